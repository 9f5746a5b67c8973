"""The fault matrix: each scenario breaks something, then checks that nothing was lost
(router rules == live mappings) and that the daemon still serves a fresh request."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import pytest

from doublenat.engine.model import parse_owned
from doublenat.lab.gateway import RequestKind
from doublenat.lab.run import Lab
from doublenat.protocol.natpmp import MapReply, MapRequest, Proto, Result
from tests.freeport import free_udp_port
from tests.lab_support import MakeLab, assert_rules_match_mappings, router_client, serve
from tests.probe import Probe, probe

_fresh_port = iter(range(20000, 30000))


def settle(lab: Lab) -> None:
    """Let a reconciliation pass clean up whatever a fault left, then check the invariant,
    and that a brand-new mapping still works."""
    assert lab.daemon is not None
    lab.daemon.reconciler.run_once()
    assert_rules_match_mappings(lab)
    with probe(lab.daemon.address, "127.0.0.200") as fresh:
        port = next(_fresh_port)
        assert fresh.tcp(port, port).result == Result.SUCCESS
    assert_rules_match_mappings(lab)


@pytest.fixture
def lab(make_lab: MakeLab) -> Lab:
    lab = make_lab(settings={"ROUTER_TIMEOUT": "0.5", "UPSTREAM_TIMEOUT": "0.6"})
    # Warm all four connections: the faults below hit connections already in use.
    lab.router.latency = 0.02
    with probe(lab.daemon.address) as client:
        helpers = [Probe(lab.daemon.address, f"127.0.0.{i}") for i in (2, 3, 4)]
        jobs = [gevent.spawn(c.udp, 1001, 1001) for c in [client, *helpers]]
        gevent.joinall(jobs, raise_error=True)
        for helper in helpers:
            helper.close()
        assert all(j.value.result == Result.SUCCESS for j in jobs)
    lab.router.latency = 0
    assert lab.router.counters.connections_open == 4
    return lab


ROUTER_FAULTS: dict[str, Callable[[Lab], object]] = {
    "drop before the reply": lambda lab: lab.router.drop_before_reply("/ip/firewall/nat/add"),
    "drop mid-reply": lambda lab: lab.router.drop_mid_reply("/ip/firewall/nat/add"),
    "execute then drop": lambda lab: lab.router.execute_then_drop("/ip/firewall/nat/add"),
    "fatal": lambda lab: lab.router.fatal("out of memory", "/ip/firewall/nat/add"),
    "router restart": lambda lab: lab.router.drop_all_connections(),
    "router restart with rst": lambda lab: lab.router.drop_all_connections(rst=True),
}


@pytest.mark.parametrize("fault", list(ROUTER_FAULTS))
def test_router_connection_faults_cost_nothing(lab: Lab, fault: str) -> None:
    ROUTER_FAULTS[fault](lab)
    with probe(lab.daemon.address) as client:
        reply = client.tcp(6881, 6881)
    # A pooled connection that broke is retried once (after checking the comment), so the
    # client does not even notice; above all there is exactly one rule.
    assert reply.result == Result.SUCCESS
    assert [r["dst-port"] for r in lab.rules() if r["protocol"] == "tcp"] == ["6881"]
    settle(lab)


def test_a_hanging_router_call_is_cut_by_the_deadline(lab: Lab) -> None:
    lab.router.stall("/ip/firewall/nat/add", times=2)  # the retry hangs as well
    started = time.monotonic()
    with probe(lab.daemon.address) as client:
        reply = client.tcp(6881, 6881)
    assert reply.result == Result.NETWORK_FAILURE
    assert time.monotonic() - started < 4
    settle(lab)  # the stalled add may have landed: reconciliation removes it
    assert not [r for r in lab.rules() if r["dst-port"] == "6881" and r["protocol"] == "tcp"]


def test_all_four_connections_broken_at_once(lab: Lab) -> None:
    lab.router.latency = 0.05
    clients = [Probe(lab.daemon.address, f"127.0.0.{i}") for i in range(10, 18)]
    try:
        jobs = [gevent.spawn(c.tcp, 7000 + i, 7000 + i) for i, c in enumerate(clients)]
        gevent.sleep(0.02)
        lab.router.drop_all_connections()
        gevent.joinall(jobs, raise_error=True)
    finally:
        for c in clients:
            c.close()
    lab.router.latency = 0
    # The four broken calls were on used connections: each is retried once on a new one.
    assert [j.value.result for j in jobs] == [Result.SUCCESS] * len(jobs)
    settle(lab)


def test_router_down_mid_operation_then_back(lab: Lab) -> None:
    lab.router.router_down()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881).result == Result.NETWORK_FAILURE
        assert client.udp(1001, 1001).result == Result.SUCCESS  # renewals need no router
        lab.router.router_up()
        deadline = time.monotonic() + 10
        while client.tcp(6881, 6881).result != Result.SUCCESS:
            assert time.monotonic() < deadline
            gevent.sleep(0.2)
    settle(lab)


GATEWAY_FAULTS: dict[str, Callable[[Lab], object]] = {
    "silent": lambda lab: lab.gateway.silence(address=False, mapping=True),
    "result 3": lambda lab: lab.gateway.fail_with(Result.NETWORK_FAILURE),
}


@pytest.mark.parametrize("fault", list(GATEWAY_FAULTS))
def test_gateway_failures_roll_back(lab: Lab, fault: str) -> None:
    GATEWAY_FAULTS[fault](lab)
    with probe(lab.daemon.address) as client:
        reply = client.tcp(6881, 6881)
        assert (reply.result, reply.external_port, reply.lifetime) == (Result.NETWORK_FAILURE, 0, 0)
        # a renewal of a fresh, valid lease is still answered from it
        assert client.udp(1001, 1001).result == Result.SUCCESS
    assert not [r for r in lab.rules() if r["protocol"] == "tcp"]
    lab.gateway.clear_faults()
    settle(lab)


@pytest.mark.parametrize("reset", ["epoch backwards", "public address change"])
def test_gateway_state_loss_resets_the_epoch_and_clients_remap(lab: Lab, reset: str) -> None:
    time.sleep(3.1)
    with probe(lab.daemon.address) as client:
        before = client.address().epoch
        if reset == "epoch backwards":
            lab.gateway.restart()
            client.tcp(6881, 6881)  # the next upstream reply reveals it
        else:
            lab.gateway.set_public_address("11.22.33.77")
            lab.daemon.addresses.forget()
            client.address()
        after = client.address()
        assert after.epoch < before
        # an RFC client re-requests its mappings after seeing the epoch go back
        assert client.udp(1001, 1001).result == Result.SUCCESS
    upstream = {(m.proto, m.internal_port) for m in lab.gateway.mappings()}
    renewed = [
        lease for lease in lab.daemon.mapper.leases.values() if str(lease.key.client) == "127.0.0.1"
    ]
    assert renewed and all(
        (lease.key.proto, lease.upstream_port) in upstream for lease in renewed
    )  # re-created upstream by the renewal
    settle(lab)


def test_reconciliation_racing_a_creation(lab: Lab) -> None:
    lab.gateway.set_delay(0.3)
    with probe(lab.daemon.address) as client:
        creation = gevent.spawn(client.tcp, 6881, 6881)
        gevent.sleep(0.1)  # the rule is on the router; the gateway has not answered yet
        report = lab.daemon.reconciler.run_once()
        assert creation.get(timeout=5).result == Result.SUCCESS
    assert report.removed == 0
    lab.gateway.set_delay(0)
    settle(lab)


def test_expiry_racing_a_renewal(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"EXPIRY_GRACE": "0", "UPSTREAM_TIMEOUT": "2"})
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881, 2).result == Result.SUCCESS
        time.sleep(1.2)
        lab.gateway.set_delay(1.5)  # the renewal is still waiting when the lease runs out
        renewal = client.tcp(6881, 6881, 60)
        lab.gateway.set_delay(0)
        assert renewal.result == Result.SUCCESS
        time.sleep(2.5)  # several janitor passes later
    assert [r["dst-port"] for r in lab.rules()] == ["6881"]
    settle(lab)


def test_two_clients_asking_for_the_same_port_at_once(lab: Lab) -> None:
    lab.router.latency = 0.01
    clients = [Probe(lab.daemon.address, f"127.0.0.{i}") for i in (30, 31, 32)]
    try:
        jobs = [gevent.spawn(c.tcp, 6881, 6881) for c in clients]
        gevent.joinall(jobs, raise_error=True)
    finally:
        for c in clients:
            c.close()
    assert all(j.value.result == Result.SUCCESS for j in jobs)
    ports = [r["dst-port"] for r in lab.rules() if r["protocol"] == "tcp"]
    assert len(ports) == len(set(ports)) == 3
    lab.router.latency = 0
    settle(lab)


# -------------------------------------------------------------- process faults


def map_until_ready(client: Probe, proto: Proto, port: int) -> int:
    """Ask like a retransmitting client until the (re)starting daemon grants it."""
    deadline = time.monotonic() + 10
    while True:
        reply = client.ask(MapRequest(proto, port, port, 60), timeout=1)
        if isinstance(reply, MapReply) and reply.result == Result.SUCCESS:
            return reply.external_port
        assert time.monotonic() < deadline, reply
        time.sleep(0.2)


def test_sigkill_then_restart_adopts_every_forward(
    emulators: dict[str, str], tmp_path: Path
) -> None:
    log, port = tmp_path / "serve.log", free_udp_port()
    router = router_client(emulators)
    first = serve(emulators, log, f"127.0.0.1:{port}")
    try:
        client = Probe(("127.0.0.1", port))
        granted = {p: map_until_ready(client, Proto.TCP, p) for p in (6881, 6882, 6883)}
        before = {r.rule_id: r for r in router.list_rules() if parse_owned(r)}
        assert len(before) == 3
        first.send_signal(signal.SIGKILL)  # no cleanup at all
        first.wait(5)
        second = serve(emulators, log, f"127.0.0.1:{port}")
        try:
            for internal, external in granted.items():  # the clients renew as usual
                assert map_until_ready(client, Proto.TCP, internal) == external
            after = {r.rule_id: r for r in router.list_rules() if parse_owned(r)}
            assert after == before  # adopted: same rules, no duplicate, none lost
            second.send_signal(signal.SIGTERM)
            assert second.wait(10) == 0
            assert not [r for r in router.list_rules() if parse_owned(r)]
        finally:
            if second.poll() is None:
                second.kill()
        client.close()
    finally:
        if first.poll() is None:
            first.kill()
        router.close()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(r.get("event") == "mapping.adopted" for r in records) == 3


def test_gateway_counts_no_repeated_work_for_retransmissions(lab: Lab) -> None:
    lab.gateway.reset_counters()
    lab.router.reset_counters()
    with probe(lab.daemon.address) as client:
        for _ in range(5):  # a client retransmitting on the RFC schedule
            assert client.tcp(6881, 6881).result == Result.SUCCESS
    assert lab.router.writes() == 1
    assert lab.gateway.requests_by_kind[RequestKind.CREATE] == 1
    assert lab.gateway.requests_by_kind[RequestKind.RENEW] == 0
