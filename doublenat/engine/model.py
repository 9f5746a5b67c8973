"""The values the engine keeps: mapping keys, leases, rules in flight, rule comments.

All frozen: the state owner (`engine.state.MappingTable`) swaps whole values, so a
reader never sees half of a change.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from ipaddress import IPv4Address

from doublenat.engine.contracts import NatRule, RuleRef, RuleSpec
from doublenat.protocol.natpmp import Proto
from doublenat.settings import RULE_PREFIX

FOREVER = math.inf


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
    rule: RuleRef
    interface: str
    external_port: int  # what the gateway granted and the client was told
    expires_at: float  # the mapping ends if no renewal arrives before this
    told: int  # the lifetime the client was last told
    requested: int  # the lifetime the client last asked for (capped): asked upstream
    upstream_expires_at: float
    upstream_renewed_at: float
    generation: int  # the upstream state generation this lease was last confirmed in
    static: bool = False  # a STATIC_MAPPINGS entry: never expires, counts in no quota
    # External mode: the gateway gave this lease's router port to another mapping after
    # an upstream loss; its rule is disabled (and its port free) until its own re-map.
    parked: bool = False
    # An update of the rule whose outcome is unknown (the connection broke after it was
    # sent) meant to move it to this port: the port stays reserved until a listing
    # shows where the rule is (engine.reconcile corrects it then).
    moving_to: int | None = None

    @property
    def comment(self) -> str:
        return rule_comment(self.key, self.upstream_port)

    @property
    def held_router_port(self) -> int | None:
        """The router port this lease reserves: none while parked."""
        return None if self.parked else self.router_port

    @property
    def upstream_lifetime(self) -> float:
        return self.upstream_expires_at - self.upstream_renewed_at

    def rule_spec(self, interface: str | None = None) -> RuleSpec:
        return RuleSpec(self.key.proto, interface or self.interface, self.router_port,
                        self.key.client, self.to_port, self.comment)


@dataclass(frozen=True, slots=True)
class Write:
    """A rule being created (or restored for a live lease), recorded before the call that
    creates it starts, so that nothing can interrupt it unnoticed.

    `unknown`: the call failed in a way that leaves open whether the router executed it;
    the router port stays reserved until a listing of the router's rules settles it.
    """

    key: MappingKey
    upstream_port: int
    router_port: int | None  # None until known (external mode asks the gateway first)
    interface: str
    restore: bool = False  # re-creating the missing rule of a live lease
    rule: RuleRef | None = None  # the add returned this id
    unknown: bool = False
    absent_from: int = 0  # listings that did not show it since it became unknown
    static: bool = False

    @property
    def comment(self) -> str:
        return rule_comment(self.key, self.upstream_port)


@dataclass(frozen=True, slots=True)
class Doomed:
    """A rule to remove: its mapping ended, or it was never owned by a live mapping.

    Its router port stays reserved until the router confirms the rule is gone.
    """

    rule: RuleRef
    comment: str
    key: MappingKey | None  # None for a prefixed rule whose comment cannot be read
    router_port: int | None
    reason: str
    token: int  # the table's handle: stays the same if the rule is re-identified
    # The rule may sit on this port instead (an unsettled move): also held until removed.
    also_port: int | None = None


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


@dataclass(frozen=True, slots=True)
class Candidate:
    """A rule of an earlier run, waiting for its client to renew (adoption)."""

    owned: OwnedRule
    rule: RuleRef
    seen_at: float

    @property
    def key(self) -> MappingKey:
        return self.owned.key

    @property
    def comment(self) -> str:
        return self.owned.rule.comment


_COMMENT = re.compile(
    re.escape(RULE_PREFIX) + r"(tcp|udp) (\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5}) via (\d{1,5})"
)


def rule_comment(key: MappingKey, upstream_port: int) -> str:
    """The rule comment: doublenat's mark, the mapping it belongs to, its upstream port."""
    return f"{RULE_PREFIX}{key.proto.label} {key.client}:{key.internal_port} via {upstream_port}"


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


def granted_lifetime(requested: int, upstream: float, cap: int) -> int:
    """What the client is told: never more than it asked for, the gateway gave, or the cap."""
    return int(max(0, min(requested, upstream, cap)))
