"""snapshot_of against the real daemon in the lab: what it reads, and when."""

from __future__ import annotations

import json
import socket

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
