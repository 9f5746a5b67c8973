"""Mappings end to end: a real UDP client, the daemon, routeros-api over TCP to the emulated
router, and NAT-PMP over UDP to the emulated gateway."""

from __future__ import annotations

import time

import gevent
import pytest

from doublenat.lab.gateway import RequestKind
from doublenat.protocol.natpmp import (
    MapReply,
    MapRequest,
    Proto,
    Result,
    pack_request,
    parse_reply,
)
from tests.lab_support import MakeLab, assert_rules_match_mappings
from tests.probe import probe


def test_create_is_one_router_write_and_no_read_renewal_none(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.router.reset_counters()
    with probe(lab.daemon.address) as client:
        reply = client.tcp(6881, 6881, 60)
        assert (reply.result, reply.external_port, reply.lifetime) == (Result.SUCCESS, 6881, 60)
        assert lab.router.writes() == 1 and lab.router.reads() == 0
        assert lab.router.counters.commands["/ip/firewall/nat/add"] == 1
        [rule] = lab.rules()
        assert (
            rule["protocol"],
            rule["in-interface"],
            rule["dst-port"],
            rule["to-addresses"],
            rule["to-ports"],
        ) == ("tcp", "wg-proton", "6881", "127.0.0.1", "6881")
        lab.router.reset_counters()
        time.sleep(8)  # past the lease's "fresh" window: the renewal goes upstream
        again = client.tcp(6881, 7777, 60)
        assert again.external_port == 6881
        assert sum(lab.router.counters.commands.values()) == 0
        assert lab.gateway.requests_by_kind[RequestKind.RENEW] >= 1
    assert_rules_match_mappings(lab)


def test_retransmissions_join_the_request_in_flight(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.gateway.set_delay(0.3)  # the creation waits on the gateway meanwhile
    lab.router.reset_counters()
    lab.gateway.reset_counters()
    with probe(lab.daemon.address) as client:
        packet = pack_request(MapRequest(Proto.UDP, 51413, 51413, 60))
        for _ in range(4):
            client.send(packet)
            gevent.sleep(0.02)
        replies = {client.receive(3.0) for _ in range(4)}
    assert len(replies) == 1 and None not in replies
    reply = parse_reply(replies.pop())
    assert isinstance(reply, MapReply) and reply.result == Result.SUCCESS
    assert lab.router.writes() == 1
    assert lab.gateway.requests_by_kind[RequestKind.CREATE] == 1
    assert_rules_match_mappings(lab)


def test_delete_and_delete_all_of_one_protocol(make_lab: MakeLab) -> None:
    lab = make_lab()
    with probe(lab.daemon.address) as client:
        for port in (7010, 7011):
            assert client.tcp(port, port).result == Result.SUCCESS
            assert client.udp(port, port).result == Result.SUCCESS
        assert len(lab.rules()) == 4
        reply = client.tcp(7010, 1234, 0)
        assert (reply.result, reply.internal_port, reply.external_port, reply.lifetime) == (
            Result.SUCCESS,
            7010,
            0,
            0,
        )
        assert client.tcp(7010, 0, 0) == reply.__class__(
            Proto.TCP, client.tcp(7010, 0, 0).epoch, Result.SUCCESS, 7010, 0, 0
        )
        everything = client.udp(0, 0, 0)
        assert (everything.result, everything.internal_port) == (Result.SUCCESS, 0)
        left = [(r["protocol"], r["dst-port"]) for r in lab.rules()]
        assert left == [("tcp", "7011")]
    assert not [m for m in lab.gateway.mappings() if m.proto == Proto.UDP]
    assert_rules_match_mappings(lab)


def test_rollback_when_the_gateway_is_silent(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"UPSTREAM_TIMEOUT": "0.6"})
    lab.gateway.silence(address=False, mapping=True)
    lab.router.reset_counters()
    with probe(lab.daemon.address) as client:
        reply = client.tcp(6881, 6881)
        assert (reply.result, reply.external_port, reply.lifetime) == (Result.NETWORK_FAILURE, 0, 0)
        assert lab.router.counters.commands["/ip/firewall/nat/add"] == 1
        assert lab.router.counters.commands["/ip/firewall/nat/remove"] == 1
        assert lab.rules() == []
        lab.gateway.clear_faults()
        assert client.tcp(6881, 6881).result == Result.SUCCESS
    assert_rules_match_mappings(lab)


def test_router_refusal_asks_nothing_upstream(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.router.trap("not enough permissions (9)", "/ip/firewall/nat/add")
    lab.gateway.reset_counters()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881).result == Result.NETWORK_FAILURE
    assert lab.gateway.requests_by_kind[RequestKind.CREATE] == 0
    assert lab.rules() == []


def test_gateway_refusal_is_passed_on(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.gateway.fail_with(Result.NOT_AUTHORIZED)
    with probe(lab.daemon.address) as client:
        assert client.udp(51413, 51413, 60).result == Result.NOT_AUTHORIZED
    assert lab.rules() == []


def test_internal_port_zero_works_even_with_an_rfc_gateway(make_lab: MakeLab) -> None:
    lab = make_lab()
    with probe(lab.daemon.address) as client:
        # doublenat asks the gateway for a real port of its own, never internal port 0
        reply = client.udp(0, 40000, 60)
    assert (reply.result, reply.internal_port, reply.external_port) == (Result.SUCCESS, 0, 40000)
    [rule] = lab.rules()
    assert rule["to-ports"] == "40000"
    assert_rules_match_mappings(lab)


def test_expiry_removes_rule_and_upstream_mapping(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"EXPIRY_GRACE": "0"})
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881, 2).lifetime == 2
    assert len(lab.rules()) == 1
    deadline = time.monotonic() + 6
    while lab.rules() and time.monotonic() < deadline:
        gevent.sleep(0.2)
    assert lab.rules() == []
    assert not [m for m in lab.gateway.mappings() if m.internal_port == 6881]


def test_quota_allow_list_and_lifetime_clamp(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"MAX_MAPPINGS_PER_CLIENT": "2", "MAX_LIFETIME": "300"})
    with probe(lab.daemon.address) as client:
        assert client.tcp(1001).result == Result.SUCCESS
        assert client.udp(1002).result == Result.SUCCESS
        refused = client.tcp(1003)
        assert (refused.result, refused.external_port) == (Result.OUT_OF_RESOURCES, 0)
        assert client.tcp(1001, 0, 0xFFFFFFFF).lifetime <= 300
    with probe(lab.daemon.address, "127.0.0.2") as other:
        assert other.tcp(1003).result == Result.SUCCESS  # the quota is per client
    assert len(lab.rules()) == 3
    strict = make_lab(settings={"ALLOWED_CLIENTS": "10.0.0.0/8"})
    strict.router.reset_counters()
    with probe(strict.daemon.address) as outsider:
        assert outsider.raw(pack_request(MapRequest(Proto.TCP, 80, 80, 60)), 0.5) is None
        assert outsider.raw(b"\x00\x00", 0.5) is None
    assert strict.rules() == [] and strict.router.writes() == 0


def test_two_clients_asking_for_the_same_port_at_once(make_lab: MakeLab) -> None:
    lab = make_lab(router_latency=0.01)
    with probe(lab.daemon.address) as a, probe(lab.daemon.address, "127.0.0.2") as b:
        jobs = [gevent.spawn(c.tcp, 6881, 6881) for c in (a, b)]
        gevent.joinall(jobs, raise_error=True)
    assert all(j.value.result == Result.SUCCESS for j in jobs)
    ports = sorted(r["dst-port"] for r in lab.rules())
    assert len(set(ports)) == 2 and "6881" in ports
    assert_rules_match_mappings(lab)


@pytest.mark.parametrize("mode", ["internal", "external"])
def test_proton_gateway_in_both_port_modes(make_lab: MakeLab, mode: str) -> None:
    lab = make_lab(profile="proton", port_mode=mode)
    lab.router.reset_counters()
    with probe(lab.daemon.address) as client:
        reply = client.udp(0, 1, 60)  # ProtonVPN's own recipe: natpmpc -a 1 0 udp 60
        assert reply.result == Result.SUCCESS and reply.internal_port == 0
        assert reply.lifetime == 60 and reply.external_port >= 32768
        tcp = client.tcp(51413, 0, 3600)
        assert tcp.lifetime == 60
    rules = {r["protocol"]: r for r in lab.rules()}
    assert lab.router.writes() == 2 and lab.router.reads() == 0
    # internal port 0: the granted port is forwarded to the same port on the client
    assert rules["udp"]["to-ports"] == str(reply.external_port)
    assert rules["tcp"]["to-ports"] == "51413"
    if mode == "external":
        assert rules["udp"]["dst-port"] == str(reply.external_port)
        assert rules["tcp"]["dst-port"] == str(tcp.external_port)
    assert_rules_match_mappings(lab)


def test_external_mode_rule_follows_a_moved_port(make_lab: MakeLab) -> None:
    lab = make_lab(profile="proton", port_mode="external")
    with probe(lab.daemon.address) as client:
        first = client.tcp(51413, 0, 60)
        lab.gateway.change_ports()
        time.sleep(8)  # past the fresh window, so the renewal goes upstream
        moved = client.tcp(51413, first.external_port, 60)
    assert moved.external_port != first.external_port
    [rule] = lab.rules()
    assert rule["dst-port"] == str(moved.external_port)
    assert_rules_match_mappings(lab)


@pytest.mark.parametrize(("profile", "mode"), [("proton", "external"), ("rfc", "internal")])
def test_udp_and_tcp_of_one_client_get_one_external_port(
    make_lab: MakeLab, profile: str, mode: str
) -> None:
    lab = make_lab(profile=profile, port_mode=mode)
    with probe(lab.daemon.address) as client:
        # Proton's documented loop, as gluetun also does it: UDP then TCP, internal port 0
        udp = client.udp(0, 1, 60)
        tcp = client.tcp(0, 1, 60)
    assert udp.result == tcp.result == Result.SUCCESS
    assert udp.external_port == tcp.external_port
    assert_rules_match_mappings(lab)
