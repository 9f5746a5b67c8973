"""Assembly and lifecycle: the engine wired to its edges, started, and stopped gracefully.

Shutdown (SIGTERM/SIGINT, or `stop()`): stop reading, let in-flight handlers finish,
stop the timers, remove every rule and upstream mapping doublenat holds (in parallel,
bounded by SHUTDOWN_TIMEOUT), close the connections. Signal handlers only set an event;
the work happens in the main greenlet.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from doublenat import __version__, stats
from doublenat.adapters.front import BindError, NatPmpServer, bind_udp
from doublenat.adapters.routeros import RouterOsClient
from doublenat.adapters.upstream import NatPmpClient
from doublenat.engine.address import AddressService
from doublenat.engine.contracts import Clock, Gateway, Router, monotonic
from doublenat.engine.epoch import Epoch, Shown, UpstreamState
from doublenat.engine.events import MappingChange
from doublenat.engine.mapper import Mapper
from doublenat.engine.ratelimit import RateLimiter
from doublenat.engine.reconcile import ReconcileLoop, Reconciler
from doublenat.engine.responder import Responder
from doublenat.engine.state import MappingTable
from doublenat.engine.upkeep import Upkeep
from doublenat.hooks import HookRunner
from doublenat.settings import Settings

if TYPE_CHECKING:
    from doublenat.observe.http import Observer

log = logging.getLogger("doublenat.daemon")

# Part of the shutdown budget given to in-flight requests before cleanup starts.
_DRAIN_SHARE = 0.3
STATS_INTERVAL = 60.0


@dataclass
class ShutdownReport:
    drained: bool
    closed: int
    left: int
    seconds: float


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        router: Router | None = None,
        gateway: Gateway | None = None,
        clock: Clock = monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.router: Router = router or RouterOsClient.from_settings(settings, clock=clock)
        self.gateway: Gateway = gateway or NatPmpClient(
            settings.vpn_gateway, budget=settings.upstream_timeout, clock=clock
        )
        self.epoch = Epoch(clock)
        self.upstream = UpstreamState(clock, on_lost=self._upstream_lost)
        self.table = MappingTable(settings.port_range, settings.max_mappings_per_client)
        self.change_listeners: list[Callable[[MappingChange], None]] = []
        self.hooks: HookRunner | None = None
        if settings.hook_command is not None:
            self.hooks = HookRunner(str(settings.hook_command), settings.hook_timeout)
            self.change_listeners.append(self.hooks.submit)
        self.mapper = Mapper(
            self.router,
            self.gateway,
            self.upstream,
            settings,
            clock=clock,
            table=self.table,
            router_wanted=self._router_wanted,
            on_change=self._mapping_changed,
            on_granted=lambda lease: self.upkeep.granted(lease),
        )
        self.reconciler = Reconciler(
            self.mapper, self.router, settings.vpn_gateway.host, settings.in_interface
        )
        self.reconcile_loop = ReconcileLoop(self.reconciler, settings.reconcile_interval, clock,
                                            on_synced=self._router_synced,
                                            liveness=settings.upstream_probe_interval)
        self.addresses = AddressService(self.gateway, self.upstream, clock)
        self.upkeep = Upkeep(self.mapper, self.addresses,
                             keepalive=settings.upstream_keepalive,
                             probe_interval=settings.upstream_probe_interval, clock=clock,
                             router_synced=lambda: self.table.router is not None)
        limiter = (
            RateLimiter(settings.rate_limit, settings.rate_burst, clock)
            if settings.rate_limit > 0
            else None
        )
        self.responder = Responder(
            self.mapper, self.addresses, self.epoch, settings.allowed_clients, limiter
        )
        self.server: NatPmpServer | None = None
        self.started_at: float | None = None  # Unix time
        # METRICS_ADDR: /metrics, /status, /healthz (doublenat/observe/; imported only then).
        self.observer: Observer | None = None
        if settings.metrics_addr is not None:
            from doublenat.observe import http

            self.observer = http.Observer(settings.metrics_addr)
            self.observer.watch_latencies(self.router, self.gateway)
        self.stopping = Event()
        self.stopped = Event()
        self._greenlets: list[gevent.Greenlet] = []
        self._signal_handlers: list[object] = []

    # ---------------------------------------------------------------- start

    def start(self) -> None:
        """Bind and start serving; returns at once. Raises BindError if LISTEN_ADDR (or
        METRICS_ADDR) is taken."""
        sock = bind_udp(self.settings.listen)
        if self.observer is not None:
            try:
                self.observer.bind()
            except BindError:
                sock.close()
                raise
        self.started_at = time.time()
        start_gateway = getattr(self.gateway, "start", None)
        if start_gateway is not None:
            start_gateway()
        self.server = NatPmpServer(sock, self.responder)
        self.server.start()
        self.reconcile_loop.start()
        self.upkeep.start()
        self._greenlets = [gevent.spawn(self._stats_loop)]
        if self.observer is not None:
            self.observer.start(self)
        host, port = sock.getsockname()
        log.info("doublenat serving NAT-PMP", extra={
            "event": "daemon.started", "version": __version__, "listen": f"{host}:{port}",
            "vpn_gateway": str(self.settings.vpn_gateway),
            "router": str(self.settings.api_address),
            "interface": self.settings.in_interface or "auto",
            "port_mode": self.settings.port_mode})

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.address

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then shut down gracefully. Returns the exit status."""
        self.start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._signal_handlers.append(
                gevent.signal_handler(signum, self._on_signal, signum)
            )
        self.stopping.wait()
        self.stop()
        return 0

    def _on_signal(self, signum: int) -> None:
        # Only queue the work: the main greenlet does the shutdown.
        if not self.stopping.is_set():
            log.info("signal received, shutting down", extra={
                "event": "daemon.signal", "signal": signal.Signals(signum).name})
        self.stopping.set()

    # ----------------------------------------------------------------- stop

    def stop(self) -> ShutdownReport:
        self.stopping.set()
        started = self.clock()
        budget = self.settings.shutdown_timeout
        drained = True
        if self.server is not None:
            self.server.stop_accepting()
            pool = self.server.pool
            assert pool is not None
            drained = pool.join(timeout=budget * _DRAIN_SHARE)
            if not drained:
                pool.kill(block=True, timeout=1)
        self.reconcile_loop.stop()
        self.upkeep.stop()
        for greenlet in self._greenlets:
            greenlet.kill()
        closed = 0
        timeout = max(1.0, budget - (self.clock() - started))
        with gevent.Timeout(timeout, False):
            closed = self.mapper.close_all()
        # Counted from the state, not along the way: a cleanup cut short by the timeout
        # leaves records behind, and they are what may be left on the router or gateway.
        left = self.table.describe_leftovers()
        if self.hooks is not None:
            # The shutdown's `deleted` events are worth delivering, within what is left.
            self.hooks.close(max(1.0, budget - (self.clock() - started)))
        self._log_stats(final=True)
        if self.server is not None:
            self.server.close()
        for closer in (getattr(self.router, "close", None), getattr(self.gateway, "close", None)):
            if closer is not None:
                closer()
        for handler in self._signal_handlers:
            handler.cancel()  # type: ignore[attr-defined]
        self.addresses.close()
        if self.observer is not None:
            self.observer.stop()
        result = ShutdownReport(drained, closed, len(left), self.clock() - started)
        log.log(logging.INFO if not left else logging.ERROR,
                "doublenat stopped" if not left else "doublenat stopped, leaving things behind",
                extra={"event": "daemon.stopped", "drained": drained,
                       "mappings_closed": closed, "left_behind": len(left),
                       "left": list(left), "seconds": round(result.seconds, 3)})
        self.stopped.set()
        return result

    # -------------------------------------------------------------- helpers

    def _upstream_lost(self, shown: Shown, why: str) -> None:
        self.epoch.reset()
        self.addresses.forget()
        self.upkeep.lost()

    def _router_wanted(self) -> None:
        self.reconcile_loop.wake()

    def _router_synced(self) -> None:
        if self.mapper.statics and not self.stopping.is_set():
            # Kept with the other greenlets: stop() kills it before the cleanup starts.
            self._greenlets = [g for g in self._greenlets if not g.dead]
            self._greenlets.append(gevent.spawn(self.mapper.ensure_statics))

    def _mapping_changed(self, change: MappingChange) -> None:
        for listener in self.change_listeners:
            try:
                listener(change)
            except Exception:
                log.exception("mapping change listener failed", extra={
                    "event": "listener.error"})

    def _stats_loop(self) -> None:
        while True:
            gevent.sleep(STATS_INTERVAL)
            self._log_stats(final=False)

    def _log_stats(self, final: bool) -> None:
        record = stats.collect(
            table=self.table, mapper=self.mapper, responder=self.responder,
            reconciler=self.reconciler, router=self.router, gateway=self.gateway,
            server=self.server, epoch=self.epoch, upstream=self.upstream, upkeep=self.upkeep)
        log.info("stats", extra={"event": "stats.final" if final else "stats", **record})
