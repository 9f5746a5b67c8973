"""The router's interfaces, addresses and routes, and what RouterOS derives from them.

A test sets up what an admin would configure (interfaces, addresses, static routes) and
what the router learns (a DHCP address and default route, a link going down); this module
derives the rest the way RouterOS does: connected routes, which routes are active, through
which interface each gateway is reached (`immediate-gw` on v7, `gateway-status` on v6), and
the answer of `/ip/route/check` (the longest-prefix active route in `main`).

IPv4 only: doublenat's VPN gateway is an IPv4 address. Pure: no I/O, no clock.
Where a value's format was not recorded, NOTES.md says GUESS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from doublenat.lab.routeros.profile import Profile

Row = dict[str, str]
IPv4 = ipaddress.IPv4Address
Net = ipaddress.IPv4Network

MAIN = "main"
# Interface-list style names NAT rules accept besides real interfaces (7.21.4 completions).
PSEUDO_INTERFACES = frozenset(["all-ethernet", "all-ppp", "all-vlan", "all-wireless"])


class RoutingError(ValueError):
    """A configuration RouterOS would refuse (unknown interface, bad address...)."""


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


@dataclass
class Interface:
    number: int
    name: str
    type: str
    running: bool = True
    disabled: bool = False
    comment: str | None = None
    mtu: int = 1500


@dataclass
class Address:
    number: int
    address: ipaddress.IPv4Interface
    interface: str
    # The peer of a point-to-point address (PPPoE: a /32 whose `network` is the far end).
    peer: IPv4 | None = None
    dynamic: bool = False
    disabled: bool = False
    comment: str | None = None

    @property
    def connected(self) -> Net:
        if self.peer is not None:
            return ipaddress.IPv4Network(f"{self.peer}/32")
        return self.address.network

    @property
    def network_text(self) -> str:
        if self.peer is not None:
            return str(self.peer)
        return str(self.address.network.network_address)


@dataclass
class Route:
    """A configured or learned (dhcp) route. `gateway` is an address, `address%iface`, or an
    interface name; None with `blackhole`."""

    number: int
    dst: Net
    gateway: str | None
    distance: int = 1
    table: str = MAIN
    blackhole: bool = False
    disabled: bool = False
    origin: str = "static"  # "static" or "dhcp"
    comment: str | None = None

    @property
    def dynamic(self) -> bool:
        return self.origin != "static"


@dataclass(frozen=True)
class RouteCheck:
    """One answer of `/ip/route/check`; a missing interface means "no route"."""

    status: str = "ok"
    interface: str | None = None
    nexthop: str | None = None

    def render(self) -> Row:
        row = {"status": self.status}
        if self.interface is not None:
            row["interface"] = self.interface
        if self.nexthop is not None:
            row["nexthop"] = self.nexthop
        return row


# What a real router answers for an unroutable destination is not recorded (GUESS): keep the
# one documented property of the answer, no interface.
NO_ROUTE = RouteCheck(status="unreachable")


@dataclass(frozen=True)
class Resolved:
    """A route as the router sees it at this moment."""

    id: str
    dst: Net
    gateway: str | None  # as configured; the interface for connected routes
    distance: int
    table: str
    origin: str  # "static", "dhcp" or "connect"
    # Where packets go: (interface, next hop address or None for "on the link").
    via: tuple[str, IPv4 | None] | None
    reachable: bool
    active: bool
    disabled: bool
    blackhole: bool
    local_address: str | None = None
    comment: str | None = None

    @property
    def interface(self) -> str | None:
        return self.via[0] if self.via else None


def _parse_gateway(text: str) -> tuple[IPv4 | None, str | None]:
    """`10.0.0.1` -> (ip, None); `10.0.0.1%ether1` -> (ip, iface); `wg0` -> (None, iface)."""
    address, _, scope = text.partition("%")
    try:
        return ipaddress.IPv4Address(address), scope or None
    except ValueError:
        if scope:
            raise RoutingError(f"invalid value for argument gateway: {text}") from None
        return None, text


@dataclass
class Routing:
    """Interfaces, addresses and routes of one router. Ids are `*HEX`, one counter per menu."""

    interfaces: dict[str, Interface] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    _next: dict[str, int] = field(default_factory=lambda: {"interface": 1, "address": 1,
                                                           "route": 1, "dynamic": 1})

    def _number(self, kind: str) -> int:
        number = self._next[kind]
        self._next[kind] += 1
        return number

    # -- configuring -------------------------------------------------------------------

    def add_interface(self, name: str, type: str = "ether", *, running: bool = True,
                      disabled: bool = False, comment: str | None = None,
                      allowed_types: Iterable[str] | None = None) -> str:
        if name in self.interfaces or name in PSEUDO_INTERFACES or not name:
            raise RoutingError(f"failure: already have interface with such name ({name})")
        if allowed_types is not None and type not in allowed_types:
            raise RoutingError(f"this RouterOS version has no interfaces of type {type}")
        mtu = 1420 if type == "wg" else 1480 if type == "pppoe-out" else 1500
        interface = Interface(self._number("interface"), name, type, running, disabled,
                              comment, mtu)
        self.interfaces[name] = interface
        return f"*{interface.number:X}"

    def interface(self, name: str) -> Interface:
        try:
            return self.interfaces[name]
        except KeyError:
            raise RoutingError(f"no such interface {name}") from None

    def remove_interface(self, name: str) -> None:
        self.interface(name)
        del self.interfaces[name]
        self.addresses = [a for a in self.addresses if a.interface != name]

    def add_address(self, cidr: str, interface: str, *, network: str | None = None,
                    dynamic: bool = False, disabled: bool = False,
                    comment: str | None = None) -> str:
        self.interface(interface)
        try:
            address = ipaddress.IPv4Interface(cidr)
            peer = ipaddress.IPv4Address(network) if network else None
        except ValueError as exc:
            raise RoutingError(f"invalid value for argument address: {cidr}") from exc
        entry = Address(self._number("address"), address, interface, peer, dynamic, disabled,
                        comment)
        self.addresses.append(entry)
        return f"*{entry.number:X}"

    def remove_address(self, cidr_or_id: str) -> None:
        before = len(self.addresses)
        self.addresses = [a for a in self.addresses
                          if cidr_or_id not in (str(a.address), f"*{a.number:X}")]
        if len(self.addresses) == before:
            raise RoutingError(f"no such address {cidr_or_id}")

    def add_route(self, dst: str, gateway: str | None = None, *, distance: int = 1,
                  table: str = MAIN, blackhole: bool = False, disabled: bool = False,
                  dhcp: bool = False, comment: str | None = None) -> str:
        try:
            network = ipaddress.IPv4Network(dst, strict=False)
        except ValueError as exc:
            raise RoutingError(f"invalid value for argument dst-address: {dst}") from exc
        if gateway is None and not blackhole:
            raise RoutingError("a route needs a gateway or blackhole")
        if gateway is not None:
            self._check_gateway(gateway)
        if not 0 <= distance <= 255:
            raise RoutingError(f"invalid value for argument distance: {distance}")
        # Learned routes count apart from configured ones: RouterOS gives them other ids.
        number = self._number("dynamic" if dhcp else "route")
        route = Route(number, network, gateway, distance, table, blackhole, disabled,
                      "dhcp" if dhcp else "static", comment)
        self.routes.append(route)
        return self._route_id(route)

    def _check_gateway(self, gateway: str) -> None:
        _address, scope = _parse_gateway(gateway)
        if scope is not None and scope not in self.interfaces:
            raise RoutingError(f"input does not match any value of gateway: {gateway}")

    @staticmethod
    def _route_id(route: Route) -> str:
        # GUESS, after the shape of ids in recorded prints: learned routes sit high.
        return f"*{0x80000000 + route.number:X}" if route.dynamic else f"*{route.number:X}"

    def find_routes(self, dst: str | None = None, table: str | None = None) -> list[str]:
        wanted = ipaddress.IPv4Network(dst, strict=False) if dst else None
        return [self._route_id(r) for r in self.routes
                if (wanted is None or r.dst == wanted) and (table is None or r.table == table)]

    def remove_route(self, route_id_or_dst: str) -> None:
        if route_id_or_dst.startswith("*"):
            keep = [r for r in self.routes if self._route_id(r) != route_id_or_dst]
        else:
            wanted = ipaddress.IPv4Network(route_id_or_dst, strict=False)
            keep = [r for r in self.routes if r.dst != wanted]
        if len(keep) == len(self.routes):
            raise RoutingError(f"no such route {route_id_or_dst}")
        self.routes = keep

    def set_route(self, route_id: str, **changes: object) -> None:
        for route in self.routes:
            if self._route_id(route) == route_id:
                for name, value in changes.items():
                    if name not in ("gateway", "distance", "table", "disabled", "comment",
                                    "blackhole"):
                        raise RoutingError(f"unknown route property {name}")
                    if name == "gateway" and value is not None:
                        self._check_gateway(str(value))
                    setattr(route, name, value)
                return
        raise RoutingError(f"no such route {route_id}")

    def renumber(self) -> None:
        """Give every interface, address and route a new id (a reboot that renumbers)."""
        for interface in self.interfaces.values():
            interface.number = self._number("interface")
        for address in self.addresses:
            address.number = self._number("address")
        for route in self.routes:
            route.number = self._number("dynamic" if route.dynamic else "route")

    # -- deriving ----------------------------------------------------------------------

    def _up(self, name: str) -> bool:
        interface = self.interfaces.get(name)
        return interface is not None and interface.running and not interface.disabled

    def resolve(self) -> list[Resolved]:
        """Every route (connected ones first), with reachability and the active choice."""
        out: list[Resolved] = []
        connected: list[tuple[Net, str]] = []
        for address in self.addresses:
            interface = self.interfaces.get(address.interface)
            if interface is None or interface.disabled or address.disabled:
                continue
            up = self._up(address.interface)
            if up:
                connected.append((address.connected, address.interface))
            out.append(Resolved(
                id=f"*{0x40000000 + address.number:X}",
                dst=address.connected, gateway=address.interface, distance=0, table=MAIN,
                origin="connect", via=(address.interface, None), reachable=up, active=False,
                disabled=False, blackhole=False,
                local_address=f"{address.address.ip}%{address.interface}",
            ))
        for route in self.routes:
            via, reachable = self._via(route, connected)
            out.append(Resolved(
                id=self._route_id(route), dst=route.dst, gateway=route.gateway,
                distance=route.distance, table=route.table, origin=route.origin, via=via,
                reachable=reachable and not route.disabled, active=False,
                disabled=route.disabled, blackhole=route.blackhole, comment=route.comment,
            ))
        # Per table and destination, the reachable route with the lowest distance is active.
        best: dict[tuple[str, Net], int] = {}
        for index, item in enumerate(out):
            if not item.reachable:
                continue
            key = (item.table, item.dst)
            if key not in best or item.distance < out[best[key]].distance:
                best[key] = index
        chosen = set(best.values())
        return [
            Resolved(**{**item.__dict__, "active": index in chosen})
            for index, item in enumerate(out)
        ]

    def _via(self, route: Route, connected: list[tuple[Net, str]]
             ) -> tuple[tuple[str, IPv4 | None] | None, bool]:
        if route.blackhole:
            return None, True
        assert route.gateway is not None
        address, scope = _parse_gateway(route.gateway)
        if address is None:
            assert scope is not None
            return (scope, None), self._up(scope)
        if scope is not None:
            return (scope, address), self._up(scope)
        # A gateway address is reached through a connected network (scope 10 <= the default
        # target-scope 10): the longest such prefix wins.
        matches = [(net, name) for net, name in connected if address in net]
        if not matches:
            return None, False
        _net, name = max(matches, key=lambda m: m[0].prefixlen)
        return (name, address), True

    def lookup(self, destination: str, table: str = MAIN) -> RouteCheck:
        """What `/ip/route/check dst-ip=...` answers: the longest-prefix active route."""
        address = ipaddress.IPv4Address(destination)
        best: Resolved | None = None
        for item in self.resolve():
            if not item.active or item.table != table or address not in item.dst:
                continue
            if best is None or item.dst.prefixlen > best.dst.prefixlen:
                best = item
        if best is None or best.via is None:
            return NO_ROUTE
        interface, nexthop = best.via
        # On the link (connected or interface gateway): the next hop is the destination.
        return RouteCheck("ok", interface, str(nexthop or address))

    # -- printing ----------------------------------------------------------------------

    def interface_rows(self, profile: Profile) -> list[Row]:
        rows = []
        for interface in self.interfaces.values():
            row: Row = {".id": f"*{interface.number:X}", "name": interface.name}
            if interface.type == "ether":
                row["default-name"] = interface.name
            row["type"] = interface.type
            row["mtu"] = str(interface.mtu)
            row["actual-mtu"] = str(interface.mtu)
            if interface.type in ("ether", "bridge", "vlan"):
                row["mac-address"] = _mac(interface.number)
            row["link-downs"] = "0"
            row["running"] = _bool(interface.running and not interface.disabled)
            row["slave"] = "false"
            row["disabled"] = _bool(interface.disabled)
            if profile.v7:
                row["dynamic"] = "false"
            if interface.comment is not None:
                row["comment"] = interface.comment
            rows.append(row)
        return rows

    def address_rows(self, profile: Profile) -> list[Row]:
        rows = []
        for address in self.addresses:
            row: Row = {
                ".id": f"*{address.number:X}",
                "address": str(address.address),
                "network": address.network_text,
                "interface": address.interface,
                "actual-interface": address.interface,
                "invalid": _bool(address.interface not in self.interfaces),
                "dynamic": _bool(address.dynamic),
                "disabled": _bool(address.disabled),
            }
            if address.comment is not None:
                row["comment"] = address.comment
            rows.append(row)
        return rows

    def route_rows(self, profile: Profile) -> list[Row]:
        return [self._route_row(item, profile) for item in self.resolve()]

    @staticmethod
    def _route_row(item: Resolved, profile: Profile) -> Row:
        row: Row = {".id": item.id, "dst-address": str(item.dst)}
        connect = item.origin == "connect"
        if profile.v7:
            row["routing-table"] = item.table
        if item.gateway is not None:
            row["gateway"] = item.gateway
        if profile.v7:
            if item.reachable and item.via is not None:
                interface, nexthop = item.via
                row["immediate-gw"] = f"{nexthop}%{interface}" if nexthop else interface
        elif item.gateway is not None:
            row["gateway-status"] = _gateway_status(item)
        row["distance"] = str(item.distance)
        row["scope"] = "10" if connect else "30"
        if not connect:
            row["target-scope"] = "10"
        if connect and item.local_address is not None:
            if profile.v7:
                row["local-address"] = item.local_address
            else:
                row["pref-src"] = item.local_address.split("%")[0]
        if not profile.v7 and item.table != MAIN:
            row["routing-mark"] = item.table
        row["dynamic"] = _bool(item.origin != "static")
        row["active"] = _bool(item.active)
        if profile.v7:
            row["inactive"] = _bool(not item.active)
        row["disabled"] = _bool(item.disabled)
        row[item.origin] = "true"
        if item.blackhole:
            row["blackhole"] = "true"
        if item.comment is not None:
            row["comment"] = item.comment
        return row


def _gateway_status(item: Resolved) -> str:
    """v6 `gateway-status`, as recorded: `G reachable via  IF` (two spaces), `IF reachable`,
    `G unreachable`."""
    assert item.gateway is not None
    state = "reachable" if item.reachable else "unreachable"
    if item.via is not None and item.via[1] is not None and item.reachable:
        return f"{item.gateway} {state} via  {item.via[0]}"
    return f"{item.gateway} {state}"


def _mac(number: int) -> str:
    return f"02:00:5E:00:{(number >> 8) & 0xFF:02X}:{number & 0xFF:02X}"
