"""What the mapping engine needs from the outside world, and how those parts fail.

The engine talks to a `Router` (the MikroTik, through RouterOS API connections) and a
`Gateway` (the VPN's NAT-PMP server). Both are injected; tests use fakes or the lab's
emulators behind the real adapters.

Router failures are classified once, by the adapter, into the types below; the engine
acts on the type and never reads RouterOS's wording.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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
class RuleRef:
    """A rule id, and the router session it was learned in.

    A session is one boot of the router as the adapter sees it: ids are only meaningful
    within it (a restarted router may renumber its rules). An id from another session is
    trusted only after the rule's comment is confirmed.
    """

    rule_id: str
    session: int


@dataclass(frozen=True, slots=True)
class NatRule:
    """A dstnat rule as read back from the router (any owner)."""

    rule_id: str
    protocol: str  # "tcp", "udp", "" (any) or something else
    in_interface: str  # a name, "", "all-ppp"-like groups, or a negation "!ether1"
    dst_port: str  # RouterOS syntax: "80", "80,443", "1000-2000" or ""
    to_addresses: str
    to_ports: str
    comment: str
    disabled: bool = False
    in_interface_list: str = ""
    session: int = 0  # the router session the listing was made in

    @property
    def ref(self) -> RuleRef:
        return RuleRef(self.rule_id, self.session)


Row = Mapping[str, str]


class RouterError(Exception):
    """Base of router failures; messages never carry the API password."""


class RouterUnavailable(RouterError):
    """Transport failure, timeout, `!fatal` or login failure: the call did not complete,
    and a write may or may not have taken effect."""


class NotSent(RouterUnavailable):
    """The router could not be reached (no connection, login refused, backing off, all
    connections busy): the command was never sent, so it certainly did not take effect."""


class RouterTrap(RouterError):
    """The router answered `!trap`: the command was refused, nothing changed, the
    connection is fine."""


class NoSuchItem(RouterTrap):
    """The rule id does not exist (any more)."""


class UnknownCommand(RouterTrap):
    """This RouterOS has no such menu or command (e.g. /ip/route/check on 7.0-7.17)."""


class NotPermitted(RouterTrap):
    """The API user's group lacks a policy the command needs."""


class InvalidValue(RouterTrap):
    """A value was refused, e.g. an `in-interface` that no longer exists."""


class AlreadyExists(RouterTrap):
    """The router refused a duplicate."""


class StaleSession(RouterError):
    """Not sent: the rule id is from an earlier router session; confirm it by comment."""


class Router(Protocol):
    def add_rule(self, spec: RuleSpec) -> RuleRef:
        """Create the rule, return its id. Retries once if a pooled connection was dead,
        checking by comment first, so a rule is never written twice."""
        ...

    def remove_rule(self, ref: RuleRef) -> None:
        """Remove a rule by id: NoSuchItem if it is not there; StaleSession (nothing sent)
        if the id is from another router session."""
        ...

    def update_rule(self, ref: RuleRef, **changes: str) -> None:
        """Change properties of a rule (dst_port, to_ports, in_interface...); fails like
        `remove_rule`."""
        ...

    def list_rules(self) -> list[NatRule]:
        """Every rule of chain dstnat."""
        ...

    def find_rules(self, comment: str) -> list[NatRule]:
        """The dstnat rules carrying exactly this comment."""
        ...

    def route_check(self, destination: str) -> list[Row]:
        """`/ip/route/check` rows toward `destination`; UnknownCommand where the version
        has none."""
        ...

    def routes(self) -> list[Row]:
        """The active IPv4 routes (`/ip/route/print`)."""
        ...

    def interfaces(self) -> list[Row]:
        """`/interface/print` rows: name, type, running, disabled."""
        ...

    def resource(self) -> Row:
        """`/system/resource/print`: version, board-name, uptime..."""
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

    @property
    def granted(self) -> bool:
        return self.result == Result.SUCCESS and self.external_port != 0 and self.lifetime > 0


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
