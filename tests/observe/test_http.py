"""The WSGI application (called directly, no socket) and the METRICS_ADDR socket."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest

from doublenat.adapters.front import BindError
from doublenat.observe.http import bind_tcp, make_app, status_body, status_document
from doublenat.observe.metrics import Metrics
from doublenat.observe.snapshot import MappingStatus, Snapshot
from doublenat.settings import Endpoint
from tests.observe.samples import snapshot

STATUS_KEYS = {"version", "started_at", "epoch", "healthy", "health", "router", "upstream",
               "mapping_counts", "mappings", "counters"}
ROUTER_KEYS = {"connected", "synchronised", "version", "board", "interface",
               "interface_source", "problem"}
UPSTREAM_KEYS = {"gateway", "public_address", "epoch", "last_answer_seconds_ago", "up",
                 "probe_interval"}
MAPPING_KEYS = {"client", "protocol", "internal_port", "external_port", "router_port",
                "rule_id", "expires_in", "lifetime", "static"}


def call(path: str, method: str = "GET", current: Snapshot | None = None,
         accept: str = "") -> tuple[str, dict[str, str], bytes]:
    asked: list[bool] = []

    def source(mappings: bool) -> Snapshot:
        asked.append(mappings)
        s = current or snapshot()
        return s if mappings else s.__class__(**{**_fields(s), "mappings": ()})

    metrics = Metrics()
    metrics.watch(lambda: source(False))
    app = make_app(metrics, source)
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got["status"], got["headers"] = status, dict(headers)

    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method, "HTTP_ACCEPT": accept},
                        start_response))
    if path == "/status" and method == "GET":
        assert asked == [True]  # only /status asks for every mapping
    if path == "/healthz":
        assert asked == [False]
    return got["status"], got["headers"], body


def _fields(s: Snapshot) -> dict[str, Any]:
    return {name: getattr(s, name) for name in s.__slots__}  # type: ignore[attr-defined]


def test_status_json_shape() -> None:
    status, headers, body = call("/status")
    assert status == "200 OK" and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    assert set(doc) == STATUS_KEYS
    assert set(doc["router"]) == ROUTER_KEYS and set(doc["upstream"]) == UPSTREAM_KEYS
    assert [set(m) for m in doc["mappings"]] == [MAPPING_KEYS] * 3
    assert doc["mappings"][2] == {
        "client": "192.168.88.10", "protocol": "tcp", "internal_port": 32400,
        "external_port": 50000, "router_port": 50000, "rule_id": "*2", "expires_in": 86000.0,
        "lifetime": 86400, "static": True}
    assert doc["router"]["interface_source"] == "route check"
    assert doc["upstream"]["public_address"] == "11.22.33.44"
    assert doc["upstream"]["last_answer_seconds_ago"] == 4.0
    assert doc["healthy"] is True and doc["mapping_counts"] == {"tcp": 2, "udp": 1}
    assert {"opcode": 2, "result": 3, "count": 2} in doc["counters"]["requests"]
    assert doc["counters"]["dropped"] == {"not_allowed": 7, "malformed": 8, "rate_limited": 9}


def test_healthz_200_and_503_with_the_reason() -> None:
    status, headers, body = call("/healthz")
    assert status == "200 OK" and body.startswith(b"ok: router synchronised")
    assert headers["Content-Type"].startswith("text/plain")
    status, _, body = call("/healthz", current=snapshot(
        router={"synchronised": False, "problem": "login refused"}))
    assert status == "503 Service Unavailable"
    assert body == b"unhealthy: router not synchronised: login refused\n"


def test_metrics_text_and_openmetrics() -> None:
    status, headers, body = call("/metrics")
    assert status == "200 OK" and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b'doublenat_mappings{protocol="tcp"} 2.0' in body
    _, headers, body = call("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_other_paths_and_methods() -> None:
    assert call("/")[0] == "404 Not Found"
    assert call("/metrics/x")[0] == "404 Not Found"
    status, headers, _ = call("/metrics", method="POST")
    assert status == "405 Method Not Allowed" and headers["Allow"] == "GET, HEAD"
    status, headers, body = call("/status", method="HEAD")
    assert status == "200 OK" and body == b"" and headers["Content-Type"] == "application/json"
    status, headers, body = call("/healthz", method="HEAD")
    assert status == "200 OK" and body == b"" and int(headers["Content-Length"]) > 10


def test_a_failing_snapshot_is_a_500_and_a_log_record(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_mappings: bool) -> Snapshot:
        raise RuntimeError("engine moved")

    app = make_app(Metrics(), broken)
    got: list[str] = []
    body = b"".join(app({"PATH_INFO": "/healthz", "REQUEST_METHOD": "GET"},
                        lambda status, headers: got.append(status)))
    assert got == ["500 Internal Server Error"] and body == b"internal error\n"
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "http.error"]
    assert record.levelno == logging.ERROR and record.exc_info is not None


def test_a_taken_port_is_a_bind_error_naming_metrics_addr() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as raised:
            bind_tcp(Endpoint("127.0.0.1", port))
    assert raised.value.strerror.startswith(f"METRICS_ADDR 127.0.0.1:{port} cannot be bound: ")
    assert "another program, or another doublenat, listens there" in raised.value.strerror


def test_an_address_not_on_this_host_is_a_bind_error() -> None:
    with pytest.raises(BindError) as raised:
        bind_tcp(Endpoint("192.0.2.1", 9815))  # TEST-NET-1: bind only, nothing is sent
    assert "METRICS_ADDR 192.0.2.1:9815 cannot be bound" in raised.value.strerror


@pytest.mark.parametrize("count", [0, 1, 255, 256, 257, 600])
def test_status_streamed_in_chunks_is_the_same_document(count: int) -> None:
    many = tuple(MappingStatus(f"10.0.{i // 200}.{i % 200 + 1}", "udp", 1000 + i, 30000 + i,
                               30000 + i, f"*{i:X}", 60.0, None, False) for i in range(count))
    s = snapshot(mappings=many)
    pieces = list(status_body(s, "fine", True))
    assert json.loads(b"".join(pieces)) == status_document(s, "fine", True)
    assert len(pieces) == 2 + -(-count // 256)  # head, one piece per 256 mappings, tail


def test_connections_are_not_delayed_by_nagle() -> None:
    # Accepted sockets inherit it: without, each kept-alive scrape waited 40 ms for the
    # scraper's delayed ACK (44 ms per /healthz measured, 1 ms with it).
    sock = bind_tcp(Endpoint("127.0.0.1", 0))
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client = socket.create_connection(sock.getsockname(), timeout=5)
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
