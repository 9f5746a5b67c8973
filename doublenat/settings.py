"""Settings: every environment variable, declared once, parsed and checked.

Each field of `Settings` is declared with its variable, parser, default and help
(`setting(...)`); `SETTINGS` is derived from those declarations, and so are the click
options, `--help`, the package's env file check and the README's table check.

Parsing is pure (but for reading the password and CA files and checking the hook is
executable): `Settings.from_raw` takes the raw strings (from click, hence from the
environment or the command line) and raises `SettingError` naming the variable at fault.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any, Literal

from doublenat.protocol.natpmp import PORT as NATPMP_PORT
from doublenat.protocol.natpmp import Proto

API_PORT = 8728
API_TLS_PORT = 8729
RULE_PREFIX = "double-natpmp-"

PortMode = Literal["internal", "external"]
LogFormat = Literal["json", "text"]

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARN": "WARNING", "WARNING": "WARNING",
           "ERROR": "ERROR"}


class SettingError(ValueError):
    """A setting is missing or invalid; `str()` is the one line shown to the operator."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, order=True)
class StaticMapping:
    """A STATIC_MAPPINGS entry: `host` asked for `port` of `proto`, held for ever."""

    proto: Proto
    client: IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.proto.label}:{self.client}:{self.port}"


# -------------------------------------------------------------- value parsers
# Each takes the variable's name (for the error) and its stripped, non-empty text.


def required(name: str, value: str | None) -> str:
    if not value:
        raise SettingError(name, "is required but not set")
    return value


def parse_bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingError(name, f"expected true/false/yes/no/1/0, got {value!r}")


def parse_int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise SettingError(name, f"expected a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise SettingError(name, f"must be between {low} and {high}, got {number}")
    return number


def parse_seconds(name: str, value: str, low: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SettingError(name, f"expected a number of seconds, got {value!r}") from None
    if not number >= low or number == float("inf"):
        raise SettingError(name, f"must be at least {low:g} seconds, got {value!r}")
    return number


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    lowered = value.lower()
    if lowered not in choices:
        raise SettingError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return lowered


def parse_level(name: str, value: str) -> str:
    level = _LEVELS.get(value.upper())
    if level is None:
        raise SettingError(name, f"expected DEBUG, INFO, WARN, ERROR, got {value!r}")
    return level


def parse_interface(_name: str, value: str) -> str | None:
    # "auto" is the default --help shows, so setting it explicitly must mean the same.
    if not value or value.lower() == "auto":
        return None
    return value


def parse_port(name: str, text: str, low: int = 1) -> int:
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses; the
    # length check keeps int() below its 4300-digit limit (another ValueError).
    if not (text.isascii() and text.isdigit() and len(text) <= 5) \
            or not low <= int(text) <= 65535:
        raise SettingError(name, f"bad port {text!r} ({low}-65535)")
    return int(text)


def parse_ipv4(name: str, text: str) -> IPv4Address:
    try:
        address = ip_address(text)
    except ValueError:
        raise SettingError(name, f"{text!r} is not an IPv4 address") from None
    if not isinstance(address, IPv4Address):
        raise SettingError(name, f"{text!r} is IPv6; NAT-PMP is IPv4 only")
    return address


def parse_gateway(name: str, text: str) -> Endpoint:
    host, _, port = text.partition(":")
    address = parse_ipv4(name, host)
    return Endpoint(str(address), parse_port(name, port) if port else NATPMP_PORT)


def parse_endpoint(name: str, text: str, default_port: int) -> Endpoint:
    if text.startswith("["):
        raise SettingError(name, "IPv6 addresses are not supported")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    if ":" in host:  # an unbracketed IPv6 address: "fe80::1" is not host "fe80:", port 1
        raise SettingError(name, "IPv6 addresses are not supported")
    if not host or any(c.isspace() for c in host):
        raise SettingError(name, f"expected host[:port], got {text!r}")
    return Endpoint(host, parse_port(name, port) if port else default_port)


def parse_address(name: str, text: str) -> Endpoint:
    """[IP]:PORT of a socket doublenat binds; an empty IP means every address."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise SettingError(name, f"expected [IP]:PORT, got {text!r}")
    address = parse_ipv4(name, host) if host else IPv4Address("0.0.0.0")
    # Port 0 binds an ephemeral port (tests, the lab); the daemon logs the one it got.
    return Endpoint(str(address), parse_port(name, port, low=0))


def parse_networks(name: str, text: str) -> tuple[IPv4Network, ...]:
    networks = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(IPv4Network(item, strict=False))
        except ValueError:
            raise SettingError(name, f"{item!r} is not an IPv4 network (CIDR)") from None
    if not networks:
        raise SettingError(name, "is empty; no client could ever be served")
    return tuple(networks)


def parse_port_range(name: str, text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    first = parse_port(name, low.strip())
    last = parse_port(name, high.strip()) if sep else first
    if first > last:
        raise SettingError(name, f"range {text!r} is empty")
    return first, last


def parse_static_mappings(name: str, text: str) -> tuple[StaticMapping, ...]:
    entries: list[StaticMapping] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3:
            raise SettingError(name, f"expected PROTO:IPv4:PORT, got {item!r}")
        proto_text, host, port = parts
        try:
            proto = Proto.from_label(proto_text.strip().lower())
        except KeyError:
            raise SettingError(name, f"{item!r}: protocol must be tcp or udp") from None
        client = parse_ipv4(name, host.strip())
        if client.is_unspecified or client.is_multicast or client.is_loopback:
            raise SettingError(name, f"{item!r}: {client} cannot receive a forward")
        entry = StaticMapping(proto, client, parse_port(name, port.strip()))
        if entry in entries:
            raise SettingError(name, f"{item!r} is listed twice")
        entries.append(entry)
    return tuple(entries)


def parse_ca_file(name: str, path: str) -> Path:
    """A CA file that does not load fails here, as a setting, not later in the router's
    client as a traceback."""
    import ssl  # here, not at the top: gevent must patch ssl before its first import

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise SettingError(name, f"{path!r} holds no usable CA certificate "
                                 f"({exc.reason or 'unreadable'})") from None
    except OSError as exc:
        raise SettingError(name, f"cannot read {path!r}: {exc.strerror}") from None
    except ValueError:
        raise SettingError(name, f"cannot read {path!r}: invalid path") from None
    return Path(path)


def parse_executable(name: str, path: str) -> Path:
    """A program run without a shell: an absolute path to an executable file."""
    command = Path(path)
    if not command.is_absolute():
        raise SettingError(name, f"{path!r} must be an absolute path (no shell, no PATH)")
    if not command.is_file():
        raise SettingError(name, f"{path!r} is not a file")
    if not os.access(command, os.X_OK):
        raise SettingError(name, f"{path!r} is not executable")
    return command


def read_password(raw: Raw) -> str:
    value = raw.get("MIKROTIK_API_PASSWORD")
    if value:
        return value  # as given: spaces may be part of a password
    path = (raw.get("MIKROTIK_API_PASSWORD_FILE") or "").strip()
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            why = "not UTF-8 text"  # the decoder's message would quote bytes of the file
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
        except ValueError:
            why = "invalid path"  # a NUL byte
        # The error names the file, never its content.
        raise SettingError("MIKROTIK_API_PASSWORD_FILE", f"cannot read {path!r}: {why}")
    raise SettingError(
        "MIKROTIK_API_PASSWORD", "is required (or set MIKROTIK_API_PASSWORD_FILE)"
    )


Raw = Mapping[str, "str | None"]
Parser = Callable[[str, "str | None", Raw], Any]


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable: its name, parser, default and help, declared once.

    `parse(variable, text, raw)` gets the stripped text (the default when unset, None when
    there is none) and every raw value, for the few settings that depend on another one.
    """

    env: str
    attr: str
    parse: Parser
    help: str
    default: str | None = None  # raw text, parsed like a value; shown in --help and README
    metavar: str = "TEXT"

    @property
    def option(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def param(self) -> str:
        return self.env.lower()


def setting(env: str, parse: Parser, help: str, default: str | None = None,
            metavar: str = "TEXT") -> Any:
    """A field of `Settings` that is also a declared environment variable."""
    return field(metadata={"setting": (env, parse, help, default, metavar)})


def _text(parse: Callable[[str, str], Any]) -> Parser:
    """A parser of a setting with a default (its text is never None; "" when the default
    is empty)."""
    return lambda name, text, _raw: parse(name, text or "")


def _optional(parse: Callable[[str, str], Any]) -> Parser:
    """A setting that is off (None) unless set."""
    return lambda name, text, _raw: parse(name, text) if text else None


def _seconds(low: float) -> Parser:
    return _text(lambda name, text: parse_seconds(name, text, low))


def _integer(low: int, high: int) -> Parser:
    return _text(lambda name, text: parse_int(name, text, low, high))


def _choice(*choices: str) -> Parser:
    return _text(lambda name, text: parse_choice(name, text, choices))


_boolean = _text(parse_bool)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every setting, parsed. The field order is the order of --help and the README."""

    vpn_gateway: Endpoint = setting(
        "VPN_GATEWAY", lambda n, t, _r: parse_gateway(n, required(n, t)),
        "IPv4 of the VPN's NAT-PMP server, IP[:PORT] (port 5351). Required.",
        metavar="IP[:PORT]")
    api_address: Endpoint = setting(
        "MIKROTIK_API_ADDRESS", lambda n, t, r: parse_endpoint(
            n, required(n, t), API_TLS_PORT if _tls(r) else API_PORT),
        "RouterOS API endpoint host[:port] (8728, or 8729 with TLS). Required.",
        metavar="HOST[:PORT]")
    api_user: str = setting("MIKROTIK_API_USER", _text(lambda _n, t: t), "API user name.",
                            "admin")
    api_password: str = field(repr=False, metadata={"setting": (
        "MIKROTIK_API_PASSWORD", lambda _n, _t, r: read_password(r),
        "API password. Prefer the environment or the _FILE setting: a command line is "
        "visible to every user in ps.", None, "SECRET")})
    api_password_file: Path | None = setting(
        "MIKROTIK_API_PASSWORD_FILE", _optional(lambda _n, t: Path(t)),
        "Read the API password from this file.", metavar="PATH")
    api_tls: bool = setting("MIKROTIK_API_TLS", _boolean, "Use API-SSL: true/false/yes/no/1/0.",
                            "false", "BOOL")
    api_tls_ca: Path | None = setting(
        "MIKROTIK_API_TLS_CA", _optional(parse_ca_file),
        "CA file that signed the router's certificate (default: the system store).",
        metavar="PATH")
    api_tls_verify: bool = setting(
        "MIKROTIK_API_TLS_VERIFY", _boolean,
        "Verify the router's certificate; false accepts a self-signed one or api-ssl "
        "without a certificate (anonymous DH), logged as a warning.", "true", "BOOL")
    in_interface: str | None = setting(
        "MIKROTIK_IN_INTERFACE", _text(parse_interface),
        "Interface for the dst-nat rules. auto: the tunnel interface the router routes "
        "VPN_GATEWAY through (never an Ethernet uplink, bridge or PPPoE client).",
        "auto", "NAME")
    port_mode: PortMode = setting(
        "VPN_PORT_MODE", _choice("internal", "external"),
        "Port the VPN gateway delivers to: 'internal' (the port doublenat asked for; RFC "
        "gateways, miniupnpd) or 'external' (the granted port; ProtonVPN).",
        "internal", "internal|external")
    listen: Endpoint = setting("LISTEN_ADDR", _text(parse_address),
                               "Where to answer NAT-PMP, [IP]:PORT.", "0.0.0.0:5351",
                               "[IP]:PORT")
    allowed_clients: tuple[IPv4Network, ...] = setting(
        "ALLOWED_CLIENTS", _text(parse_networks),
        "CIDR list of clients served; others get no reply.",
        "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16", "CIDR,...")
    max_mappings_per_client: int = setting(
        "MAX_MAPPINGS_PER_CLIENT", _integer(1, 65535),
        "Mappings per client, TCP and UDP together; beyond: result 4.", "64", "N")
    reconcile_interval: float = setting(
        "RECONCILE_INTERVAL", _seconds(1), "Seconds between reconciliations with the router.",
        "600", "SECONDS")
    log_level: str = setting("LOG_LEVEL", _text(parse_level), "DEBUG, INFO, WARN or ERROR.",
                             "INFO", "LEVEL")
    log_format: LogFormat = setting("LOG_FORMAT", _choice("json", "text"),
                                    "json (one object per line) or text.", "json", "json|text")
    upstream_keepalive: bool = setting(
        "UPSTREAM_KEEPALIVE", _boolean,
        "Renew upstream mappings on doublenat's own for as long as the lifetime the client "
        "asked for (capped by MAX_LIFETIME); false: a mapping ends with its upstream lease.",
        "true", "BOOL")
    upstream_probe_interval: float = setting(
        "UPSTREAM_PROBE_INTERVAL", _seconds(1),
        "Seconds between opcode-0 probes of VPN_GATEWAY (notices a VPN reconnect); the "
        "router's uptime is read as often between reconciliations.", "30", "SECONDS")
    static_mappings: tuple[StaticMapping, ...] = setting(
        "STATIC_MAPPINGS", lambda n, t, _r: parse_static_mappings(n, t) if t else (),
        "Mappings held without any client request: PROTO:IPv4:PORT,... "
        "(e.g. tcp:192.168.88.10:32400).", metavar="LIST")
    hook_command: Path | None = setting(
        "HOOK_COMMAND", _optional(parse_executable),
        "Executable run (no shell) on every mapping created, changed or deleted.",
        metavar="PATH")
    hook_timeout: float = setting("HOOK_TIMEOUT", _seconds(0.1),
                                  "Seconds a hook may run before it is killed.", "10",
                                  "SECONDS")
    metrics_addr: Endpoint | None = setting(
        "METRICS_ADDR", _optional(parse_address),
        "IP:PORT of the HTTP endpoint for /metrics, /status and /healthz (off when unset).",
        metavar="IP:PORT")
    max_lifetime: int = setting("MAX_LIFETIME", _integer(1, 2**31 - 1),
                                "Longest lifetime granted to a client, seconds.", "86400",
                                "SECONDS")
    router_timeout: float = setting("ROUTER_TIMEOUT", _seconds(0.1),
                                    "Deadline of each RouterOS API call, seconds.", "5",
                                    "SECONDS")
    upstream_timeout: float = setting("UPSTREAM_TIMEOUT", _seconds(0.3),
                                      "Retransmission budget toward VPN_GATEWAY, seconds.", "3",
                                      "SECONDS")
    expiry_grace: float = setting(
        "EXPIRY_GRACE", _seconds(0),
        "Seconds a mapping outlives its lifetime before it is removed.", "10", "SECONDS")
    adopt_grace: float = setting(
        "ADOPT_GRACE", _seconds(0),
        "Seconds a rule of an earlier run waits for its client to renew.", "900", "SECONDS")
    port_range: tuple[int, int] = setting(
        "PORT_RANGE", _text(parse_port_range),
        "Ports doublenat may use on the router and the gateway.", "1024-65535", "LOW-HIGH")
    rate_limit: float = setting("CLIENT_RATE_LIMIT", _seconds(0),
                                "Requests per second per client (0: no limit).", "50", "RATE")
    rate_burst: int = setting("CLIENT_RATE_BURST", _integer(1, 10**6),
                              "Burst allowed above CLIENT_RATE_LIMIT.", "100", "N")
    shutdown_timeout: float = setting("SHUTDOWN_TIMEOUT", _seconds(1),
                                      "Seconds allowed for the cleanup at shutdown.", "30",
                                      "SECONDS")

    def redacted(self) -> dict[str, object]:
        """The settings as plain values, password replaced, for logs and `check`."""
        out: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "api_password":
                value = "<set>" if value else "<empty>"
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif value is not None and not isinstance(value, bool | int | float):
                value = str(value)
            out[f.name] = value
        return out

    @classmethod
    def from_raw(cls, raw: Raw) -> Settings:
        """Build settings from raw strings keyed by environment variable name."""
        values = {}
        for spec in SETTINGS:
            text = raw.get(spec.env)
            text = text.strip() if isinstance(text, str) else None
            values[spec.attr] = spec.parse(spec.env, text or spec.default, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(*f.metadata["setting"][:1], f.name, *f.metadata["setting"][1:])
    for f in dataclasses.fields(Settings)
)
BY_ENV = {s.env: s for s in SETTINGS}


def _tls(raw: Raw) -> bool:
    value = (raw.get("MIKROTIK_API_TLS") or "").strip()
    return parse_bool("MIKROTIK_API_TLS", value) if value else False


