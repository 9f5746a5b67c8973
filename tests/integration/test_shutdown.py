"""Graceful shutdown: in flight work finishes, then nothing is left on router or gateway."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import gevent

from doublenat.protocol.natpmp import MapRequest, Proto, Result, pack_request
from tests.lab_support import MakeLab, listening_port, router_client, serve
from tests.probe import Probe, probe


def test_stop_finishes_in_flight_work_then_removes_everything(make_lab: MakeLab) -> None:
    lab = make_lab()
    with probe(lab.daemon.address) as client:
        for port in range(7000, 7010):
            assert client.tcp(port, port).result == Result.SUCCESS
        lab.gateway.set_delay(0.5)
        in_flight = gevent.spawn(client.udp, 7100, 7100)
        gevent.sleep(0.1)
        report = lab.daemon.stop()
        reply = in_flight.get(timeout=5)
        assert reply.result == Result.SUCCESS  # answered before the cleanup
        late = client.raw(pack_request(MapRequest(Proto.TCP, 7200, 7200, 60)), 0.5)
    assert late is None  # reading stopped
    assert report.drained and report.left == 0 and report.closed == 11
    assert lab.rules() == []
    assert lab.gateway.mappings() == []


def test_sigterm_removes_every_rule_and_exits_zero(
    emulators: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    process = serve(emulators, log, LOG_LEVEL="DEBUG")
    try:
        port = listening_port(log)
        client = Probe(("127.0.0.1", port))
        deadline = time.monotonic() + 10
        while client.tcp(6881, 6881).result != Result.SUCCESS:  # until synchronised
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert client.udp(6881, 6881).result == Result.SUCCESS
        assert client.tcp(51413, 0).result == Result.SUCCESS
        client.close()
        router = router_client(emulators)
        assert len([r for r in router.list_rules() if r.comment.startswith("double-natpmp-")]) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
        assert [r for r in router.list_rules() if r.comment.startswith("double-natpmp-")] == []
        router.close()
    finally:
        if process.poll() is None:
            process.kill()
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"timestamp", "level", "logger", "message"} <= r.keys() for r in records)
    stopped = [r for r in records if r.get("event") == "daemon.stopped"]
    assert stopped and stopped[0]["left_behind"] == 0 and stopped[0]["mappings_closed"] == 3
    assert emulators["password"] not in log.read_text()


def test_a_silent_gateway_does_not_hold_back_the_rule_cleanup(make_lab: MakeLab) -> None:
    lab = make_lab()
    with probe(lab.daemon.address) as client:
        for port in range(8000, 8040):
            assert client.udp(port, port).result == Result.SUCCESS
    lab.gateway.silence()  # upstream deletes will all go unanswered
    report = lab.daemon.stop()
    # The rules are gone; the 40 upstream mappings the gateway may still hold are counted.
    assert lab.rules() == [] and report.left == 40 and report.closed == 40
    # rules come off first; the 40 upstream deletes then give up together, not in turn
    assert report.seconds < float(lab.environment()["SHUTDOWN_TIMEOUT"])
