"""Settings (SPEC §2): defaults, every accepted form, every refusal naming its variable."""

from __future__ import annotations

import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from doublenat.settings import SETTINGS, Endpoint, SettingError, Settings

PASSWORD = "Pa55-w0rd!xyzzy"
REQUIRED = {
    "VPN_GATEWAY": "10.2.0.1",
    "MIKROTIK_API_ADDRESS": "192.168.88.1",
    "MIKROTIK_API_PASSWORD": PASSWORD,
}
SPEC_VARIABLES = {
    "VPN_GATEWAY", "MIKROTIK_API_ADDRESS", "MIKROTIK_API_USER", "MIKROTIK_API_PASSWORD",
    "MIKROTIK_API_PASSWORD_FILE", "MIKROTIK_API_TLS", "MIKROTIK_API_TLS_CA",
    "MIKROTIK_API_TLS_VERIFY", "MIKROTIK_IN_INTERFACE", "VPN_PORT_MODE", "LISTEN_ADDR",
    "ALLOWED_CLIENTS", "MAX_MAPPINGS_PER_CLIENT", "RECONCILE_INTERVAL", "LOG_LEVEL",
    "LOG_FORMAT",
}
# Free text: any value is a valid user name, password or interface name.
FREE_TEXT = {"MIKROTIK_API_USER", "MIKROTIK_API_PASSWORD", "MIKROTIK_IN_INTERFACE"}


def parse(**overrides: str | None) -> Settings:
    raw: dict[str, str | None] = {**REQUIRED, **overrides}
    return Settings.from_raw(raw)


def refused(variable: str, **overrides: str | None) -> SettingError:
    with pytest.raises(SettingError) as caught:
        parse(**overrides)
    error = caught.value
    assert error.variable == variable, str(error)
    assert str(error).startswith(f"{variable}: "), str(error)
    assert "\n" not in str(error)
    assert PASSWORD not in str(error)
    return error


# ----------------------------------------------------------------- the table


def test_every_spec_variable_is_a_cli_setting() -> None:
    names = [var.env for var in SETTINGS]
    assert set(names) >= SPEC_VARIABLES, SPEC_VARIABLES - set(names)
    assert len(names) == len(set(names))


def test_defaults() -> None:
    s = parse()
    assert s.vpn_gateway == Endpoint("10.2.0.1", 5351)
    assert s.api_address == Endpoint("192.168.88.1", 8728)
    assert s.api_user == "admin"
    assert s.api_password == PASSWORD
    assert s.api_tls is False
    assert s.api_tls_ca is None
    assert s.api_tls_verify is True
    assert s.in_interface is None
    assert s.port_mode == "internal"
    assert s.listen == Endpoint("0.0.0.0", 5351)
    assert s.allowed_clients == (
        IPv4Network("10.0.0.0/8"), IPv4Network("172.16.0.0/12"), IPv4Network("192.168.0.0/16"))
    assert s.max_mappings_per_client == 64
    assert s.reconcile_interval == 600
    assert s.log_level == "INFO"
    assert s.log_format == "json"
    assert s.max_lifetime == 86400
    assert s.router_timeout == 5
    assert s.upstream_timeout == 3
    assert s.expiry_grace == 10
    assert s.adopt_grace == 900
    assert s.port_range == (1024, 65535)
    assert s.rate_limit == 50
    assert s.rate_burst == 100
    assert s.shutdown_timeout == 30


@pytest.mark.parametrize("var", [v for v in SETTINGS if v.default is not None],
                         ids=lambda v: v.env)
def test_default_shown_in_help_is_the_real_default(var) -> None:
    # An operator who copies the default from --help into the environment gets the same.
    assert parse(**{var.env: var.default}) == parse()


@pytest.mark.parametrize("var", [v.env for v in SETTINGS if v.env not in REQUIRED])
def test_empty_optional_variable_means_unset(var: str) -> None:
    assert parse(**{var: ""}) == parse()


@pytest.mark.parametrize(("var", "value"), [
    (var, value) for var in REQUIRED for value in (None, "", "   ")
    # Blanks are a password like any other: only the other two are stripped.
    if not (var == "MIKROTIK_API_PASSWORD" and value == "   ")
])
def test_required_variable_missing(var: str, value: str | None) -> None:
    error = refused(var, **{var: value})
    assert "required" in str(error)


# ------------------------------------------------------------ accepted forms


@pytest.mark.parametrize(("text", "expected"), [
    ("10.2.0.1", Endpoint("10.2.0.1", 5351)),
    ("10.2.0.1:5351", Endpoint("10.2.0.1", 5351)),
    ("10.2.0.1:15351", Endpoint("10.2.0.1", 15351)),
    (" 10.2.0.1:1 ", Endpoint("10.2.0.1", 1)),
    ("10.2.0.1:65535", Endpoint("10.2.0.1", 65535)),
])
def test_vpn_gateway_forms(text: str, expected: Endpoint) -> None:
    assert parse(VPN_GATEWAY=text).vpn_gateway == expected


@pytest.mark.parametrize(("text", "tls", "expected"), [
    ("192.168.88.1", None, Endpoint("192.168.88.1", 8728)),
    ("192.168.88.1", "true", Endpoint("192.168.88.1", 8729)),
    ("router.lan", "false", Endpoint("router.lan", 8728)),
    ("router.lan", "yes", Endpoint("router.lan", 8729)),
    ("router.lan:18728", None, Endpoint("router.lan", 18728)),
    ("router.lan:18728", "1", Endpoint("router.lan", 18728)),
    ("192.168.88.1:8729", "0", Endpoint("192.168.88.1", 8729)),
])
def test_api_address_forms(text: str, tls: str | None, expected: Endpoint) -> None:
    s = parse(MIKROTIK_API_ADDRESS=text, MIKROTIK_API_TLS=tls)
    assert s.api_address == expected


BOOLEANS = [("true", True), ("false", False), ("yes", True), ("no", False), ("1", True),
            ("0", False), ("TRUE", True), ("False", False), ("YeS", True), ("nO", False),
            (" true ", True)]


@pytest.mark.parametrize(("text", "expected"), BOOLEANS)
def test_boolean_forms(text: str, expected: bool) -> None:
    assert parse(MIKROTIK_API_TLS=text).api_tls is expected
    assert parse(MIKROTIK_API_TLS_VERIFY=text).api_tls_verify is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("DEBUG", "DEBUG"), ("debug", "DEBUG"), ("Info", "INFO"), ("WARN", "WARNING"),
    ("warn", "WARNING"), ("WARNING", "WARNING"), ("Warning", "WARNING"), ("ERROR", "ERROR"),
    ("error", "ERROR"),
])
def test_log_level_forms(text: str, expected: str) -> None:
    assert parse(LOG_LEVEL=text).log_level == expected


@pytest.mark.parametrize(("text", "expected"), [("json", "json"), ("JSON", "json"),
                                                ("text", "text"), ("Text", "text")])
def test_log_format_forms(text: str, expected: str) -> None:
    assert parse(LOG_FORMAT=text).log_format == expected


@pytest.mark.parametrize(("text", "expected"), [("internal", "internal"),
                                                ("external", "external"),
                                                ("External", "external")])
def test_port_mode_forms(text: str, expected: str) -> None:
    assert parse(VPN_PORT_MODE=text).port_mode == expected


@pytest.mark.parametrize(("text", "expected"), [
    (":5351", Endpoint("0.0.0.0", 5351)),
    (":15351", Endpoint("0.0.0.0", 15351)),
    ("127.0.0.1:5351", Endpoint("127.0.0.1", 5351)),
    ("192.168.89.2:5351", Endpoint("192.168.89.2", 5351)),
    ("127.0.0.1:0", Endpoint("127.0.0.1", 0)),  # ephemeral: tests and the lab
])
def test_listen_forms(text: str, expected: Endpoint) -> None:
    assert parse(LISTEN_ADDR=text).listen == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("192.168.88.0/24", ("192.168.88.0/24",)),
    ("192.168.88.0/24,10.0.0.0/8", ("192.168.88.0/24", "10.0.0.0/8")),
    (" 192.168.88.0/24 , 10.1.2.3/32 ", ("192.168.88.0/24", "10.1.2.3/32")),
    ("192.168.88.7/24", ("192.168.88.0/24",)),  # host bits are forgiven
    ("192.168.88.7", ("192.168.88.7/32",)),
    ("0.0.0.0/0", ("0.0.0.0/0",)),
])
def test_allowed_clients_forms(text: str, expected: tuple[str, ...]) -> None:
    assert parse(ALLOWED_CLIENTS=text).allowed_clients == tuple(map(IPv4Network, expected))


@pytest.mark.parametrize(("var", "attr", "text", "expected"), [
    ("MAX_MAPPINGS_PER_CLIENT", "max_mappings_per_client", "1", 1),
    ("MAX_MAPPINGS_PER_CLIENT", "max_mappings_per_client", "65535", 65535),
    ("RECONCILE_INTERVAL", "reconcile_interval", "1", 1.0),
    ("RECONCILE_INTERVAL", "reconcile_interval", "2.5", 2.5),
    ("MAX_LIFETIME", "max_lifetime", "1", 1),
    ("MAX_LIFETIME", "max_lifetime", str(2**31 - 1), 2**31 - 1),
    ("ROUTER_TIMEOUT", "router_timeout", "0.1", 0.1),
    ("UPSTREAM_TIMEOUT", "upstream_timeout", "0.3", 0.3),
    ("EXPIRY_GRACE", "expiry_grace", "0", 0.0),
    ("ADOPT_GRACE", "adopt_grace", "0", 0.0),
    ("CLIENT_RATE_LIMIT", "rate_limit", "0", 0.0),
    ("CLIENT_RATE_BURST", "rate_burst", "1", 1),
    ("CLIENT_RATE_BURST", "rate_burst", "1000000", 10**6),
    ("SHUTDOWN_TIMEOUT", "shutdown_timeout", "1", 1.0),
    ("PORT_RANGE", "port_range", "20000-20010", (20000, 20010)),
    ("PORT_RANGE", "port_range", "5000", (5000, 5000)),
    ("PORT_RANGE", "port_range", "1 - 65535", (1, 65535)),
])
def test_numeric_ranges_accepted(var: str, attr: str, text: str, expected: object) -> None:
    assert getattr(parse(**{var: text}), attr) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("tcp:192.168.88.10:32400", ["tcp 192.168.88.10 32400"]),
    ("tcp:192.168.88.10:32400,udp:192.168.88.10:32400",
     ["tcp 192.168.88.10 32400", "udp 192.168.88.10 32400"]),
    (" UDP:10.0.0.5:27015 , ", ["udp 10.0.0.5 27015"]),
])
def test_static_mappings_forms(text: str, expected: list[str]) -> None:
    entries = parse(STATIC_MAPPINGS=text).static_mappings
    assert [f"{e.proto.label} {e.client} {e.port}" for e in entries] == expected


def test_new_settings_defaults() -> None:
    s = parse()
    assert s.upstream_keepalive is True
    assert s.upstream_probe_interval == 30
    assert s.static_mappings == ()
    assert s.hook_command is None
    assert s.hook_timeout == 10
    assert s.metrics_addr is None


def test_hook_command_and_metrics_addr_accepted(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    s = parse(HOOK_COMMAND=str(hook), METRICS_ADDR="127.0.0.1:9815", UPSTREAM_KEEPALIVE="no")
    assert s.hook_command == hook
    assert s.metrics_addr == Endpoint("127.0.0.1", 9815)
    assert s.upstream_keepalive is False


def test_free_text_settings() -> None:
    s = parse(MIKROTIK_API_USER="doublenat", MIKROTIK_IN_INTERFACE="wg-proton")
    assert (s.api_user, s.in_interface) == ("doublenat", "wg-proton")
    assert parse(MIKROTIK_IN_INTERFACE="AUTO").in_interface is None


def test_tls_ca_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    key = tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(ca), "-days", "2", "-subj", "/CN=lab-ca"],
        check=True, capture_output=True, timeout=20,
    )
    assert parse(MIKROTIK_API_TLS="yes", MIKROTIK_API_TLS_CA=str(ca)).api_tls_ca == ca


# ------------------------------------------------------------- invalid forms

INVALID: dict[str, list[str]] = {
    "VPN_GATEWAY": ["gateway.vpn", "10.2.0", "10.2.0.256", "::1", "[fe80::1]:5351",
                    "10.2.0.1:0", "10.2.0.1:65536", "10.2.0.1:port", "10.2.0.1:53:51",
                    "10.2.0.1:²"],
    "MIKROTIK_API_ADDRESS": [":8728", "router lan", "router.lan:0", "router.lan:99999",
                             "router.lan:http", "[::1]:8728", "fe80::1", "router.lan:-1",
                             "router.lan:" + "9" * 5000],
    "MIKROTIK_API_TLS": ["ture", "2", "enabled", "y", "tru e"],
    "MIKROTIK_API_TLS_VERIFY": ["nope", "-1", "truee"],
    "MIKROTIK_API_TLS_CA": ["/nonexistent/ca.pem", "/", "/etc/hostname", "x" * 300],
    "MIKROTIK_API_PASSWORD_FILE": ["/nonexistent/password", "/"],
    "VPN_PORT_MODE": ["both", "int", "externally"],
    "LISTEN_ADDR": ["5351", "bad", "0.0.0.0", "localhost:5351", "0.0.0.0:65536",
                    "0.0.0.0:-1", "::1:5351", "0.0.0.0:", "1.2.3.4:٣"],
    "ALLOWED_CLIENTS": [",", " , ", "10.0.0.0/33", "everyone", "10.0.0.0/8,fd00::/8",
                        "10.0.0.0/8;192.168.0.0/16"],
    "MAX_MAPPINGS_PER_CLIENT": ["0", "-1", "65536", "many", "1.5", "9" * 5000],
    "RECONCILE_INTERVAL": ["0", "0.5", "-1", "nan", "inf", "1e999", "soon"],
    "LOG_LEVEL": ["TRACE", "CRITICAL", "verbose", "WARNINGS"],
    "LOG_FORMAT": ["xml", "ecs", "jsonl"],
    "MAX_LIFETIME": ["0", str(2**31), "forever"],
    "ROUTER_TIMEOUT": ["0", "0.05", "-5", "NaN"],
    "UPSTREAM_TIMEOUT": ["0.2", "0", "x"],
    "EXPIRY_GRACE": ["-1", "-inf", "ten"],
    "ADOPT_GRACE": ["-0.1", "inf"],
    "PORT_RANGE": ["0-100", "100-99", "1024-65536", "a-b", "1024-", "-1024", "1024:2048"],
    "CLIENT_RATE_LIMIT": ["-1", "nan", "fast"],
    "CLIENT_RATE_BURST": ["0", "1000001", "1.5"],
    "SHUTDOWN_TIMEOUT": ["0", "0.9", "inf", "later"],
    "UPSTREAM_KEEPALIVE": ["maybe", "2", "keep"],
    "UPSTREAM_PROBE_INTERVAL": ["0", "0.5", "never", "inf"],
    "STATIC_MAPPINGS": ["tcp:192.168.88.10", "sctp:192.168.88.10:80", "tcp:nas.lan:80",
                        "tcp:192.168.88.10:0", "tcp:192.168.88.10:80,TCP:192.168.88.10:80",
                        "udp:0.0.0.0:80", "tcp:192.168.88.10:80:1", "tcp:127.0.0.1:80",
                        "tcp:192.168.88.10:65536", "192.168.88.10:80"],
    "HOOK_COMMAND": ["/nonexistent/hook", "relative/hook", "/etc/passwd", "/", "hook"],
    "HOOK_TIMEOUT": ["0", "0.05", "x"],
    "METRICS_ADDR": ["9100", "localhost:9100", "0.0.0.0:65536", "[::1]:9100"],
}


def test_every_validated_setting_has_invalid_cases() -> None:
    validated = {var.env for var in SETTINGS} - FREE_TEXT
    assert validated == set(INVALID)


@pytest.mark.parametrize(("var", "text"),
                         [(var, text) for var, texts in INVALID.items() for text in texts],
                         ids=lambda x: x[:40])
def test_invalid_value_names_its_variable(var: str, text: str) -> None:
    overrides = {var: text}
    if var == "MIKROTIK_API_PASSWORD_FILE":
        overrides["MIKROTIK_API_PASSWORD"] = None
    refused(var, **overrides)


def test_tls_ca_garbage_is_a_setting_error(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    error = refused("MIKROTIK_API_TLS_CA", MIKROTIK_API_TLS="true", MIKROTIK_API_TLS_CA=str(ca))
    assert str(ca) in str(error)


# Which value a generated text is tried as: everything the table has, password file included
# (with no password set, so that the file is read).
ALL_VARIABLES = sorted(var.env for var in SETTINGS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(var=st.sampled_from(ALL_VARIABLES), text=st.text(max_size=400))
@example(var="MIKROTIK_API_TLS_CA", text="a" * 300)
@example(var="MIKROTIK_API_PASSWORD_FILE", text="a\x00b")
@example(var="LISTEN_ADDR", text=":" + "1" * 5000)
@example(var="VPN_GATEWAY", text="1.2.3.4:\u00b2")
def test_arbitrary_text_parses_or_names_the_variable(var: str, text: str) -> None:
    overrides: dict[str, str | None] = {var: text}
    if var == "MIKROTIK_API_PASSWORD_FILE":
        overrides["MIKROTIK_API_PASSWORD"] = None
    named = var
    if var == "MIKROTIK_API_PASSWORD_FILE" and not text.strip():
        named = "MIKROTIK_API_PASSWORD"  # an empty file setting is no password at all
    try:
        parse(**overrides)
    except SettingError as error:
        assert error.variable == named, str(error)
        assert str(error).startswith(f"{named}: ")
        assert "\n" not in str(error) and "\r" not in str(error)
        assert PASSWORD not in str(error)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=20))
def test_arbitrary_boolean_parses_or_names_the_variable(text: str) -> None:
    for var in ("MIKROTIK_API_TLS", "MIKROTIK_API_TLS_VERIFY"):
        try:
            value = parse(**{var: text})
        except SettingError as error:
            assert error.variable == var
            assert text.strip().lower() not in {"true", "false", "yes", "no", "1", "0", ""}
        else:
            assert text.strip().lower() in {
                "true", "false", "yes", "no", "1", "0", "on", "off", ""}
            assert isinstance(value.api_tls, bool) and isinstance(value.api_tls_verify, bool)


# --------------------------------------------------------------- the password


@pytest.mark.parametrize(("content", "expected"), [
    (PASSWORD + "\n", PASSWORD),
    (PASSWORD + "\r\n", PASSWORD),
    (PASSWORD, PASSWORD),
    (" spaced out \n", " spaced out "),  # inner and leading spaces are the password's
])
def test_password_file(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "password"
    path.write_text(content, newline="")
    s = parse(MIKROTIK_API_PASSWORD=None, MIKROTIK_API_PASSWORD_FILE=str(path))
    assert s.api_password == expected


def test_password_from_environment_is_taken_verbatim() -> None:
    assert parse(MIKROTIK_API_PASSWORD=" pw with spaces ").api_password == " pw with spaces "


def test_missing_password_file_named_in_error(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    error = refused("MIKROTIK_API_PASSWORD_FILE", MIKROTIK_API_PASSWORD=None,
                    MIKROTIK_API_PASSWORD_FILE=str(path))
    assert str(path) in str(error)


def test_unreadable_password_file_named_without_content(tmp_path: Path) -> None:
    # Running as root makes chmod 000 useless; a file that is not text is unreadable too.
    path = tmp_path / "password"
    path.write_bytes(b"\xff\xfe" + PASSWORD.encode() + b"\xff")
    error = refused("MIKROTIK_API_PASSWORD_FILE", MIKROTIK_API_PASSWORD=None,
                    MIKROTIK_API_PASSWORD_FILE=str(path))
    assert str(path) in str(error)
    assert PASSWORD not in str(error) and "xff" not in str(error)
    assert error.__cause__ is None and error.__context__ is None


def test_password_file_is_a_directory(tmp_path: Path) -> None:
    error = refused("MIKROTIK_API_PASSWORD_FILE", MIKROTIK_API_PASSWORD=None,
                    MIKROTIK_API_PASSWORD_FILE=str(tmp_path))
    assert str(tmp_path) in str(error)


def test_no_password_at_all_names_the_password() -> None:
    error = refused("MIKROTIK_API_PASSWORD", MIKROTIK_API_PASSWORD=None)
    assert "MIKROTIK_API_PASSWORD_FILE" in str(error)


def test_password_never_in_redacted_or_repr(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    for s in (parse(), parse(MIKROTIK_API_PASSWORD=None, MIKROTIK_API_PASSWORD_FILE=str(path))):
        redacted = s.redacted()
        assert redacted["api_password"] == "<set>"
        assert PASSWORD not in repr(redacted) and PASSWORD not in str(redacted)
        assert set(redacted) >= {"vpn_gateway", "api_address", "listen", "allowed_clients"}
        assert PASSWORD not in repr(s) and PASSWORD not in str(s)
    assert parse(MIKROTIK_API_PASSWORD=None, MIKROTIK_API_PASSWORD_FILE=str(
        _empty(tmp_path))).redacted()["api_password"] == "<empty>"


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.write_text("")
    return path
