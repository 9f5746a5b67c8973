"""What the emulated router knows: tables, interfaces, the route oracle, system singletons.

Usable without the API, so a test can play the admin: seed rules, delete one behind the
daemon's back, move an interface away, change where a destination is routed. Every change to
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

from doublenat.lab.routeros.query import BOOLEANS, Query

log = logging.getLogger(__name__)

Row = dict[str, str]
Observer = Callable[[str, Row], None]

DEFAULT_INTERFACES = frozenset({"ether1", "bridge", "wg-proton"})
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


# -- /ip/route/check -------------------------------------------------------------------


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


# What a real router prints for an unroutable destination is undocumented; this is a guess
# that keeps the one documented property of the answer (no interface).
NO_ROUTE = RouteCheck(status="unreachable")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RouteOracle:
    """Answers route checks by longest-prefix match over destinations set by the test."""

    def __init__(self) -> None:
        self._routes: dict[Network, RouteCheck] = {}
        self.no_route: RouteCheck = NO_ROUTE

    def set(
        self,
        destination: str,
        *,
        interface: str | None,
        nexthop: str | None = None,
        status: str = "ok",
    ) -> None:
        """Route `destination` (an address or a prefix) via `interface`."""
        self._routes[ipaddress.ip_network(destination, strict=False)] = RouteCheck(
            status, interface, nexthop
        )

    def set_answer(self, destination: str, answer: RouteCheck) -> None:
        self._routes[ipaddress.ip_network(destination, strict=False)] = answer

    def set_no_route(self, destination: str) -> None:
        self._routes[ipaddress.ip_network(destination, strict=False)] = self.no_route

    def remove(self, destination: str) -> None:
        self._routes.pop(ipaddress.ip_network(destination, strict=False), None)

    def clear(self) -> None:
        self._routes.clear()

    def entries(self) -> dict[str, RouteCheck]:
        return {str(k): v for k, v in self._routes.items()}

    def check(self, destination: str) -> RouteCheck:
        address = ipaddress.ip_address(destination)
        best: tuple[int, RouteCheck] | None = None
        for network, answer in self._routes.items():
            if network.version != address.version or address not in network:
                continue
            if best is None or network.prefixlen > best[0]:
                best = (network.prefixlen, answer)
        return best[1] if best else self.no_route


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


def default_resource(version: str) -> Row:
    return {
        "version": f"{version} (stable)",
        "build-time": "2025-02-24 12:47:50",
        "factory-software": "7.1",
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


class RouterState:
    """Everything the emulated router holds; survives restarts of the emulator's sessions."""

    def __init__(
        self,
        *,
        interfaces: Collection[str] = DEFAULT_INTERFACES,
        identity: str = "MikroTik",
        version: str = "7.18",
        default_route: RouteCheck | None = RouteCheck("ok", "ether1", "192.0.2.1"),
    ) -> None:
        self.interfaces: set[str] = set(interfaces)
        self.nat = Table("/ip/firewall/nat", NAT_SCHEMA, self._interface_exists)
        self.tables: dict[str, Table] = {self.nat.path: self.nat}
        self.routes = RouteOracle()
        if default_route is not None:
            self.routes.set_answer("0.0.0.0/0", default_route)
        self.identity = identity
        # Fields of /system/resource/print; "uptime" is computed unless a test sets it.
        self.resource: Row = default_resource(version)
        self.booted_at = time.monotonic()

    def _interface_exists(self, name: str) -> bool:
        return name in self.interfaces

    def reboot_clock(self) -> None:
        self.booted_at = time.monotonic()

    def resource_row(self) -> Row:
        row = {"uptime": format_uptime(time.monotonic() - self.booted_at)}
        row.update(self.resource)
        return row
