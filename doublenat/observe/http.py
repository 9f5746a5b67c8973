"""The HTTP endpoint at METRICS_ADDR: /metrics, /status and /healthz (gevent's WSGI server).

Every answer is made from memory (a snapshot of the daemon, the metrics registry): no
handler waits on the router or the gateway, so a scrape never holds up a NAT-PMP request,
and a dead router cannot hang /healthz. Nothing served holds the API password: the
snapshot carries no setting but VPN_GATEWAY and the probe interval.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from doublenat.adapters.front import BindError
from doublenat.observe.health import judge
from doublenat.observe.metrics import Metrics
from doublenat.observe.snapshot import MappingStatus, Snapshot, snapshot_of
from doublenat.settings import Endpoint

log = logging.getLogger("doublenat.http")

# Connections served at once (Prometheus keeps one open); more wait in the listen queue.
_CONNECTIONS = 16
_BACKLOG = 64
_PATHS = ("/metrics", "/status", "/healthz")
_CHUNK = 256  # mappings per piece of /status

StartResponse = Callable[..., Any]
SnapshotSource = Callable[[bool], Snapshot]  # (with every mapping?) -> snapshot


def status_document(s: Snapshot, health_reason: str, healthy: bool,
                    mappings: bool = True) -> dict[str, Any]:
    """The /status JSON: for people (`doublenat status`) and scripts alike."""
    r, u = s.router, s.upstream
    document = {
        "version": s.version,
        "started_at": s.started_at,
        "epoch": s.epoch,
        "healthy": healthy,
        "health": health_reason,
        "router": {
            "connected": r.connected, "synchronised": r.synchronised,
            "version": r.version, "board": r.board, "interface": r.interface,
            "interface_source": r.interface_source, "problem": r.problem,
        },
        "upstream": {
            "gateway": u.gateway, "public_address": u.public_address, "epoch": u.epoch,
            "last_answer_seconds_ago": None if u.since_answer is None
            else round(u.since_answer, 3),
            "up": u.up, "probe_interval": s.probe_interval,
        },
        "mapping_counts": dict(s.mapping_counts),
        "counters": {
            "requests": [{"opcode": c.opcode, "result": c.result, "count": c.count}
                         for c in s.requests],
            "dropped": dict(s.dropped),
            "port_changes": s.port_changes, "upstream_losses": s.upstream_losses,
            "hook_failures": s.hook_failures,
        },
    }
    if mappings:
        document["mappings"] = [_mapping(m) for m in s.mappings]
    return document


def _mapping(m: MappingStatus) -> dict[str, Any]:
    return {"client": m.client, "protocol": m.protocol, "internal_port": m.internal_port,
            "external_port": m.external_port, "router_port": m.router_port,
            "rule_id": m.rule_id, "expires_in": round(m.expires_in, 1),
            "lifetime": m.lifetime, "static": m.static}


def status_body(s: Snapshot, health_reason: str, healthy: bool) -> Iterator[bytes]:
    """`status_document` as JSON, in chunks of `_CHUNK` mappings with a pause for the hub
    between them: 10,000 mappings are ~2 MB of JSON and tens of milliseconds of work."""
    head = json.dumps(status_document(s, health_reason, healthy, mappings=False))
    yield (head[:-1] + ', "mappings": [').encode()
    mappings = s.mappings
    for start in range(0, len(mappings), _CHUNK):
        if start:
            gevent.sleep(0)
        chunk = json.dumps([_mapping(m) for m in mappings[start:start + _CHUNK]])[1:-1]
        yield (", " + chunk if start else chunk).encode()
    yield b"]}\n"


def make_app(metrics: Metrics, snapshot: SnapshotSource) -> Callable[..., Iterable[bytes]]:
    """The WSGI application: three read-only paths, 404 elsewhere, 405 for other methods."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path not in _PATHS:
            return _reply(start_response, "404 Not Found", b"not found: try /metrics, "
                          b"/status or /healthz\n", "text/plain; charset=utf-8")
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", b"GET only\n",
                          "text/plain; charset=utf-8", [("Allow", "GET, HEAD")])
        try:
            if path == "/metrics":
                body, content_type = metrics.exposition(environ.get("HTTP_ACCEPT", ""))
                return _reply(start_response, "200 OK", body, content_type, method=method)
            if path == "/healthz":
                health = judge(snapshot(False))
                line = ("ok: " if health.healthy else "unhealthy: ") + health.reason + "\n"
                return _reply(start_response, "200 OK" if health.healthy else
                              "503 Service Unavailable", line.encode(),
                              "text/plain; charset=utf-8", method=method)
            current = snapshot(True)
            health = judge(current)
            # No Content-Length: streamed, chunked on HTTP/1.1.
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Cache-Control", "no-store")])
            if method == "HEAD":
                return []
            return status_body(current, health.reason, health.healthy)
        except Exception:
            log.exception("HTTP request failed", extra={"event": "http.error", "path": path})
            return _reply(start_response, "500 Internal Server Error", b"internal error\n",
                          "text/plain; charset=utf-8")

    return app


def _reply(start_response: StartResponse, status: str, body: bytes, content_type: str,
           extra: list[tuple[str, str]] | None = None, method: str = "GET") -> list[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *(extra or [])])
    return [] if method == "HEAD" else [body]


def bind_tcp(address: Endpoint) -> socket.socket:
    """The listening socket for METRICS_ADDR; a clear BindError if it cannot be had."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Lets a restarted doublenat rebind past TIME_WAIT; a live listener still refuses.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by accepted connections (Linux): pywsgi writes the headers and the body
        # apart, and with Nagle the body waits for the scraper's delayed ACK, 40 ms per
        # request on a kept-alive connection (measured: 44 ms per /healthz without it).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address.host, address.port))
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason += " (another program, or another doublenat, listens there)"
        raise BindError(exc.errno, f"METRICS_ADDR {address} cannot be bound: {reason}") \
            from None
    return sock


class Observer:
    """The metrics registry for the adapters' histograms, and the HTTP endpoint.

    Made when METRICS_ADDR is set; `bind()` before the daemon starts anything (a taken
    port is a start-up error), `start(daemon)` once it runs, `stop()` at the end.
    """

    def __init__(self, address: Endpoint) -> None:
        self.address = address
        self.metrics = Metrics()
        self._socket: socket.socket | None = None
        self._server: WSGIServer | None = None

    def watch_latencies(self, router: object, gateway: object) -> None:
        """Have the adapters report each call's duration to the histograms (an injected
        router or gateway without the hook is left alone)."""
        if hasattr(router, "observe_call"):
            router.observe_call = self.metrics.observe_router_call  # type: ignore[attr-defined]
        if hasattr(gateway, "observe_request"):
            gateway.observe_request = (  # type: ignore[attr-defined]
                self.metrics.observe_upstream_request)

    def bind(self) -> None:
        self._socket = bind_tcp(self.address)

    @property
    def bound(self) -> tuple[str, int]:
        """Where it listens (the real port when METRICS_ADDR asked for port 0)."""
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        return host, port

    def start(self, daemon: Any) -> None:
        """Serve `daemon` (a `doublenat.daemon.Daemon`)."""
        if self._socket is None:
            self.bind()
        assert self._socket is not None

        def snapshot(mappings: bool) -> Snapshot:
            return snapshot_of(daemon, mappings)

        self.metrics.watch(lambda: snapshot(False))
        self._server = WSGIServer(self._socket, make_app(self.metrics, snapshot),
                                  spawn=Pool(_CONNECTIONS), log=None, error_log=log)
        self._server.start()
        host, port = self.bound
        log.info("metrics, status and health served over HTTP", extra={
            "event": "http.started", "metrics_addr": f"{host}:{port}",
            "paths": list(_PATHS)})

    def stop(self) -> None:
        if self._server is not None:
            # Idle kept-alive scrapers are not worth waiting for at shutdown.
            self._server.stop(timeout=0.5)
            self._server = None
        elif self._socket is not None:
            self._socket.close()
        self._socket = None
