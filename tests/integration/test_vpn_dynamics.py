"""The VPN moves (issue 13): keep-alive, moved ports, recovery after a reconnect, static
mappings and hooks, through the real daemon and the lab's emulators over loopback."""

from __future__ import annotations

import json
import os
import time
from ipaddress import IPv4Address
from pathlib import Path

import gevent
import pytest

from doublenat.engine.model import MappingKey
from doublenat.lab.gateway import GatewayEmulator
from doublenat.protocol.natpmp import Proto, Result
from tests.lab_support import MakeLab, assert_rules_match_mappings
from tests.logcapture import captured_records
from tests.probe import probe


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        gevent.sleep(0.05)
    pytest.fail(f"not within {timeout} s: {what}")


def ours(gateway: GatewayEmulator) -> int:
    return len(gateway.mappings())


def test_a_reconnect_is_repaired_without_any_client_request(make_lab: MakeLab) -> None:
    """The gateway loses every mapping and gets a new address (a VPN reconnect to
    another server): doublenat notices at its next probe and asks again for every
    mapping within 5 s; no client has to renew."""
    lab = make_lab(settings={"UPSTREAM_PROBE_INTERVAL": "1"})
    with probe(lab.daemon.address) as client:
        for port in (6881, 6882, 6883):
            assert client.tcp(port, port, 3600).result == Result.SUCCESS
    assert ours(lab.gateway) == 3
    with captured_records() as records:
        lab.gateway.reconnect(new_address="11.22.33.99")
        lost_at = time.monotonic()
        wait_for(lambda: ours(lab.gateway) == 3, 8, "every mapping asked for again")
        repaired_in = time.monotonic() - lost_at  # bench/ measures it; here: it happens
    events = [getattr(r, "event", "") for r in records]
    assert "upstream.lost" in events and "upstream.remapped" in events
    [lost] = [r for r in records if getattr(r, "event", "") == "upstream.lost"]
    assert lost.shown_by in ("epoch", "address")  # type: ignore[attr-defined]
    [remapped] = [r for r in records if getattr(r, "event", "") == "upstream.remapped"]
    assert remapped.mappings == 3 and remapped.failed == 0  # type: ignore[attr-defined]
    assert lab.daemon.epoch.seconds() <= repaired_in + 1  # our epoch restarted too
    assert_rules_match_mappings(lab)


def test_external_mode_rules_follow_the_ports_a_reconnect_moved(make_lab: MakeLab) -> None:
    lab = make_lab(profile="proton", settings={"UPSTREAM_PROBE_INTERVAL": "1"})
    with probe(lab.daemon.address) as client:
        before = {port: client.udp(port, 1, 60).external_port for port in (5000, 5001)}
    with captured_records() as records:
        lab.gateway.reconnect(new_address="11.22.33.98")
        wait_for(lambda: ours(lab.gateway) == 2, 8, "both mappings asked for again")
        wait_for(lambda: all(str(m.external_port) in {r["dst-port"] for r in lab.rules()}
                             for m in lab.gateway.mappings()), 5, "rules moved")
    changed = [r for r in records if getattr(r, "event", "") == "mapping.changed"]
    assert sorted(r.previous_external_port for r in changed) == sorted(  # type: ignore[attr-defined]
        before.values())
    assert_rules_match_mappings(lab)
    with probe(lab.daemon.address) as client:  # the clients learn the new ports
        for port in (5000, 5001):
            reply = client.udp(port, 1, 60)
            lease = lab.daemon.table.leases[MappingKey(IPv4Address("127.0.0.1"), Proto.UDP,
                                                       port)]
            granted = lab.gateway.mapping("127.0.0.1", Proto.UDP, lease.upstream_port)
            assert granted is not None and reply.external_port == granted.external_port


def test_a_client_renewing_rarely_keeps_its_port_with_short_upstream_leases(
    make_lab: MakeLab,
) -> None:
    """The gateway grants 2 s; the client asked for an hour and does not come back:
    doublenat renews upstream itself and the mapping stays, on the same port."""
    lab = make_lab()
    lab.gateway.set_max_lifetime(2)
    with probe(lab.daemon.address) as client:
        reply = client.tcp(7000, 7000, 3600)
        assert reply.lifetime == 2  # told what the gateway granted
        gevent.sleep(6)
        [mapping] = lab.gateway.mappings()
        assert mapping.renewals >= 6 / 1.0 - 2  # every 0.5-1 s of a 2 s lease
        again = client.tcp(7000, 7000, 3600)
    assert again.result == Result.SUCCESS and again.external_port == reply.external_port
    assert_rules_match_mappings(lab)


def test_natpmpc_style_opcode_0_survives_a_short_gateway_blip(make_lab: MakeLab) -> None:
    """natpmpc asks opcode 0 before every mapping; once the address cache is stale, a
    blip used to answer result 3 and natpmpc gave up without sending the renewal."""
    lab = make_lab()
    lab.daemon.addresses.ttl = 0.3  # the 10 s cache, shortened for the test
    with probe(lab.daemon.address) as client:
        assert client.address().result == Result.SUCCESS
        assert client.tcp(7100, 7100, 60).result == Result.SUCCESS
        gevent.sleep(0.4)
        lab.gateway.silence_for(4)
        address = client.address(timeout=6)
        assert address.result == Result.SUCCESS and str(address.address) == "11.22.33.44"
        renewal = client.tcp(7100, 7100, 60)
        assert renewal.result == Result.SUCCESS  # answered from the valid lease


def test_static_mappings_through_their_whole_life(make_lab: MakeLab) -> None:
    """Static mappings: created once the router is reachable (it is down at start), kept
    through an upstream loss and an administrator deleting their rule, removed at
    shutdown."""
    lab = make_lab(start=False, settings={
        "STATIC_MAPPINGS": "tcp:192.168.88.10:32400,udp:192.168.88.10:32400",
        "UPSTREAM_PROBE_INTERVAL": "1", "RECONCILE_INTERVAL": "2"})
    lab.start_emulators()
    lab.router.router_down()
    lab.start(synced=False)
    gevent.sleep(1)
    assert not lab.rules()
    lab.router.router_up()
    wait_for(lambda: len(lab.rules()) == 2, 10, "both static mappings created")
    statics = {(lease.key.proto, lease.external_port) for lease in lab.daemon.table.leases.values()
               if lease.static}
    assert len(statics) == 2 and len({port for _, port in statics}) == 1  # one port, both
    lab.gateway.reconnect(new_address="11.22.33.97")
    wait_for(lambda: ours(lab.gateway) == 2, 8, "static mappings asked for again")
    lab.router.state.nat.remove(lab.rules()[0][".id"])  # an administrator deletes one
    wait_for(lambda: len(lab.rules()) == 2, 6, "the deleted rule restored")
    assert_rules_match_mappings(lab)
    report = lab.daemon.stop()
    assert report.left == 0 and not lab.rules() and ours(lab.gateway) == 0


HOOK = """#!/bin/sh
{{ printf '%s ' "$DOUBLENAT_EVENT" "$DOUBLENAT_PROTOCOL" "$DOUBLENAT_CLIENT" \\
  "$DOUBLENAT_INTERNAL_PORT" "$DOUBLENAT_EXTERNAL_PORT" \\
  "${{DOUBLENAT_PREVIOUS_EXTERNAL_PORT:-none}}" "$DOUBLENAT_STATIC"; echo; }} >> {log}
env > {env}.$DOUBLENAT_EVENT
"""


def test_a_hook_sees_every_event_in_order_and_no_setting(
    make_lab: MakeLab, tmp_path: Path
) -> None:
    log, env = tmp_path / "events", tmp_path / "env"
    hook = tmp_path / "hook"
    hook.write_text(HOOK.format(log=log, env=env))
    hook.chmod(0o755)
    lab = make_lab(profile="proton", settings={"HOOK_COMMAND": str(hook),
                                               "UPSTREAM_PROBE_INTERVAL": "1"})
    os.environ["DOUBLENAT_TEST_SECRET"] = "must-not-leak"
    try:
        with probe(lab.daemon.address) as client:
            first = client.udp(6000, 1, 60).external_port
            lab.gateway.reconnect(new_address="11.22.33.96")
            wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, 8,
                     "the changed event")
            assert client.udp(6000, 0, 0).result == Result.SUCCESS
        wait_for(lambda: len(log.read_text().splitlines()) >= 3, 5, "the deleted event")
    finally:
        del os.environ["DOUBLENAT_TEST_SECRET"]
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["created", "changed", "deleted"]
    assert events[0][1:5] == ["udp", "127.0.0.1", "6000", str(first)]
    assert events[1][5] == str(first) and events[1][4] != str(first)
    assert all(e[6] == "false" for e in events)
    names = {line.split("=", 1)[0] for line in (tmp_path / "env.created").read_text().splitlines()}
    assert names <= {"PATH", "LANG", "PWD", "SHLVL", "_", "OLDPWD"} | {
        n for n in names if n.startswith("DOUBLENAT_")}
    text = "".join(p.read_text() for p in tmp_path.glob("env.*"))
    assert "must-not-leak" not in text and lab.password not in text
    assert "MIKROTIK" not in text and "VPN_GATEWAY" not in text
    assert json.dumps(lab.daemon.hooks.failed) == "0"  # type: ignore[union-attr]


def test_an_idle_daemon_knows_whether_the_gateway_and_the_router_answer(
    make_lab: MakeLab,
) -> None:
    """No client has asked anything yet: the probe still asks the gateway (so health is
    known), and a router that dies between reconciliations is noticed within a probe
    interval, not at the next RECONCILE_INTERVAL."""
    lab = make_lab(settings={"UPSTREAM_PROBE_INTERVAL": "1", "RECONCILE_INTERVAL": "600"})
    wait_for(lambda: lab.daemon.upstream.last_answer_at is not None, 5,
             "the gateway probed with no mapping")
    assert lab.daemon.table.router is not None
    lab.router.router_down()
    lab.router.drop_all_connections()
    wait_for(lambda: lab.daemon.table.router is None, 5, "the dead router noticed")
    lab.router.router_up()
    wait_for(lambda: lab.daemon.table.router is not None, 10, "the router back")
