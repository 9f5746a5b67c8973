"""Abuse limits: a flooding client, a full handler pool, strangers and greedy clients."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gevent

from doublenat.protocol.natpmp import AddressRequest, MapRequest, Proto, Result, pack_request
from tests.lab_support import MakeLab, assert_rules_match_mappings, listening_port, serve
from tests.probe import Probe, probe

FLOODER = textwrap.dedent(
    """
    import socket, sys, time
    host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.66", 0))
    s.setblocking(False)
    packets = [bytes([0, 2, 0, 0, i >> 8, i & 255, 0, 0, 0, 0, 0, 60]) for i in range(1, 4000)]
    start = time.monotonic(); sent = 0
    while (now := time.monotonic()) - start < seconds:
        while sent < (now - start) * rate:
            try:
                s.sendto(packets[sent % len(packets)], (host, port))
            except OSError:
                pass
            sent += 1
        time.sleep(0.001)
    print(sent)
    """
)


def opcode0_latencies(clients: list[Probe], count: int) -> list[float]:
    """Round-robin over several sources, each well inside its own rate limit."""
    samples = []
    packet = pack_request(AddressRequest())
    for i in range(count):
        started = time.perf_counter()
        assert clients[i % len(clients)].raw(packet, 2.0) is not None
        samples.append(time.perf_counter() - started)
    return samples


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def test_a_flooding_client_does_not_starve_the_others(
    emulators: dict[str, str], tmp_path: Path
) -> None:
    """10,000 requests/s from one source; another client's p99 stays close to unloaded.

    The figures are printed; the assertion is deliberately loose (bench/ measures it)."""
    log = tmp_path / "serve.log"
    daemon = serve(emulators, log, LOG_LEVEL="INFO")
    try:
        port = listening_port(log)
        quiet_clients = [Probe(("127.0.0.1", port), f"127.0.3.{i}") for i in range(1, 9)]
        loaded_clients = [Probe(("127.0.0.1", port), f"127.0.4.{i}") for i in range(1, 9)]
        try:
            opcode0_latencies(quiet_clients, 8)  # warm up: the address gets cached
            quiet = opcode0_latencies(quiet_clients, 400)
            flood = subprocess.Popen(
                [sys.executable, "-c", FLOODER, "127.0.0.1", str(port), "10000", "4"],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)
            loaded = opcode0_latencies(loaded_clients, 400)
            sent = int(flood.communicate(timeout=20)[0])
            assert loaded_clients[0].tcp(6881, 6881).result == Result.SUCCESS  # still serving
        finally:
            for client in quiet_clients + loaded_clients:
                client.close()
        print(
            f"flood {sent} datagrams; opcode-0 p99 quiet {p99(quiet) * 1e3:.3f} ms, "
            f"flooded {p99(loaded) * 1e3:.3f} ms"
        )
        assert sent > 30000
        assert p99(loaded) < max(4 * p99(quiet), 0.005)
    finally:
        daemon.terminate()
        assert daemon.wait(15) == 0
    # the flood got its rate's worth of answers and its quota of mappings, no more
    stats = [json.loads(line) for line in log.read_text().splitlines()]
    final = next(r for r in stats if r.get("event") == "stats.final")
    assert final.get("requests_rate_limited", 0) > 30000
    assert final.get("mappings_created", 0) <= 64 + 1


def test_a_full_handler_pool_loses_nothing_and_recovers(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.gateway.set_delay(0.4)  # every creation holds its handler slot this long
    clients = [Probe(lab.daemon.address, f"127.0.1.{i}") for i in range(1, 151)]
    try:
        packet = pack_request(MapRequest(Proto.UDP, 5000, 5000, 60))
        for client in clients:  # 150 at once: 100 handlers, the rest wait in the kernel
            client.send(packet)
        gevent.sleep(0.1)
        assert lab.daemon.server.in_flight() == 100
        replies = [client.receive(10.0) for client in clients]
    finally:
        for client in clients:
            client.close()
    assert all(r is not None and r[2:4] == b"\x00\x00" for r in replies)
    assert lab.daemon.server.in_flight() == 0
    lab.gateway.set_delay(0)
    with probe(lab.daemon.address, "127.0.2.1") as fresh:
        assert fresh.tcp(7000, 7000).result == Result.SUCCESS
    assert len(lab.rules()) == 151
    assert_rules_match_mappings(lab)


def test_the_rate_limit_applies_per_source(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"CLIENT_RATE_LIMIT": "5", "CLIENT_RATE_BURST": "10"})
    packet = pack_request(AddressRequest())
    with probe(lab.daemon.address, "127.0.0.7") as greedy:
        for _ in range(30):
            greedy.send(packet)
        answered = 0
        while greedy.receive(0.3) is not None:
            answered += 1
    assert 10 <= answered <= 12  # the burst, plus what refilled meanwhile
    with probe(lab.daemon.address, "127.0.0.8") as polite:
        assert polite.address().result == Result.SUCCESS
    assert lab.daemon.responder.counts["rate_limited"] >= 18


def test_two_clients_behind_a_silent_gateway_cannot_fill_the_handler_pool(
    make_lab: MakeLab,
) -> None:
    """Each request waiting on a silent gateway holds a handler for the whole upstream
    budget; two clients retransmitting 60 new mappings each must not take all 100, or
    even a cached opcode 0 from a third client goes unanswered (issue 12)."""
    lab = make_lab()
    with probe(lab.daemon.address, "127.0.3.1") as third:
        assert third.address().result == Result.SUCCESS  # the address is cached now
        lab.gateway.silence()
        greedy = [Probe(lab.daemon.address, f"127.0.3.{i}") for i in (2, 3)]
        try:
            for client in greedy:
                for port in range(20000, 20060):
                    client.send(pack_request(MapRequest(Proto.TCP, port, port, 60)))
            gevent.sleep(0.3)  # every one of them is read and waiting upstream
            assert third.raw(pack_request(AddressRequest()), 1.0) is not None
            busy = lab.daemon.server.in_flight()
            assert busy < 100, busy
        finally:
            for client in greedy:
                client.close()
