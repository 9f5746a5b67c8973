"""What must hold after every step of the simulation, and after a reconciliation or a
shutdown. Each check raises `Violation` with a message that says what broke.

Ownership of a rule on the router: a record claims a prefixed rule when the rule carries
its comment and either the record's rule id is from the router's current session and
names that rule, or the record knows no id (a write in flight or of unknown outcome), or
its id is from an earlier session (the engine then finds its rule by comment). A lease
and the write restoring its rule are one owner. "Exactly one owner" is what keeps every
removal by id or by comment from touching a rule that someone else still needs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from doublenat.engine.contracts import NatRule, RuleRef
from doublenat.engine.state import MappingTable, StateError

if TYPE_CHECKING:
    from tests.sim.world import SimGateway, SimRouter


class Violation(AssertionError):
    """An invariant of the mapping engine does not hold."""


@dataclass(frozen=True, slots=True)
class Owner:
    label: str
    comment: str
    refs: tuple[RuleRef | None, ...]  # None: claims by comment
    keeps: bool  # wants the rule to stay (a mapping, a candidate, a write in flight)

    def claims(self, rule: NatRule, session: int) -> bool:
        for ref in self.refs:
            if ref is None or ref.session != session or ref.rule_id == rule.rule_id:
                return True
        return False


def owners(table: MappingTable) -> dict[str, list[Owner]]:
    """Every record that may claim a rule, by comment."""
    out: dict[str, list[Owner]] = defaultdict(list)
    restoring = {w.key: w for w in table.writes.values() if w.restore}

    def write_ref(write) -> RuleRef | None:  # type: ignore[no-untyped-def]
        return None if write.unknown or write.rule is None else write.rule

    for key, lease in table.leases.items():
        refs: list[RuleRef | None] = [lease.rule]
        restore = restoring.get(key)
        if restore is not None and restore.comment == lease.comment:
            refs.append(write_ref(restore))
        out[lease.comment].append(Owner(f"mapping {key}", lease.comment, tuple(refs), True))
    for write in table.writes.values():
        lease = table.leases.get(write.key)
        if write.restore and lease is not None and lease.comment == write.comment:
            continue  # one owner with its lease
        label = "restore" if write.restore else "write"
        state = " (unknown outcome)" if write.unknown else ""
        # A write of unknown outcome only ever ends in the removal of what it finds.
        out[write.comment].append(Owner(f"{label} {write.comment!r}{state}", write.comment,
                                        (write_ref(write),), not write.unknown))
    for key, candidate in table.candidates.items():
        out[candidate.comment].append(Owner(f"candidate {key}", candidate.comment,
                                            (candidate.rule,), True))
    for doomed in table.doomed.values():
        out[doomed.comment].append(Owner(
            f"rule to remove {doomed.rule.rule_id}@{doomed.rule.session} ({doomed.reason})",
            doomed.comment, (doomed.rule,), False))
    return out


def check_ownership(table: MappingTable, router: SimRouter, exempt: set[int],
                    *, at_least_one_only: bool = False) -> None:
    """Every prefixed rule (but those the engine has not listed yet) has an owner; one
    that keeps it is its only owner (records that remove it may be several: the rule
    goes either way, and a second removal finds it gone)."""
    by_comment = owners(table)
    session = router.session
    for rule_id, rule in router.prefixed().items():
        if router.uid[rule_id] in exempt:
            continue
        claimants = [o for o in by_comment.get(rule.comment, ()) if o.claims(rule, session)]
        if not claimants:
            raise Violation(f"rule {rule_id} ({rule.comment!r}, port {rule.dst_port} to "
                            f"{rule.to_addresses}) is on the router but no record owns it: "
                            "nothing would remove it")
        if at_least_one_only or len(claimants) == 1:
            continue
        if any(o.keeps for o in claimants):
            raise Violation(f"rule {rule_id} ({rule.comment!r}) is claimed by "
                            f"{len(claimants)} records, one of which keeps it: "
                            f"{[o.label for o in claimants]}")


def check_forwarding(router: SimRouter, ignore: set[int]) -> None:
    """No (protocol, router port) forwards to two clients among doublenat's rules."""
    seen: dict[tuple[str, str], tuple[str, str]] = {}
    for rule_id, rule in router.prefixed().items():
        if router.uid[rule_id] in ignore or rule.disabled:
            continue
        where = (rule.protocol, rule.dst_port)
        other = seen.setdefault(where, (rule.to_addresses, rule_id))
        if other[0] != rule.to_addresses:
            raise Violation(f"{rule.protocol} port {rule.dst_port} forwards to two clients: "
                            f"{other[0]} (rule {other[1]}) and {rule.to_addresses} "
                            f"(rule {rule_id})")


def check_upstream_ports(table: MappingTable) -> None:
    """One record per upstream port and protocol (the gateway keys mappings by them)."""
    seen: dict[tuple[object, int], str] = {}

    def claim(proto: object, port: int, who: str) -> None:
        other = seen.setdefault((proto, port), who)
        if other != who:
            raise Violation(f"upstream port {port} held by {other} and {who}")

    for key, lease in table.leases.items():
        claim(key.proto, lease.upstream_port, f"mapping {key}")
    for write in table.writes.values():
        if not write.restore:
            claim(write.key.proto, write.upstream_port, f"write {write.comment!r}")
    for key, candidate in table.candidates.items():
        claim(key.proto, candidate.owned.upstream_port, f"candidate {key}")
    for (proto, port), key in table.upstream_ends.items():
        claim(proto, port, f"pending upstream delete of {key}")


def check_state(table: MappingTable, router: SimRouter, exempt: set[int],
                admin: set[int]) -> None:
    """After every step."""
    try:
        table.check()
    except StateError as exc:
        raise Violation(f"table: {exc}") from exc
    check_ownership(table, router, exempt)
    check_forwarding(router, admin)
    check_upstream_ports(table)


def check_foreign(router: SimRouter, foreign: dict[int, NatRule]) -> None:
    """Rules of other owners are never changed or removed."""
    by_uid = {router.uid[i]: r for i, r in router.rules.items()}
    for uid, rule in foreign.items():
        now = by_uid.get(uid)
        if now is None:
            raise Violation(f"foreign rule {rule.comment!r} was removed")
        if (now.protocol, now.in_interface, now.dst_port, now.to_addresses, now.to_ports,
                now.comment) != (rule.protocol, rule.in_interface, rule.dst_port,
                                 rule.to_addresses, rule.to_ports, rule.comment):
            raise Violation(f"foreign rule {rule.comment!r} was changed: {now}")


def check_leases_have_rules(table: MappingTable, router: SimRouter, interface: str,
                            skip: Iterable[object] = ()) -> None:
    """After a reconciliation that completed with the router healthy: every live mapping
    has its rule, as the mapping says it is, on the current interface, known by id."""
    skipped = set(skip)
    rules = router.rules
    for key, lease in table.leases.items():
        if key in skipped:
            continue
        ref = lease.rule
        rule = rules.get(ref.rule_id) if ref.session == router.session else None
        if lease.parked:
            # Its port is another mapping's: its rule, if still there, must be disabled.
            if any(r.comment == lease.comment and not r.disabled for r in rules.values()):
                raise Violation(f"parked mapping {key} has an enabled rule")
            continue
        if rule is None or rule.comment != lease.comment:
            same = [i for i, r in rules.items() if r.comment == lease.comment]
            raise Violation(f"mapping {key} has no rule after a healthy reconciliation "
                            f"(it knows {ref.rule_id}@{ref.session}, router session "
                            f"{router.session}; rules with its comment: {same})")
        wanted = (key.proto.label, interface, str(lease.router_port), str(key.client),
                  str(lease.to_port))
        actual = (rule.protocol, rule.in_interface, rule.dst_port, rule.to_addresses,
                  rule.to_ports) + (("disabled",) if rule.disabled else ())
        if wanted != actual:
            raise Violation(f"mapping {key}'s rule {ref.rule_id} is {actual}, the mapping "
                            f"says {wanted}")


def check_converged(table: MappingTable, router: SimRouter, interface: str) -> None:
    """After two healthy reconciliations and a flush with nothing else running: nothing
    in flight, nothing to remove, and the router's doublenat rules are exactly the live
    mappings' and the adoptable ones'."""
    if table.writes or table.doomed or table.upstream_ends:
        raise Violation(f"not converged: writes {list(table.writes)}, to remove "
                        f"{[d.rule for d in table.doomed.values()]}, upstream deletes "
                        f"{list(table.upstream_ends)}")
    check_leases_have_rules(table, router, interface)
    expected = {lease.rule.rule_id for lease in table.leases.values() if not lease.parked}
    expected |= {i for i, r in router.prefixed().items()
                 if any(r.comment == lease.comment for lease in table.leases.values()
                        if lease.parked)}
    for candidate in table.candidates.values():
        if candidate.rule.session != router.session:
            raise Violation(f"candidate {candidate.key} known by a stale id")
        expected.add(candidate.rule.rule_id)
    actual = set(router.prefixed())
    if actual != expected:
        raise Violation(f"router's doublenat rules {sorted(actual)} != live and adoptable "
                        f"{sorted(expected)}")


def check_shutdown(table: MappingTable, router: SimRouter, gateway: SimGateway,
                   exempt: set[int], run: int, *, router_clean: bool,
                   gateway_clean: bool, given_up: set[tuple[object, int]] = frozenset()
                   ) -> None:
    """After the cleanup at shutdown (the process gone): what is left on the router and
    the gateway is what the table still records (`describe_leftovers`); nothing at all
    when the cleanup ran to its end with the router (or the gateway) healthy."""
    try:
        table.check()
    except StateError as exc:
        raise Violation(f"table at shutdown: {exc}") from exc
    left = table.describe_leftovers()
    if len(left) != table.leftovers():
        raise Violation(f"leftovers described {len(left)} != counted {table.leftovers()}")
    check_ownership(table, router, exempt, at_least_one_only=True)
    if router_clean:
        stray = [r for i, r in router.prefixed().items() if router.uid[i] not in exempt]
        if stray or table.leases or table.candidates or table.writes or table.doomed:
            raise Violation(f"clean shutdown left rules {stray}; report: {left}")
    accounted: set[tuple[object, int]] = set(table.upstream_ends)
    accounted |= {(k.proto, lease.upstream_port) for k, lease in table.leases.items()}
    accounted |= {(w.key.proto, w.upstream_port) for w in table.writes.values()}
    accounted |= {(k.proto, c.owned.upstream_port) for k, c in table.candidates.items()}
    ours = {k: v for k, v in gateway.live().items() if v[2] == run and k not in given_up}
    unreported = sorted((p.label, port) for (p, port) in ours if (p, port) not in accounted)
    if unreported:
        raise Violation(f"shutdown left upstream mappings the report does not count: "
                        f"{unreported}; report: {left}")
    if gateway_clean and table.upstream_ends:
        raise Violation(f"clean shutdown left upstream deletes unsent: "
                        f"{list(table.upstream_ends)}")
