"""Real routers (issue 11): every RouterOS profile through the daemon's whole life, with
the real routeros-api client; the tunnel-only rule; ids after a restart; api-ssl
without a certificate."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import gevent
import pytest

from doublenat.lab.routeros import RouterOsEmulator
from doublenat.lab.run import Lab, LabConfig
from doublenat.protocol.natpmp import Result
from tests.lab_support import MakeLab, assert_rules_match_mappings
from tests.logcapture import captured_records
from tests.probe import probe

# Each profile, and how the daemon must find the interface on it (NOTES.md: 7.0-7.17
# have no /ip/route/check).
PROFILES = {"6.49": "route check", "7.16": "route table", "7.21": "route check"}


def detection(lab: Lab) -> tuple[str | None, str | None]:
    view = lab.daemon.table.router  # type: ignore[union-attr]
    return (view.interface, view.source) if view is not None else (None, None)


@pytest.mark.parametrize("version", list(PROFILES))
def test_the_whole_life_on_each_routeros_version(make_lab: MakeLab, version: str) -> None:
    lab = make_lab(routeros=version, settings={"RECONCILE_INTERVAL": "3600"})
    assert detection(lab) == (lab.vpn_interface, PROFILES[version])
    checks = len(lab.router.sent("/ip/route/check"))
    assert (checks > 0) == (PROFILES[version] == "route check")
    writes = lab.router.writes()
    with probe(lab.daemon.address) as client:
        created = client.tcp(6881, 6881, 3600)
        assert created.result == Result.SUCCESS
        assert lab.router.writes() == writes + 1  # one write, no read
        assert client.tcp(6881, 0, 3600).external_port == created.external_port  # renew
        assert client.udp(6881, 6881, 3600).result == Result.SUCCESS
        [rule] = [r for r in lab.rules() if r["protocol"] == "tcp"]
        assert rule["in-interface"] == lab.vpn_interface
        # reconciliation: an administrator deletes our rule and adds a stray one
        lab.router.state.nat.remove(rule[".id"])
        lab.router.state.nat.add(chain="dstnat", action="dst-nat", protocol="tcp",
                                 dst_port="9999", to_addresses="192.168.88.9",
                                 to_ports="9999", comment="double-natpmp-garbled")
        report = lab.daemon.reconciler.run_once()
        assert (report.restored, report.removed) == (1, 1)
        assert_rules_match_mappings(lab)
        assert client.tcp(6881, 0, 0).result == Result.SUCCESS  # delete
    assert [r["protocol"] for r in lab.rules()] == ["udp"]
    report = lab.daemon.stop()
    assert report.left == 0 and lab.rules() == []


@pytest.mark.parametrize("version", ["7.16", "7.21"])
@pytest.mark.parametrize("case", ["tunnel down", "pppoe uplink", "bridge"])
def test_the_gateway_reached_through_no_tunnel_creates_and_moves_nothing(
    make_lab: MakeLab, version: str, case: str
) -> None:
    """The tunnel goes down and the gateway's address resolves through the default route
    (the ISP uplink: Ethernet, or a PPPoE client), or a route sends it to the LAN bridge:
    doublenat must not expose a LAN host there. Nothing is created or moved, requests get
    result 3, and the log says why, naming the interface and MIKROTIK_IN_INTERFACE."""
    lab = make_lab(routeros=version, start=False)
    state = lab.router.state
    gateway_host = lab.config.gateway_host
    if case == "pppoe uplink":
        state.setup_home_router(vpn_gateway=gateway_host, uplink="pppoe",
                                vpn_interface=lab.vpn_interface)
    lab.start()
    with probe(lab.daemon.address) as client:
        assert client.tcp(7000, 7000, 3600).result == Result.SUCCESS
    [before] = lab.rules()
    expected = {"tunnel down": "ether1", "pppoe uplink": "pppoe-out1", "bridge": "bridge"}[case]
    if case == "bridge":
        state.add_route(f"{gateway_host}/32", gateway="bridge", distance=0)
        state.set_running(lab.vpn_interface, False)
    else:
        state.set_running(lab.vpn_interface, False)
    with captured_records() as records:
        with pytest.raises(Exception, match=expected):
            lab.daemon.reconciler.run_once()
        with probe(lab.daemon.address) as client:
            assert client.tcp(7001, 7001, 3600).result == Result.NETWORK_FAILURE
    refused = [r for r in records if getattr(r, "event", "") == "interface.refused"]
    assert refused and refused[0].levelno == logging.ERROR
    reason = refused[0].reason  # type: ignore[attr-defined]
    assert expected in reason and "MIKROTIK_IN_INTERFACE" in reason and "not a VPN tunnel" in \
        reason
    assert lab.rules() == [before]  # nothing created, nothing moved
    state.set_running(lab.vpn_interface, True)
    if case == "bridge":
        state.remove_route(f"{gateway_host}/32")
        state.add_route(f"{gateway_host}/32", gateway=lab.vpn_interface)
    lab.daemon.reconciler.run_once()
    with probe(lab.daemon.address) as client:
        assert client.tcp(7001, 7001, 3600).result == Result.SUCCESS
    assert {r["in-interface"] for r in lab.rules()} == {lab.vpn_interface}


def test_an_interface_set_explicitly_is_trusted_as_given(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"MIKROTIK_IN_INTERFACE": "ether1"})
    assert detection(lab) == ("ether1", "setting")
    with probe(lab.daemon.address) as client:
        assert client.tcp(7002, 7002, 60).result == Result.SUCCESS
    assert {r["in-interface"] for r in lab.rules()} == {"ether1"}


def foreign_rules(lab: Lab) -> dict[str, dict[str, str]]:
    """The administrator's rules by comment, ids left out (a renumbering changes them)."""
    return {r["comment"]: {k: v for k, v in r.items() if k != ".id"}
            for r in lab.router.state.nat.rows()
            if not r.get("comment", "").startswith("double-natpmp-")}


def with_admin_rules_around_ours(lab: Lab, ports: tuple[int, ...]) -> None:
    """An administrator's rule before ours (later deleted), ours, then `openvpn`: after a
    renumbering from *1, an id doublenat learned for its own rule names `openvpn`."""
    nat = lab.router.state.nat
    first = nat.add(chain="dstnat", action="dst-nat", protocol="udp", dst_port="1194",
                    to_addresses="192.168.88.2", to_ports="1194", comment="temporary")
    with probe(lab.daemon.address) as client:
        for port in ports:
            assert client.tcp(port, port, 3600).result == Result.SUCCESS
    nat.add(chain="dstnat", action="dst-nat", protocol="udp", dst_port="1194",
            in_interface="ether1", to_addresses="192.168.88.2", to_ports="1194",
            comment="openvpn")
    nat.remove(first)


RENUMBER = pytest.mark.parametrize("renumber", [True, "compact"],
                                   ids=["new-ids", "ids-from-1"])


@RENUMBER
def test_after_a_renumbering_restart_no_foreign_rule_is_ever_touched(
    make_lab: MakeLab, renumber: bool | str
) -> None:
    """Deletes, renewals and reconciliation right after a restart that renumbered every
    rule touch doublenat's rules only."""
    lab = make_lab(settings={"RECONCILE_INTERVAL": "3600"})
    with_admin_rules_around_ours(lab, (7100, 7101))
    foreign = foreign_rules(lab)
    lab.router.reboot(renumber=renumber)  # type: ignore[arg-type]
    with probe(lab.daemon.address) as client:
        assert client.tcp(7100, 0, 0).result == Result.SUCCESS  # a delete right after
        assert client.tcp(7101, 0, 3600).result == Result.SUCCESS  # a renewal
    lab.daemon.reconciler.run_once()
    assert foreign_rules(lab) == foreign
    assert [r["to-ports"] for r in lab.rules()] == ["7101"]
    assert_rules_match_mappings(lab)
    assert lab.daemon.stop().left == 0
    assert lab.rules() == [] and foreign_rules(lab) == foreign


@RENUMBER
def test_a_shutdown_right_after_a_renumbering_restart_removes_only_ours(
    make_lab: MakeLab, renumber: bool | str
) -> None:
    lab = make_lab(settings={"RECONCILE_INTERVAL": "3600"})
    with_admin_rules_around_ours(lab, (7110, 7111, 7112))
    foreign = foreign_rules(lab)
    lab.router.reboot(renumber=renumber)  # type: ignore[arg-type]
    assert lab.daemon.stop().left == 0
    assert lab.rules() == [] and foreign_rules(lab) == foreign


@pytest.fixture
def adh_lab() -> Iterator[Lab]:
    """The lab with its router offering api-ssl without a certificate (anonymous DH)."""
    lab = Lab(LabConfig(listen="127.0.0.1:0"))
    lab.router = RouterOsEmulator("127.0.0.1", 0, users={"doublenat": lab.password},
                                  ssl_context="adh")
    lab.start_emulators()  # gives the swapped router the lab's setup
    yield lab
    lab.stop()


def test_api_ssl_without_a_certificate_works_with_verify_false(adh_lab: Lab) -> None:
    tls = adh_lab.router.tls_address
    assert tls is not None
    adh_lab.config.settings = {"MIKROTIK_API_TLS": "true", "MIKROTIK_API_TLS_VERIFY": "false",
                               "MIKROTIK_API_ADDRESS": "{}:{}".format(*tls)}
    adh_lab.start(timeout=10)
    with probe(adh_lab.daemon.address) as client:
        assert client.tcp(7200, 7200, 60).result == Result.SUCCESS
    assert len(adh_lab.rules()) == 1
    sessions = adh_lab.router.connections()
    assert sessions and all(s.tls for s in sessions)


def test_api_ssl_without_a_certificate_is_refused_when_verifying(adh_lab: Lab) -> None:
    """Anonymous DH proves nothing about the router: only with VERIFY=false."""
    tls = adh_lab.router.tls_address
    assert tls is not None
    adh_lab.config.settings = {"MIKROTIK_API_TLS": "true", "ROUTER_TIMEOUT": "1",
                               "MIKROTIK_API_ADDRESS": "{}:{}".format(*tls)}
    adh_lab.start(timeout=10, synced=False)
    gevent.sleep(1.5)
    assert adh_lab.daemon.table.router is None  # type: ignore[union-attr]
    error = adh_lab.daemon.reconcile_loop.last_error or ""  # type: ignore[union-attr]
    assert "TLS handshake failed" in error and "MIKROTIK_API_TLS_VERIFY=false" in error
    assert adh_lab.router.writes() == 0
