"""snapshot_of against the real daemon in the lab: what it reads, and when."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from doublenat.observe.health import judge
from doublenat.observe.snapshot import snapshot_of
from doublenat.protocol.natpmp import Result
from tests.lab_support import MakeLab
from tests.observe.support import get, metrics_addr, run_doublenat, samples
from tests.probe import probe

METRICS = {"METRICS_ADDR": "127.0.0.1:0"}


def test_a_fresh_lab_daemon(make_lab: MakeLab) -> None:
    lab = make_lab(settings=METRICS)
    assert lab.daemon is not None
    s = snapshot_of(lab.daemon)
    assert s.router.connected and s.router.synchronised and s.router.problem is None
    assert (s.router.interface, s.router.interface_source) == ("wg-proton", "route check")
    assert s.upstream.public_address == "11.22.33.44" and s.upstream.up
    assert s.upstream.epoch is not None and s.upstream.since_answer is not None
    assert s.upstream.gateway == str(lab.settings.vpn_gateway)  # type: ignore[union-attr]
    assert s.mapping_counts == (("tcp", 0), ("udp", 0)) and len(s.mappings) == 0
    assert s.started_at is not None and s.probe_interval == 30.0
    assert judge(s).healthy


def test_an_interface_from_the_setting_says_so(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"MIKROTIK_IN_INTERFACE": "wg-proton"})
    assert lab.daemon is not None and lab.daemon.observer is None  # no METRICS_ADDR
    router = snapshot_of(lab.daemon).router
    assert (router.interface, router.interface_source) == ("wg-proton", "setting")


def test_mappings_are_those_of_the_moment_it_was_taken(make_lab: MakeLab) -> None:
    lab = make_lab()
    assert lab.daemon is not None
    with probe(lab.daemon.address) as client:
        client.tcp(6881, 6881)
        client.udp(6881, 6881)
        before = snapshot_of(lab.daemon, mappings=True)
        client.tcp(6881, 0, 0)  # deleted after the snapshot
    after = snapshot_of(lab.daemon, mappings=True)
    assert sorted((m.protocol, m.internal_port) for m in before.mappings) == [
        ("tcp", 6881), ("udp", 6881)]
    assert [(m.protocol, m.internal_port) for m in after.mappings] == [("udp", 6881)]
    [udp] = after.mappings
    assert udp.client == "127.0.0.1" and udp.router_port == udp.external_port == 6881
    assert 0 < udp.expires_in <= 60 + 1 and not udp.static
    assert udp.rule_id in {r[".id"] for r in lab.rules()}
    assert dict(after.mapping_counts) == {"tcp": 0, "udp": 1}
    assert len(snapshot_of(lab.daemon).mappings) == 0  # only /status asks for them


def test_a_silent_gateway_is_down_at_once_and_unhealthy_after_two_probe_intervals(
    make_lab: MakeLab,
) -> None:
    lab = make_lab(settings={**METRICS, "UPSTREAM_TIMEOUT": "0.5"})
    assert lab.daemon is not None
    lab.gateway.silence()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881).result == Result.NETWORK_FAILURE
    s = snapshot_of(lab.daemon)
    assert not s.upstream.up
    assert samples(lab)[("doublenat_upstream_up", ())] == 0
    # Its last answer (at start) is recent: within two probe intervals, still healthy.
    assert get(lab, "/healthz")[0] == 200
    # Two probe intervals on: as judged with the same gateway state a minute later.
    later = s.__class__(**{**{n: getattr(s, n) for n in s.__slots__},  # type: ignore[attr-defined]
                           "upstream": s.upstream.__class__(
                               **{**{n: getattr(s.upstream, n)
                                     for n in s.upstream.__slots__},  # type: ignore[attr-defined]
                                  "since_answer": 61.0})})
    assert not judge(later).healthy
    lab.gateway.clear_faults()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6882, 6882).result == Result.SUCCESS
    assert snapshot_of(lab.daemon).upstream.up


def test_stop_closes_the_endpoint(make_lab: MakeLab) -> None:
    lab = make_lab(settings=METRICS)
    host, port = metrics_addr(lab).rsplit(":", 1)
    assert json.loads(get(lab, "/status")[2])["router"]["synchronised"]
    lab.stop()
    with socket.socket() as sock:
        assert sock.connect_ex((host, int(port))) != 0


def test_serve_with_a_bad_metrics_addr_is_a_settings_error() -> None:
    done = run_doublenat("serve", VPN_GATEWAY="127.0.0.1:9", MIKROTIK_API_ADDRESS="127.0.0.1:9",
                         MIKROTIK_API_PASSWORD="Obs3rve-pa55word!zzyzx", METRICS_ADDR="localhost:x",
                         LOG_FORMAT="text")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "doublenat: error: METRICS_ADDR: 'localhost' is not an IPv4 address"]


def wait_for(predicate, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_router_version_and_board_come_from_the_router(make_lab: MakeLab) -> None:
    lab = make_lab()
    assert lab.daemon is not None
    router = snapshot_of(lab.daemon).router
    resource = lab.router.state.resource_row()  # what the emulated router says of itself
    assert router.version == resource["version"] and router.board == resource["board-name"]


def test_a_static_mapping_is_listed_as_static(make_lab: MakeLab) -> None:
    lab = make_lab(settings={**METRICS, "STATIC_MAPPINGS": "tcp:192.168.88.10:32400"})
    assert wait_for(lambda: len(json.loads(get(lab, "/status")[2])["mappings"]) == 1)
    [static] = json.loads(get(lab, "/status")[2])["mappings"]
    assert (static["client"], static["protocol"], static["internal_port"], static["static"]) \
        == ("192.168.88.10", "tcp", 32400, True)


def test_upstream_losses_and_moved_ports_are_counted(make_lab: MakeLab) -> None:
    lab = make_lab(profile="proton", settings={**METRICS, "UPSTREAM_PROBE_INTERVAL": "1"})
    assert lab.daemon is not None
    with probe(lab.daemon.address) as client:
        # An 8 s lease: renewals within its first eighth are answered from the lease.
        first = client.udp(6881, 0, lifetime=8).external_port
        lab.gateway.change_ports()  # the next renewal upstream gets another port
        time.sleep(1.2)
        moved = client.udp(6881, first, lifetime=8).external_port
    assert moved != first
    assert wait_for(lambda: samples(lab)[("doublenat_port_changes_total", ())] == 1)
    with probe(lab.daemon.address) as client:
        client.tcp(7000, 0, lifetime=3600)  # probes run while a mapping lives
    # A VPN reconnect to another server: the next probe sees another public address.
    lab.gateway.set_public_address("11.22.33.55")
    assert wait_for(lambda: samples(lab)[("doublenat_upstream_losses_total", ())] == 1)
    assert snapshot_of(lab.daemon).upstream_losses == 1


def test_hook_failures_are_counted(make_lab: MakeLab, tmp_path: Path) -> None:
    hook = tmp_path / "failing-hook"
    hook.write_text("#!/bin/sh\nexit 3\n")
    hook.chmod(0o755)
    lab = make_lab(settings={**METRICS, "HOOK_COMMAND": str(hook)})
    assert lab.daemon is not None
    assert samples(lab)[("doublenat_hook_failures_total", ())] == 0
    with probe(lab.daemon.address) as client:
        client.tcp(6881, 6881)  # created: one hook run, which fails
    assert wait_for(lambda: samples(lab)[("doublenat_hook_failures_total", ())] == 1)
    assert snapshot_of(lab.daemon).hook_failures == 1
