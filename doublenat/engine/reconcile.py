"""Reconciliation: make the router's doublenat rules equal the live mappings.

`plan` is pure: from the rules listed on the router and a snapshot of the engine's state
it decides what to adopt, remove and restore. `Reconciler` carries the plan out, each
step under the mapping's lock and re-checked there, so it never races a creation,
renewal or deletion of the same mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, replace

import gevent
from gevent.event import Event

from doublenat.engine.contracts import (
    Clock,
    NatRule,
    Router,
    RouterError,
    RouterTrap,
    monotonic,
)
from doublenat.engine.mapper import Candidate, Mapper
from doublenat.engine.model import Lease, MappingKey, OwnedRule, is_prefixed, parse_owned

log = logging.getLogger("doublenat.reconcile")


class NoInterface(Exception):
    """The router has no route toward the VPN gateway to derive the interface from."""


@dataclass(frozen=True, slots=True)
class Plan:
    foreign: list[NatRule] = field(default_factory=list)  # rules of other owners
    adopt: list[OwnedRule] = field(default_factory=list)  # earlier rules awaiting renewal
    remove: list[tuple[NatRule, str]] = field(default_factory=list)  # (rule, why)
    restore: list[MappingKey] = field(default_factory=list)  # live mapping, rule missing
    retarget: list[MappingKey] = field(default_factory=list)  # rule on an old interface
    forget_candidates: list[MappingKey] = field(default_factory=list)  # their rule is gone
    forget_garbage: list[str] = field(default_factory=list)  # already gone from the router


def plan(
    rules: list[NatRule],
    leases: Mapping[MappingKey, Lease],
    candidates: Mapping[MappingKey, Candidate],
    pending: Collection[str],
    uncertain: Collection[str],
    garbage: Collection[str],
    interface: str,
    removed: Collection[str] = (),
) -> Plan:
    result = Plan()
    owner_of = {lease.rule_id: key for key, lease in leases.items()}
    candidate_ids = {c.owned.rule.rule_id for c in candidates.values()}
    present: set[str] = set()
    for rule in rules:
        present.add(rule.rule_id)
        if not is_prefixed(rule):
            result.foreign.append(rule)
            continue
        if rule.rule_id in owner_of or rule.rule_id in candidate_ids:
            continue
        if rule.comment in pending:
            continue  # being created right now; its mapping is not installed yet
        if rule.rule_id in removed:
            continue  # its mapping just ended; the removal was under way at the listing
        owned = parse_owned(rule)
        if rule.rule_id in garbage:
            result.remove.append((rule, "mapping already ended"))
        elif owned is None:
            result.remove.append((rule, "prefixed comment doublenat cannot read"))
        elif rule.comment in uncertain:
            result.remove.append((rule, "left by a write that failed midway"))
        elif owned.key in leases or owned.key in candidates:
            result.remove.append((rule, "duplicate of a mapping's rule"))
        elif owned.router_port is None:
            result.remove.append((rule, "dst-port doublenat cannot read"))
        else:
            result.adopt.append(owned)
    for key, lease in leases.items():
        if lease.rule_id not in present:
            result.restore.append(key)
        elif lease.interface != interface:
            result.retarget.append(key)
    for key, candidate in candidates.items():
        if candidate.owned.rule.rule_id not in present:
            result.forget_candidates.append(key)
    result.forget_garbage.extend(rule_id for rule_id in garbage if rule_id not in present)
    return result


@dataclass(slots=True)
class Report:
    interface: str = ""
    rules: int = 0
    adopted: int = 0
    removed: int = 0
    restored: int = 0
    retargeted: int = 0


class Reconciler:
    def __init__(
        self,
        mapper: Mapper,
        router: Router,
        gateway_ip: str,
        configured_interface: str | None = None,
    ) -> None:
        self.mapper = mapper
        self.router = router
        self.gateway_ip = gateway_ip
        self.configured_interface = configured_interface
        self._uncertain_age: dict[str, int] = {}
        self.totals: dict[str, int] = {"adopted": 0, "removed": 0, "restored": 0, "runs": 0}

    def detect_interface(self) -> str:
        if self.configured_interface:
            return self.configured_interface
        interface = self.router.route_interface(self.gateway_ip)
        if not interface:
            raise NoInterface(f"the router has no route toward VPN_GATEWAY {self.gateway_ip}")
        return interface

    def run_once(self) -> Report:
        mapper = self.mapper
        try:
            interface = self.detect_interface()
        except NoInterface:
            # Never guess (a LAN bridge would hijack LAN traffic): refuse new rules.
            mapper.router_ready = False
            raise
        # Failures known before the listing are judged by it; later ones wait for the next.
        uncertain_before = set(mapper.uncertain)
        garbage_before = set(mapper.garbage)
        with mapper.watching_removals() as removed:
            rules = self.router.list_rules()
        the_plan = plan(rules, mapper.leases, mapper.candidates, mapper.pending,
                        uncertain_before, garbage_before, interface, removed)
        report = Report(interface=interface, rules=len(rules))
        if mapper.interface not in (None, interface):
            log.warning("VPN interface changed, moving rules",
                        extra={"event": "interface.changed", "previous": mapper.interface,
                               "interface": interface})
        unreadable = mapper.ports.load_foreign(the_plan.foreign, interface)
        for rule in unreadable:
            log.warning("cannot read dst-port of a rule; its ports are not avoided",
                        extra={"event": "rule.unreadable", "rule_id": rule.rule_id,
                               "dst_port": rule.dst_port})
        mapper.interface = interface
        mapper.router_ready = True
        for owned in the_plan.adopt:
            self._hold(owned)
            mapper.candidates[owned.key] = Candidate(owned, owned.rule.in_interface,
                                                     mapper.clock())
            report.adopted += 1
            log.info("rule of an earlier run kept for adoption",
                     extra={"event": "rule.adoptable", "rule_id": owned.rule.rule_id,
                            "client": str(owned.key.client), "protocol": owned.key.proto.label,
                            "internal_port": owned.key.internal_port,
                            "router_port": owned.router_port})
        listed = {r.rule_id for r in rules}
        for key in the_plan.forget_candidates:
            with mapper.locked(key):
                candidate = mapper.candidates.get(key)
                if candidate is not None and candidate.owned.rule.rule_id not in listed:
                    del mapper.candidates[key]
                    self._release(candidate.owned)
        for rule_id in the_plan.forget_garbage:
            mapper.forget_garbage(rule_id)
        for rule, why in the_plan.remove:
            report.removed += self._remove(rule, why)
        for key in the_plan.restore:
            report.restored += self._restore(key, interface)
        for key in the_plan.retarget:
            report.retargeted += self._retarget(key, interface)
        self._age_uncertain(uncertain_before)
        for name in ("adopted", "removed", "restored"):
            self.totals[name] += getattr(report, name)
        self.totals["runs"] += 1
        log.info("reconciled", extra={"event": "reconcile.done", **asdict(report)})
        return report

    # ------------------------------------------------------------ steps

    def _hold(self, owned: OwnedRule) -> None:
        key = owned.key
        if owned.router_port is not None:
            self.mapper.ports.hold_router(key.proto, owned.router_port, key.client)
        self.mapper.ports.hold_upstream(key.proto, owned.upstream_port, key.client)

    def _release(self, owned: OwnedRule) -> None:
        key = owned.key
        if owned.router_port is not None:
            self.mapper.ports.release_router(key.proto, owned.router_port, key.client)
        self.mapper.ports.release_upstream(key.proto, owned.upstream_port, key.client)

    def _remove(self, rule: NatRule, why: str) -> int:
        mapper = self.mapper
        owned = parse_owned(rule)
        key = owned.key if owned else None
        if key is not None:
            with mapper.locked(key):
                lease = mapper.leases.get(key)
                candidate = mapper.candidates.get(key)
                if (lease is not None and lease.rule_id == rule.rule_id) or (
                    candidate is not None and candidate.owned.rule.rule_id == rule.rule_id
                ):
                    return 0  # someone took it over since the listing
                return self._remove_now(rule, why)
        return self._remove_now(rule, why)

    def _remove_now(self, rule: NatRule, why: str) -> int:
        try:
            self.router.remove_rule(rule.rule_id)
        except RouterError as exc:
            log.warning("could not remove a stray rule", extra={
                "event": "rule.remove_failed", "rule_id": rule.rule_id, "reason": str(exc)})
            return 0
        self.mapper.forget_garbage(rule.rule_id)
        log.info("removed a rule no mapping owns", extra={
            "event": "rule.removed", "rule_id": rule.rule_id, "comment": rule.comment,
            "reason": why})
        return 1

    def _restore(self, key: MappingKey, interface: str) -> int:
        mapper = self.mapper
        with mapper.locked(key):
            lease = mapper.leases.get(key)
            if lease is None:
                return 0
            lease = replace(lease, interface=interface)
            try:
                # Confirm under the lock: a rule written after the listing is not missing.
                if self.router.find_rules(lease.comment):
                    return 0
                rule_id = self.router.add_rule(lease.rule_spec())
            except RouterError as exc:
                log.warning("could not restore a missing rule", extra={
                    "event": "rule.restore_failed", "client": str(key.client),
                    "protocol": key.proto.label, "internal_port": key.internal_port,
                    "reason": str(exc)})
                return 0
            mapper.leases[key] = replace(lease, rule_id=rule_id)
            log.warning("restored a live mapping's missing rule", extra={
                "event": "rule.restored", "client": str(key.client),
                "protocol": key.proto.label, "internal_port": key.internal_port,
                "router_port": lease.router_port, "rule_id": rule_id})
            return 1

    def _retarget(self, key: MappingKey, interface: str) -> int:
        mapper = self.mapper
        with mapper.locked(key):
            lease = mapper.leases.get(key)
            if lease is None or lease.interface == interface:
                return 0
            try:
                self.router.update_rule(lease.rule_id, in_interface=interface)
            except RouterTrap as exc:
                log.warning("could not move a rule to the new interface", extra={
                    "event": "rule.retarget_failed", "rule_id": lease.rule_id,
                    "reason": str(exc)})
                return 0
            mapper.leases[key] = replace(lease, interface=interface)
            return 1

    def _age_uncertain(self, seen: set[str]) -> None:
        # A failed write may still land late (a stalled connection); watch it two rounds.
        for comment in seen:
            age = self._uncertain_age.get(comment, 0) + 1
            if age >= 2:
                self.mapper.uncertain.discard(comment)
                self._uncertain_age.pop(comment, None)
            else:
                self._uncertain_age[comment] = age


class ReconcileLoop:
    """Runs the reconciler at start, every interval, and sooner when the engine asks.

    While the router is unreachable it retries when the router client says a new
    connection is worth trying (its backoff), and no more often than once a second.
    """

    def __init__(self, reconciler: Reconciler, interval: float,
                 clock: Clock = monotonic) -> None:
        self.reconciler = reconciler
        self.interval = interval
        self.clock = clock
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        self.last_error: str | None = None
        self.synced = Event()

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.clear()
            attempt = self.clock()
            try:
                self.reconciler.run_once()
            except (RouterError, NoInterface) as exc:
                self._failed(str(exc))
                self._wait_retry(attempt)
                continue
            except Exception:
                log.exception("reconciliation failed", extra={"event": "reconcile.error"})
                self._wait_retry(attempt)
                continue
            if self.last_error is not None:
                log.info("router synchronised again", extra={"event": "reconcile.recovered"})
            self.last_error = None
            self.synced.set()
            self._wake.wait(self.interval)

    def _failed(self, reason: str) -> None:
        if self.last_error != reason:
            log.warning("router not synchronised; retrying", extra={
                "event": "reconcile.failed", "reason": reason})
        self.last_error = reason

    def _wait_retry(self, attempt: float) -> None:
        retry_at = getattr(self.reconciler.router, "retry_at", lambda: 0.0)()
        gevent.sleep(max(attempt + _MIN_RETRY_GAP, retry_at) - self.clock())
        self._wake.clear()


_MIN_RETRY_GAP = 1.0
