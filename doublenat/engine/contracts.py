"""What the mapping engine needs from the outside world, and how those parts fail.

The engine talks to a `Router` (the MikroTik, through RouterOS API connections) and a
`Gateway` (the VPN's NAT-PMP server). Both are injected; tests use fakes or the lab's
emulators behind the real adapters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

from doublenat.protocol.natpmp import Proto, Result

# ------------------------------------------------------------------- router


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A dst-nat rule as doublenat writes it."""

    proto: Proto
    interface: str
    dst_port: int
    to_address: IPv4Address
    to_port: int
    comment: str


@dataclass(frozen=True, slots=True)
class NatRule:
    """A dstnat rule as read back from the router (any owner)."""

    rule_id: str
    protocol: str  # "tcp", "udp", "" (any) or something else
    in_interface: str
    dst_port: str  # RouterOS syntax: "80", "80,443", "1000-2000" or ""
    to_addresses: str
    to_ports: str
    comment: str
    disabled: bool = False


class RouterError(Exception):
    """Base of router failures; messages never carry the API password."""


class RouterUnavailable(RouterError):
    """Transport failure, timeout, `!fatal` or login failure: the call did not complete."""


class RouterTrap(RouterError):
    """The router answered `!trap`: the request was refused, the connection is fine."""


class NoSuchItem(RouterTrap):
    """`no such item`: the rule id does not exist (any more)."""


class Router(Protocol):
    def add_rule(self, spec: RuleSpec) -> str:
        """Create the rule, return its id. Retries once if a pooled connection was dead,
        checking by comment first, so a rule is never written twice."""
        ...

    def remove_rule(self, rule_id: str) -> bool:
        """Remove a rule; False if it was already gone."""
        ...

    def update_rule(self, rule_id: str, **changes: str) -> None:
        """Change properties of a rule (e.g. dst_port, to_ports, in_interface)."""
        ...

    def list_rules(self) -> list[NatRule]:
        """Every rule of chain dstnat."""
        ...

    def find_rules(self, comment: str) -> list[NatRule]:
        """The dstnat rules carrying exactly this comment."""
        ...

    def route_interface(self, destination: str) -> str | None:
        """The interface the router would use toward `destination`, or None."""
        ...


# ------------------------------------------------------------------ gateway


@dataclass(frozen=True, slots=True)
class AddressAnswer:
    result: Result
    address: IPv4Address
    epoch: int


@dataclass(frozen=True, slots=True)
class MapAnswer:
    result: Result
    external_port: int
    lifetime: int
    epoch: int


class GatewayError(Exception):
    """The gateway did not give a usable answer within the retransmission budget."""


class Gateway(Protocol):
    def public_address(self) -> AddressAnswer: ...

    def map(
        self, proto: Proto, internal_port: int, suggested_port: int, lifetime: int
    ) -> MapAnswer:
        """Create, renew (lifetime > 0) or delete (lifetime 0) an upstream mapping."""
        ...


# -------------------------------------------------------------------- clock


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds on a monotonic clock."""
        ...


monotonic: Clock = time.monotonic
