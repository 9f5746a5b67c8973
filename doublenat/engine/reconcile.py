"""Reconciliation: make the router's doublenat rules equal the mapping state.

At start and every RECONCILE_INTERVAL (and sooner when the engine asks):
1. detect the VPN interface (engine.detect) and whether it may carry rules;
2. list the router's dstnat rules;
3. `plan` (pure) sorts them against a snapshot of the table: whose each rule is, which
   lease's rule is missing or was renumbered, what to adopt or remove;
4. `Reconciler` carries the plan out, each step under the mapping's lock and re-checked
   there, so it never races a creation, renewal or deletion of the same mapping.

A lease is matched to its rule by comment, not by the id it remembers: after a router
restart ids may have changed, and the listing re-identifies them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace

import gevent
from gevent.event import Event

from doublenat.engine import ruleops
from doublenat.engine.contracts import (
    Clock,
    NatRule,
    Router,
    RouterError,
    RouterUnavailable,
    RuleRef,
    monotonic,
)
from doublenat.engine.interface import SETTING_NAME, Detection, detect_interface
from doublenat.engine.mapper import Mapper
from doublenat.engine.model import (
    Candidate,
    Doomed,
    Lease,
    MappingKey,
    OwnedRule,
    Write,
    is_prefixed,
    parse_owned,
)
from doublenat.engine.state import InterfaceSource, RouterView

log = logging.getLogger("doublenat.reconcile")

class NoInterface(Exception):
    """The VPN interface could not be found, or what was found may not carry rules."""


@dataclass(frozen=True, slots=True)
class Plan:
    foreign: list[NatRule] = field(default_factory=list)  # rules of other owners
    found: dict[MappingKey, RuleRef] = field(default_factory=dict)  # lease rule re-identified
    found_from: dict[MappingKey, RuleRef] = field(default_factory=dict)  # the id it replaces
    restore: list[MappingKey] = field(default_factory=list)  # live mapping, rule missing
    retarget: list[MappingKey] = field(default_factory=list)  # rule on an old interface
    adopt: list[OwnedRule] = field(default_factory=list)  # earlier rules awaiting renewal
    candidates_found: dict[MappingKey, RuleRef] = field(default_factory=dict)
    candidates_gone: list[Candidate] = field(default_factory=list)
    doomed_listed: list[tuple[Doomed, RuleRef]] = field(default_factory=list)  # remove again
    doomed_gone: list[Doomed] = field(default_factory=list)  # already gone from the router
    remove: list[tuple[NatRule, str]] = field(default_factory=list)  # (rule, why)
    # A live mapping's rule that is not as the mapping says (an update of unknown
    # outcome, or someone edited it): corrected under the mapping's lock.
    drifted: list[MappingKey] = field(default_factory=list)


def expected_fields(lease: Lease) -> dict[str, str]:
    """What a lease's rule must say (as `update_rule` names the properties)."""
    return {"dst_port": str(lease.router_port), "to_ports": str(lease.to_port),
            "in_interface": lease.interface, "disabled": "yes" if lease.parked else "no"}


def rule_fields(rule: NatRule) -> dict[str, str]:
    return {"dst_port": rule.dst_port, "to_ports": rule.to_ports,
            "in_interface": rule.in_interface, "disabled": "yes" if rule.disabled else "no"}


def drifted(lease: Lease, rule: NatRule) -> bool:
    expected, actual = expected_fields(lease), rule_fields(rule)
    if lease.parked:  # a parked rule only has to be disabled, wherever it points
        return actual["disabled"] != "yes"
    return expected != actual


def plan(
    rules: list[NatRule],
    leases: Mapping[MappingKey, Lease],
    writes: Mapping[str, Write],
    candidates: Mapping[MappingKey, Candidate],
    doomed: Collection[Doomed],
    interface: str | None,
    removed: Collection[RuleRef] = (),
) -> Plan:
    """Sort the listed rules. `removed`: ids removed while the listing was in flight
    (listed, yet nobody's any more); `interface` None: the interface is unknown now, so
    nothing is restored or moved."""
    result = Plan()
    by_comment: dict[str, list[NatRule]] = {}
    for rule in rules:
        if not is_prefixed(rule):
            result.foreign.append(rule)
        elif rule.ref not in removed:
            by_comment.setdefault(rule.comment, []).append(rule)
    claimed: set[str] = set()  # ids some record accounts for

    for key, lease in leases.items():
        listed = by_comment.get(lease.comment, [])
        if not listed:
            write = writes.get(lease.comment)
            # An earlier restore of unknown outcome, not listed, is no reason to wait: the
            # lease holds the port, and a copy landing late is removed as a duplicate.
            # A parked lease holds no port (another mapping has it): its rule comes back
            # on the port its own re-map grants.
            if interface is not None and not lease.parked and (
                    write is None or (write.restore and write.unknown)):
                result.restore.append(key)
            continue
        own = next((r for r in listed if r.ref == lease.rule), listed[0])
        claimed.add(own.rule_id)
        if own.ref != lease.rule:
            result.found[key] = own.ref
            result.found_from[key] = lease.rule
        for duplicate in listed:
            if duplicate is not own:
                result.remove.append((duplicate, "duplicate of a live mapping's rule"))
                claimed.add(duplicate.rule_id)
        if interface is not None and lease.interface != interface:
            result.retarget.append(key)
        if lease.moving_to is not None or drifted(lease, own):
            result.drifted.append(key)  # after any retarget: checked again, fresh

    for write in writes.values():
        # Being written, or of unknown outcome (settled apart): not this plan's to judge.
        claimed.update(r.rule_id for r in by_comment.get(write.comment, []))

    for key, candidate in candidates.items():
        listed = by_comment.get(candidate.comment, [])
        if not listed:
            result.candidates_gone.append(candidate)
            continue
        own = next((r for r in listed if r.ref == candidate.rule), listed[0])
        claimed.update(r.rule_id for r in listed)
        if own.ref != candidate.rule:
            result.candidates_found[key] = own.ref

    for entry in doomed:
        listed = by_comment.get(entry.comment, [])
        same = [r for r in listed if r.ref == entry.rule]
        if same:
            result.doomed_listed.append((entry, same[0].ref))
            claimed.add(same[0].rule_id)
        elif listed and all(r.session != entry.rule.session for r in listed):
            # Another session: the rule may have been renumbered; its comment is ours.
            result.doomed_listed.append((entry, listed[0].ref))
            claimed.add(listed[0].rule_id)
        else:
            result.doomed_gone.append(entry)

    adopting: set[MappingKey] = set()
    for listed in by_comment.values():
        for rule in listed:
            if rule.rule_id in claimed:
                continue
            owned = parse_owned(rule)
            if owned is None:
                result.remove.append((rule, "prefixed comment doublenat cannot read"))
            elif owned.key in leases or owned.key in candidates or owned.key in adopting:
                result.remove.append((rule, "duplicate of a mapping's rule"))
            elif owned.router_port is None:
                result.remove.append((rule, "dst-port doublenat cannot read"))
            else:
                adopting.add(owned.key)
                result.adopt.append(owned)
    return result


@dataclass(slots=True)
class Report:
    interface: str | None = None
    source: InterfaceSource | None = None
    rules: int = 0
    adopted: int = 0
    removed: int = 0
    restored: int = 0
    retargeted: int = 0
    reidentified: int = 0
    corrected: int = 0
    failed: int = 0


class Reconciler:
    def __init__(
        self,
        mapper: Mapper,
        router: Router,
        gateway_ip: str,
        configured_interface: str | None = None,
    ) -> None:
        self.mapper = mapper
        self.table = mapper.table
        self.router = router
        self.gateway_ip = gateway_ip
        self.configured_interface = configured_interface
        self.totals: dict[str, int] = {"adopted": 0, "removed": 0, "restored": 0, "runs": 0}
        self.last_report: Report | None = None
        self.last_detection: Detection | None = None
        self._last_problem: str | None = None

    # ------------------------------------------------------------- detection

    def detect(self) -> RouterView:
        """The interface for the rules and how it was found; NoInterface if none may be
        used."""
        detection = detect_interface(self.router, self.gateway_ip, self.configured_interface)
        self.last_detection = detection
        view = detection.view
        if view is None:
            raise NoInterface(detection.problem or "no interface")
        return view

    # ------------------------------------------------------------------- run

    def run_once(self) -> Report:
        table = self.table
        try:
            view: RouterView | None = self.detect()
            problem = None
        except NoInterface as exc:
            view, problem = None, str(exc)
        with table.listing() as listing:
            unknown_before = [c for c, w in table.writes.items() if w.unknown]
            doomed_before = set(table.doomed)
            rules = self.router.list_rules()
        report = Report(rules=len(rules))
        if view is not None:
            previous = table.router.interface if table.router is not None else None
            if previous not in (None, view.interface):
                log.warning("VPN interface changed, moving rules", extra={
                    "event": "interface.changed", "previous": previous,
                    "interface": view.interface, "source": view.source})
            table.synchronised(view)
            report.interface, report.source = view.interface, view.source
            self._problem(None)
        else:
            table.unsynchronised(problem or "")
            self._problem(problem)
        interface = view.interface if view is not None else None
        the_plan = plan(rules, table.leases, table.writes, table.candidates,
                        list(table.doomed.values()), interface, listing.removed)
        # A rule doomed while the listing was in flight may have been written after the
        # router answered: not being listed says nothing about it being gone.
        the_plan.doomed_gone[:] = [d for d in the_plan.doomed_gone if d.token in doomed_before]
        if interface is not None:
            for rule in table.load_foreign(the_plan.foreign, interface):
                log.warning("cannot read dst-port of a rule; its ports are not avoided",
                            extra={"event": "rule.unreadable", "rule_id": rule.rule_id,
                                   "dst_port": rule.dst_port})
        by_comment: dict[str, list[NatRule]] = {}
        for rule in rules:
            if rule.ref not in listing.removed:
                by_comment.setdefault(rule.comment, []).append(rule)
        doomed = table.settle_unknown(by_comment, unknown_before)
        self._apply(the_plan, doomed, view, report)
        for name in ("adopted", "removed", "restored"):
            self.totals[name] += getattr(report, name)
        self.totals["runs"] += 1
        self.last_report = report
        log.info("reconciled", extra={"event": "reconcile.done", **asdict(report)})
        if problem is not None:
            raise NoInterface(problem)
        return report

    def _problem(self, problem: str | None) -> None:
        if problem is not None and problem != self._last_problem:
            log.error("no usable VPN interface: no rule is created or moved", extra={
                "event": "interface.refused", "reason": problem, "setting": SETTING_NAME})
        elif problem is None and self._last_problem is not None:
            log.info("VPN interface usable again", extra={"event": "interface.usable"})
        self._last_problem = problem

    # ------------------------------------------------------------ steps

    def _apply(self, the_plan: Plan, doomed: list[Doomed], view: RouterView | None,
               report: Report) -> None:
        table, mapper = self.table, self.mapper
        for key, ref in the_plan.found.items():
            with mapper.locked(key):
                # Only for the lease the plan saw: waiting for the lock, the mapping may
                # have ended and another taken its key, with a rule of its own.
                lease = table.lease(key)
                if lease is not None and lease.rule == the_plan.found_from[key]:
                    table.rule_found(key, ref)
                    report.reidentified += 1
        for key, ref in the_plan.candidates_found.items():
            table.candidate_found(key, ref)
        for gone in the_plan.candidates_gone:
            with mapper.locked(gone.key):
                if table.candidates.get(gone.key) == gone:  # not adopted meanwhile
                    table.drop_candidate(gone.key, "gone from the router", rule_present=False)
        for entry in the_plan.doomed_gone:
            table.removed(entry)
        for owned in the_plan.adopt:
            if table.add_candidate(owned, owned.rule.ref, mapper.clock()):
                report.adopted += 1
                log.info("rule of an earlier run kept for adoption", extra={
                    "event": "rule.adoptable", "rule_id": owned.rule.rule_id,
                    "client": str(owned.key.client), "protocol": owned.key.proto.label,
                    "internal_port": owned.key.internal_port,
                    "router_port": owned.router_port})
            else:
                the_plan.remove.append((owned.rule, "its port is another mapping's"))
        removals = [table.doom_listed(rule, rule.ref, why) for rule, why in the_plan.remove]
        removals += doomed
        removals += [table.doomed_found(entry, ref) for entry, ref in the_plan.doomed_listed]
        for entry in removals:
            if entry.token not in table.doomed:
                continue
            if mapper._remove(entry):
                report.removed += 1
                log.info("removed a rule no mapping owns", extra={
                    "event": "rule.removed", "rule_id": entry.rule.rule_id,
                    "comment": entry.comment, "reason": entry.reason})
            else:
                report.failed += 1
        if view is None:
            return
        for key in the_plan.restore:
            report.restored += self._restore(key, view.interface, report)
        for key in the_plan.retarget:
            report.retargeted += self._retarget(key, view.interface, report)
        for key in the_plan.drifted:
            report.corrected += self._correct(key, report)

    def _restore(self, key: MappingKey, interface: str, report: Report) -> int:
        mapper, table = self.mapper, self.table
        with mapper.locked(key):
            lease = table.lease(key)
            if lease is None or lease.parked:  # parked since the plan: see `plan`
                return 0
            try:
                # Confirm under the lock: a rule written after the listing is not missing.
                found = self.router.find_rules(lease.comment)
            except RouterError as exc:
                return self._step_failed("rule.restore_failed", key, exc, report)
            if found:
                table.rule_found(key, found[0].ref)
                return 0
            write = table.begin_restore(key, interface)
            if write is None:
                return 0
            try:
                ref = self.router.add_rule(lease.rule_spec(interface))
            except RouterError as exc:
                table.unknown(write)
                return self._step_failed("rule.restore_failed", key, exc, report)
            finally:
                current = table.writes.get(write.comment)
                if current is not None and current.rule is None and not current.unknown:
                    table.unknown(current)  # killed mid-call: a listing settles it
            table.restored(write, ref)
            log.warning("restored a live mapping's missing rule", extra={
                "event": "rule.restored", "client": str(key.client),
                "protocol": key.proto.label, "internal_port": key.internal_port,
                "router_port": lease.router_port, "rule_id": ref.rule_id})
            return 1

    def _retarget(self, key: MappingKey, interface: str, report: Report) -> int:
        mapper, table = self.mapper, self.table
        with mapper.locked(key):
            lease = table.lease(key)
            if lease is None or lease.interface == interface:
                return 0
            try:
                ref = ruleops.update(self.router, lease.rule, lease.comment,
                                     in_interface=interface)
            except RouterError as exc:
                return self._step_failed("rule.retarget_failed", key, exc, report)
            if ref is None:
                return 0  # gone: the next run restores it on the new interface
            table.retargeted(key, interface, ref)
            return 1

    def _correct(self, key: MappingKey, report: Report) -> int:
        """Make a live mapping's rule say what the mapping says. Under the mapping's lock
        and from a fresh look by comment: an update of unknown outcome that did move the
        rule is accepted (its port was kept reserved), one that did not is let go, and
        whatever else differs is set right."""
        mapper, table = self.mapper, self.table
        with mapper.locked(key):
            lease = table.lease(key)
            if lease is None:
                return 0
            try:
                found = self.router.find_rules(lease.comment)
            except RouterError as exc:
                return self._step_failed("rule.correct_failed", key, exc, report)
            if not found:
                if lease.moving_to is not None:
                    table.move_failed(key, lease.moving_to)
                return 0  # gone: the next run restores it
            own = next((r for r in found if r.ref == lease.rule), found[0])
            if lease.moving_to is not None:
                if own.dst_port == str(lease.moving_to):  # the update did land
                    lease = table.moved(replace(lease, router_port=lease.moving_to,
                                                moving_to=None, parked=False, rule=own.ref))
                else:
                    table.move_failed(key, lease.moving_to)
                    lease = table.lease(key) or lease
            if own.ref != lease.rule:
                table.rule_found(key, own.ref)
            if not drifted(lease, own):
                return 1
            changes = {k: v for k, v in expected_fields(lease).items()
                       if v != rule_fields(own)[k]}
            if lease.parked:
                changes = {"disabled": "yes"}
            try:
                ref = ruleops.update(self.router, own.ref, lease.comment, **changes)
            except RouterError as exc:
                return self._step_failed("rule.correct_failed", key, exc, report)
            if ref is not None:
                table.rule_found(key, ref)
            log.warning("set a live mapping's rule right", extra={
                "event": "rule.corrected", "client": str(key.client),
                "protocol": key.proto.label, "internal_port": key.internal_port,
                "rule_id": own.rule_id, "changes": changes})
            return 1

    def _step_failed(self, event: str, key: MappingKey, exc: Exception, report: Report) -> int:
        report.failed += 1
        log.warning("reconciliation step failed; the next run tries again", extra={
            "event": event, "client": str(key.client), "protocol": key.proto.label,
            "internal_port": key.internal_port, "reason": str(exc)})
        return 0


class ReconcileLoop:
    """Runs the reconciler at start, every interval, and sooner when the engine asks.

    While the router is unreachable it retries when the router client says a new
    connection is worth trying (its backoff), and no more often than once a second.
    """

    def __init__(self, reconciler: Reconciler, interval: float,
                 clock: Clock = monotonic, on_synced: Callable[[], None] = lambda: None,
                 liveness: float = 30.0) -> None:
        self.reconciler = reconciler
        self._on_synced = on_synced
        self.liveness = liveness
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
            except NoInterface as exc:
                # Listed and cleaned up, but no rule may be created: retry sooner.
                self.last_error = str(exc)
                self._wait_retry(attempt, slow=True)
                continue
            except RouterError as exc:
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
            self._on_synced()
            self._idle_until(attempt + self.interval)

    def _idle_until(self, deadline: float) -> None:
        """Wait for the next run, asking the router for its uptime every `liveness`
        seconds meanwhile (one small read): a router that died between reconciliations
        is noticed within that, not at the next interval, and a restart shows too."""
        while (left := deadline - self.clock()) > 0:
            if self._wake.wait(min(left, self.liveness)):
                return
            if deadline - self.clock() <= 0:
                return
            try:
                self.reconciler.router.resource()
            except RouterUnavailable as exc:
                self._failed(str(exc))
                return
            except RouterError:
                pass  # refused (no `read` on /system/resource): proves the router is up

    def _failed(self, reason: str) -> None:
        if self.last_error != reason:
            log.warning("router not synchronised; retrying", extra={
                "event": "reconcile.failed", "reason": reason})
        self.last_error = reason
        self.reconciler.table.unsynchronised(f"router unreachable: {reason}")

    def _wait_retry(self, attempt: float, slow: bool = False) -> None:
        retry_at = getattr(self.reconciler.router, "retry_at", lambda: 0.0)()
        gap = _NO_INTERFACE_GAP if slow else _MIN_RETRY_GAP
        # A plain sleep: requests refused meanwhile must not turn into a reconnect storm.
        gevent.sleep(max(attempt + gap, retry_at) - self.clock())
        self._wake.clear()


_MIN_RETRY_GAP = 1.0
# A tunnel that is down is polled a little more gently than an unreachable router.
_NO_INTERFACE_GAP = 5.0
