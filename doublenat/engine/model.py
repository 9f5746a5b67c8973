"""The values the engine keeps: mapping keys, live leases, rule comments, lifetimes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address

from doublenat.engine.contracts import NatRule, RuleSpec
from doublenat.protocol.natpmp import Proto
from doublenat.settings import RULE_PREFIX


@dataclass(frozen=True, slots=True, order=True)
class MappingKey:
    """A mapping is one client's internal port for one protocol (RFC 6886 3.3)."""

    client: IPv4Address
    proto: Proto
    internal_port: int

    def __str__(self) -> str:
        return f"{self.proto.label} {self.client}:{self.internal_port}"


@dataclass(frozen=True, slots=True)
class Lease:
    """A live double mapping: one router rule plus one upstream mapping.

    Times are on the engine's monotonic clock.
    """

    key: MappingKey
    upstream_port: int  # the internal port doublenat holds at the gateway
    router_port: int  # dst-port of the rule on the VPN interface
    to_port: int  # to-ports of the rule: the client's port
    rule_id: str
    interface: str
    external_port: int  # what the gateway granted and the client was told
    expires_at: float  # the mapping ends if no renewal arrives before this
    upstream_expires_at: float
    upstream_renewed_at: float
    generation: int  # the upstream state generation this lease was last confirmed in

    @property
    def comment(self) -> str:
        return rule_comment(self.key, self.upstream_port)

    def rule_spec(self) -> RuleSpec:
        return RuleSpec(
            self.key.proto,
            self.interface,
            self.router_port,
            self.key.client,
            self.to_port,
            self.comment,
        )


_COMMENT = re.compile(
    re.escape(RULE_PREFIX) + r"(tcp|udp) (\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}) via (\d{1,5})"
)


def rule_comment(key: MappingKey, upstream_port: int) -> str:
    """The rule comment: doublenat's mark, the mapping it belongs to, its upstream port."""
    return f"{RULE_PREFIX}{key.proto.label} {key.client}:{key.internal_port} via {upstream_port}"


@dataclass(frozen=True, slots=True)
class OwnedRule:
    """A rule on the router whose comment says doublenat made it."""

    rule: NatRule
    key: MappingKey
    upstream_port: int

    @property
    def router_port(self) -> int | None:
        return int(self.rule.dst_port) if self.rule.dst_port.isdigit() else None

    @property
    def to_port(self) -> int | None:
        return int(self.rule.to_ports) if self.rule.to_ports.isdigit() else None


def parse_owned(rule: NatRule) -> OwnedRule | None:
    """Recognise one of doublenat's rules; None for anyone else's."""
    match = _COMMENT.fullmatch(rule.comment)
    if not match:
        return None
    proto, client, internal, upstream = match.groups()
    try:
        key = MappingKey(IPv4Address(client), Proto.from_label(proto), int(internal))
    except ValueError:
        return None
    if not 0 <= key.internal_port <= 0xFFFF or not 0 < int(upstream) <= 0xFFFF:
        return None
    return OwnedRule(rule, key, int(upstream))


def is_prefixed(rule: NatRule) -> bool:
    return rule.comment.startswith(RULE_PREFIX)


def granted_lifetime(requested: int, upstream: int, cap: int) -> int:
    """What the client is told: never more than it asked for, the gateway gave, or the cap."""
    return max(0, min(requested, upstream, cap))
