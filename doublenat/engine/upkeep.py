"""The engine's timers: keep-alive renewals, the upstream probe, re-mapping after an
upstream loss, static mappings, expiry, and finishing interrupted removals.

Keep-alive (SPEC §5.1) costs nothing per idle mapping between renewals: one heap entry
per mapping, one greenlet sleeping until the earliest is due. Each renewal is planned at
a fraction of the upstream lease drawn in [1/4, 1/2] from a hash of the mapping and the
grant's time, so mappings created (or re-mapped) together spread out instead of coming
back as a herd, and the spread persists. A mapping that ended is skipped when popped.
The loop wakes at most every KEEPALIVE_TICK and sends everything due by then: waking
once per renewal (hundreds a second with 10,000 mappings on a 60 s lease) cost the hub
three times the CPU of the renewals themselves (bench/dynamics.py).

Re-mapping (SPEC §5.2): when the gateway shows it lost its mappings (its epoch went back
or its address changed, seen in any reply or in the opcode-0 probe every
UPSTREAM_PROBE_INTERVAL), every live mapping is asked for again
at once, `REMAP_PARALLEL` at a time. Those that failed while the gateway was answering
are asked for once more as soon as the pass is over: in `external` mode the gateway may
give a mapping the port another of ours held before the loss, and while that one's own
re-map is still in flight its rule can be neither parked nor moved, so the first try
fails; once every re-map has finished it succeeds. One that still fails is retried by
the keep-alive schedule until its lifetime ends, never dropped.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
from collections.abc import Callable

import gevent
from gevent.event import Event
from gevent.pool import Group, Pool

from doublenat.engine.address import AddressService
from doublenat.engine.contracts import Clock, monotonic
from doublenat.engine.events import mapping_fields
from doublenat.engine.mapper import Mapper, in_pool
from doublenat.engine.model import Lease, MappingKey

log = logging.getLogger("doublenat.upkeep")

REMAP_PARALLEL = 64
KEEPALIVE_PARALLEL = 32
KEEPALIVE_TICK = 0.1  # a renewal may be this late: nothing against 15-30 s of a 60 s lease
RETRY_AFTER = 5.0  # a failed renewal is tried again this much later (or sooner)
JANITOR_TICK = 1.0
FLUSH_EVERY = 10.0  # retries of removals and upstream deletes that failed
STATIC_RETRY = 5.0
_SPREAD = (0.25, 0.5)


def renewal_fraction(key: MappingKey, renewed_at: float) -> float:
    """Where in the upstream lease the next renewal falls, in [1/4, 1/2): a hash, so
    tests and the benchmark see the same spread every run."""
    digest = hashlib.blake2b(f"{key}|{renewed_at:.3f}".encode(), digest_size=8).digest()
    share = int.from_bytes(digest, "big") / 2**64
    low, high = _SPREAD
    return low + (high - low) * share


class RenewalSchedule:
    """Due times of keep-alive renewals: a heap with lazy deletion (pure, no I/O)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, MappingKey]] = []
        self._due: dict[MappingKey, float] = {}

    def plan(self, key: MappingKey, due: float) -> None:
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))

    def cancel(self, key: MappingKey) -> None:
        self._due.pop(key, None)

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # replaced or cancelled
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[MappingKey]:
        keys = []
        while (due := self.next_due()) is not None and due <= now:
            _, key = heapq.heappop(self._heap)
            del self._due[key]
            keys.append(key)
        return keys

    def __len__(self) -> int:
        return len(self._due)

    def due(self, key: MappingKey) -> float | None:
        return self._due.get(key)


class Upkeep:
    def __init__(
        self,
        mapper: Mapper,
        addresses: AddressService,
        *,
        keepalive: bool,
        probe_interval: float,
        clock: Clock = monotonic,
        router_synced: Callable[[], bool] = lambda: True,
    ) -> None:
        self.mapper = mapper
        self.table = mapper.table
        self.addresses = addresses
        self.keepalive = keepalive
        self.probe_interval = probe_interval
        self.clock = clock
        self._router_synced = router_synced
        self.schedule = RenewalSchedule()
        self._wake = Event()
        self._lost = Event()
        self._greenlets: list[gevent.Greenlet] = []
        # Keep-alive renewals and later retries run in these (a re-map's end with its loop:
        # in_pool), so stop() ends them all. A renewal left waiting on the gateway would
        # outlive the daemon's shutdown, and greenlet reports the interpreter's killing it
        # on stderr, not as JSON.
        self._renewals = Pool(KEEPALIVE_PARALLEL)
        self._later = Group()
        self.remaps = 0
        self.renewals_sent = 0
        self.renewals_failed = 0
        self.last_remap: dict[str, float | int] | None = None

    # --------------------------------------------------------------- inputs

    def granted(self, lease: Lease) -> None:
        """A fresh upstream grant (any path): plan this mapping's next renewal."""
        if not self.keepalive:
            return
        due = lease.upstream_renewed_at + lease.upstream_lifetime * renewal_fraction(
            lease.key, lease.upstream_renewed_at)
        if due >= lease.expires_at:
            self.schedule.cancel(lease.key)  # the mapping ends before: nothing to keep
            return
        self._plan(lease.key, due)

    def lost(self) -> None:
        """The gateway lost its mappings: re-map them all (never blocks)."""
        self._lost.set()

    def _plan(self, key: MappingKey, due: float) -> None:
        earliest = self.schedule.next_due()
        self.schedule.plan(key, due)
        if earliest is None or due < earliest:
            self._wake.set()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._greenlets = [gevent.spawn(loop) for loop in (
            self._keepalive_loop, self._remap_loop, self._probe_loop, self._janitor_loop)]

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=True, timeout=1)
        self._greenlets = []
        for work in (self._renewals, self._later):
            work.kill(block=True, timeout=1)

    # ------------------------------------------------------------- keep-alive

    def _keepalive_loop(self) -> None:
        pool = self._renewals
        while True:
            self._wake.clear()
            due = self.schedule.next_due()
            wait = None if due is None else max(0.0, due - self.clock())
            if wait is None or wait > 0:
                self._wake.wait(None if wait is None else max(wait, KEEPALIVE_TICK))
                continue
            for key in self.schedule.pop_due(self.clock()):
                pool.spawn(self._renew, key, "keep-alive")  # blocks while the pool is full

    def _renew(self, key: MappingKey, why: str) -> bool | None:
        self.renewals_sent += 1
        try:
            renewed = self.mapper.refresh(key, why)
        except Exception:
            log.exception("keep-alive renewal failed", extra={
                "event": "keepalive.error", "client": str(key.client)})
            renewed = False
        if renewed is False:
            self.renewals_failed += 1
            lease = self.table.lease(key)
            if lease is not None:
                left = lease.upstream_expires_at - self.clock()
                self._plan(key, self.clock() + max(1.0, min(RETRY_AFTER, left / 4)))
        return renewed

    # ------------------------------------------------------------- re-mapping

    def _remap_loop(self) -> None:
        while True:
            self._lost.wait()
            self._lost.clear()
            self.remap()

    def remap(self) -> None:
        generation = self.mapper.upstream.generation
        stale = [k for k, lease in self.table.leases.items() if lease.generation < generation]
        if not stale:
            return
        started = self.clock()
        changes_before = self.mapper.counters["port_changes"]
        answers = self.mapper.upstream.answers
        results = in_pool(REMAP_PARALLEL, lambda k: self._renew(k, "upstream lost"), stale)
        again = [i for i, r in enumerate(results) if r is False]
        if again and self.mapper.upstream.answers > answers:
            # (Not when the gateway is silent: the keep-alive retries pace those.)
            for i, result in zip(again, in_pool(
                    REMAP_PARALLEL, lambda i: self._renew(stale[i], "upstream lost"), again),
                    strict=True):
                results[i] = result
        failed = sum(1 for r in results if r is False)
        if failed and not self.keepalive:
            # Without keep-alive nobody else would try again before the client does.
            for key, result in zip(stale, results, strict=True):
                if result is False:
                    self._later.add(gevent.spawn_later(
                        RETRY_AFTER, self._renew, key, "upstream lost"))
        self.remaps += 1
        self.last_remap = {"mappings": len(stale), "seconds": self.clock() - started,
                           "moved": self.mapper.counters["port_changes"] - changes_before,
                           "failed": failed, "retried": len(again)}
        log.warning("re-mapped after an upstream loss", extra=mapping_fields(
            "upstream.remapped", None, None, {
                "mappings": len(stale), "seconds": round(self.clock() - started, 3),
                "moved": self.last_remap["moved"], "failed": failed, "retried": len(again)}))

    # ------------------------------------------------------------------ probe

    def _probe_loop(self) -> None:
        # While mappings exist (SPEC §5.2), and also while idle: one datagram a probe
        # interval lets /healthz say whether the gateway answers before anyone asks.
        while True:
            gevent.sleep(self.probe_interval)
            self.addresses.refresh()

    # ---------------------------------------------------------------- janitor

    def _janitor_loop(self) -> None:
        last_flush = last_static = self.clock()
        while True:
            gevent.sleep(JANITOR_TICK)
            now = self.clock()
            try:
                self.mapper.expire_due()
                if now - last_flush >= FLUSH_EVERY:
                    last_flush = now
                    self.mapper.flush()
                if self.mapper.statics and self._router_synced() and \
                        now - last_static >= STATIC_RETRY:
                    last_static = now
                    self.mapper.ensure_statics()
            except Exception:
                log.exception("upkeep pass failed", extra={"event": "upkeep.error"})
