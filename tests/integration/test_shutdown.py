"""Graceful shutdown: in flight work finishes, then nothing is left on router or gateway."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from doublenat.adapters.routeros import RouterOsClient
from doublenat.protocol.natpmp import MapRequest, Proto, Result, pack_request
from doublenat.settings import Endpoint
from tests.lab_support import MakeLab
from tests.probe import Probe, probe

DOUBLENAT = Path(sys.executable).with_name("doublenat")


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
    assert report.drained and report.left == 0 and report.removed == 11
    assert lab.rules() == []
    assert lab.gateway.mappings() == []


@pytest.fixture
def emulators(tmp_path: Path) -> Iterator[dict[str, str]]:
    password = tmp_path / "password"
    password.write_text("lab-Secret-42\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "doublenat.lab.standalone",
            "--router",
            "127.0.0.1:0",
            "--password-file",
            str(password),
            "--gateway",
            "127.0.0.1:0",
            "--route",
            "127.0.0.1=wg-proton",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        addresses = json.loads(process.stdout.readline())
        addresses["password"] = "lab-Secret-42"
        yield addresses
    finally:
        process.terminate()
        process.wait(5)


def start_serve(emulators: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:  # type: ignore[type-arg]
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "VPN_GATEWAY": emulators["gateway"],
        "MIKROTIK_API_ADDRESS": emulators["router"],
        "MIKROTIK_API_USER": "doublenat",
        "MIKROTIK_API_PASSWORD": emulators["password"],
        "LISTEN_ADDR": "127.0.0.1:0",
        "ALLOWED_CLIENTS": "127.0.0.0/8",
        "LOG_LEVEL": "DEBUG",
    }
    with log.open("w") as out:
        process = subprocess.Popen([str(DOUBLENAT), "serve"], env=env, stderr=out)
    return process, log


def listening_port(log: Path, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "daemon.started":
                return int(record["listen"].rsplit(":", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"doublenat did not start:\n{log.read_text()}")


def test_sigterm_removes_every_rule_and_exits_zero(
    emulators: dict[str, str], tmp_path: Path
) -> None:
    process, log = start_serve(emulators, tmp_path)
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
        host, api_port = emulators["router"].rsplit(":", 1)
        router = RouterOsClient(Endpoint(host, int(api_port)), "doublenat", emulators["password"])
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
    assert lab.rules() == [] and report.left == 0 and report.removed == 40
    # rules come off first; the 40 upstream deletes then give up together, not in turn
    assert report.seconds < float(lab.environment()["SHUTDOWN_TIMEOUT"])
