"""RouterOS version profiles, the routing model, users and policies, api-ssl without a
certificate, and reboots, as the real routeros-api client sees them (see NOTES.md for the
recordings each expectation comes from)."""

from __future__ import annotations

import ipaddress
import random
import ssl
from collections.abc import Callable, Iterator

import pytest
from click.testing import CliRunner
from routeros_api import exceptions

from doublenat.lab.command import lab as lab_command
from doublenat.lab.routeros import (
    LAB_VERSIONS,
    NO_ROUTE,
    PROFILES,
    Profile,
    RouteCheck,
    RouterOsEmulator,
    RouterState,
    RoutingError,
    anonymous_dh_client_context,
)
from doublenat.lab.run import Lab, LabConfig
from doublenat.lab.standalone import _configure

from .conftest import PASSWORD, USER, Connect, RawClient

NAT = "/ip/firewall/nat"
GATEWAY = "10.2.0.1"
Raw = Callable[..., RawClient]


@pytest.fixture
def start() -> Iterator[Callable[..., RouterOsEmulator]]:
    """start(version, **kwargs): a started emulator; a home router routing GATEWAY via the
    tunnel unless `vpn_gateway=None`."""
    started: list[RouterOsEmulator] = []

    def _start(version: str, vpn_gateway: str | None = GATEWAY, **kwargs: object
               ) -> RouterOsEmulator:
        emu = RouterOsEmulator(users={USER: PASSWORD}, profile=version, **kwargs)  # type: ignore[arg-type]
        emu.state.setup_home_router(vpn_gateway=vpn_gateway)
        started.append(emu.start())
        return emu

    yield _start
    for emu in started:
        emu.stop()


def error(call: Callable[[], object]) -> str:
    with pytest.raises(exceptions.RouterOsApiCommunicationError) as caught:
        call()
    return caught.value.original_message.decode()


def dstnat(**extra: str) -> dict[str, str]:
    rule = {"chain": "dstnat", "action": "dst-nat", "protocol": "tcp", "dst_port": "6881",
            "in_interface": "wg-proton", "to_addresses": "192.168.88.10", "to_ports": "6881",
            "comment": "double-natpmp-tcp-6881"}
    rule.update(extra)
    return rule


# ======================================================================================
# Profiles
# ======================================================================================


def test_named_profiles() -> None:
    assert set(LAB_VERSIONS) <= set(PROFILES)
    v6, v716, v718, v721 = (PROFILES[n] for n in ("6.49", "7.16", "7.18", "7.21"))
    # Route check: in 6.x, absent 7.0-7.17, back from 7.18.
    assert (v6.route_check, v716.route_check, v718.route_check, v721.route_check) == (
        True, False, True, True)
    assert [p.empty_sentence for p in (v6, v716, v718, v721)] == [False, False, True, True]
    assert [p.route_style for p in (v6, v716, v721)] == ["v6", "v7", "v7"]
    assert not v6.named_unknown_parameter and v721.named_unknown_parameter
    assert "wg" not in v6.interface_types and "wg" in v716.interface_types
    assert "any-port" in v721.nat_unknown and "any-port" not in v6.nat_unknown
    assert v721.version_text == "7.21.4 (stable)" and v6.version_text == "6.49.10 (long-term)"
    assert Profile.named("7.17.1").route_check is False
    assert Profile.named("7.19").route_check and Profile.named("7.19").empty_sentence
    assert PROFILES["6.42"].challenge_login and not PROFILES["6.42"].plaintext_login


@pytest.mark.parametrize(("version", "present"), [("6.49", True), ("7.16", False),
                                                  ("7.21", True)])
def test_route_check_by_version(start: Callable[..., RouterOsEmulator], connect: Connect,
                                version: str, present: bool) -> None:
    emu = start(version)
    _, api = connect(emu)
    route = api.get_resource("/ip/route")
    if not present:
        assert error(lambda: route.call("check", {"dst-ip": GATEWAY, "once": ""})) == (
            "no such command")
        return
    [row] = route.call("check", {"dst-ip": GATEWAY, "once": ""})
    tunnel = "wg-proton" if version != "6.49" else "ovpn-proton"
    assert row == {"status": "ok", "interface": tunnel, "nexthop": GATEWAY}


def test_route_check_reply_words(start: Callable[..., RouterOsEmulator], raw: Raw) -> None:
    emu = start("7.21")
    reply = raw(emu).call("/ip/route/check", f"=dst-ip={GATEWAY}", "=once=", ".tag=3")
    assert reply == [
        ("!re", "=status=ok", "=interface=wg-proton", f"=nexthop={GATEWAY}", ".tag=3"),
        ("!done", ".tag=3"),
    ]
    reply = raw(emu).call("/ip/route/check", "=dst-ip=8.8.8.8", "=once=",
                          "=.proplist=interface")
    assert reply == [("!re", "=interface=ether1"), ("!done",)]


def test_empty_sentence_on_route_print(start: Callable[..., RouterOsEmulator], raw: Raw) -> None:
    query = ("/ip/route/print", "?dst-address=203.0.113.0/24")
    assert raw(start("7.16")).call(*query) == [("!done",)]
    assert raw(start("7.21")).call(*query) == [("!empty",), ("!done",)]
    assert raw(start("6.49")).call(*query) == [("!done",)]


# ======================================================================================
# /ip/route/print
# ======================================================================================

ACTIVE_MAIN = ("?active=true", "?routing-table=main", "?#&")
PROPS = "dst-address,gateway,immediate-gw,distance,routing-table"


def test_route_print_v7_active_main(start: Callable[..., RouterOsEmulator], raw: Raw) -> None:
    emu = start("7.16")
    emu.state.add_route("0.0.0.0/0", "wg-proton", table="vpn")
    reply = raw(emu).call("/ip/route/print", f"=.proplist={PROPS}", *ACTIVE_MAIN)
    assert reply == [
        ("!re", "=dst-address=192.0.2.0/24", "=gateway=ether1", "=immediate-gw=ether1",
         "=distance=0", "=routing-table=main"),
        ("!re", "=dst-address=192.168.88.0/24", "=gateway=bridge", "=immediate-gw=bridge",
         "=distance=0", "=routing-table=main"),
        ("!re", "=dst-address=10.2.0.2/32", "=gateway=wg-proton",
         "=immediate-gw=wg-proton", "=distance=0", "=routing-table=main"),
        ("!re", "=dst-address=0.0.0.0/0", "=gateway=192.0.2.1",
         "=immediate-gw=192.0.2.1%ether1", "=distance=1", "=routing-table=main"),
        ("!re", f"=dst-address={GATEWAY}/32", "=gateway=wg-proton",
         "=immediate-gw=wg-proton", "=distance=1", "=routing-table=main"),
        ("!done",),
    ]


def test_route_print_full_rows(start: Callable[..., RouterOsEmulator], connect: Connect) -> None:
    _, api = connect(start("7.21"))
    rows = {r["dst-address"]: r for r in api.get_resource("/ip/route").get()}
    assert rows["0.0.0.0/0"] == {
        "id": "*80000001", "dst-address": "0.0.0.0/0", "routing-table": "main",
        "gateway": "192.0.2.1", "immediate-gw": "192.0.2.1%ether1", "distance": "1",
        "scope": "30", "target-scope": "10", "dynamic": "true", "active": "true",
        "inactive": "false", "disabled": "false", "dhcp": "true",
    }
    assert rows["192.168.88.0/24"]["local-address"] == "192.168.88.1%bridge"
    assert rows["192.168.88.0/24"]["connect"] == "true"
    assert rows[f"{GATEWAY}/32"]["static"] == "true"
    assert rows[f"{GATEWAY}/32"]["id"] == "*1"


def test_route_print_v6_gateway_status(start: Callable[..., RouterOsEmulator],
                                       connect: Connect) -> None:
    emu = start("6.49")
    emu.state.add_route("0.0.0.0/0", "ovpn-proton", table="vpn")
    _, api = connect(emu)
    rows = api.get_resource("/ip/route").get()
    by_dst = {(r["dst-address"], r.get("routing-mark")): r for r in rows}
    default = by_dst[("0.0.0.0/0", None)]
    assert default["gateway-status"] == "192.0.2.1 reachable via  ether1"
    assert "immediate-gw" not in default and "routing-table" not in default
    assert by_dst[("0.0.0.0/0", "vpn")]["gateway-status"] == "ovpn-proton reachable"
    assert by_dst[("192.168.88.0/24", None)]["pref-src"] == "192.168.88.1"
    emu.state.set_running("ovpn-proton", False)
    rows = api.get_resource("/ip/route").get(dst_address=f"{GATEWAY}/32")
    assert rows[0]["gateway-status"] == "ovpn-proton unreachable"
    assert rows[0]["active"] == "false"


def test_route_print_v6_active_main(start: Callable[..., RouterOsEmulator], raw: Raw) -> None:
    """v6 has no routing-table column: main-table routes are those without routing-mark."""
    emu = start("6.49")
    emu.state.add_route("0.0.0.0/0", "ovpn-proton", table="vpn")
    reply = raw(emu).call("/ip/route/print", "=.proplist=dst-address,gateway-status",
                          "?active=true", "?-routing-mark", "?dst-address=0.0.0.0/0")
    assert reply == [
        ("!re", "=dst-address=0.0.0.0/0", "=gateway-status=192.0.2.1 reachable via  ether1"),
        ("!done",),
    ]


def test_tunnel_down_resolves_the_gateway_through_the_uplink(
    start: Callable[..., RouterOsEmulator], connect: Connect
) -> None:
    """The scenario the daemon must refuse: the tunnel is down, and the VPN gateway is then
    reached through the ISP uplink."""
    emu = start("7.21")
    _, api = connect(emu)
    route = api.get_resource("/ip/route")
    emu.state.set_running("wg-proton", False)
    [check] = route.call("check", {"dst-ip": GATEWAY, "once": ""})
    assert check == {"status": "ok", "interface": "ether1", "nexthop": "192.0.2.1"}
    # The route table shows why: the tunnel's route is inactive and has no immediate-gw.
    [tunnel] = route.get(dst_address=f"{GATEWAY}/32")
    assert (tunnel["active"], tunnel["inactive"]) == ("false", "true")
    assert "immediate-gw" not in tunnel
    [iface] = api.get_resource("/interface").get(name="wg-proton")
    assert (iface["type"], iface["running"]) == ("wg", "false")
    emu.state.set_running("wg-proton", True)
    assert route.call("check", {"dst-ip": GATEWAY, "once": ""})[0]["interface"] == "wg-proton"


def test_vpn_in_its_own_routing_table() -> None:
    state = RouterState()
    state.setup_home_router(vpn_gateway=GATEWAY, vpn_routing="table")
    # main knows no tunnel route: the gateway resolves through the uplink there.
    assert state.route_check(GATEWAY) == RouteCheck("ok", "ether1", "192.0.2.1")
    assert state.route_check(GATEWAY, table="vpn") == RouteCheck("ok", "wg-proton", GATEWAY)


def test_pppoe_uplink() -> None:
    state = RouterState()
    state.setup_home_router(vpn_gateway=GATEWAY, uplink="pppoe")
    assert state.interface_type("pppoe-out1") == "pppoe-out"
    assert state.route_check("8.8.8.8") == RouteCheck("ok", "pppoe-out1", "8.8.8.8")
    rows = {r["dst-address"]: r for r in state.routing.route_rows(state.profile)}
    assert rows["0.0.0.0/0"]["immediate-gw"] == "pppoe-out1"
    assert rows["198.51.100.1/32"]["gateway"] == "pppoe-out1"  # the peer, connected
    [address] = [a for a in state.routing.address_rows(state.profile)
                 if a["interface"] == "pppoe-out1"]
    assert (address["address"], address["network"]) == ("198.51.100.7/32", "198.51.100.1")
    state.set_running("wg-proton", False)
    assert state.route_check(GATEWAY).interface == "pppoe-out1"


def test_routing_rules() -> None:
    state = RouterState(setup="bare")
    state.add_interface("ether1")
    state.add_interface("ether2")
    state.add_interface("wg1", "wg")
    state.add_address("192.0.2.2/24", "ether1")
    state.add_address("198.51.100.2/24", "ether2")
    # Gateways are reached through connected networks only.
    state.add_route("0.0.0.0/0", "203.0.113.1")
    assert state.route_check("8.8.8.8") == NO_ROUTE
    # Two routes for one destination: the lower distance is active.
    state.add_route("0.0.0.0/0", "192.0.2.1", distance=5)
    far = state.add_route("0.0.0.0/0", "198.51.100.1", distance=2)
    assert state.route_check("8.8.8.8").interface == "ether2"
    state.set_route(far, disabled=True)
    assert state.route_check("8.8.8.8").interface == "ether1"
    # An explicit scope (`address%iface`) follows that interface.
    state.add_route("10.0.0.0/8", "10.2.0.1%wg1")
    assert state.route_check("10.9.9.9") == RouteCheck("ok", "wg1", "10.2.0.1")
    state.set_disabled("wg1", True)
    assert state.route_check("10.9.9.9").interface == "ether1"
    # A blackhole route is active and routes nowhere.
    state.add_route("10.9.0.0/16", blackhole=True)
    assert state.route_check("10.9.9.9") == NO_ROUTE
    # An address whose link is down gives no connected route, and no gateway behind it.
    state.set_running("ether1", False)
    assert state.route_check("8.8.8.8") == NO_ROUTE
    with pytest.raises(RoutingError):
        state.add_route("0.0.0.0/0", "10.0.0.1%nope-iface!")
    with pytest.raises(RoutingError):
        state.add_interface("ether1")
    with pytest.raises(RoutingError):
        RouterState(profile="6.49", setup="bare").add_interface("wg0", "wg")


def test_route_check_follows_active_routes_seeded() -> None:
    """Random configurations: route check answers through one of the longest active routes
    containing the destination, and never through an interface that is down."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for _ in range(40):
        state = RouterState(setup="bare")
        names = [f"wg{i}" for i in range(4)]
        for name in names:
            state.add_interface(name, "wg", running=rng.random() < 0.7)
        for _ in range(8):
            prefix = rng.choice([0, 8, 16, 24, 32])
            dst = f"10.{rng.randrange(4)}.{rng.randrange(4)}.0/{prefix}"
            state.add_route(dst, rng.choice(names), distance=rng.randrange(1, 4))
        destination = f"10.{rng.randrange(4)}.{rng.randrange(4)}.{rng.randrange(4)}"
        answer = state.route_check(destination)
        resolved = state.routing.resolve()
        address = ipaddress.ip_address(destination)
        candidates = [r for r in resolved if r.active and address in r.dst]
        context = f"seed {seed}: {destination} -> {answer}"
        if not candidates:
            assert answer == NO_ROUTE, context
            continue
        longest = max(c.dst.prefixlen for c in candidates)
        winners = {c.interface for c in candidates if c.dst.prefixlen == longest}
        assert answer.interface in winners, context
        interface = state.routing.interfaces[answer.interface]
        assert interface.running and not interface.disabled, context


# ======================================================================================
# /interface, /ip/address, /system/resource
# ======================================================================================


def test_interface_print_rows(start: Callable[..., RouterOsEmulator], raw: Raw) -> None:
    emu = start("7.21")
    emu.state.add_interface("pppoe-out1", "pppoe-out")
    emu.state.add_interface("ovpn-out1", "ovpn-out", running=False)
    reply = raw(emu).call("/interface/print", "=.proplist=name,type,running,disabled")
    assert reply == [
        ("!re", "=name=ether1", "=type=ether", "=running=true", "=disabled=false"),
        ("!re", "=name=bridge", "=type=bridge", "=running=true", "=disabled=false"),
        ("!re", "=name=wg-proton", "=type=wg", "=running=true", "=disabled=false"),
        ("!re", "=name=pppoe-out1", "=type=pppoe-out", "=running=true", "=disabled=false"),
        ("!re", "=name=ovpn-out1", "=type=ovpn-out", "=running=false", "=disabled=false"),
        ("!done",),
    ]
    [row] = raw(emu).call("/interface/print", "?name=ether1")[:1]
    assert "=default-name=ether1" in row and "=mac-address=02:00:5E:00:00:01" in row


def test_address_print(start: Callable[..., RouterOsEmulator], connect: Connect) -> None:
    _, api = connect(start("7.16"))
    rows = api.get_resource("/ip/address").get(interface="wg-proton")
    assert rows == [{"id": "*3", "address": "10.2.0.2/32", "network": "10.2.0.2",
                     "interface": "wg-proton", "actual-interface": "wg-proton",
                     "invalid": "false", "dynamic": "false", "disabled": "false"}]


@pytest.mark.parametrize(("version", "text"), [("6.49", "6.49.10 (long-term)"),
                                               ("7.16", "7.16.2 (stable)"),
                                               ("7.21", "7.21.4 (stable)")])
def test_system_resource_by_version(start: Callable[..., RouterOsEmulator], connect: Connect,
                                    version: str, text: str) -> None:
    _, api = connect(start(version))
    [row] = api.get_resource("/system/resource").get()
    assert row["version"] == text
    assert {"uptime", "board-name", "architecture-name", "cpu-load", "build-time",
            "free-memory", "total-memory", "platform"} <= set(row)
    assert (row["board-name"], row["architecture-name"]) == ("CHR", "x86_64")


# ======================================================================================
# Traps per version, users and policies
# ======================================================================================


@pytest.mark.parametrize("version", ["6.49", "7.16", "7.21"])
def test_trap_wordings(start: Callable[..., RouterOsEmulator], connect: Connect,
                       version: str) -> None:
    emu = start(version, vpn_gateway=None)
    _, api = connect(emu)
    nat = api.get_resource(NAT)
    tunnel = "wg-proton" if version != "6.49" else "ovpn-proton"
    assert error(lambda: nat.remove(id="*7")) == "no such item (4)"
    unknown = error(lambda: nat.add(**dstnat(in_interface=tunnel), colour="red"))
    assert unknown == ("unknown parameter" if version == "6.49" else "unknown parameter colour")
    with pytest.raises(exceptions.RouterOsApiCommunicationError) as failed:
        connect(emu, USER, "wrong")
    assert failed.value.original_message == b"invalid user name or password (6)"


def test_read_only_user_gets_not_enough_permissions(
    start: Callable[..., RouterOsEmulator], connect: Connect, raw: Raw
) -> None:
    emu = start("7.21")
    emu.add_user("watcher", "pw", group="read")
    rule = emu.state.nat.add(**dstnat())
    _, api = connect(emu, "watcher", "pw")
    nat = api.get_resource(NAT)
    assert len(nat.get()) == 1  # reading is allowed
    for call in (lambda: nat.add(**dstnat(dst_port="1")),
                 lambda: nat.set(id=rule, comment="x"),
                 lambda: nat.remove(id=rule)):
        assert error(call) == "not enough permissions (9)"
    assert emu.state.nat.rows() == [dict(emu.state.nat.get(rule) or {})]
    assert emu.state.nat.find(comment="double-natpmp-tcp-6881")[0][".id"] == rule
    client = raw(emu, login=False)
    client.login("watcher", "pw")
    assert client.call(f"{NAT}/remove", f"=.id={rule}", ".tag=9") == [
        ("!trap", "=message=not enough permissions (9)", ".tag=9"), ("!done", ".tag=9")]
    # Policies can be given one by one; without `api` the user cannot log in over the API.
    emu.add_user("nosy", "pw", group="read,write,winbox")
    with pytest.raises(exceptions.RouterOsApiCommunicationError):
        connect(emu, "nosy", "pw")
    with pytest.raises(ValueError, match="unknown policy"):
        emu.add_user("odd", "pw", group="read,fly")


def test_nat_properties_by_version(start: Callable[..., RouterOsEmulator],
                                   connect: Connect) -> None:
    _, api7 = connect(start("7.21"))
    nat7 = api7.get_resource(NAT)
    assert error(lambda: nat7.add(**dstnat(any_port="80"))) == "unknown parameter any-port"
    nat7.add(**dstnat(port="80"))
    for value in ("all-ppp", "all-ethernet", "all-vlan", "all-wireless", "!ether1"):
        nat7.add(**dstnat(in_interface=value, dst_port="81"))
    nat7.add(chain="dstnat", action="dst-nat", protocol="tcp", dst_port="82",
             in_interface_list="WAN", to_addresses="192.168.88.2")
    assert len(nat7.get(dst_port="81")) == 5
    _, api6 = connect(start("6.49"))
    api6.get_resource(NAT).add(**dstnat(in_interface="ovpn-proton", any_port="80"))


def test_fatal_before_login_on_every_version(start: Callable[..., RouterOsEmulator],
                                             raw: Raw) -> None:
    for version in LAB_VERSIONS:
        client = raw(start(version), login=False)
        client.send("/interface/print")
        assert client.read() == ("!fatal", "not logged in")
        assert client.closed_by_peer()


# ======================================================================================
# api-ssl without a certificate: anonymous DH only
# ======================================================================================


def test_api_ssl_anonymous_dh(connect: Connect) -> None:
    with RouterOsEmulator(users={USER: PASSWORD}, ssl_context="adh") as emu:
        assert emu.tls_address is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.set_ciphers("ALL:ADH:@SECLEVEL=0")
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        pool, api = connect(emu, address=emu.tls_address, ssl_context=context)
        assert api.get_resource("/system/identity").get() == [{"name": "MikroTik"}]
        assert pool.socket.socket.cipher()[0].startswith("ADH-")
        connect(emu, address=emu.tls_address, ssl_context=anonymous_dh_client_context())
        # DEFAULT removes anonymous suites for good under OpenSSL 3: no shared cipher.
        broken = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        broken.set_ciphers("DEFAULT:ADH:@SECLEVEL=0")
        broken.check_hostname = False
        broken.verify_mode = ssl.CERT_NONE
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            connect(emu, address=emu.tls_address, ssl_context=broken)
        # Nor does a verifying client get anywhere: there is no certificate to verify.
        with pytest.raises(ssl.SSLError):
            connect(emu, address=emu.tls_address, use_ssl=True)
        assert emu.counters.tls_handshake_failures >= 2


# ======================================================================================
# Reboots
# ======================================================================================


def test_reboot_renumbers_ids_when_asked(start: Callable[..., RouterOsEmulator],
                                         connect: Connect) -> None:
    emu = start("7.21")
    _, api = connect(emu)
    nat = api.get_resource(NAT)
    for port in ("1", "2", "3"):
        nat.add(**dstnat(dst_port=port, comment=f"rule-{port}"))
    before = [(r["id"], r["comment"]) for r in nat.get()]
    routes_before = emu.state.routing.find_routes()
    emu.reboot()  # plain reboot: sessions drop, ids stay
    with pytest.raises(exceptions.RouterOsApiConnectionError):
        nat.get()
    _, api = connect(emu)
    nat = api.get_resource(NAT)
    assert [(r["id"], r["comment"]) for r in nat.get()] == before
    emu.reboot(renumber=True)
    _, api = connect(emu)
    nat = api.get_resource(NAT)
    after = [(r["id"], r["comment"]) for r in nat.get()]
    assert [c for _, c in after] == [c for _, c in before]  # rows and order kept
    assert not {i for i, _ in after} & {i for i, _ in before}
    assert error(lambda: nat.remove(id=before[0][0])) == "no such item (4)"
    assert not set(emu.state.routing.find_routes()) & set(routes_before)
    [resource] = api.get_resource("/system/resource").get()
    assert resource["uptime"] in ("0s", "1s")


# ======================================================================================
# The lab and the standalone emulator
# ======================================================================================


@pytest.mark.parametrize(("version", "tunnel"), [("6.49", "ovpn-proton"),
                                                 ("7.16", "wg-proton"),
                                                 ("7.21", "wg-proton")])
def test_lab_router_state(version: str, tunnel: str) -> None:
    the_lab = Lab(LabConfig(routeros=version))
    state = the_lab.router.state
    assert the_lab.router.profile is PROFILES[version]
    assert the_lab.vpn_interface == tunnel
    gateway = the_lab.config.gateway_host
    assert state.route_check(gateway) == RouteCheck("ok", tunnel, gateway)
    state.set_running(tunnel, False)
    assert state.route_check(gateway).interface == "ether1"


def test_lab_command_offers_the_versions() -> None:
    runner = CliRunner()
    shown = runner.invoke(lab_command, ["--help"])
    assert shown.exit_code == 0 and "--routeros" in shown.output
    for version in LAB_VERSIONS:
        assert version in shown.output
    refused = runner.invoke(lab_command, ["--routeros", "5.26"])
    assert refused.exit_code == 2 and "5.26" in refused.output


def test_standalone_configuration() -> None:
    emu = RouterOsEmulator(profile="7.16")
    _configure(emu, ("wg-proton", "bridge", "tun9:gre-tunnel", "wg-b"),
               ("10.2.0.0/24=wg-proton", "10.3.0.1=wg-b"), ("wg-b",))
    state = emu.state
    assert state.interface_type("tun9") == "gre-tunnel"
    assert state.interface_type("wg-b") == "wg"
    assert state.route_check("10.2.0.1").interface == "wg-proton"
    assert state.route_check("10.3.0.1").interface == "ether1"  # wg-b is down
    with pytest.raises(ValueError):
        _configure(emu, (), ("10.4.0.0/24",), ())
