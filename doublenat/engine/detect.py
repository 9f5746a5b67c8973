"""Which router interface the VPN gateway is reached through, and whether it is a tunnel.

Pure functions over rows read from the router (the adapter reads them):
- where the RouterOS version has `/ip/route/check` (6.x, and 7.18 onward), its answer;
- elsewhere (7.0-7.17) the longest-prefix active route toward the gateway in the main
  routing table (`/ip/route/print`), its interface taken from `immediate-gw`
  (`A.B.C.D%iface` through a gateway, or the bare interface of a connected route), or
  from `gateway` when that names an interface.
Then the safety rule (SPEC §4.1): only a tunnel may carry the rules. An Ethernet port,
bridge, VLAN or PPPoE client may be the ISP uplink or the LAN; a rule there would expose
a LAN host on the ISP's address. Typically the tunnel is down and the gateway resolves
through the default route: doublenat then refuses, and says so naming the interface.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network

Row = Mapping[str, str]

# `type` values of `/interface` for tunnels a VPN client uses (sources: the emulator's
# NOTES.md). Everything else (ether, bridge, vlan, pppoe-out, wlan, bond, veth, ...) is
# refused: it may be the ISP uplink or the LAN.
TUNNEL_TYPES = frozenset({
    "wg",  # WireGuard
    "ovpn-out",  # OpenVPN client
    "l2tp-out", "sstp-out", "pptp-out",  # PPP-based VPN clients
    "gre-tunnel", "ipip-tunnel", "eoip-tunnel", "gre", "ipip", "eoip",
    "6to4-tunnel", "vxlan", "zerotier",
})


@dataclass(frozen=True, slots=True)
class Found:
    interface: str
    detail: str  # how: "route check: via 10.2.0.1", "route 10.2.0.0/16 via 10.2.0.1%wg0"


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "yes")


def from_route_check(rows: Iterable[Row]) -> Found | None:
    """The interface `/ip/route/check` reports, if it reports a usable route.

    What route check says for an unreachable destination is not recorded anywhere we
    found; a row without an interface, or with a status other than ok, is no route.
    """
    for row in rows:
        interface = (row.get("interface") or "").strip()
        status = (row.get("status") or "ok").strip().lower()
        if interface and status == "ok":
            nexthop = row.get("nexthop") or ""
            return Found(interface, "route check" + (f": via {nexthop}" if nexthop else ""))
    return None


def _interface_of(route: Row) -> str | None:
    """`immediate-gw` first (`10.2.0.1%wg0` or `wg0`), else a `gateway` naming one."""
    for field in ("immediate-gw", "gateway"):
        value = (route.get(field) or "").strip()
        if not value:
            continue
        if "%" in value:
            return value.split("%", 1)[1] or None
        try:
            ip_address(value)
        except ValueError:
            return value  # an interface name (a connected route, or gateway=wg0)
    return None


def from_routes(routes: Iterable[Row], destination: str) -> Found | None:
    """The longest-prefix active route of the main table toward `destination`."""
    target = IPv4Address(destination)
    best: tuple[int, int, Row, str] | None = None
    for route in routes:
        if not _true(route.get("active")):
            continue
        table = (route.get("routing-table") or "main").strip()
        if table != "main" or route.get("routing-mark"):
            continue
        try:
            network = ip_network((route.get("dst-address") or "").strip(), strict=False)
        except ValueError:
            continue
        if not isinstance(network, IPv4Network) or target not in network:
            continue
        interface = _interface_of(route)
        if interface is None:
            continue
        distance = int(route["distance"]) if (route.get("distance") or "").isdigit() else 255
        rank = (network.prefixlen, -distance)
        if best is None or rank > best[:2]:
            best = (network.prefixlen, -distance, route, interface)
    if best is None:
        return None
    route, interface = best[2], best[3]
    via = route.get("immediate-gw") or route.get("gateway") or interface
    return Found(interface, f"route {route.get('dst-address')} via {via}")


def tunnel_problem(interface: str, interfaces: Iterable[Row]) -> str | None:
    """Why `interface` may not carry the rules; None if it is a tunnel."""
    row = next((r for r in interfaces if r.get("name") == interface), None)
    if row is None:
        return f"interface {interface!r} is not in /interface"
    kind = (row.get("type") or "").strip()
    if kind not in TUNNEL_TYPES:
        return (f"interface {interface!r} is of type {kind or 'unknown'!r}, not a VPN tunnel "
                "(it may be the ISP uplink or the LAN)")
    return None
