"""The double mapping: a router rule plus an upstream mapping, kept together for a client.

Rules this module keeps:
- Work on one mapping key is serialised (`KeyedLocks`); a duplicate of a request that is
  still being worked on joins it (`Joiner`). Different keys run in parallel.
- A creation costs one router write and no router read: ports come from the local
  `PortBook`, chosen under one allocation lock.
- Order of a creation: when the rule is fully known up front (mode `internal`, a real
  internal port) the rule is written first and nothing is asked upstream if that fails;
  otherwise (mode `external`, or internal port 0) the gateway is asked first, because the
  rule needs the granted port. Whatever succeeded is rolled back if a later step fails.
- Renewals and retransmissions never touch the router, unless the gateway moved the
  external port and the rule must follow it.
- Expiry re-checks the deadline under the key's lock, so a renewal that won the race
  keeps its mapping.
- Nothing is forgotten: a rule that could not be removed is kept in `garbage` (and its
  port stays held) until reconciliation removes it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Literal

from gevent.lock import BoundedSemaphore
from gevent.pool import Pool

from doublenat.engine.contracts import (
    Clock,
    Gateway,
    GatewayError,
    MapAnswer,
    NoSuchItem,
    Router,
    RouterError,
    RouterTrap,
    RuleSpec,
    monotonic,
)
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.locks import Joiner, KeyedLocks
from doublenat.engine.model import Lease, MappingKey, OwnedRule, granted_lifetime, rule_comment
from doublenat.engine.ports import PortBook
from doublenat.protocol.natpmp import MapRequest, Proto, Result

log = logging.getLogger("doublenat.mapping")

PortMode = Literal["internal", "external"]
# A renewal this soon after the last upstream refresh is answered from the lease.
_FRESH_FRACTION = 1 / 8
_FRESH_MAX = 30.0
# Upstream deletes sent at once during shutdown (UDP: cheap to have many in flight).
_SHUTDOWN_UPSTREAM_PARALLEL = 100
_THROTTLED = frozenset({"mapping.refused", "mapping.failed", "upstream.failed"})
_WARN_EVERY = 10.0
_WARNED_MAX = 10_000


@dataclass(frozen=True, slots=True)
class MapperConfig:
    port_mode: PortMode = "internal"
    max_per_client: int = 64
    max_lifetime: int = 86400
    expiry_grace: float = 10.0
    adopt_grace: float = 900.0
    port_range: tuple[int, int] = (1024, 65535)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a mapping request came to; the caller turns it into a reply."""

    result: Result
    external_port: int = 0
    lifetime: int = 0  # the most the client may be told; capped again by its own request


@dataclass(frozen=True, slots=True)
class Candidate:
    """A rule of an earlier run, waiting for its client to renew (adoption)."""

    owned: OwnedRule
    interface: str
    seen_at: float


_OTHER = {Proto.UDP: Proto.TCP, Proto.TCP: Proto.UDP}
_COLLISION = "<collision>"  # _add_rule's answer when the router says the port is taken
_FAILED = Outcome(Result.NETWORK_FAILURE)
_NO_PORT = Outcome(Result.OUT_OF_RESOURCES)
_DONE = Outcome(Result.SUCCESS)


def _upstream_failure(answer: MapAnswer | None) -> Outcome:
    if answer is not None and answer.result in (Result.NOT_AUTHORIZED, Result.OUT_OF_RESOURCES):
        return Outcome(answer.result)
    return _FAILED


class Mapper:
    def __init__(
        self,
        router: Router,
        gateway: Gateway,
        upstream: UpstreamState,
        config: MapperConfig = MapperConfig(),
        clock: Clock = monotonic,
        router_wanted: Callable[[], None] = lambda: None,
    ) -> None:
        self.router = router
        self.gateway = gateway
        self.upstream = upstream
        self.config = config
        self.clock = clock
        self._router_wanted = router_wanted
        self.ports = PortBook(*config.port_range)
        self.leases: dict[MappingKey, Lease] = {}
        self.by_client: dict[IPv4Address, set[MappingKey]] = defaultdict(set)
        self.candidates: dict[MappingKey, Candidate] = {}
        self.pending: set[str] = set()  # comments of rules being written right now
        self.uncertain: set[str] = set()  # comments of writes whose outcome is unknown
        self.removing: set[str] = set()  # rule ids being removed right now
        self._removal_logs: list[set[str]] = []  # open while a reconciliation lists rules
        # Rules to remove when the router allows: id -> (mapping, router port still held).
        self.garbage: dict[str, tuple[MappingKey, int]] = {}
        self.interface: str | None = None
        self.router_ready = False  # a port view and an interface have been loaded
        self._alloc = BoundedSemaphore(1)
        self._locks: KeyedLocks[MappingKey] = KeyedLocks()
        self._joiner: Joiner[tuple[object, ...], Outcome] = Joiner()
        self._creating: dict[IPv4Address, int] = defaultdict(int)
        self._warned: dict[tuple[IPv4Address, str, str], float] = {}
        self.counters: dict[str, int] = defaultdict(int)

    # ----------------------------------------------------------------- entry

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
        lifetime = min(request.lifetime, self.config.max_lifetime)
        suggested = request.suggested_port
        return self._joiner.run(("map", key), lambda: self._map(key, suggested, lifetime))

    def _map(self, key: MappingKey, suggested: int, lifetime: int) -> Outcome:
        with self._locks.hold(key):
            lease = self.leases.get(key)
            if lease is not None:
                return self._renew(lease, lifetime)
            candidate = self.candidates.get(key)
            if candidate is not None and candidate.owned.router_port is not None:
                return self._adopt(candidate, suggested, lifetime)
            return self._create(key, suggested, lifetime)

    # ---------------------------------------------------------------- create

    def _create(self, key: MappingKey, suggested: int, lifetime: int) -> Outcome:
        client, proto = key.client, key.proto
        held = len(self.by_client.get(client, ())) + self._creating[client]
        if held >= self.config.max_per_client:
            self._event(logging.WARNING, "mapping.refused", key, result=Result.OUT_OF_RESOURCES,
                        reason="MAX_MAPPINGS_PER_CLIENT reached")
            return _NO_PORT
        interface = self.interface
        if not self.router_ready or interface is None:
            self._router_wanted()
            self._event(logging.WARNING, "mapping.failed", key, result=Result.NETWORK_FAILURE,
                        reason="router not synchronised yet (unreachable or no VPN interface)")
            return _FAILED
        internal_mode = self.config.port_mode == "internal"
        router_first = internal_mode and key.internal_port != 0
        # The same client's mapping of the other protocol (gluetun and Proton's loop map
        # UDP then TCP): share its ports, so both protocols get one external port.
        companion = self.leases.get(MappingKey(client, _OTHER[proto], key.internal_port))
        if companion is not None:
            suggested = companion.external_port
        elif not self.ports.in_range(suggested):
            suggested = 0  # e.g. Proton's "1": a hint nobody can honour, not worth a search
        preferred = [p for p in (suggested, key.internal_port) if p]
        if companion is not None:
            preferred.insert(0, companion.upstream_port)
        with self._alloc:
            port = self.ports.allocate(client, proto, preferred, router=internal_mode)
        if port is None:
            self._event(logging.WARNING, "mapping.refused", key, result=Result.OUT_OF_RESOURCES,
                        reason="no free port")
            return _NO_PORT
        comment = rule_comment(key, port)
        self.pending.add(comment)
        self._creating[client] += 1
        try:
            if router_first:
                return self._create_rule_first(key, port, suggested, lifetime, interface)
            return self._create_upstream_first(key, port, suggested, lifetime, interface)
        finally:
            self.pending.discard(comment)
            self._creating[client] -= 1
            if not self._creating[client]:
                del self._creating[client]

    def _create_rule_first(
        self,
        key: MappingKey,
        port: int,
        suggested: int,
        lifetime: int,
        interface: str,
        first_try: bool = True,
    ) -> Outcome:
        spec = RuleSpec(key.proto, interface, port, key.client, key.internal_port,
                        rule_comment(key, port))
        rule_id = self._add_rule(spec, key, collision_retry=first_try)
        if rule_id is _COLLISION:
            # Our view of the router was stale: remember the port as taken, try another.
            self.ports.mark_foreign(key.proto, port)
            self._release(key, port, port)
            with self._alloc:
                retry = self.ports.allocate(key.client, key.proto, (), router=True)
            if retry is None:
                return _NO_PORT
            self.pending.add(rule_comment(key, retry))
            try:
                return self._create_rule_first(key, retry, suggested, lifetime, interface,
                                               first_try=False)
            finally:
                self.pending.discard(rule_comment(key, retry))
        if rule_id is None:
            self._release(key, port, port)
            return _FAILED
        answer = self._ask(key.proto, port, suggested, lifetime, key)
        if answer is None or not _granted(answer):
            removed = self._drop_rule(rule_id, key, port)
            self._release(key, port, port if removed else None)
            return _upstream_failure(answer)
        return self._install(key, port, port, key.internal_port, rule_id, interface, answer,
                             lifetime, "mapping.created")

    def _create_upstream_first(
        self, key: MappingKey, port: int, suggested: int, lifetime: int, interface: str
    ) -> Outcome:
        internal_mode = self.config.port_mode == "internal"
        router_port_if_internal = port if internal_mode else None
        answer = self._ask(key.proto, port, suggested, lifetime, key)
        if answer is None or not _granted(answer):
            self._release(key, port, router_port_if_internal)
            return _upstream_failure(answer)
        router_port = port if internal_mode else answer.external_port
        if not internal_mode:
            with self._alloc:
                free = self.ports.router_free(key.proto, router_port, key.client)
                if free:
                    self.ports.hold_router(key.proto, router_port, key.client)
            if not free:
                self._event(logging.WARNING, "mapping.refused", key,
                            result=Result.OUT_OF_RESOURCES, router_port=router_port,
                            reason="granted port is taken on the router")
                self._forget_upstream(key.proto, port, key)
                self._release(key, port, None)
                return _NO_PORT
        to_port = key.internal_port or answer.external_port
        spec = RuleSpec(key.proto, interface, router_port, key.client, to_port,
                        rule_comment(key, port))
        rule_id = self._add_rule(spec, key)
        if rule_id is None:
            self._forget_upstream(key.proto, port, key)
            self._release(key, port, router_port)
            return _FAILED
        return self._install(key, port, router_port, to_port, rule_id, interface, answer,
                             lifetime, "mapping.created")

    # ----------------------------------------------------------------- renew

    def renew_now(self, client: IPv4Address, request: MapRequest) -> Outcome | None:
        """A renewal answered at once from a fresh lease, or None if it needs real work
        (no lease, not fresh, a delete, or other work on that mapping under way).

        Nothing here yields, so the UDP front may call it without a handler greenlet.
        """
        if request.lifetime == 0:
            return None
        key = MappingKey(client, request.proto, request.internal_port)
        lease = self.leases.get(key)
        if lease is None or self._locks.busy(key) or self._joiner.joined(("map", key)):
            return None
        now = self.clock()
        if not self._fresh(lease, now):
            return None
        return self._from_lease(lease, min(request.lifetime, self.config.max_lifetime), now)

    def _fresh(self, lease: Lease, now: float) -> bool:
        """Was the upstream mapping confirmed so recently that asking again is waste?"""
        if lease.generation != self.upstream.generation or lease.upstream_expires_at <= now:
            return False
        window = min((lease.upstream_expires_at - lease.upstream_renewed_at) * _FRESH_FRACTION,
                     _FRESH_MAX)
        return now - lease.upstream_renewed_at < window

    def _renew(self, lease: Lease, lifetime: int) -> Outcome:
        now = self.clock()
        current = lease.generation == self.upstream.generation
        upstream_left = lease.upstream_expires_at - now
        if self._fresh(lease, now):
            return self._from_lease(lease, lifetime, now)
        answer = self._ask(lease.key.proto, lease.upstream_port, lease.external_port, lifetime,
                           lease.key)
        if answer is None or not _granted(answer):
            if current and upstream_left >= 1:
                # The gateway is not answering, but what it granted still holds.
                return self._from_lease(lease, lifetime, now)
            return _upstream_failure(answer)
        return self._follow(lease, answer, lifetime)

    def _from_lease(self, lease: Lease, lifetime: int, now: float) -> Outcome:
        left = int(lease.upstream_expires_at - now)
        told = granted_lifetime(lifetime, left, self.config.max_lifetime)
        deadline = max(lease.expires_at, now + told + self.config.expiry_grace)
        self.leases[lease.key] = replace(lease, expires_at=deadline)
        self.counters["renewed_from_lease"] += 1
        return Outcome(Result.SUCCESS, lease.external_port, left)

    def _follow(self, lease: Lease, answer: MapAnswer, lifetime: int) -> Outcome:
        """Store a fresh upstream grant; move the rule if the granted port moved."""
        key = lease.key
        router_port, to_port = self._rule_ports(lease, answer.external_port)
        if (router_port, to_port) != (lease.router_port, lease.to_port):
            moved = self._move_rule(lease, router_port, to_port)
            if moved is None:
                return _FAILED
            lease = moved
        now = self.clock()
        told = granted_lifetime(lifetime, answer.lifetime, self.config.max_lifetime)
        self.leases[key] = replace(
            lease,
            external_port=answer.external_port,
            expires_at=now + told + self.config.expiry_grace,
            upstream_expires_at=now + answer.lifetime,
            upstream_renewed_at=now,
            generation=self.upstream.generation,
        )
        self.counters["renewed"] += 1
        if log.isEnabledFor(logging.DEBUG):
            self._event(logging.DEBUG, "mapping.renewed", key, lease=self.leases[key],
                        lifetime=told, result=Result.SUCCESS)
        return Outcome(Result.SUCCESS, answer.external_port, answer.lifetime)

    def _rule_ports(self, lease: Lease, external_port: int) -> tuple[int, int]:
        router_port = external_port if self.config.port_mode == "external" else lease.router_port
        to_port = lease.key.internal_port or external_port
        return router_port, to_port

    def _move_rule(self, lease: Lease, router_port: int, to_port: int) -> Lease | None:
        key = lease.key
        changes: dict[str, str] = {}
        if router_port != lease.router_port:
            with self._alloc:
                free = self.ports.router_free(key.proto, router_port, key.client)
                if free:
                    self.ports.hold_router(key.proto, router_port, key.client)
            if not free:
                self._event(logging.WARNING, "mapping.failed", key,
                            result=Result.NETWORK_FAILURE, router_port=router_port,
                            reason="the gateway moved the port to one taken on the router")
                return None
            changes["dst_port"] = str(router_port)
        if to_port != lease.to_port:
            changes["to_ports"] = str(to_port)
        try:
            self.router.update_rule(lease.rule_id, **changes)
        except RouterError as exc:
            if router_port != lease.router_port:
                self.ports.release_router(key.proto, router_port, key.client)
            self._event(logging.WARNING, "mapping.failed", key, result=Result.NETWORK_FAILURE,
                        reason=f"could not move the rule: {exc}")
            return None
        if router_port != lease.router_port:
            self.ports.release_router(key.proto, lease.router_port, key.client)
        moved = replace(lease, router_port=router_port, to_port=to_port)
        self._event(logging.INFO, "mapping.moved", key, lease=moved, result=Result.SUCCESS)
        return moved

    # ----------------------------------------------------------------- adopt

    def _adopt(self, candidate: Candidate, suggested: int, lifetime: int) -> Outcome:
        owned = candidate.owned
        key = owned.key
        router_port = owned.router_port
        assert router_port is not None
        if self.config.port_mode == "external":
            suggested = router_port
        answer = self._ask(key.proto, owned.upstream_port, suggested, lifetime, key)
        if answer is None or not _granted(answer):
            return _upstream_failure(answer)
        now = self.clock()
        lease = Lease(
            key=key,
            upstream_port=owned.upstream_port,
            router_port=router_port,
            to_port=owned.to_port or key.internal_port,
            rule_id=owned.rule.rule_id,
            interface=candidate.interface,
            external_port=answer.external_port,
            # Replaced by _follow; kept alive a little if moving the rule fails there.
            expires_at=now + self.config.expiry_grace,
            upstream_expires_at=now,
            upstream_renewed_at=now,
            generation=self.upstream.generation,
        )
        del self.candidates[key]
        self.leases[key] = lease
        self.by_client[key.client].add(key)
        self.counters["adopted"] += 1
        outcome = self._follow(lease, answer, lifetime)
        self._event(logging.INFO, "mapping.adopted", key, lease=self.leases.get(key, lease),
                    result=outcome.result)
        return outcome

    # ---------------------------------------------------------------- delete

    def delete(
        self,
        key: MappingKey,
        event: str = "mapping.deleted",
        upstream_later: list[tuple[Proto, int, MappingKey]] | None = None,
    ) -> Outcome:
        """Remove a mapping (idempotent: nothing to delete is success). With
        `upstream_later`, the upstream delete is queued there instead of sent."""
        with self._locks.hold(key):
            lease = self.leases.get(key)
            if lease is not None:
                self._teardown(lease, event, upstream_later)
                return _DONE
            candidate = self.candidates.pop(key, None)
            if candidate is not None:
                self._drop_candidate(candidate, event, upstream_later)
        return _DONE

    def delete_all(self, client: IPv4Address, proto: Proto) -> Outcome:
        """RFC 6886 3.4: internal port 0 and lifetime 0 remove the client's mappings of
        that protocol only."""
        keys = [k for k in self.by_client.get(client, ()) if k.proto == proto]
        keys += [k for k in self.candidates if k.client == client and k.proto == proto]
        self._in_parallel(self.delete, keys)
        return _DONE

    def _teardown(
        self,
        lease: Lease,
        event: str,
        upstream_later: list[tuple[Proto, int, MappingKey]] | None = None,
    ) -> None:
        key = lease.key
        del self.leases[key]
        client_keys = self.by_client.get(key.client)
        if client_keys is not None:
            client_keys.discard(key)
            if not client_keys:
                del self.by_client[key.client]
        removed = self._drop_rule(lease.rule_id, key, lease.router_port)
        self._forget_upstream_now_or_later(key.proto, lease.upstream_port, key, upstream_later)
        self.ports.release_upstream(key.proto, lease.upstream_port, key.client)
        if removed:
            self.ports.release_router(key.proto, lease.router_port, key.client)
        self.counters[event.split(".")[1]] += 1
        self._event(logging.INFO, event, key, lease=lease, lifetime=0, result=Result.SUCCESS)

    def _drop_candidate(
        self,
        candidate: Candidate,
        event: str,
        upstream_later: list[tuple[Proto, int, MappingKey]] | None = None,
    ) -> None:
        owned = candidate.owned
        key = owned.key
        removed = self._drop_rule(owned.rule.rule_id, key, owned.router_port or 0)
        self._forget_upstream_now_or_later(key.proto, owned.upstream_port, key, upstream_later)
        self.ports.release_upstream(key.proto, owned.upstream_port, key.client)
        if removed and owned.router_port is not None:
            self.ports.release_router(key.proto, owned.router_port, key.client)
        self._event(logging.INFO, event, key, rule_id=owned.rule.rule_id,
                    router_port=owned.router_port, result=Result.SUCCESS,
                    reason="rule of an earlier run")

    # ---------------------------------------------------------------- expiry

    def expire_due(self) -> int:
        """End mappings whose client stopped renewing, and unadopted earlier rules."""
        now = self.clock()
        due = [k for k, lease in self.leases.items() if lease.expires_at <= now]
        stale = [k for k, c in self.candidates.items()
                 if c.seen_at + self.config.adopt_grace <= now]
        self._in_parallel(self._expire, due)
        self._in_parallel(self._expire_candidate, stale)
        return len(due) + len(stale)

    def _expire(self, key: MappingKey) -> None:
        with self._locks.hold(key):
            lease = self.leases.get(key)
            # A renewal may have run while we waited for the lock: trust only the deadline.
            if lease is not None and lease.expires_at <= self.clock():
                self._teardown(lease, "mapping.expired")

    def _expire_candidate(self, key: MappingKey) -> None:
        with self._locks.hold(key):
            candidate = self.candidates.get(key)
            deadline = None if candidate is None else candidate.seen_at + self.config.adopt_grace
            if candidate is not None and deadline is not None and deadline <= self.clock():
                del self.candidates[key]
                self._drop_candidate(candidate, "mapping.abandoned")

    # -------------------------------------------------------------- shutdown

    def close_all(self) -> int:
        """Remove every rule and upstream mapping doublenat holds (graceful shutdown).

        Rules first, over the router pool; then the upstream deletes, many at a time,
        so a silent gateway cannot hold the router cleanup back.
        """
        keys = list(self.leases) + [k for k in self.candidates if k not in self.leases]
        upstream: list[tuple[Proto, int, MappingKey]] = []
        self._in_parallel(lambda k: self.delete(k, "mapping.closed", upstream), keys)
        for rule_id in list(self.garbage):
            self.remove_garbage(rule_id)
        if upstream:
            Pool(_SHUTDOWN_UPSTREAM_PARALLEL).map(lambda u: self._forget_upstream(*u), upstream)
        return len(keys)

    # ---------------------------------------------------- reconciliation hooks

    def remove_garbage(self, rule_id: str) -> bool:
        if rule_id not in self.garbage:
            return True
        try:
            self.router.remove_rule(rule_id)
        except NoSuchItem:
            pass
        except RouterError:
            return False
        self.forget_garbage(rule_id)
        return True

    def forget_garbage(self, rule_id: str) -> None:
        """The rule is gone from the router: its port is free again."""
        entry = self.garbage.pop(rule_id, None)
        if entry is not None:
            key, port = entry
            self.ports.release_router(key.proto, port, key.client)

    @contextmanager
    def watching_removals(self) -> Iterator[set[str]]:
        """While a reconciliation lists the router's rules, collect the ids of rules being
        removed or removed meanwhile: such a rule may still be listed, yet belongs to
        a mapping that just ended, not to an earlier run."""
        seen = set(self.removing)
        self._removal_logs.append(seen)
        try:
            yield seen
        finally:
            self._removal_logs.remove(seen)
            seen |= self.removing

    def locked(self, key: MappingKey) -> AbstractContextManager[None]:
        return self._locks.hold(key)

    # --------------------------------------------------------------- helpers

    def _install(
        self,
        key: MappingKey,
        upstream_port: int,
        router_port: int,
        to_port: int,
        rule_id: str,
        interface: str,
        answer: MapAnswer,
        lifetime: int,
        event: str,
    ) -> Outcome:
        now = self.clock()
        told = granted_lifetime(lifetime, answer.lifetime, self.config.max_lifetime)
        lease = Lease(
            key=key,
            upstream_port=upstream_port,
            router_port=router_port,
            to_port=to_port,
            rule_id=rule_id,
            interface=interface,
            external_port=answer.external_port,
            expires_at=now + told + self.config.expiry_grace,
            upstream_expires_at=now + answer.lifetime,
            upstream_renewed_at=now,
            generation=self.upstream.generation,
        )
        self.leases[key] = lease
        self.by_client[key.client].add(key)
        self.counters["created"] += 1
        self._event(logging.INFO, event, key, lease=lease, lifetime=told, result=Result.SUCCESS)
        return Outcome(Result.SUCCESS, answer.external_port, answer.lifetime)

    def _add_rule(self, spec: RuleSpec, key: MappingKey, collision_retry: bool = False
                  ) -> str | None:
        """The new rule's id; None if it failed; `_COLLISION` if the router says the
        port is taken and the caller will retry with another."""
        try:
            return self.router.add_rule(spec)
        except RouterTrap as exc:
            reason = f"router refused the rule: {exc}"
            if collision_retry and "already have" in str(exc):
                self._event(logging.INFO, "mapping.collision", key, router_port=spec.dst_port,
                            reason=reason)
                return _COLLISION
            if "in-interface" in str(exc):
                self.router_ready = False  # the VPN interface went away: detect it again
                self._router_wanted()
        except RouterError as exc:
            reason = f"router unreachable: {exc}"
            # The add may have happened before the connection broke: clean it up later.
            self.uncertain.add(spec.comment)
        self._event(logging.WARNING, "mapping.failed", key, result=Result.NETWORK_FAILURE,
                    router_port=spec.dst_port, reason=reason)
        return None

    def _drop_rule(self, rule_id: str, key: MappingKey, router_port: int) -> bool:
        self.removing.add(rule_id)
        try:
            self.router.remove_rule(rule_id)
            return True
        except RouterError as exc:
            self.garbage[rule_id] = (key, router_port)
            self._event(logging.WARNING, "rule.remove_failed", key, rule_id=rule_id,
                        reason=f"{exc}; reconciliation will remove it")
            return False
        finally:
            self.removing.discard(rule_id)
            for removed in self._removal_logs:
                removed.add(rule_id)

    def _ask(self, proto: Proto, port: int, suggested: int, lifetime: int,
             key: MappingKey) -> MapAnswer | None:
        try:
            answer = self.gateway.map(proto, port, suggested, lifetime)
        except GatewayError as exc:
            self._event(logging.WARNING, "upstream.failed", key, upstream_port=port,
                        reason=str(exc), result=Result.NETWORK_FAILURE)
            return None
        self.upstream.saw_epoch(answer.epoch)
        if not _granted(answer):
            self._event(logging.WARNING, "upstream.refused", key, upstream_port=port,
                        upstream_result=int(answer.result), result=_upstream_failure(answer).result)
        return answer

    def _forget_upstream(self, proto: Proto, port: int, key: MappingKey) -> None:
        try:
            answer = self.gateway.map(proto, port, 0, 0)
        except GatewayError as exc:
            # The upstream lease runs out by itself; nothing on the router depends on it.
            self._event(logging.INFO, "upstream.delete_failed", key, upstream_port=port,
                        reason=str(exc))
            return
        self.upstream.saw_epoch(answer.epoch)

    def _forget_upstream_now_or_later(
        self,
        proto: Proto,
        port: int,
        key: MappingKey,
        later: list[tuple[Proto, int, MappingKey]] | None,
    ) -> None:
        if later is None:
            self._forget_upstream(proto, port, key)
        else:
            later.append((proto, port, key))

    def _release(self, key: MappingKey, upstream_port: int, router_port: int | None) -> None:
        self.ports.release_upstream(key.proto, upstream_port, key.client)
        if router_port is not None:
            self.ports.release_router(key.proto, router_port, key.client)

    def _in_parallel(
        self, work: Callable[[MappingKey], object], keys: Iterable[MappingKey]
    ) -> None:
        keys = list(keys)
        if len(keys) == 1:
            work(keys[0])
        elif keys:
            # More workers than router connections keeps all of them busy.
            Pool(16).map(work, keys)

    def _event(self, level: int, event: str, key: MappingKey, lease: Lease | None = None,
               **fields: object) -> None:
        """One record per mapping event, always with the same fields (None when unknown),
        so a log aggregator can graph and filter them without parsing messages."""
        if level >= logging.WARNING and event in _THROTTLED:
            # A client hammering past its quota, or every request while the router is
            # down, is one warning per client and reason every few seconds, not a flood.
            mark = (key.client, event, str(fields.get("reason", "")))
            now = self.clock()
            if now - self._warned.get(mark, -_WARN_EVERY) < _WARN_EVERY:
                level = logging.DEBUG
            else:
                self._warned[mark] = now
                if len(self._warned) > _WARNED_MAX:
                    self._warned = {m: t for m, t in self._warned.items()
                                    if now - t < _WARN_EVERY}
        if not log.isEnabledFor(level):
            return
        record: dict[str, object] = {
            "event": event,
            "client": str(key.client),
            "protocol": key.proto.label,
            "internal_port": key.internal_port,
            "router_port": None,
            "upstream_port": None,
            "external_port": None,
            "rule_id": None,
            "interface": None,
            "lifetime": None,
            "result": None,
        }
        if lease is not None:
            record.update(router_port=lease.router_port, upstream_port=lease.upstream_port,
                          external_port=lease.external_port, rule_id=lease.rule_id,
                          interface=lease.interface)
        for name, value in fields.items():
            record[name] = int(value) if isinstance(value, Result) else value
        log.log(level, event.replace(".", " "), extra=record)


def _granted(answer: MapAnswer) -> bool:
    return answer.result == Result.SUCCESS and answer.external_port != 0 and answer.lifetime > 0
