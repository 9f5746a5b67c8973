"""The double mapping's workflows: create, renew, follow, delete, expire, adopt, shut down.

Each workflow talks to the router and the gateway and records every step in the one
state owner, `MappingTable` (engine.state), whose transitions keep the invariants:
a rule is recorded before the call that creates it starts, a port stays reserved until
the router is known not to hold its rule. Rules kept here:

- Work on one mapping key is serialised (`KeyedLocks`); a duplicate of a request that is
  still being worked on joins it (`Joiner`). Different keys run in parallel.
- A creation costs one router write and no router read: ports come from the table's
  local view.
- Order of a creation: when the rule is fully known up front (mode `internal`, a real
  internal port) the rule is written first and nothing is asked upstream if that fails;
  otherwise (mode `external`, or internal port 0) the gateway is asked first, because the
  rule needs the granted port. Whatever succeeded is rolled back if a later step fails.
- Renewals never touch the router, unless the gateway moved the external port and the
  rule must follow it (mode `external`).
- Lifetimes: the client is told min(requested, upstream-granted). With keep-alive the
  mapping lives until the requested lifetime (capped) has passed since the client's last
  request, doublenat renewing upstream itself (engine.upkeep); without, it ends with the
  upstream lease. Either way plus EXPIRY_GRACE. Static mappings never expire.
- Expiry re-checks the deadline under the key's lock, so a renewal that won the race
  keeps its mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import TypeVar

from gevent.pool import Pool

from doublenat.engine import ruleops
from doublenat.engine.contracts import (
    AlreadyExists,
    Clock,
    Gateway,
    GatewayError,
    InvalidValue,
    MapAnswer,
    NotSent,
    Router,
    RouterError,
    RouterTrap,
    RouterUnavailable,
    RuleSpec,
    StaleSession,
    monotonic,
)
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.events import ChangeKind, MappingChange, mapping_fields
from doublenat.engine.locks import Joiner, KeyedLocks
from doublenat.engine.model import (
    FOREVER,
    Candidate,
    Doomed,
    Lease,
    MappingKey,
    Write,
    granted_lifetime,
)
from doublenat.engine.state import MappingTable
from doublenat.engine.throttle import Throttle
from doublenat.protocol.natpmp import MapRequest, Proto, Result
from doublenat.settings import Settings, StaticMapping

log = logging.getLogger("doublenat.mapping")

# A renewal this soon after the last upstream refresh is answered from the lease.
_FRESH_FRACTION = 1 / 8
_FRESH_MAX = 30.0
# Upstream deletes sent at once (UDP: cheap to have many in flight).
_UPSTREAM_PARALLEL = 100
# Workers for many mappings at once: more than router connections keeps all busy.
_PARALLEL = 16
_THROTTLED = frozenset({"mapping.refused", "mapping.failed", "upstream.failed",
                        "upstream.refused"})


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a mapping request came to; the caller turns it into a reply."""

    result: Result
    external_port: int = 0
    lifetime: int = 0  # the most the client may be told; capped again by its own request


_OTHER = {Proto.UDP: Proto.TCP, Proto.TCP: Proto.UDP}
_FAILED = Outcome(Result.NETWORK_FAILURE)
_NO_PORT = Outcome(Result.OUT_OF_RESOURCES)
_DONE = Outcome(Result.SUCCESS)


def _upstream_failure(answer: MapAnswer | None) -> Outcome:
    if answer is not None and answer.result in (Result.NOT_AUTHORIZED, Result.OUT_OF_RESOURCES):
        return Outcome(answer.result)
    return _FAILED


T = TypeVar("T")
R = TypeVar("R")


def in_pool(size: int, work: Callable[[T], R], items: list[T]) -> list[R]:
    """`work` on every item, `size` at a time; the results in the items' order.
    Interrupted (a shutdown's timeout, a kill), the workers end with the caller instead
    of running on unowned."""
    pool = Pool(size)
    workers = []
    try:
        # Spawned here, not by Pool.map: its feeder greenlet would outlive a killed caller
        # and go on starting workers.
        for item in items:
            workers.append(pool.spawn(work, item))  # waits while the pool is full
        pool.join()
    finally:
        pool.kill(block=True, timeout=1)
    for worker in workers:
        if worker.exception is not None:
            raise worker.exception
    return [worker.value for worker in workers]

class Mapper:
    def __init__(
        self,
        router: Router,
        gateway: Gateway,
        upstream: UpstreamState,
        settings: Settings,
        *,
        clock: Clock = monotonic,
        table: MappingTable | None = None,
        router_wanted: Callable[[], None] = lambda: None,
        on_change: Callable[[MappingChange], None] = lambda change: None,
        on_granted: Callable[[Lease], None] = lambda lease: None,
    ) -> None:
        self.router = router
        self.gateway = gateway
        self.upstream = upstream
        self.settings = settings
        self.clock = clock
        self.table = table or MappingTable(settings.port_range, settings.max_mappings_per_client)
        self._router_wanted = router_wanted
        self._on_change = on_change
        self._on_granted = on_granted  # a fresh upstream grant: plan the next keep-alive
        self._locks: KeyedLocks[MappingKey] = KeyedLocks()
        self._joiner: Joiner[tuple[object, ...], Outcome] = Joiner()
        self._throttle = Throttle(clock)
        self._statics = {MappingKey(s.client, s.proto, s.port): s
                         for s in settings.static_mappings}
        self.counters: dict[str, int] = dict.fromkeys(
            ("created", "renewed", "renewed_from_lease", "kept_alive", "moved", "deleted",
             "expired", "closed", "adopted", "abandoned", "port_changes"), 0)

    # ------------------------------------------------------------------ views

    @property
    def leases(self):  # type: ignore[no-untyped-def]
        return self.table.leases

    @property
    def candidates(self):  # type: ignore[no-untyped-def]
        return self.table.candidates

    def locked(self, key: MappingKey):  # type: ignore[no-untyped-def]
        return self._locks.hold(key)

    def is_static(self, key: MappingKey) -> bool:
        return key in self._statics

    # ------------------------------------------------------------------ entry

    def handle(self, client: IPv4Address, request: MapRequest) -> Outcome:
        """Serve one mapping request (the caller checked the client is allowed)."""
        proto, internal = request.proto, request.internal_port
        if request.lifetime == 0:
            if internal == 0:
                return self._joiner.run(
                    ("delete-all", client, proto), lambda: self.delete_all(client, proto)
                )
            key = MappingKey(client, proto, internal)
            return self._joiner.run(("delete", key), lambda: self.delete(key))
        key = MappingKey(client, proto, internal)
        requested = min(request.lifetime, self.settings.max_lifetime)
        suggested = request.suggested_port
        return self._joiner.run(("map", key), lambda: self._map(key, suggested, requested))

    def _map(self, key: MappingKey, suggested: int, requested: int) -> Outcome:
        with self._locks.hold(key):
            lease = self.table.lease(key)
            if lease is not None:
                return self._renew(lease, requested)
            candidate = self.table.candidates.get(key)
            if candidate is not None:
                return self._adopt(candidate, suggested, requested)
            return self._create(key, suggested, requested)

    # ---------------------------------------------------------------- create

    def _create(self, key: MappingKey, suggested: int, requested: int,
                static: bool = False) -> Outcome:
        client, proto = key.client, key.proto
        internal_mode = self.settings.port_mode == "internal"
        # The same client's mapping of the other protocol (gluetun and Proton's loop map
        # UDP then TCP): share its ports, so both protocols get one external port.
        companion = self.table.lease(MappingKey(client, _OTHER[proto], key.internal_port))
        if companion is not None:
            suggested = companion.external_port
        elif not self.table.in_range(suggested):
            suggested = 0  # e.g. Proton's "1": a hint nobody can honour, not worth a search
        preferred = [p for p in (suggested, key.internal_port) if p]
        if companion is not None:
            preferred.insert(0, companion.upstream_port)
        write = self.table.reserve(key, preferred, router_port=internal_mode, static=static)
        if write == "quota":
            self._event(logging.WARNING, "mapping.refused", key, reason_code="quota",
                        result=Result.OUT_OF_RESOURCES,
                        reason="MAX_MAPPINGS_PER_CLIENT reached")
            return _NO_PORT
        if write == "no port":
            self._event(logging.WARNING, "mapping.refused", key, reason_code="no-port",
                        result=Result.OUT_OF_RESOURCES, reason="no free port")
            return _NO_PORT
        if write == "not synchronised":
            self._router_wanted()
            self._event(logging.WARNING, "mapping.failed", key, reason_code="router-unsynced",
                        result=Result.NETWORK_FAILURE,
                        reason=f"router not synchronised: {self.table.problem}")
            return _FAILED
        assert isinstance(write, Write)
        try:
            if internal_mode and key.internal_port != 0:
                return self._create_rule_first(write, suggested, requested)
            return self._create_upstream_first(write, suggested, requested)
        finally:
            # Killed or failed unexpectedly half-way: whatever call was in flight may have
            # taken effect. The record stays (unknown) until a listing settles it. (Under
            # the key's lock, every unfinished write of this key is this workflow's.)
            for current in self.table.writes_for(key):
                if not current.unknown:
                    self.table.unknown(current)

    def _add(self, write: Write, spec: RuleSpec, retry_collision: bool) -> Write | Outcome:
        """Write the rule; the updated write, or the outcome to answer on failure (the
        write already settled in the table)."""
        key = write.key
        try:
            ref = self.router.add_rule(spec)
        except RouterError as exc:
            if isinstance(exc, RouterUnavailable) and not isinstance(exc, NotSent):
                # The add may have happened before the connection broke: the port stays
                # reserved until a listing shows whether the rule exists.
                self.table.unknown(write)
                self._failed(key, "router-unavailable", f"router unreachable: {exc}",
                             spec.dst_port)
                return _FAILED
            if isinstance(exc, AlreadyExists) and retry_collision and \
                    write.router_port == write.upstream_port:
                # Our view of the router was stale: the port is taken; try another.
                self._event(logging.INFO, "mapping.collision", key, router_port=spec.dst_port,
                            reason=f"router refused the rule: {exc}")
                moved = self.table.another_router_port(write)
                if moved is None:
                    return _NO_PORT
                return self._add(moved, replace(spec, dst_port=moved.router_port or 0,
                                                comment=moved.comment), retry_collision=False)
            # Certainly not written: refused, or never sent.
            self.table.cancel(write, upstream_mapped=self._upstream_first(write))
            if isinstance(exc, InvalidValue):
                # Typically the VPN interface went away: detect it again before more rules.
                self.table.unsynchronised(f"the router refused the rule: {exc}")
                self._router_wanted()
            if isinstance(exc, NotSent):
                self._failed(key, "router-unreachable", f"router unreachable: {exc}",
                             spec.dst_port)
            else:
                self._failed(key, "router-refused", f"router refused the rule: {exc}",
                             spec.dst_port)
            return _NO_PORT if isinstance(exc, AlreadyExists) else _FAILED
        return self.table.written(write, ref)

    def _upstream_first(self, write: Write) -> bool:
        return not (self.settings.port_mode == "internal" and write.key.internal_port != 0)

    def _create_rule_first(self, write: Write, suggested: int, requested: int) -> Outcome:
        key = write.key
        assert write.router_port is not None
        spec = RuleSpec(key.proto, write.interface, write.router_port, key.client,
                        key.internal_port, write.comment)
        written = self._add(write, spec, retry_collision=True)
        if isinstance(written, Outcome):
            return written
        answer = self._ask(key, written.upstream_port, suggested, requested)
        if answer is None or not answer.granted:
            # No answer at all: the gateway may have mapped it and the reply been lost,
            # so the upstream port waits for its delete (a refusal mapped nothing).
            doomed = self.table.abandon(written, "the gateway did not grant the mapping",
                                        upstream_mapped=answer is None)
            if doomed is not None:
                self._remove(doomed)
            return _upstream_failure(answer)
        return self._install(written, written.router_port or 0, key.internal_port, answer,
                             requested)

    def _create_upstream_first(self, write: Write, suggested: int, requested: int) -> Outcome:
        key = write.key
        answer = self._ask(key, write.upstream_port, suggested, requested)
        if answer is None or not answer.granted:
            self.table.cancel(write, upstream_mapped=answer is None)  # as in rule-first
            return _upstream_failure(answer)
        if write.router_port is None:
            reserved = self.table.reserve_router(write, answer.external_port)
            if reserved is None:
                self.table.cancel(write, upstream_mapped=True)
                self._end_upstream(key.proto, write.upstream_port, key)
                self._event(logging.WARNING, "mapping.refused", key, reason_code="port-taken",
                            result=Result.OUT_OF_RESOURCES, router_port=answer.external_port,
                            reason="the granted port is taken on the router")
                return _NO_PORT
            write = reserved
        assert write.router_port is not None
        to_port = key.internal_port or answer.external_port
        spec = RuleSpec(key.proto, write.interface, write.router_port, key.client, to_port,
                        write.comment)
        written = self._add(write, spec, retry_collision=False)
        if isinstance(written, Outcome):
            if written.result != Result.SUCCESS and write.comment not in self.table.writes:
                self._end_upstream(key.proto, write.upstream_port, key)
            return written
        return self._install(written, written.router_port or 0, to_port, answer, requested)

    def _install(self, write: Write, router_port: int, to_port: int, answer: MapAnswer,
                 requested: int) -> Outcome:
        now = self.clock()
        told = granted_lifetime(requested, answer.lifetime, self.settings.max_lifetime)
        lease = self.table.install(write, Lease(
            key=write.key,
            upstream_port=write.upstream_port,
            router_port=router_port,
            to_port=to_port,
            rule=write.rule,  # type: ignore[arg-type]
            interface=write.interface,
            external_port=answer.external_port,
            expires_at=self._deadline(write.static, now, requested, told),
            told=told,
            requested=requested,
            upstream_expires_at=now + answer.lifetime,
            upstream_renewed_at=now,
            generation=self.upstream.generation,
            static=write.static,
        ))
        self.counters["created"] += 1
        self._on_old_interface(lease)
        self._event(logging.INFO, "mapping.created", lease.key, lease=lease, lifetime=told,
                    result=Result.SUCCESS)
        self._changed(ChangeKind.CREATED, lease, "client request" if not lease.static
                      else "static mapping")
        self._on_granted(lease)
        return Outcome(Result.SUCCESS, answer.external_port, answer.lifetime)

    def _on_old_interface(self, lease: Lease) -> None:
        """The rule was written (or found) on an interface the router stopped using
        meanwhile (a reconciliation moved the other rules while this one was being
        written): ask for a reconciliation now, not at the next interval."""
        view = self.table.router
        if view is not None and view.interface != lease.interface:
            self._router_wanted()

    def _deadline(self, static: bool, now: float, requested: int, told: int) -> float:
        if static:
            return FOREVER
        kept = requested if self.settings.upstream_keepalive else told
        return now + kept + self.settings.expiry_grace

    # ----------------------------------------------------------------- renew

    def renew_now(self, client: IPv4Address, request: MapRequest) -> Outcome | None:
        """A renewal answered at once from a fresh lease, or None if it needs real work
        (no lease, not fresh, a delete, or other work on that mapping under way).

        Nothing here yields, so the UDP front may call it without a handler greenlet.
        """
        if request.lifetime == 0:
            return None
        key = MappingKey(client, request.proto, request.internal_port)
        lease = self.table.lease(key)
        if lease is None or self._locks.busy(key) or self._joiner.joined(("map", key)):
            return None
        now = self.clock()
        if not self._fresh(lease, now):
            return None
        return self._from_lease(lease, min(request.lifetime, self.settings.max_lifetime), now)

    def _fresh(self, lease: Lease, now: float) -> bool:
        """Was the upstream mapping confirmed so recently that asking again is waste?
        Never with less than a second left: the answer would say lifetime 0, which tells
        the client its mapping is gone."""
        if lease.generation != self.upstream.generation \
                or lease.upstream_expires_at - now < 1 or lease.parked:
            return False
        window = min(lease.upstream_lifetime * _FRESH_FRACTION, _FRESH_MAX)
        return now - lease.upstream_renewed_at < window

    def _renew(self, lease: Lease, requested: int) -> Outcome:
        now = self.clock()
        if self._fresh(lease, now):
            return self._from_lease(lease, requested, now)
        answer = self._ask(lease.key, lease.upstream_port, lease.external_port, requested)
        if answer is None or not answer.granted:
            if lease.generation == self.upstream.generation and \
                    lease.upstream_expires_at - now >= 1:
                # The gateway is not answering, but what it granted still holds.
                return self._from_lease(lease, requested, now)
            return _upstream_failure(answer)
        return self._follow(lease, answer, requested, "client renewal")

    def _from_lease(self, lease: Lease, requested: int, now: float) -> Outcome:
        left = int(lease.upstream_expires_at - now)
        told = granted_lifetime(requested, left, self.settings.max_lifetime)
        deadline = max(lease.expires_at, self._deadline(lease.static, now, requested, told))
        self.table.renewed(replace(lease, expires_at=deadline, told=told,
                                   requested=max(requested, 1)))
        self.counters["renewed_from_lease"] += 1
        return Outcome(Result.SUCCESS, lease.external_port, left)

    def _follow(self, lease: Lease, answer: MapAnswer, requested: int | None,
                why: str, announce: bool = True) -> Outcome:
        """Store a fresh upstream grant; move the rule if the granted port moved.

        `requested` is the client's lifetime for a client's request; None for doublenat's
        own renewal (keep-alive, re-mapping), which never lengthens the mapping's life.
        """
        key = lease.key
        previous = lease.external_port
        if answer.external_port != previous or lease.parked:
            moved = self._move_rule(lease, answer.external_port, why)
            if moved is None:
                return _FAILED
            lease = moved
        now = self.clock()
        if requested is None:
            told = lease.told
            deadline = lease.expires_at
        else:
            told = granted_lifetime(requested, answer.lifetime, self.settings.max_lifetime)
            deadline = self._deadline(lease.static, now, requested, told)
        lease = self.table.renewed(replace(
            lease,
            external_port=answer.external_port,
            expires_at=deadline,
            told=told,
            requested=lease.requested if requested is None else requested,
            upstream_expires_at=now + answer.lifetime,
            upstream_renewed_at=now,
            generation=self.upstream.generation,
        ))
        self.counters["renewed" if requested is not None else "kept_alive"] += 1
        if log.isEnabledFor(logging.DEBUG):
            self._event(logging.DEBUG, "mapping.renewed", key, lease=lease, lifetime=told,
                        result=Result.SUCCESS, reason=why)
        if answer.external_port != previous and announce:
            self.counters["port_changes"] += 1
            self._event(logging.WARNING, "mapping.changed", key, lease=lease,
                        previous_external_port=previous, reason=why, result=Result.SUCCESS)
            self._changed(ChangeKind.CHANGED, lease, why, previous)
        self._on_granted(lease)
        return Outcome(Result.SUCCESS, answer.external_port, answer.lifetime)

    def _move_rule(self, lease: Lease, external_port: int, why: str) -> Lease | None:
        """The rule follows a moved external port in `external` mode (the gateway
        delivers to the granted port); in `internal` mode only to-ports of a port-0
        mapping follow. A parked rule is enabled again on its new port. Returns the lease
        as moved, or None if the rule could not follow."""
        key = lease.key
        external_mode = self.settings.port_mode == "external"
        router_port = external_port if external_mode else lease.router_port
        to_port = key.internal_port or external_port
        if (router_port, to_port) == (lease.router_port, lease.to_port) and not lease.parked:
            return replace(lease, external_port=external_port)
        if lease.moving_to is not None:
            # An earlier move's outcome is unknown: the rule may be on either port, both
            # reserved. A third port would need a third reservation; settle it first.
            self._router_wanted()
            self._event(logging.WARNING, "mapping.failed", key, reason_code="move-unsettled",
                        result=Result.NETWORK_FAILURE,
                        reason="an earlier move of the rule is not settled yet")
            return None
        changes: dict[str, str] = {}
        moving = router_port != lease.router_port or lease.parked
        if moving:
            if not self._reserve_move(lease, router_port):
                self._event(logging.WARNING, "mapping.failed", key, reason_code="port-taken",
                            result=Result.NETWORK_FAILURE, router_port=router_port,
                            reason="the gateway moved the port to one taken on the router")
                return None
            changes["dst_port"] = str(router_port)
            if lease.parked:
                changes["disabled"] = "no"
        if to_port != lease.to_port:
            changes["to_ports"] = str(to_port)
        settled = False
        try:
            ref = ruleops.update(self.router, lease.rule, lease.comment, **changes)
            settled = True
        except (NotSent, StaleSession, RouterTrap) as exc:
            settled = True  # certainly not applied
            if moving:
                self.table.move_failed(key, router_port)
            self._event(logging.WARNING, "mapping.failed", key, reason_code="move-failed",
                        result=Result.NETWORK_FAILURE, reason=f"could not move the rule: {exc}")
            return None
        except RouterError as exc:
            self._event(logging.WARNING, "mapping.failed", key, reason_code="move-failed",
                        result=Result.NETWORK_FAILURE,
                        reason=f"could not move the rule (reconciliation finds out where it "
                               f"is): {exc}")
            return None
        finally:
            if not settled:
                # Sent, outcome unknown (a broken connection, or killed meanwhile): both
                # ports stay reserved until a listing shows where the rule is.
                self.table.move_unknown(key, router_port if moving else None)
        moved = replace(lease, router_port=router_port, to_port=to_port,
                        external_port=external_port, parked=False, moving_to=None,
                        rule=ref or lease.rule)
        if ref is None and not lease.parked:
            if moving:
                self.table.move_failed(key, router_port)
            self._event(logging.WARNING, "mapping.failed", key, reason_code="move-failed",
                        result=Result.NETWORK_FAILURE,
                        reason="the rule is gone from the router; reconciliation restores it")
            return None
        # (A parked rule that vanished is re-made by reconciliation on its new port.)
        moved = self.table.moved(moved)
        self.counters["moved"] += 1
        self._event(logging.INFO, "mapping.moved", key, lease=moved, result=Result.SUCCESS,
                    reason=why)
        return moved

    def _reserve_move(self, lease: Lease, port: int) -> bool:
        """Reserve the port a rule moves to. In external mode, after an upstream loss the
        gateway may hand out a port that one of our own mappings held before the loss
        (the gateway no longer delivers it there): that mapping's rule is parked
        (disabled) so the port forwards to one client only, and the parked rule comes
        back when its own re-map grants it a port (two mappings handed each other's
        ports would otherwise wait for each other forever)."""
        key = lease.key
        if self.table.begin_move(key, port):
            return True
        holder = self.table.lease_holding(key.proto, port)
        if (self.settings.port_mode != "external" or holder is None or holder.key == key
                or holder.generation >= self.upstream.generation):
            return False
        with self._locks.try_hold(holder.key) as held:
            current = self.table.lease(holder.key)
            if not held or current is None or current.parked or current.router_port != port:
                return False
            if current.comment in self.table.writes:
                # Its rule is being re-created, with an unknown outcome: a copy it does
                # not know may be there, enabled; disabling the known one would not stop
                # the port forwarding to it. Not parked: this move waits for a later try.
                return False
            try:
                ref = ruleops.update(self.router, current.rule, current.comment, disabled="yes")
            except RouterError:
                return False
            if ref is not None:
                self.table.rule_found(holder.key, ref)
            parked = self.table.park(holder.key)
            self._event(logging.WARNING, "mapping.parked", holder.key, lease=parked,
                        result=Result.SUCCESS, reason=f"the gateway gave its port to {key}; "
                        "its rule is disabled until its own re-map")
        return self.table.begin_move(key, port)

    def refresh(self, key: MappingKey, why: str) -> bool | None:
        """doublenat's own upstream renewal of a live mapping (keep-alive, re-mapping
        after an upstream loss). True: renewed; False: failed, try again later; None:
        nothing to renew (the mapping ended)."""
        with self._locks.hold(key):
            lease = self.table.lease(key)
            if lease is None or lease.expires_at <= self.clock():
                return None
            answer = self._ask(key, lease.upstream_port, lease.external_port, lease.requested)
            if answer is None or not answer.granted:
                return False
            return self._follow(lease, answer, None, why).result == Result.SUCCESS

    # ----------------------------------------------------------------- adopt

    def _adopt(self, candidate: Candidate, suggested: int, requested: int,
               static: bool = False) -> Outcome:
        owned = candidate.owned
        key = owned.key
        router_port = owned.router_port
        assert router_port is not None
        if self.settings.port_mode == "external":
            suggested = router_port
        answer = self._ask(key, owned.upstream_port, suggested, requested)
        if answer is None or not answer.granted:
            return _upstream_failure(answer)
        now = self.clock()
        told = granted_lifetime(requested, answer.lifetime, self.settings.max_lifetime)
        to_port = owned.to_port or key.internal_port
        # The rule as found, then made to follow the grant like any renewal.
        lease = self.table.adopt(key, Lease(
            key=key,
            upstream_port=owned.upstream_port,
            router_port=router_port,
            to_port=to_port,
            rule=candidate.rule,
            interface=owned.rule.in_interface,
            external_port=(router_port if self.settings.port_mode == "external"
                           else answer.external_port),
            expires_at=self._deadline(static, now, requested, told),
            told=told,
            requested=requested,
            upstream_expires_at=now,
            upstream_renewed_at=now,
            generation=self.upstream.generation,
            static=static,
        ))
        self.counters["adopted"] += 1
        self._on_old_interface(lease)
        if owned.rule.disabled:
            # Parked by the earlier run (which stopped without its cleanup): parked here
            # too, so following the grant enables it on the port the gateway gave.
            lease = self.table.park(key) or lease
        outcome = self._follow(lease, answer, requested, "adopted after a restart",
                               announce=False)
        current = self.table.lease(key) or lease
        self._event(logging.INFO, "mapping.adopted", key, lease=current, result=outcome.result)
        self._changed(ChangeKind.CREATED, current, "rule of an earlier run adopted")
        return outcome

    # ---------------------------------------------------------------- delete

    def delete(self, key: MappingKey, event: str = "mapping.deleted",
               upstream_now: bool = True) -> Outcome:
        """Remove a mapping (idempotent: nothing to delete is success). A static mapping
        stays: a client's delete cannot end what STATIC_MAPPINGS holds."""
        with self._locks.hold(key):
            lease = self.table.lease(key)
            if lease is not None:
                if lease.static and event == "mapping.deleted":
                    self._event(logging.INFO, "mapping.kept", key, lease=lease,
                                reason="static mapping: a client's delete does not end it",
                                result=Result.SUCCESS)
                    return _DONE
                self._teardown(key, event, upstream_now)
                return _DONE
            candidate = self.table.candidates.get(key)
            doomed = self.table.drop_candidate(key, "rule of an earlier run, deleted")
            if candidate is not None and doomed is not None:
                self._remove(doomed)
                if upstream_now:
                    self._end_upstream(key.proto, candidate.owned.upstream_port, key)
        return _DONE

    def delete_all(self, client: IPv4Address, proto: Proto) -> Outcome:
        """RFC 6886 3.4: internal port 0 and lifetime 0 remove the client's mappings of
        that protocol only."""
        self._in_parallel(self.delete, self.table.keys_of(client, proto))
        return _DONE

    def _teardown(self, key: MappingKey, event: str, upstream_now: bool) -> None:
        ended = self.table.end(key, event)
        if ended is None:
            return
        lease, doomed = ended
        self._remove(doomed)
        if upstream_now:
            self._end_upstream(key.proto, lease.upstream_port, key)
        self.counters[event.split(".")[1]] += 1
        self._event(logging.INFO, event, key, lease=lease, lifetime=0, result=Result.SUCCESS)
        self._changed(ChangeKind.DELETED, replace(lease, told=0), event.split(".")[1])

    # ---------------------------------------------------------------- expiry

    def expire_due(self) -> int:
        """End mappings whose client stopped renewing, and unadopted earlier rules."""
        now = self.clock()
        due = [k for k, lease in self.table.leases.items() if lease.expires_at <= now]
        grace = self.settings.adopt_grace
        stale = [k for k, c in self.table.candidates.items() if c.seen_at + grace <= now]
        self._in_parallel(self._expire, due)
        self._in_parallel(self._expire_candidate, stale)
        return len(due) + len(stale)

    def _expire(self, key: MappingKey) -> None:
        with self._locks.hold(key):
            lease = self.table.lease(key)
            # A renewal may have run while we waited for the lock: trust only the deadline.
            if lease is not None and lease.expires_at <= self.clock():
                self._teardown(key, "mapping.expired", upstream_now=True)

    def _expire_candidate(self, key: MappingKey) -> None:
        with self._locks.hold(key):
            candidate = self.table.candidates.get(key)
            if candidate is None or candidate.seen_at + self.settings.adopt_grace > self.clock():
                return
            doomed = self.table.drop_candidate(key, "rule of an earlier run, never renewed")
            if doomed is not None:
                self.counters["abandoned"] += 1
                self._remove(doomed)
                self._end_upstream(key.proto, candidate.owned.upstream_port, key)
                self._event(logging.INFO, "mapping.abandoned", key,
                            rule_id=candidate.rule.rule_id, router_port=doomed.router_port,
                            result=Result.SUCCESS, reason="rule of an earlier run")

    def flush(self, final: bool = False) -> None:
        """Finish what an interrupted or failed step left: doomed rules, upstream deletes.
        `final` (shutdown): an upstream delete that fails is kept, so the leftovers say
        what the gateway may still hold; otherwise it is given up (its lease runs out)."""
        self._in_parallel(self._remove_doomed, list(self.table.doomed.values()))
        self.flush_upstream(final)

    def _remove_doomed(self, doomed: Doomed) -> None:
        if doomed.token in self.table.doomed:
            self._remove(doomed)

    def flush_upstream(self, final: bool = False) -> None:
        ends = list(self.table.upstream_ends.items())
        if ends:
            in_pool(_UPSTREAM_PARALLEL, lambda e: self._end_upstream(
                e[0][0], e[0][1], e[1], keep_failed=final), ends)

    # ---------------------------------------------------------- static mappings

    def ensure_statics(self) -> int:
        """Create every static mapping that has no lease (at start, after failures);
        returns how many are still missing."""
        missing = [k for k in self._statics if self.table.lease(k) is None]
        self._in_parallel(self._ensure_static, missing)
        return sum(1 for k in self._statics if self.table.lease(k) is None)

    def _ensure_static(self, key: MappingKey) -> None:
        lifetime = self.settings.max_lifetime
        with self._locks.hold(key):
            if self.table.lease(key) is not None:
                return
            candidate = self.table.candidates.get(key)
            if candidate is not None:
                self._adopt(candidate, key.internal_port, lifetime, static=True)
            else:
                self._create(key, key.internal_port, lifetime, static=True)

    @property
    def statics(self) -> tuple[StaticMapping, ...]:
        return tuple(self._statics.values())

    # -------------------------------------------------------------- shutdown

    def close_all(self) -> int:
        """Remove every rule and upstream mapping doublenat holds (graceful shutdown);
        returns how many mappings and adoptable rules it ended. What is left, if
        anything, is in the table (`describe_leftovers`).

        Rules first, over the router pool; then the upstream deletes, many at a time,
        so a silent gateway cannot hold the router cleanup back.
        """
        keys = list(self.table.leases) + [k for k in self.table.candidates
                                          if k not in self.table.leases]
        self._in_parallel(lambda k: self.delete(k, "mapping.closed", upstream_now=False), keys)
        self._in_parallel(self._close_write, list(self.table.writes.values()))
        self.flush(final=True)
        return len(keys)

    def _close_write(self, write: Write) -> None:
        """A write that never finished (a killed handler, an unknown outcome): find its
        rule by comment and remove it; then the record can go."""
        try:
            found = self.router.find_rules(write.comment)
        except RouterError:
            return
        for doomed in self.table.settle_write(write, found):
            self._remove(doomed)

    # --------------------------------------------------------------- helpers

    def _remove(self, doomed: Doomed) -> bool:
        try:
            refs = ruleops.remove(self.router, doomed.rule, doomed.comment)
        except RouterError as exc:
            self._event(logging.WARNING, "rule.remove_failed", doomed.key,
                        rule_id=doomed.rule.rule_id, reason=f"{exc}; it will be removed later",
                        reason_code="remove-failed")
            return False
        self.table.removed(doomed, refs)
        return True

    def _ask(self, key: MappingKey, port: int, suggested: int,
             lifetime: int) -> MapAnswer | None:
        try:
            answer = self.gateway.map(key.proto, port, suggested, lifetime)
        except GatewayError as exc:
            self._event(logging.WARNING, "upstream.failed", key, upstream_port=port,
                        reason=str(exc), reason_code="gateway-silent",
                        result=Result.NETWORK_FAILURE)
            return None
        self.upstream.saw_epoch(answer.epoch)
        if not answer.granted:
            self._event(logging.WARNING, "upstream.refused", key, upstream_port=port,
                        upstream_result=int(answer.result), reason_code="gateway-refused",
                        result=_upstream_failure(answer).result)
        return answer

    def _end_upstream(self, proto: Proto, port: int | None, key: MappingKey,
                      keep_failed: bool = False) -> None:
        if port is None:
            return
        try:
            answer = self.gateway.map(proto, port, 0, 0)
        except GatewayError as exc:
            # The upstream lease runs out by itself; nothing on the router depends on it.
            self._event(logging.INFO, "upstream.delete_failed", key, upstream_port=port,
                        reason=str(exc))
            if keep_failed:
                return
        else:
            self.upstream.saw_epoch(answer.epoch)
        self.table.upstream_ended(proto, port)

    def _failed(self, key: MappingKey, code: str, reason: str, router_port: int) -> None:
        self._event(logging.WARNING, "mapping.failed", key, result=Result.NETWORK_FAILURE,
                    router_port=router_port, reason=reason, reason_code=code)

    def _in_parallel(self, work: Callable[..., object], items: Iterable[object]) -> None:
        items = list(items)
        if len(items) == 1:
            work(items[0])
        elif items:
            # More workers than router connections keeps all of them busy.
            in_pool(_PARALLEL, work, items)

    def _changed(self, kind: ChangeKind, lease: Lease, why: str,
                 previous: int | None = None) -> None:
        address = self.upstream.address
        self._on_change(MappingChange(
            kind=kind, proto=lease.key.proto, client=lease.key.client,
            internal_port=lease.key.internal_port, external_port=lease.external_port,
            lifetime=lease.told, static=lease.static, previous_external_port=previous,
            public_address=address, reason=why))

    def _event(self, level: int, event: str, key: MappingKey | None,
               lease: Lease | None = None, reason_code: str | None = None,
               **fields: object) -> None:
        """One record per mapping event, always with the same fields (None when unknown),
        so a log aggregator can graph and filter them without parsing messages."""
        if level >= logging.WARNING and event in _THROTTLED and key is not None and \
                not self._throttle.allow(key.client, f"{event}:{reason_code}"):
            level = logging.DEBUG
        if not log.isEnabledFor(level):
            return
        record = mapping_fields(event, key, lease, fields)
        if reason_code is not None:
            record["reason_code"] = reason_code
        log.log(level, event.replace(".", " "), extra=record)
