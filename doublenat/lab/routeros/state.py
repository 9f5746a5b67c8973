"""What the emulated router knows: tables, users, the routing model, system singletons.

Usable without the API, so a test can play the admin: seed rules, delete one behind the
daemon's back, take the tunnel down, change where a destination is routed. Every change to
a table, from the API or from a test, is reported to that table's observers.

All of it is touched from greenlets of one hub and nothing here yields, so it needs no locks.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from doublenat.lab.routeros.profile import CURRENT, Profile
from doublenat.lab.routeros.query import BOOLEANS, Query
from doublenat.lab.routeros.routing import MAIN, PSEUDO_INTERFACES, RouteCheck, Routing

log = logging.getLogger(__name__)

Row = dict[str, str]
Observer = Callable[[str, Row], None]

_ITEM_ID = re.compile(r"\*([0-9A-Fa-f]{1,8})\Z")
_PORT_ITEM = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")


class RouterError(Exception):
    """A refusal the API reports as a `!trap`."""

    def __init__(self, message: str, category: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.category = category


class UnknownParameterError(RouterError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown parameter {name}")
        self.name = name


class NoSuchItemError(RouterError):
    def __init__(self) -> None:
        super().__init__("no such item")


class Kind(Enum):
    TEXT = "text"
    BOOL = "bool"
    INT = "int"
    CHOICE = "choice"
    PORTS = "ports"
    ADDRESS = "address"
    INTERFACE = "interface"
    PROTOCOL = "protocol"


@dataclass(frozen=True)
class Column:
    name: str
    kind: Kind = Kind.TEXT
    # Rendered when the property was never set; None means the property is absent.
    default: str | None = None
    writable: bool = True
    choices: frozenset[str] = frozenset()
    # Matchers accept a leading "!" (negation), e.g. in-interface=!ether1.
    negatable: bool = False


@dataclass(frozen=True)
class Schema:
    columns: tuple[Column, ...]
    required: tuple[str, ...] = ()
    by_name: Mapping[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {c.name: c for c in self.columns})


_PROTOCOLS = frozenset(
    [
        "tcp",
        "udp",
        "icmp",
        "icmpv6",
        "gre",
        "esp",
        "ah",
        "ipip",
        "ipsec-ah",
        "ipsec-esp",
        "l2tp",
        "ospf",
        "pim",
        "rsvp",
        "sctp",
        "udp-lite",
        "vrrp",
        "dccp",
        "igmp",
        "ipv6-encap",
        "ipv6-frag",
        "ipv6-nonxt",
        "ipv6-opts",
        "ipv6-route",
    ]
)
_NAT_ACTIONS = frozenset(
    [
        "accept",
        "add-dst-to-address-list",
        "add-src-to-address-list",
        "dst-nat",
        "endpoint-independent-nat",
        "jump",
        "log",
        "masquerade",
        "netmap",
        "passthrough",
        "redirect",
        "return",
        "same",
        "src-nat",
    ]
)

NAT_SCHEMA = Schema(
    columns=(
        Column("chain"),
        Column("action", Kind.CHOICE, default="accept", choices=_NAT_ACTIONS),
        Column("to-addresses", Kind.ADDRESS),
        Column("to-ports", Kind.PORTS),
        Column("protocol", Kind.PROTOCOL, negatable=True),
        Column("src-address", Kind.ADDRESS, negatable=True),
        Column("dst-address", Kind.ADDRESS, negatable=True),
        Column("src-address-list", negatable=True),
        Column("dst-address-list", negatable=True),
        Column("src-port", Kind.PORTS, negatable=True),
        Column("dst-port", Kind.PORTS, negatable=True),
        Column("port", Kind.PORTS, negatable=True),
        Column("any-port", Kind.PORTS, negatable=True),
        Column("in-interface", Kind.INTERFACE, negatable=True),
        Column("out-interface", Kind.INTERFACE, negatable=True),
        Column("in-interface-list", negatable=True),
        Column("out-interface-list", negatable=True),
        Column("connection-mark", negatable=True),
        Column("connection-type", negatable=True),
        Column("packet-mark", negatable=True),
        Column("routing-mark", negatable=True),
        Column("jump-target"),
        Column("address-list"),
        Column("address-list-timeout"),
        Column("log", Kind.BOOL, default="false"),
        Column("log-prefix", default=""),
        Column("bytes", Kind.INT, default="0", writable=False),
        Column("packets", Kind.INT, default="0", writable=False),
        Column("invalid", Kind.BOOL, default="false", writable=False),
        Column("dynamic", Kind.BOOL, default="false", writable=False),
        Column("disabled", Kind.BOOL, default="false"),
        Column("comment"),
    ),
    required=("chain",),
)


def format_id(number: int) -> str:
    return f"*{number:X}"


def parse_id(item_id: str) -> int:
    match = _ITEM_ID.match(item_id)
    if match is None:
        raise RouterError("invalid internal item number", 1)
    return int(match.group(1), 16)


def split_ids(value: str | Iterable[str]) -> list[str]:
    """`*1,*2` or an iterable of ids, as a list; the API accepts comma lists."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    ids = [p.strip() for p in parts if p.strip()]
    if not ids:
        raise NoSuchItemError()
    return ids


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _protocol_number(value: str) -> bool:
    return value.isdigit() and int(value) <= 255


def _valid_ports(value: str) -> bool:
    for item in value.split(","):
        match = _PORT_ITEM.match(item)
        if match is None:
            return False
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if high > 65535 or low > high:
            return False
    return True


def _valid_address(value: str) -> bool:
    try:
        if "-" in value:
            low, high = (ipaddress.ip_address(p) for p in value.split("-", 1))
            return low.version == high.version and low <= high
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


class Table:
    """An ordered menu table (`/ip/firewall/nat` and the like) with monotonic `*HEX` ids."""

    def __init__(
        self,
        path: str,
        schema: Schema,
        interface_exists: Callable[[str], bool] = lambda _name: True,
    ) -> None:
        self.path = path
        self.schema = schema
        self._interface_exists = interface_exists
        # Rows are kept fully rendered (id and defaults included) so a print copies only
        # what matches; dict order is the rule order.
        self._rows: dict[int, Row] = {}
        self._next = 1
        self._observers: list[Observer] = []
        self.observer_errors: list[BaseException] = []

    # -- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._lookup(item_id) is not None

    def rows(self) -> list[Row]:
        """Copies of every row in rule order, as the API would print them."""
        return [dict(r) for r in self._rows.values()]

    def ids(self) -> list[str]:
        return [r[".id"] for r in self._rows.values()]

    def get(self, item_id: str) -> Row | None:
        row = self._lookup(item_id)
        return dict(row) if row is not None else None

    def find(self, query: Query | None = None, /, **equals: object) -> list[Row]:
        """Rows matching a parsed query and/or plain equalities (`dst_port=8080`)."""
        wanted = {k.replace("_", "-"): _text(v) for k, v in equals.items()}
        out = []
        for row in self._rows.values():
            if query is not None and not query.matches(row):
                continue
            if all(row.get(k) == v for k, v in wanted.items()):
                out.append(dict(row))
        return out

    def select(self, query: Query) -> list[Row]:
        """Internal fast path for print: matching rows, not copied."""
        return query.select(self._rows.values())  # type: ignore[return-value]

    # -- observers ---------------------------------------------------------------------

    def add_observer(self, observer: Observer) -> Callable[[], None]:
        """Call `observer(kind, row)` after each change; kind is add, set or remove.

        Returns a function that unsubscribes it.
        """
        self._observers.append(observer)
        return lambda: self.remove_observer(observer)

    def remove_observer(self, observer: Observer) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self, kind: str, row: Row) -> None:
        for observer in list(self._observers):
            try:
                observer(kind, dict(row))
            except Exception as exc:
                # An observer's bug must not turn into a router fault; tests can inspect it.
                log.exception("observer of %s failed on %s", self.path, kind)
                self.observer_errors.append(exc)

    # -- writing -----------------------------------------------------------------------

    def add(
        self,
        attrs: Mapping[str, object] | None = None,
        /,
        *,
        place_before: str | None = None,
        validate: bool = True,
        **kwargs: object,
    ) -> str:
        """Append a row (or insert it before `place_before`) and return its new id.

        Keyword names may use `_` for `-`. `validate=False` lets a test seed read-only
        properties (dynamic rules, counters) and skip reference checks.
        """
        values = self._merge(attrs, kwargs)
        before = self._lookup_or_raise(place_before) if place_before else None
        clean = self._validated(values, validate)
        if validate:
            missing = [n for n in self.schema.required if not clean.get(n)]
            if missing:
                raise RouterError(f"missing value(s) of argument(s) {' '.join(missing)}", 1)
        number = self._next
        self._next += 1
        row: Row = {".id": format_id(number)}
        for column in self.schema.columns:
            value = clean.get(column.name, column.default)
            if value is not None:
                row[column.name] = value
        if before is None:
            self._rows[number] = row
        else:
            target = parse_id(before[".id"])
            reordered: dict[int, Row] = {}
            for key, existing in self._rows.items():
                if key == target:
                    reordered[number] = row
                reordered[key] = existing
            self._rows = reordered
        self._notify("add", row)
        return row[".id"]

    def set(
        self,
        item_ids: str | Iterable[str],
        attrs: Mapping[str, object] | None = None,
        /,
        *,
        validate: bool = True,
        **kwargs: object,
    ) -> None:
        rows = self._resolve(item_ids)
        clean = self._validated(self._merge(attrs, kwargs), validate)
        for row in rows:
            for name, value in clean.items():
                if value is None:
                    self._reset(row, name)
                else:
                    row[name] = value
        for row in rows:
            self._notify("set", row)

    def unset(self, item_ids: str | Iterable[str], names: Iterable[str]) -> None:
        rows = self._resolve(item_ids)
        names = [n.replace("_", "-") for n in names]
        for name in names:
            column = self.schema.by_name.get(name)
            if column is None or not column.writable:
                raise RouterError("input does not match any value of value-name", 1)
        for row in rows:
            for name in names:
                self._reset(row, name)
        for row in rows:
            self._notify("set", row)

    def remove(self, item_ids: str | Iterable[str]) -> None:
        # All or nothing: one unknown id leaves every listed row in place.
        rows = self._resolve(item_ids)
        for row in rows:
            self._rows.pop(parse_id(row[".id"]), None)
        for row in rows:
            self._notify("remove", row)

    def renumber(self, compact: bool = False) -> None:
        """Give every row a new id, keeping rows and order (a reboot that renumbers).

        New ids continue the counter, so no old id names a row any more; with `compact`
        they start again at *1, so an old id may name *another* row (the dangerous case
        for a client that trusts cached ids). Observers are not told: nothing about the
        rules changed.
        """
        renumbered: dict[int, Row] = {}
        if compact:
            self._next = 1
        for row in self._rows.values():
            number = self._next
            self._next += 1
            row[".id"] = format_id(number)
            renumbered[number] = row
        self._rows = renumbered

    def clear(self) -> None:
        """Remove every row (observers hear each removal). Ids keep counting up."""
        rows = list(self._rows.values())
        self._rows.clear()
        for row in rows:
            self._notify("remove", row)

    # -- helpers -----------------------------------------------------------------------

    def _lookup(self, item_id: str) -> Row | None:
        try:
            return self._rows.get(parse_id(item_id))
        except RouterError:
            return None

    def _lookup_or_raise(self, item_id: str) -> Row:
        row = self._rows.get(parse_id(item_id))
        if row is None:
            raise NoSuchItemError()
        return row

    def _resolve(self, item_ids: str | Iterable[str]) -> list[Row]:
        rows: list[Row] = []
        for item_id in split_ids(item_ids):
            row = self._lookup_or_raise(item_id)
            if row not in rows:
                rows.append(row)
        return rows

    def _reset(self, row: Row, name: str) -> None:
        default = self.schema.by_name[name].default
        if default is None:
            row.pop(name, None)
        else:
            row[name] = default

    @staticmethod
    def _merge(attrs: Mapping[str, object] | None, kwargs: Mapping[str, object]) -> dict:
        merged = dict(attrs or {})
        merged.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        return merged

    def _validated(self, values: Mapping[str, object], validate: bool) -> dict[str, str | None]:
        """Canonical text per property; None means "back to the default" (an empty value)."""
        clean: dict[str, str | None] = {}
        for name, raw in values.items():
            column = self.schema.by_name.get(name)
            if column is None or (validate and not column.writable):
                raise UnknownParameterError(name)
            value = _text(raw)
            if value == "" and column.default != "":
                # An empty value clears an optional property rather than storing "".
                clean[name] = None
                continue
            clean[name] = self._check(column, value) if validate else self._canonical(column, value)
        return clean

    @staticmethod
    def _canonical(column: Column, value: str) -> str:
        if column.kind is Kind.BOOL and value.lower() in BOOLEANS:
            return "true" if BOOLEANS[value.lower()] else "false"
        return value

    def _check(self, column: Column, value: str) -> str:
        body = value[1:] if column.negatable and value.startswith("!") else value
        kind = column.kind
        if kind is Kind.TEXT:
            return value
        if kind is Kind.BOOL:
            if value.lower() not in BOOLEANS:
                raise _mismatch(column)
            return "true" if BOOLEANS[value.lower()] else "false"
        if kind is Kind.CHOICE and body not in column.choices:
            raise _mismatch(column)
        if kind is Kind.PROTOCOL and body not in _PROTOCOLS and not _protocol_number(body):
            raise _mismatch(column)
        if kind is Kind.INTERFACE and not self._interface_exists(body):
            raise _mismatch(column)
        if (
            (kind is Kind.INT and not body.isdigit())
            or (kind is Kind.PORTS and not _valid_ports(body))
            or (kind is Kind.ADDRESS and not _valid_address(body))
        ):
            raise RouterError(f"invalid value for argument {column.name}", 1)
        return value


def _mismatch(column: Column) -> RouterError:
    return RouterError(f"input does not match any value of {column.name}", 1)



# -- users -----------------------------------------------------------------------------

# The policy names of /user/group (7.21.4 completions, tikoci/restraml deep-inspect.json).
POLICIES = frozenset(
    [
        "api", "ftp", "local", "password", "policy", "read", "reboot", "rest-api", "romon",
        "sensitive", "sniff", "ssh", "telnet", "test", "web", "winbox", "write",
    ]
)
# RouterOS's default groups; which policies "read" and "write" hold is a GUESS after the
# manual's description (read: everything that does not change the configuration).
GROUPS: dict[str, frozenset[str]] = {
    "full": POLICIES,
    "write": POLICIES - {"policy"},
    "read": POLICIES - {"write", "policy", "sensitive", "ftp"},
}


@dataclass
class User:
    name: str
    password: str
    policies: frozenset[str] = POLICIES


def policies_of(group: str | Iterable[str]) -> frozenset[str]:
    """A group name ("full", "read", "write") or an explicit policy list (`api,read,!write`)."""
    if isinstance(group, str) and group in GROUPS:
        return GROUPS[group]
    names = group.split(",") if isinstance(group, str) else list(group)
    wanted = {n.strip() for n in names if n.strip() and not n.strip().startswith("!")}
    unknown = wanted - POLICIES
    if unknown:
        raise ValueError(f"unknown policy {sorted(unknown)[0]!r}")
    return frozenset(wanted)


# -- the whole router ------------------------------------------------------------------


def format_uptime(seconds: float) -> str:
    """RouterOS duration text, e.g. 1w2d3h4m5s."""
    remaining = int(seconds)
    parts = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    if remaining or not parts:
        parts.append(f"{remaining}s")
    return "".join(parts)


def resource_row(profile: Profile, uptime: str) -> Row:
    """`/system/resource/print` of a CHR on x86_64. Names: 7.21.4 `get value-name`
    completions; values GUESS, shaped like recorded rows (NOTES.md)."""
    return {
        "uptime": uptime,
        "version": profile.version_text,
        "build-time": profile.build_time,
        "factory-software": profile.factory_software,
        "free-memory": "912785408",
        "total-memory": "1073741824",
        "cpu": "QEMU",
        "cpu-count": "2",
        "cpu-frequency": "2400",
        "cpu-load": "1",
        "free-hdd-space": "83632128",
        "total-hdd-space": "133464064",
        "write-sect-since-reboot": "1520",
        "write-sect-total": "1520",
        "architecture-name": "x86_64",
        "board-name": "CHR",
        "platform": "MikroTik",
    }


# Types the compatibility view guesses from a bare name.
_TYPE_BY_PREFIX = (
    ("wg", "wg"), ("bridge", "bridge"), ("vlan", "vlan"), ("pppoe-out", "pppoe-out"),
    ("ovpn-out", "ovpn-out"), ("l2tp-out", "l2tp-out"), ("sstp-out", "sstp-out"),
    ("pptp-out", "pptp-out"), ("gre", "gre-tunnel"), ("ipip", "ipip-tunnel"),
    ("eoip", "eoip-tunnel"), ("lo", "loopback"),
)


def type_from_name(name: str, allowed: Collection[str] = ()) -> str:
    for prefix, kind in _TYPE_BY_PREFIX:
        if name.startswith(prefix) and (not allowed or kind in allowed):
            return kind
    return "ether"


class InterfaceNames:
    """`state.interfaces`: the interface names as a set-like view (the older API).

    `add(name)` creates an interface whose type is guessed from its name; new code calls
    `state.add_interface(name, type)`.
    """

    def __init__(self, state: RouterState) -> None:
        self._state = state

    def __contains__(self, name: object) -> bool:
        return name in self._state.routing.interfaces

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._state.routing.interfaces))

    def __len__(self) -> int:
        return len(self._state.routing.interfaces)

    def add(self, name: str) -> None:
        if name not in self:
            types = self._state.profile.interface_types
            self._state.add_interface(name, type_from_name(name, types))

    def update(self, names: Iterable[str]) -> None:
        for name in names:
            self.add(name)

    def discard(self, name: str) -> None:
        if name in self:
            self._state.remove_interface(name)


class LegacyRoutes:
    """`state.routes`: the older "route oracle" API, kept on top of the routing model.

    `set(dest, interface=, nexthop=)` adds a static route (`nexthop%interface`, or the
    interface as gateway) and replaces one set before for the same destination;
    `set_no_route(dest)` adds a blackhole route. New code uses `state.add_route()`.
    """

    def __init__(self, state: RouterState) -> None:
        self._state = state
        self._mine: dict[str, str] = {}

    def _key(self, destination: str) -> str:
        return str(ipaddress.ip_network(destination, strict=False))

    def remove(self, destination: str) -> None:
        route_id = self._mine.pop(self._key(destination), None)
        if route_id is not None:
            self._state.routing.routes = [
                r for r in self._state.routing.routes
                if self._state.routing._route_id(r) != route_id
            ]

    def set(self, destination: str, *, interface: str | None, nexthop: str | None = None,
            status: str = "ok") -> None:
        del status  # the model derives it
        self.remove(destination)
        key = self._key(destination)
        if interface is None:
            self._mine[key] = self._state.add_route(key, blackhole=True, distance=0)
            return
        self._state.interfaces.add(interface)
        gateway = f"{nexthop}%{interface}" if nexthop else interface
        self._mine[key] = self._state.add_route(key, gateway, distance=0)

    def set_no_route(self, destination: str) -> None:
        self.set(destination, interface=None)

    def check(self, destination: str) -> RouteCheck:
        return self._state.route_check(destination)

    def clear(self) -> None:
        """Remove every route (configured and learned)."""
        self._state.routing.routes.clear()
        self._mine.clear()


class RouterState:
    """Everything the emulated router holds; survives restarts of the emulator's sessions.

    `setup="home"` (the default) starts as a typical home router without a route to a VPN
    gateway (see `setup_home_router`); `setup="bare"` starts with no interfaces at all.
    """

    def __init__(
        self,
        *,
        profile: str | Profile = CURRENT,
        identity: str = "MikroTik",
        setup: str = "home",
    ) -> None:
        self.profile = profile if isinstance(profile, Profile) else Profile.named(profile)
        self.routing = Routing()
        self.nat = Table("/ip/firewall/nat", NAT_SCHEMA, self._interface_exists)
        self.tables: dict[str, Table] = {self.nat.path: self.nat}
        self.users: dict[str, User] = {}
        self.identity = identity
        # Fields of /system/resource/print a test overrides; the rest follow the profile.
        self.resource: Row = {}
        # The router under test has been up for a while (a day), as a real one has: a
        # reboot then shows as uptime going back, which is how the adapter notices one.
        self.booted_at = time.monotonic() - 86400
        self.interfaces = InterfaceNames(self)
        self.routes = LegacyRoutes(self)
        if setup == "home":
            self.setup_home_router(vpn_gateway=None)
        elif setup != "bare":
            raise ValueError(f"unknown setup {setup!r}")

    # -- users -------------------------------------------------------------------------

    def add_user(self, name: str, password: str = "",
                 group: str | Iterable[str] = "full") -> None:
        """Add (or replace) an API user: `group` is full/read/write or a policy list."""
        self.users[name] = User(name, password, policies_of(group))

    # -- interfaces, addresses, routes -------------------------------------------------

    def add_interface(self, name: str, type: str = "ether", *, running: bool = True,
                      disabled: bool = False, comment: str | None = None) -> str:
        """Add an interface; `type` as /interface prints it (`wg`, `pppoe-out`, ...)."""
        return self.routing.add_interface(name, type, running=running, disabled=disabled,
                                          comment=comment,
                                          allowed_types=self.profile.interface_types)

    def set_running(self, name: str, running: bool) -> None:
        """A link or tunnel going up or down (what `running` shows)."""
        self.routing.interface(name).running = running

    def set_disabled(self, name: str, disabled: bool) -> None:
        self.routing.interface(name).disabled = disabled

    def remove_interface(self, name: str) -> None:
        self.routing.remove_interface(name)

    def interface_type(self, name: str) -> str:
        return self.routing.interface(name).type

    def add_address(self, cidr: str, interface: str, *, network: str | None = None,
                    dynamic: bool = False, disabled: bool = False) -> str:
        """An IP address on an interface; its network becomes a connected route."""
        return self.routing.add_address(cidr, interface, network=network, dynamic=dynamic,
                                        disabled=disabled)

    def remove_address(self, cidr_or_id: str) -> None:
        self.routing.remove_address(cidr_or_id)

    def add_route(self, dst: str, gateway: str | None = None, *, distance: int = 1,
                  table: str = MAIN, blackhole: bool = False, disabled: bool = False,
                  dhcp: bool = False, comment: str | None = None) -> str:
        """A route: `gateway` is an address, `address%iface` or an interface name."""
        return self.routing.add_route(dst, gateway, distance=distance, table=table,
                                      blackhole=blackhole, disabled=disabled, dhcp=dhcp,
                                      comment=comment)

    def remove_route(self, route_id_or_dst: str) -> None:
        self.routing.remove_route(route_id_or_dst)

    def set_route(self, route_id: str, **changes: object) -> None:
        self.routing.set_route(route_id, **changes)

    def route_check(self, destination: str, table: str = MAIN) -> RouteCheck:
        """The answer of `/ip/route/check dst-ip=destination` (longest-prefix active route)."""
        return self.routing.lookup(destination, table)

    def _interface_exists(self, name: str) -> bool:
        return name in self.routing.interfaces or name in PSEUDO_INTERFACES

    # -- the typical home router -------------------------------------------------------

    def setup_home_router(
        self,
        *,
        vpn_gateway: str | None = "10.2.0.1",
        uplink: str = "dhcp",
        vpn_interface: str | None = None,
        vpn_type: str | None = None,
        vpn_routing: str = "host",
        vpn_table: str = "vpn",
    ) -> None:
        """Replace interfaces, addresses and routes with a typical home router's.

        - ether1: the ISP uplink. `uplink="dhcp"`: address 192.0.2.2/24 and a default route
          via 192.0.2.1 learned by DHCP. `uplink="pppoe"`: pppoe-out1 over ether1 carries
          198.51.100.7 (peer 198.51.100.1) and the default route (gateway pppoe-out1).
        - bridge: the LAN, 192.168.88.1/24.
        - the VPN tunnel (`wg-proton` of type wg; on 6.x `ovpn-proton` of type ovpn-out),
          address 10.2.0.2/32. With `vpn_gateway`, `vpn_routing="host"` routes
          `vpn_gateway/32` through the tunnel in main; `"table"` puts 0.0.0.0/0 through the
          tunnel in routing table `vpn_table` and leaves main alone.
        """
        v7 = self.profile.v7
        name = vpn_interface or ("wg-proton" if v7 else "ovpn-proton")
        kind = vpn_type or ("wg" if v7 else "ovpn-out")
        self.routing = Routing()
        self.add_interface("ether1", "ether")
        self.add_interface("bridge", "bridge")
        if uplink == "dhcp":
            self.add_address("192.0.2.2/24", "ether1", dynamic=True)
            self.add_route("0.0.0.0/0", "192.0.2.1", distance=1, dhcp=True)
        elif uplink == "pppoe":
            self.add_interface("pppoe-out1", "pppoe-out")
            self.add_address("198.51.100.7/32", "pppoe-out1", network="198.51.100.1",
                             dynamic=True)
            # GUESS: the PPPoE client's default route appears as a dynamic route.
            self.add_route("0.0.0.0/0", "pppoe-out1", distance=1, dhcp=True)
        else:
            raise ValueError(f"unknown uplink {uplink!r}")
        self.add_address("192.168.88.1/24", "bridge")
        self.add_interface(name, kind)
        self.add_address("10.2.0.2/32", name)
        if vpn_gateway is None:
            return
        if vpn_routing == "host":
            self.add_route(f"{vpn_gateway}/32", name)
        elif vpn_routing == "table":
            self.add_route("0.0.0.0/0", name, table=vpn_table)
        else:
            raise ValueError(f"unknown vpn_routing {vpn_routing!r}")

    # -- the clock and reboots ---------------------------------------------------------

    def reboot_clock(self) -> None:
        self.booted_at = time.monotonic()

    def renumber(self, compact: bool = False) -> None:
        """New ids for every table row, interface, address and route (GUESS: whether a
        real reboot renumbers is not recorded; if it does, `compact`, ids from *1 in
        order, is the likely way)."""
        for table in self.tables.values():
            table.renumber(compact)
        self.routing.renumber()

    def resource_row(self) -> Row:
        row = resource_row(self.profile, format_uptime(time.monotonic() - self.booted_at))
        row.update(self.resource)
        return row
