"""Startup, interface detection and reconciliation, against the emulated router."""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent
import pytest

from doublenat.engine.model import MappingKey, rule_comment
from doublenat.engine.reconcile import NoInterface
from doublenat.lab.run import VPN_INTERFACE
from doublenat.protocol.natpmp import Proto, Result
from tests.lab_support import MakeLab, assert_rules_match_mappings
from tests.probe import probe


def eventually(check: Callable[[], bool], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        gevent.sleep(0.1)


def test_starts_with_the_router_down_and_recovers_without_restart(make_lab: MakeLab) -> None:
    lab = make_lab(start=False, settings={"ROUTER_TIMEOUT": "0.5"})
    lab.start_emulators()
    lab.router.router_down()
    lab.start(synced=False)
    with probe(lab.daemon.address) as client:
        assert client.address().result == Result.SUCCESS  # opcode 0 needs no router
        failed = client.tcp(6881, 6881)
        assert (failed.result, failed.external_port) == (Result.NETWORK_FAILURE, 0)
        lab.router.router_up()

        def maps() -> bool:
            return client.tcp(6881, 6881).result == Result.SUCCESS

        eventually(maps, timeout=15)
    assert_rules_match_mappings(lab)


def test_no_route_to_the_gateway_means_no_rules_until_there_is_one(make_lab: MakeLab) -> None:
    lab = make_lab()
    gateway_ip = lab.gateway.address[0]
    # A blackhole route in front of the tunnel's: the router has no way to the gateway.
    hole = lab.router.state.add_route(f"{gateway_ip}/32", blackhole=True, distance=0)
    with pytest.raises(NoInterface):
        lab.daemon.reconciler.run_once()
    lab.router.reset_counters()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881).result == Result.NETWORK_FAILURE
        assert lab.router.writes() == 0 and lab.rules() == []
        lab.router.state.remove_route(hole)
        eventually(lambda: client.tcp(6881, 6881).result == Result.SUCCESS)
    [rule] = lab.rules()
    assert rule["in-interface"] == VPN_INTERFACE  # never the LAN bridge


def seed_rule(lab, internal: int, router_port: int, client: str = "127.0.0.1") -> str:  # type: ignore[no-untyped-def]
    from ipaddress import IPv4Address

    key = MappingKey(IPv4Address(client), Proto.TCP, internal)
    row = lab.router.state.nat.add(
        {
            "chain": "dstnat",
            "action": "dst-nat",
            "protocol": "tcp",
            "in-interface": VPN_INTERFACE,
            "dst-port": str(router_port),
            "to-addresses": client,
            "to-ports": str(internal),
            "comment": rule_comment(key, router_port),
        }
    )
    return str(row[".id"]) if isinstance(row, dict) else str(row)


def test_rules_of_an_earlier_run_are_adopted_by_renewals(make_lab: MakeLab) -> None:
    lab = make_lab(start=False)
    lab.start_emulators()
    kept = seed_rule(lab, 6881, 6881)
    lab.start()
    assert lab.daemon.mapper.candidates  # kept, not deleted at start
    lab.router.reset_counters()
    with probe(lab.daemon.address) as client:
        reply = client.tcp(6881, 6881, 60)
    assert reply.result == Result.SUCCESS and reply.external_port == 6881
    assert lab.router.writes() == 0
    assert [r[".id"] for r in lab.rules()] == [kept]
    assert_rules_match_mappings(lab)


def test_unadopted_rules_are_removed_after_the_grace(make_lab: MakeLab) -> None:
    lab = make_lab(start=False, settings={"ADOPT_GRACE": "1"})
    lab.start_emulators()
    seed_rule(lab, 6881, 6881)
    lab.start()
    eventually(lambda: not lab.rules())
    assert not lab.daemon.mapper.candidates


def test_reconciliation_restores_removes_and_follows_the_interface(make_lab: MakeLab) -> None:
    lab = make_lab()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881).result == Result.SUCCESS
        assert client.udp(6882, 6882).result == Result.SUCCESS
    nat = lab.router.state.nat
    tcp_rule = next(r for r in nat.rows() if r["protocol"] == "tcp")
    nat.remove(tcp_rule[".id"])  # an administrator deleted it
    nat.add(
        {
            "chain": "dstnat",
            "action": "dst-nat",
            "protocol": "tcp",
            "dst-port": "1",
            "to-addresses": "127.0.0.9",
            "to-ports": "1",
            "comment": "double-natpmp-something-unreadable",
        }
    )
    nat.add(
        {
            "chain": "dstnat",
            "action": "dst-nat",
            "protocol": "tcp",
            "dst-port": "80",
            "to-addresses": "192.168.88.5",
            "to-ports": "80",
            "comment": "web server",
        }
    )
    # The admin moves the gateway's route onto another tunnel.
    state = lab.router.state
    state.add_interface("wg-backup", "wg")
    [route] = state.routing.find_routes(f"{lab.gateway.address[0]}/32")
    state.set_route(route, gateway="wg-backup")
    report = lab.daemon.reconciler.run_once()
    assert (report.restored, report.removed, report.retargeted) == (1, 1, 1)
    assert {r["in-interface"] for r in lab.rules()} == {"wg-backup"}
    assert any(r.get("comment") == "web server" for r in nat.rows())  # foreign rule kept
    assert_rules_match_mappings(lab)
