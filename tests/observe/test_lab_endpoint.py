"""The lab daemon with METRICS_ADDR: mappings made with natpmpc and the project's probe show
in /metrics, /status and `doublenat status`; /healthz turns 503 when the router goes away;
nothing served holds the password; a taken port stops the start."""

from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest

from doublenat.adapters.front import BindError
from doublenat.protocol.natpmp import Result
from tests.freeport import free_udp_port
from tests.lab_support import MakeLab
from tests.needs import need_program
from tests.observe.support import get, metrics_addr, own_loopback, run_doublenat, samples
from tests.probe import probe

METRICS = {"METRICS_ADDR": "127.0.0.1:0"}


def natpmpc(host: str, *args: str) -> str:
    done = subprocess.run(["natpmpc", "-g", host, *args], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_mappings_show_in_metrics_status_and_the_status_command(make_lab: MakeLab) -> None:
    need_program("natpmpc")
    host = own_loopback()
    lab = make_lab(listen=f"{host}:5351", settings=METRICS)
    assert lab.daemon is not None
    tcp = natpmpc(host, "-a", "6881", "6881", "tcp", "60")
    udp = natpmpc(host, "-a", "6881", "6881", "udp", "60")
    [tcp_port] = re.findall(r"Mapped public port (\d+) protocol TCP", tcp)
    [udp_port] = re.findall(r"Mapped public port (\d+) protocol UDP", udp)
    with probe(lab.daemon.address) as client:  # from 127.0.0.1, as natpmpc's are
        assert client.tcp(7000, 7000).result == Result.SUCCESS
        assert client.raw(b"\x00\x03") is not None  # unknown opcode: result 5
        assert client.raw(b"\x02\x01" + bytes(10)) is not None  # PCP: unsupported version

    got = samples(lab)
    assert got[("doublenat_mappings", (("protocol", "tcp"),))] == 2
    assert got[("doublenat_mappings", (("protocol", "udp"),))] == 1

    def requests(opcode: str, result: str) -> float:
        return got[("doublenat_requests_total", (("opcode", opcode), ("result", result)))]

    assert requests("1", "success") == 1  # natpmpc's UDP mapping
    assert requests("2", "success") == 2  # natpmpc's and the probe's TCP mappings
    assert requests("other", "unsupported_opcode") == 1
    assert requests("1", "unsupported_version") == 1
    # natpmpc asks opcode 0 before each mapping; the lab asked at start.
    assert requests("0", "success") == lab.daemon.responder.counts["op0.result0"] >= 2
    assert got[("doublenat_router_up", ())] == 1 and got[("doublenat_upstream_up", ())] == 1
    assert got[("doublenat_router_call_seconds_count", ())] >= 3  # listing, route, 3 adds
    assert got[("doublenat_upstream_request_seconds_count", ())] >= 4

    status, content_type, body = get(lab, "/status")
    assert status == 200 and content_type == "application/json"
    doc = json.loads(body)
    listed = {(m["protocol"], m["internal_port"]): m for m in doc["mappings"]}
    assert set(listed) == {("tcp", 6881), ("udp", 6881), ("tcp", 7000)}
    assert listed[("tcp", 6881)]["external_port"] == int(tcp_port)
    assert listed[("udp", 6881)]["external_port"] == int(udp_port)
    assert all(m["client"] == "127.0.0.1" and not m["static"] for m in doc["mappings"])
    assert {m["rule_id"] for m in doc["mappings"]} == {r[".id"] for r in lab.rules()}
    assert doc["router"]["synchronised"] and doc["router"]["interface"] == "wg-proton"
    assert doc["upstream"]["public_address"] == "11.22.33.44"
    assert get(lab, "/healthz")[:2] == (200, "text/plain; charset=utf-8")

    table = run_doublenat("status", METRICS_ADDR=metrics_addr(lab))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].startswith("health    ok: router synchronised")
    assert "mappings  3 (tcp 2, udp 1)" in lines
    rows = [line.split() for line in lines if line.startswith(("tcp ", "udp "))]
    assert sorted((r[0], r[1], r[2], r[3]) for r in rows) == sorted([
        ("tcp", "127.0.0.1", "6881", tcp_port), ("udp", "127.0.0.1", "6881", udp_port),
        ("tcp", "127.0.0.1", "7000", str(listed[("tcp", 7000)]["external_port"]))])
    raw = run_doublenat("status", "--json", METRICS_ADDR=metrics_addr(lab))
    assert raw.returncode == 0, raw.stderr
    assert {(m["protocol"], m["internal_port"]) for m in json.loads(raw.stdout)["mappings"]} \
        == set(listed)


def test_healthz_turns_503_with_the_reason_when_the_router_goes_away(
    make_lab: MakeLab,
) -> None:
    lab = make_lab(settings=METRICS)
    assert lab.daemon is not None
    assert get(lab, "/healthz")[0] == 200
    lab.router.stop()
    with probe(lab.daemon.address) as client:
        # The client's request is what finds the router gone (result 3).
        assert client.tcp(6881, 6881).result == Result.NETWORK_FAILURE
    status, _, body = get(lab, "/healthz")
    assert status == 503
    assert body.startswith(b"unhealthy: router unreachable: ")
    got = samples(lab)
    assert got[("doublenat_router_up", ())] == 0 and got[("doublenat_healthy", ())] == 0
    assert got[("doublenat_requests_total", (("opcode", "2"), ("result", "network_failure")))] \
        == 1
    table = run_doublenat("status", METRICS_ADDR=metrics_addr(lab))
    assert table.returncode == 0
    assert table.stdout.splitlines()[1].startswith("health    UNHEALTHY: router unreachable")


def test_nothing_served_holds_the_password(make_lab: MakeLab) -> None:
    lab = make_lab(settings=METRICS)
    assert lab.daemon is not None and len(lab.password) >= 16
    with probe(lab.daemon.address) as client:
        client.tcp(6881, 6881)
    lab.router.stop()  # errors too: the router's failure text is in /status and /healthz
    with probe(lab.daemon.address) as client:
        client.tcp(6882, 6882)
    bodies = [get(lab, path)[2] for path in ("/metrics", "/status", "/healthz", "/", "/x")]
    bodies += [run_doublenat("status", *flag, METRICS_ADDR=metrics_addr(lab)).stdout.encode()
               for flag in ((), ("--json",))]
    assert b"router unreachable" in bodies[2]
    for body in bodies:
        assert lab.password.encode() not in body


def test_metrics_addr_taken_stops_the_daemon_before_it_serves(make_lab: MakeLab) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        listen_port = free_udp_port()
        lab = make_lab(start=False, listen=f"127.0.0.1:{listen_port}",
                       settings={"METRICS_ADDR": f"127.0.0.1:{port}"})
        with pytest.raises(BindError, match=f"METRICS_ADDR 127.0.0.1:{port} cannot be bound"):
            lab.start()
    # LISTEN_ADDR was let go again: nothing of the failed start is left holding it.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(("127.0.0.1", listen_port))


def test_serve_with_metrics_addr_taken_exits_1_with_one_clear_line() -> None:
    password = "Obs3rve-pa55word!zzyzx"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_doublenat(
            "serve", VPN_GATEWAY="127.0.0.1:9", MIKROTIK_API_ADDRESS="127.0.0.1:9",
            MIKROTIK_API_PASSWORD=password, LISTEN_ADDR="127.0.0.1:0",
            METRICS_ADDR=f"127.0.0.1:{port}", LOG_FORMAT="json")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    record = json.loads(lines[0])
    assert record["level"] == "ERROR" and record["event"] == "daemon.bind"
    assert f"METRICS_ADDR 127.0.0.1:{port} cannot be bound" in record["message"]
    assert password not in done.stdout + done.stderr


def test_status_command_errors() -> None:
    unset = run_doublenat("status")
    assert unset.returncode == 2
    assert unset.stderr.startswith("doublenat: error: METRICS_ADDR: is not set")
    bad = run_doublenat("status", METRICS_ADDR="localhost")
    assert bad.returncode == 2 and "METRICS_ADDR" in bad.stderr
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        nobody = run_doublenat("status", METRICS_ADDR=f"127.0.0.1:{port}")
    assert nobody.returncode == 1
    assert nobody.stderr.startswith(f"doublenat: nothing answers at http://127.0.0.1:{port}/")
