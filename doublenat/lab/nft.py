"""nftables mirrors of the lab's emulators, so that packets follow what they hold.

The RouterOS emulator and the gateway emulator only keep tables. In the end-to-end bed
each runs inside a network namespace of its own, and these mirrors turn their tables into
real netfilter NAT in that namespace:

- `RouterNatMirror` applies the emulated MikroTik's `/ip/firewall/nat` rules (dst-nat,
  src-nat, masquerade, redirect, accept), translating RouterOS interface names such as
  `wg-proton` to the namespace's real links through a map the caller gives;
- `GatewayNatMirror` forwards each mapping of the gateway emulator from its WAN link to
  the mapping's source, at the granted external port (`proton`: the VPN delivers to the
  port number it granted) or at the internal port (`rfc`: like miniupnpd).

Each mirror owns one table (`table ip doublenat_lab` for the router, `doublenat_lab_gw`
for the gateway, so both can share a namespace) with a `dstnat` and a `srcnat` chain, and
rewrites both chains in one atomic `nft -f` transaction after every change, from the
emulator's current state. The write happens inside the observer, so the
emulator answers (the API `!done`, the NAT-PMP reply) only once netfilter agrees with it:
a test can send a packet as soon as it has its answer.

Rows that cannot be expressed (an unmapped interface, an unsupported property or action,
a disabled rule) are left out and logged once; they never break the mirror.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence

from gevent.lock import BoundedSemaphore

from doublenat.lab.gateway import GatewayEmulator, GatewayMapping, MappingEvent, Profile
from doublenat.lab.routeros.state import Row, Table

log = logging.getLogger("doublenat.lab.nft")

DEFAULT_TABLE = "doublenat_lab"
GATEWAY_TABLE = "doublenat_lab_gw"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}\Z")
_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}\Z")
_PORTS = re.compile(r"[0-9]{1,5}(?:-[0-9]{1,5})?(?:,[0-9]{1,5}(?:-[0-9]{1,5})?)*\Z")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 _.:/*@+=,-]")
_COMMENT_MAX = 120

# Properties that change nothing about which packets a rule translates, or that the
# renderer reads itself.
_PASSIVE = frozenset(
    [".id", "chain", "action", "comment", "log", "log-prefix", "bytes", "packets",
     "invalid", "dynamic", "disabled"]
)
_HANDLED = frozenset(
    ["protocol", "src-address", "dst-address", "src-port", "dst-port", "in-interface",
     "out-interface", "to-addresses", "to-ports"]
)
_PORT_PROTOCOLS = frozenset(["tcp", "udp", "sctp", "dccp", "udp-lite", "udplite"])


class NftError(RuntimeError):
    """nft refused a script; the message carries its stderr."""


class Unsupported(ValueError):
    """A RouterOS rule this mirror cannot express in nftables."""


class Nft:
    """Runs `nft` in the current network namespace (or through `argv`, e.g. netns exec)."""

    def __init__(self, argv: Sequence[str] = ("nft",)) -> None:
        self.argv = list(argv)

    def run(self, *args: str, script: str | None = None) -> str:
        command = [*self.argv, *args]
        if script is not None:
            command += ["-f", "-"]
        done = subprocess.run(
            command, input=script, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise NftError(f"{' '.join(command)}: {done.stderr.strip()}\n{script or ''}")
        return done.stdout

    def apply(self, script: str) -> None:
        """One atomic transaction."""
        self.run(script=script)


def parse_interface_map(text: str) -> dict[str, str]:
    """`wg-proton=tun,bridge=lan` → {"wg-proton": "tun", "bridge": "lan"}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, real = item.partition("=")
        if not sep or not name or not _NAME.match(real):
            raise ValueError(f"bad interface map item {item!r}: want ROUTEROS_NAME=LINK")
        mapping[name] = real
    return mapping


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "").replace('"', "") + '"'


def _comment(text: str) -> str:
    return _quote(_COMMENT_UNSAFE.sub("_", text)[:_COMMENT_MAX])


def _negation(value: str) -> tuple[str, str]:
    return ("!= ", value[1:]) if value.startswith("!") else ("", value)


def _address(value: str) -> str:
    if "-" in value:
        low, high = (ipaddress.IPv4Address(part) for part in value.split("-", 1))
        return f"{low}-{high}"
    network = ipaddress.IPv4Network(value, strict=False)
    return str(network.network_address) if network.prefixlen == 32 else str(network)


def _ports(value: str) -> str:
    if not _PORTS.match(value):
        raise Unsupported(f"ports {value!r}")
    items = value.split(",")
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _single_port_or_range(value: str) -> str:
    if "," in value or not _PORTS.match(value):
        raise Unsupported(f"to-ports {value!r}: one port or one range only")
    return value


def render_rule(row: Mapping[str, str], interfaces: Mapping[str, str]) -> tuple[str, str]:
    """(chain, statement) for one RouterOS NAT row; raises Unsupported.

    The chain is the mirror's `dstnat` or `srcnat`. Interface names go through
    `interfaces`; a name it does not know cannot match any real link, so the row is skipped.
    """
    chain = row.get("chain", "")
    action = row.get("action", "accept")
    if chain not in ("dstnat", "srcnat"):
        raise Unsupported(f"chain {chain!r}")
    extra = sorted(k for k, v in row.items()
                   if k not in _PASSIVE and k not in _HANDLED and v not in ("", None))
    if extra:
        raise Unsupported(f"properties {', '.join(extra)}")
    parts: list[str] = []
    for prop, keyword in (("in-interface", "iifname"), ("out-interface", "oifname")):
        value = row.get(prop)
        if not value:
            continue
        if (chain, prop) == ("dstnat", "out-interface"):
            raise Unsupported("out-interface in dstnat")
        op, name = _negation(value)
        if name not in interfaces:
            raise Unsupported(f"{prop} {name!r} is not mapped to a link")
        parts.append(f"{keyword} {op}{_quote(interfaces[name])}")
    for prop, keyword in (("src-address", "saddr"), ("dst-address", "daddr")):
        value = row.get(prop)
        if value:
            op, body = _negation(value)
            parts.append(f"ip {keyword} {op}{_address(body)}")
    protocol = row.get("protocol")
    l4: str | None = None
    if protocol:
        op, name = _negation(protocol)
        if op or name not in _PORT_PROTOCOLS:
            parts.append(f"meta l4proto {op}{name}")
        else:
            l4 = "udplite" if name == "udp-lite" else name
            parts.append(f"meta l4proto {l4}")
    for prop, keyword in (("src-port", "sport"), ("dst-port", "dport")):
        value = row.get(prop)
        if not value:
            continue
        if l4 is None:
            raise Unsupported(f"{prop} without protocol tcp or udp")
        op, body = _negation(value)
        parts.append(f"{l4} {keyword} {op}{_ports(body)}")
    to_addresses = row.get("to-addresses")
    to_ports = row.get("to-ports")
    if action == "accept":
        parts.append("accept")
    elif action == "dst-nat" and chain == "dstnat":
        if not to_addresses:
            raise Unsupported("dst-nat without to-addresses")
        target = _address(to_addresses)
        if to_ports:
            if l4 is None:
                raise Unsupported("to-ports without protocol tcp or udp")
            target += ":" + _single_port_or_range(to_ports)
        parts.append(f"dnat ip to {target}")
    elif action == "redirect" and chain == "dstnat":
        parts.append("redirect" + (f" to :{_single_port_or_range(to_ports)}" if to_ports else ""))
    elif action == "masquerade" and chain == "srcnat":
        parts.append("masquerade" + (f" to :{_single_port_or_range(to_ports)}" if to_ports else ""))
    elif action == "src-nat" and chain == "srcnat":
        if not to_addresses:
            raise Unsupported("src-nat without to-addresses")
        target = _address(to_addresses)
        if to_ports:
            target += ":" + _single_port_or_range(to_ports)
        parts.append(f"snat ip to {target}")
    else:
        raise Unsupported(f"action {action!r} in {chain}")
    return chain, " ".join(parts)


class _Mirror:
    """A table of its own with a dstnat and a srcnat chain, rewritten atomically."""

    def __init__(self, nft: Nft | None = None, table: str = DEFAULT_TABLE) -> None:
        if not _TABLE_NAME.match(table):
            raise ValueError(f"bad nft table name {table!r}")
        self.nft = nft or Nft()
        self.table = table
        self.errors: list[BaseException] = []
        self.syncs = 0
        self._lock = BoundedSemaphore(1)
        self._skipped: dict[str, str] = {}
        self._created = False

    def _create(self) -> None:
        t = self.table
        self.nft.apply(
            f"table ip {t}\n"
            f"delete table ip {t}\n"
            f"table ip {t} {{\n"
            "  chain dstnat { type nat hook prerouting priority dstnat; policy accept; }\n"
            "  chain srcnat { type nat hook postrouting priority srcnat; policy accept; }\n"
            "}\n"
        )
        self._created = True

    def close(self) -> None:
        """Delete the table (its NAT stops at once)."""
        with self._lock:
            if self._created:
                # Adding first makes the delete succeed even if someone removed the table.
                self.nft.apply(f"table ip {self.table}\ndelete table ip {self.table}\n")
                self._created = False

    def _rules(self) -> Iterable[tuple[str, str, str]]:
        """(chain, statement, comment) in order."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make the chains equal the emulator's current state. Serialised: each sync reads
        the state when it gets the lock, so the last one to run always wins with the truth."""
        with self._lock:
            if not self._created:
                return
            lines = [f"flush chain ip {self.table} dstnat", f"flush chain ip {self.table} srcnat"]
            lines += [
                f"add rule ip {self.table} {chain} {statement} comment {_comment(comment)}"
                for chain, statement, comment in self._rules()
            ]
            try:
                self.nft.apply("\n".join(lines) + "\n")
            except Exception as exc:
                self.errors.append(exc)
                log.error("nft mirror could not apply the rules", exc_info=True,
                          extra={"event": "lab.nft.failed", "table": self.table})
                raise
            self.syncs += 1

    def _skip(self, key: str, reason: str) -> None:
        if self._skipped.get(key) != reason:
            self._skipped[key] = reason
            log.warning("nft mirror leaves a rule out", extra={
                "event": "lab.nft.skipped", "table": self.table, "rule": key, "reason": reason})

    def listing(self) -> str:
        return self.nft.run("list", "table", "ip", self.table)


class RouterNatMirror(_Mirror):
    """Mirrors a RouterOS emulator's NAT table; `interfaces` maps RouterOS names to links."""

    def __init__(
        self,
        nat: Table,
        interfaces: Mapping[str, str],
        *,
        nft: Nft | None = None,
        table: str = DEFAULT_TABLE,
    ) -> None:
        super().__init__(nft, table)
        self.nat = nat
        self.interfaces = dict(interfaces)
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> RouterNatMirror:
        self._create()
        self._unsubscribe = self.nat.add_observer(self._changed)
        self.sync()
        return self

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        super().close()

    def _changed(self, kind: str, row: Row) -> None:
        self.sync()

    def _rules(self) -> Iterable[tuple[str, str, str]]:
        for row in self.nat.rows():
            rule_id = row.get(".id", "?")
            if row.get("disabled") == "true":
                continue
            try:
                chain, statement = render_rule(row, self.interfaces)
            except (Unsupported, ValueError) as exc:
                self._skip(rule_id, str(exc))
                continue
            comment = f"routeros {rule_id} {row.get('comment', '')}".strip()
            yield chain, statement, comment


class GatewayNatMirror(_Mirror):
    """Forwards the gateway emulator's mappings from `wan` to the mapping's source.

    `deliver` picks the port traffic is sent on to: "external" (the granted port, as
    ProtonVPN does) or "internal" (the port asked for, as miniupnpd does); by default the
    one that fits the emulator's profile.
    """

    def __init__(
        self,
        gateway: GatewayEmulator,
        wan: str,
        *,
        deliver: str | None = None,
        nft: Nft | None = None,
        table: str = GATEWAY_TABLE,
    ) -> None:
        super().__init__(nft, table)
        if not _NAME.match(wan):
            raise ValueError(f"bad link name {wan!r}")
        if deliver is None:
            deliver = "external" if gateway.profile is Profile.PROTON else "internal"
        if deliver not in ("external", "internal"):
            raise ValueError(f"deliver must be external or internal, not {deliver!r}")
        self.gateway = gateway
        self.wan = wan
        self.deliver = deliver
        # Kept from the events: asking the emulator for its table would expire entries and
        # call observers from inside an observer.
        self._mappings: dict[tuple[object, ...], GatewayMapping] = {}

    def start(self) -> GatewayNatMirror:
        self._create()
        for mapping in self.gateway.mappings():
            self._mappings[mapping.key] = mapping
        self.gateway.add_observer(self._changed)
        self.sync()
        return self

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.gateway.remove_observer(self._changed)
        super().close()

    def _changed(self, event: MappingEvent, mapping: GatewayMapping) -> None:
        if event in (MappingEvent.CREATED, MappingEvent.CHANGED):
            self._mappings[mapping.key] = mapping
        else:
            self._mappings.pop(mapping.key, None)
        self.sync()

    def _rules(self) -> Iterable[tuple[str, str, str]]:
        for mapping in list(self._mappings.values()):
            proto = mapping.proto.label
            port = mapping.external_port if self.deliver == "external" else mapping.internal_port
            if port == 0:  # internal 0 in the rfc profile is refused, never mapped
                continue
            statement = (
                f"iifname {_quote(self.wan)} meta l4proto {proto} {proto} dport "
                f"{mapping.external_port} dnat ip to {mapping.source}:{port}"
            )
            comment = f"natpmp {proto} {mapping.source}:{mapping.internal_port}"
            yield "dstnat", statement, comment
