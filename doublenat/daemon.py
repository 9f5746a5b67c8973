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
from dataclasses import dataclass

import gevent
from gevent.event import Event

from doublenat import __version__
from doublenat.adapters.front import BindError, NatPmpServer, bind_udp
from doublenat.adapters.routeros import RouterOsClient
from doublenat.adapters.upstream import NatPmpClient
from doublenat.engine.address import AddressService
from doublenat.engine.contracts import Clock, Gateway, Router, monotonic
from doublenat.engine.epoch import Epoch, UpstreamState
from doublenat.engine.mapper import Mapper, MapperConfig
from doublenat.engine.ratelimit import RateLimiter
from doublenat.engine.reconcile import ReconcileLoop, Reconciler
from doublenat.engine.responder import Responder
from doublenat.observe.http import Observer
from doublenat.settings import Settings

log = logging.getLogger("doublenat.daemon")

# Part of the shutdown budget given to in-flight requests before cleanup starts.
_DRAIN_SHARE = 0.3
_JANITOR_TICK = 1.0
STATS_INTERVAL = 60.0


@dataclass
class ShutdownReport:
    drained: bool
    removed: int
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
        self.started_at: float | None = None  # Unix time
        # METRICS_ADDR: /metrics, /status, /healthz (doublenat/observe/).
        self.observer = Observer(settings.metrics_addr) if settings.metrics_addr else None
        metrics = self.observer.metrics if self.observer is not None else None
        self.router: Router = router or RouterOsClient.from_settings(
            settings, clock=clock, observe_call=metrics.observe_router_call if metrics else None)
        self.gateway: Gateway = gateway or NatPmpClient(
            settings.vpn_gateway, budget=settings.upstream_timeout, clock=clock,
            observe_request=metrics.observe_upstream_request if metrics else None,
        )
        self.epoch = Epoch(clock)
        self.upstream = UpstreamState(clock, on_lost=self._upstream_lost)
        self.mapper = Mapper(
            self.router,
            self.gateway,
            self.upstream,
            MapperConfig(
                port_mode=settings.port_mode,
                max_per_client=settings.max_mappings_per_client,
                max_lifetime=settings.max_lifetime,
                expiry_grace=settings.expiry_grace,
                adopt_grace=settings.adopt_grace,
                port_range=settings.port_range,
            ),
            clock=clock,
            router_wanted=self._router_wanted,
        )
        self.reconciler = Reconciler(
            self.mapper, self.router, settings.vpn_gateway.host, settings.in_interface
        )
        self.reconcile_loop = ReconcileLoop(self.reconciler, settings.reconcile_interval, clock)
        self.addresses = AddressService(self.gateway, self.upstream, clock)
        limiter = (
            RateLimiter(settings.rate_limit, settings.rate_burst, clock)
            if settings.rate_limit > 0
            else None
        )
        self.responder = Responder(
            self.mapper, self.addresses, self.epoch, settings.allowed_clients, limiter
        )
        self.server: NatPmpServer | None = None
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
        self._greenlets = [gevent.spawn(self._janitor), gevent.spawn(self._stats_loop)]
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
        for greenlet in self._greenlets:
            greenlet.kill()
        removed = 0
        timeout = max(1.0, budget - (self.clock() - started))
        with gevent.Timeout(timeout, False):
            removed = self.mapper.close_all()
        left = len(self.mapper.leases) + len(self.mapper.candidates) + len(self.mapper.garbage)
        self._log_stats(final=True)
        if self.server is not None:
            self.server.close()
        for closer in (getattr(self.router, "close", None), getattr(self.gateway, "close", None)):
            if closer is not None:
                closer()
        for handler in self._signal_handlers:
            handler.cancel()  # type: ignore[attr-defined]
        if self.observer is not None:
            self.observer.stop()
        report = ShutdownReport(drained, removed, left, self.clock() - started)
        log.log(logging.INFO if not left else logging.ERROR, "doublenat stopped", extra={
            "event": "daemon.stopped", "drained": drained, "mappings_closed": removed,
            "left_behind": left, "seconds": round(report.seconds, 3)})
        self.stopped.set()
        return report

    # -------------------------------------------------------------- helpers

    def _upstream_lost(self, why: str) -> None:
        self.epoch.reset()
        self.addresses.forget()

    def _router_wanted(self) -> None:
        self.reconcile_loop.wake()

    def _janitor(self) -> None:
        while True:
            gevent.sleep(_JANITOR_TICK)
            try:
                self.mapper.expire_due()
            except Exception:
                log.exception("expiry pass failed", extra={"event": "expiry.error"})

    def _stats_loop(self) -> None:
        while True:
            gevent.sleep(STATS_INTERVAL)
            self._log_stats(final=False)

    def _log_stats(self, final: bool) -> None:
        from doublenat.stats import collect

        log.info("stats", extra={"event": "stats.final" if final else "stats",
                                 **collect(self)})
