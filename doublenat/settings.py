"""Settings: every environment variable, parsed and checked, in one frozen dataclass.

Parsing is pure: `Settings.from_raw` takes the raw strings (from click, hence from the
environment or the command line) and raises `SettingError` naming the variable at fault.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Literal

from doublenat.protocol.natpmp import PORT as NATPMP_PORT

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


@dataclass(frozen=True, slots=True)
class Settings:
    vpn_gateway: Endpoint
    api_address: Endpoint
    api_user: str
    api_password: str = field(repr=False)
    api_tls: bool
    api_tls_ca: Path | None
    api_tls_verify: bool
    in_interface: str | None
    port_mode: PortMode
    listen: Endpoint
    allowed_clients: tuple[IPv4Network, ...]
    max_mappings_per_client: int
    reconcile_interval: float
    log_level: str
    log_format: LogFormat
    max_lifetime: int
    router_timeout: float
    upstream_timeout: float
    expiry_grace: float
    adopt_grace: float
    port_range: tuple[int, int]
    rate_limit: float
    rate_burst: int
    shutdown_timeout: float

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
    def from_raw(cls, raw: dict[str, str | None]) -> Settings:
        """Build settings from raw strings keyed by environment variable name."""

        def get(name: str) -> str | None:
            value = raw.get(name)
            return value.strip() if isinstance(value, str) else None

        tls = parse_bool("MIKROTIK_API_TLS", get("MIKROTIK_API_TLS"), False)
        ca = get("MIKROTIK_API_TLS_CA")
        if ca:
            check_ca_file("MIKROTIK_API_TLS_CA", ca)
        low_port, high_port = parse_port_range("PORT_RANGE", get("PORT_RANGE") or "1024-65535")
        return cls(
            vpn_gateway=parse_gateway(get("VPN_GATEWAY")),
            api_address=parse_endpoint(
                "MIKROTIK_API_ADDRESS",
                required("MIKROTIK_API_ADDRESS", get("MIKROTIK_API_ADDRESS")),
                API_TLS_PORT if tls else API_PORT,
            ),
            api_user=get("MIKROTIK_API_USER") or "admin",
            api_password=read_password(
                raw.get("MIKROTIK_API_PASSWORD"), get("MIKROTIK_API_PASSWORD_FILE")
            ),
            api_tls=tls,
            api_tls_ca=Path(ca) if ca else None,
            api_tls_verify=parse_bool(
                "MIKROTIK_API_TLS_VERIFY", get("MIKROTIK_API_TLS_VERIFY"), True
            ),
            in_interface=parse_interface(get("MIKROTIK_IN_INTERFACE")),
            port_mode=parse_choice(
                "VPN_PORT_MODE", get("VPN_PORT_MODE") or "internal", ("internal", "external")
            ),  # type: ignore[arg-type]
            listen=parse_listen(get("LISTEN_ADDR") or f"0.0.0.0:{NATPMP_PORT}"),
            allowed_clients=parse_networks(
                "ALLOWED_CLIENTS",
                get("ALLOWED_CLIENTS") or "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16",
            ),
            max_mappings_per_client=parse_int(
                "MAX_MAPPINGS_PER_CLIENT", get("MAX_MAPPINGS_PER_CLIENT"), 64, 1, 65535
            ),
            reconcile_interval=parse_seconds(
                "RECONCILE_INTERVAL", get("RECONCILE_INTERVAL"), 600, 1
            ),
            log_level=parse_level(get("LOG_LEVEL") or "INFO"),
            log_format=parse_choice(
                "LOG_FORMAT", (get("LOG_FORMAT") or "json").lower(), ("json", "text")
            ),  # type: ignore[arg-type]
            max_lifetime=parse_int("MAX_LIFETIME", get("MAX_LIFETIME"), 86400, 1, 2**31 - 1),
            router_timeout=parse_seconds("ROUTER_TIMEOUT", get("ROUTER_TIMEOUT"), 5, 0.1),
            upstream_timeout=parse_seconds("UPSTREAM_TIMEOUT", get("UPSTREAM_TIMEOUT"), 3, 0.3),
            expiry_grace=parse_seconds("EXPIRY_GRACE", get("EXPIRY_GRACE"), 10, 0),
            adopt_grace=parse_seconds("ADOPT_GRACE", get("ADOPT_GRACE"), 900, 0),
            port_range=(low_port, high_port),
            rate_limit=parse_seconds("CLIENT_RATE_LIMIT", get("CLIENT_RATE_LIMIT"), 50, 0),
            rate_burst=parse_int("CLIENT_RATE_BURST", get("CLIENT_RATE_BURST"), 100, 1, 10**6),
            shutdown_timeout=parse_seconds("SHUTDOWN_TIMEOUT", get("SHUTDOWN_TIMEOUT"), 30, 1),
        )


# -------------------------------------------------------------- value parsers


def required(name: str, value: str | None) -> str:
    if not value:
        raise SettingError(name, "is required but not set")
    return value


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingError(name, f"expected true/false/yes/no/1/0, got {value!r}")


def parse_int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise SettingError(name, f"expected a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise SettingError(name, f"must be between {low} and {high}, got {number}")
    return number


def parse_seconds(name: str, value: str | None, default: float, low: float) -> float:
    if value is None or value == "":
        return float(default)
    try:
        number = float(value)
    except ValueError:
        raise SettingError(name, f"expected a number of seconds, got {value!r}") from None
    if not number >= low or number == float("inf"):
        raise SettingError(name, f"must be at least {low} seconds, got {value!r}")
    return number


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    lowered = value.lower()
    if lowered not in choices:
        raise SettingError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return lowered


def parse_level(value: str) -> str:
    level = _LEVELS.get(value.upper())
    if level is None:
        raise SettingError("LOG_LEVEL", f"expected DEBUG, INFO, WARN, ERROR, got {value!r}")
    return level


def parse_interface(value: str | None) -> str | None:
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


def parse_gateway(value: str | None) -> Endpoint:
    text = required("VPN_GATEWAY", value)
    host, _, port = text.partition(":")
    address = parse_ipv4("VPN_GATEWAY", host)
    return Endpoint(str(address), parse_port("VPN_GATEWAY", port) if port else NATPMP_PORT)


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


def parse_listen(text: str) -> Endpoint:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise SettingError("LISTEN_ADDR", f"expected [IP]:PORT, got {text!r}")
    address = parse_ipv4("LISTEN_ADDR", host) if host else IPv4Address("0.0.0.0")
    # Port 0 binds an ephemeral port (tests, the lab); the daemon logs the one it got.
    return Endpoint(str(address), parse_port("LISTEN_ADDR", port, low=0))


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


def check_ca_file(name: str, path: str) -> None:
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


def read_password(value: str | None, path: str | None) -> str:
    if value:
        return value
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
