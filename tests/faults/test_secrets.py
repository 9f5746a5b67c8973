"""The API password never shows: not in a log line, an exception text or `--help`.

Passwords are built from marker chunks (`Q7xa`, `Q7xb`, ...) joined by characters that JSON
or repr() escape (quotes, backslash, tab, non-ASCII, a space, "=password="): a leak of any
piece of one, raw or escaped, leaves a marker in the text, so partial leaks count too.

What it proves:
- the adapter (RouterOsClient), driven into every failure the emulator can stage at login
  and after it (wrong password, a trap that quotes the password back, a trap without a
  message, !fatal, a disconnect before, during and after a reply, garbage bytes, a stalled
  login, the router down, TLS against the wrong CA and against a plain port), raises
  exceptions whose str(), repr() and formatted traceback hold no piece of the password,
  and logs none, unscrubbed, at DEBUG;
- `doublenat serve` itself, started with the password in its environment and a router that
  refuses it, logs none in JSON or text format at DEBUG, while a client asks for mappings;
- `doublenat serve --help` and `doublenat --help` do not show it when it is set (directly
  or through MIKROTIK_API_PASSWORD_FILE), nor does the error for another bad setting;
- the log scrubber masks a password however repr() quoted the text around it (the fix
  made here, see `doublenat.redact.Redactor`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import gevent
import pytest

from doublenat import logs
from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.contracts import RouterError, RuleRef, RuleSpec
from doublenat.lab.gateway import GatewayEmulator
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.lab.routeros.faults import FaultKind, FaultSpec, Match
from doublenat.lab.routeros.wire import encode_sentence
from doublenat.protocol.natpmp import Proto
from doublenat.settings import Endpoint
from tests.logcapture import attached
from tests.pki import Pki, make_pki
from tests.probe import probe

MARK = re.compile(r"Q7x[a-z]")
PASSWORDS = [
    'Q7xa"Q7xb\\Q7xcö',
    "Q7xa'Q7xb\"Q7xc =password=Q7xd",
    "Q7xa\tQ7xb\\u00e9Q7xc'Q7xd",
    "Q7xa'Q7xb",  # only a single quote: repr() switches to double quotes for it
]
USER = "doublenat"


def leaks(text: str, password: str) -> list[str]:
    """Pieces of `password` found in `text`: its markers, and the whole in its escapes."""
    found = sorted(set(MARK.findall(text)))
    forms = {password, json.dumps(password)[1:-1], repr(password)[1:-1],
             repr(password.encode())[2:-1]}
    found += [f"whole password as {form!r}" for form in forms if form in text]
    return found


def exception_texts(exc: BaseException) -> str:
    """Everything an exception could show: str, repr, args, the traceback with its chain."""
    parts = [str(exc), repr(exc), *map(repr, exc.args)]
    parts += traceback.format_exception(exc)
    return "\n".join(parts)


class Capture(logging.Handler):
    """Every record, unscrubbed: message, extras (as JSON and repr) and the traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self._plain = logging.Formatter("%(levelname)s %(name)s %(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("doublenat.lab"):
            return  # the emulators are the test's, not doublenat's
        fields = {k: v for k, v in record.__dict__.items() if k not in ("args", "exc_info")}
        self.texts.append(self._plain.format(record))
        self.texts.append(json.dumps(fields, default=repr))
        self.texts.append(repr(record.args))


@pytest.fixture
def capture() -> Iterator[Capture]:
    with attached(Capture()) as handler:
        yield handler


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pki]:
    base = tmp_path_factory.mktemp("pki")
    return {"router": make_pki(base, "router"), "other": make_pki(base, "other")}


def _spec() -> RuleSpec:
    return RuleSpec(Proto.UDP, "wg-proton", 40123, IPv4Address("192.168.1.9"), 7000,
                    "double-natpmp-udp 192.168.1.9:7000 via 40123")


# (emulator password: None = the right one; fault to arm; client options)
Scenario = tuple[str | None, FaultSpec | None, dict[str, object]]
LOGIN = Match.of("/login")
ADD = Match.of("/ip/firewall/nat/add")
SCENARIOS: dict[str, Callable[[str], Scenario]] = {
    "wrong password": lambda pw: ("not-" + pw[:2], None, {}),
    "login trap quoting the password": lambda pw: (None, FaultSpec(
        FaultKind.TRAP, LOGIN, times=None,
        message=f"cannot log in: /login =name={USER} =password={pw}"), {}),
    "login trap without a message": lambda pw: (None, FaultSpec(
        FaultKind.TRAP_WITHOUT_MESSAGE, LOGIN, times=None), {}),
    "fatal at login": lambda pw: (None, FaultSpec(
        FaultKind.FATAL, LOGIN, times=None, message=f"bad password {pw}"), {}),
    "disconnect before the login reply": lambda pw: (None, FaultSpec(
        FaultKind.DROP_BEFORE_REPLY, LOGIN, times=None), {}),
    "disconnect inside the login reply": lambda pw: (None, FaultSpec(
        FaultKind.DROP_MID_REPLY, LOGIN, times=None), {}),
    "RST before the login reply": lambda pw: (None, FaultSpec(
        FaultKind.DROP_BEFORE_REPLY, LOGIN, times=None, rst=True), {}),
    "garbage instead of the login reply": lambda pw: (None, FaultSpec(
        FaultKind.RAW, LOGIN, times=None, close=True,
        payload=b"\x05!trap\x0f=message=" + pw.encode()[:15].ljust(15, b"x") + b"\xf9"), {}),
    "malformed reply quoting the password": lambda pw: (None, FaultSpec(
        FaultKind.RAW, LOGIN, times=None, close=True,
        payload=encode_sentence([b"!bogus", b'=said="' + pw.encode() + b'"', b".tag=1"])),
        {}),
    "login stalls": lambda pw: (None, FaultSpec(FaultKind.STALL, LOGIN, times=None), {}),
    "trap on a write": lambda pw: (None, FaultSpec(
        FaultKind.TRAP, ADD, times=None, message=f"failure: {pw}"), {}),
    "disconnect after a write": lambda pw: (None, FaultSpec(
        FaultKind.EXECUTE_THEN_DROP, ADD, times=None), {}),
    "fatal on a write": lambda pw: (None, FaultSpec(FaultKind.FATAL, ADD, times=None), {}),
    "router down": lambda pw: (None, None, {"down": True}),
    "TLS with the wrong CA": lambda pw: (None, None, {"tls": "other"}),
    "TLS towards the plain port": lambda pw: (None, None, {"tls": "plain"}),
}


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_adapter_failures_never_show_the_password(
    scenario: str, password: str, capture: Capture, pki: dict[str, Pki]
) -> None:
    router_password, fault, options = SCENARIOS[scenario](password)
    emu = RouterOsEmulator(users={USER: router_password or password},
                           ssl_context=pki["router"].server_context()).start()
    try:
        if fault is not None:
            emu.faults.arm(fault)
        address = emu.address
        tls = options.get("tls")
        if tls == "other":
            assert emu.tls_address is not None
            address = emu.tls_address
        if options.get("down"):
            emu.router_down()
        client = RouterOsClient(
            Endpoint(*address), USER, password, tls=tls is not None,
            tls_ca=pki[str(tls)].ca if tls == "other" else pki["router"].ca, timeout=0.5,
            clock=lambda: 0.0)  # a frozen clock: no backoff between attempts
        raised: list[BaseException] = []
        for call in (client.identity, client.list_rules, lambda: client.add_rule(_spec()),
                     lambda: client.remove_rule(RuleRef("*1", 1)), client.identity):
            try:
                call()
            except (RouterError, OSError) as exc:
                raised.append(exc)
        client.close()
    finally:
        emu.stop()
    if scenario not in ("trap on a write", "disconnect after a write", "fatal on a write"):
        assert raised, "the scenario should make the adapter fail"
    for exc in raised:
        text = exception_texts(exc)
        assert not leaks(text, password), (scenario, text)
    logged = "\n".join(capture.texts)
    assert not leaks(logged, password), (scenario, logged)


# ------------------------------------------------------------------ the daemon


def _serve(env: dict[str, str], timeout: float = 30.0) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "doublenat.cli", "serve"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, out: bytearray,
                   timeout: float = 20.0) -> None:
    assert proc.stdout is not None
    with gevent.Timeout(timeout, AssertionError(f"no {needle!r} in: {bytes(out)[-2000:]!r}")):
        while needle not in out:
            chunk = proc.stdout.readline()
            if not chunk:
                raise AssertionError(f"doublenat exited: {bytes(out)[-2000:]!r}")
            out += chunk


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.parametrize("setup", ["wrong password", "TLS with the wrong CA"])
def test_serve_logs_never_show_the_password(
    setup: str, log_format: str, pki: dict[str, Pki], tmp_path: Path
) -> None:
    password = PASSWORDS[1]
    emu = RouterOsEmulator(users={USER: "something-else" if setup == "wrong password"
                                  else password},
                           ssl_context=pki["router"].server_context()).start()
    gateway = GatewayEmulator("127.0.0.1", 0)
    gateway.start()
    emu.state.add_route("127.0.0.1/32", "wg-proton")
    env = _base_env() | {
        "VPN_GATEWAY": "{}:{}".format(*gateway.address),
        "MIKROTIK_API_USER": USER,
        "MIKROTIK_API_PASSWORD": password,
        "LISTEN_ADDR": "127.0.0.1:0",
        "ALLOWED_CLIENTS": "127.0.0.0/8",
        "LOG_LEVEL": "DEBUG",
        "LOG_FORMAT": log_format,
        "ROUTER_TIMEOUT": "1",
        "SHUTDOWN_TIMEOUT": "2",
    }
    if setup == "wrong password":
        env["MIKROTIK_API_ADDRESS"] = "{}:{}".format(*emu.address)
    else:
        assert emu.tls_address is not None
        env |= {"MIKROTIK_API_ADDRESS": "{}:{}".format(*emu.tls_address),
                "MIKROTIK_API_TLS": "yes", "MIKROTIK_API_TLS_CA": str(pki["other"].ca)}
    proc = _serve(env)
    out = bytearray()
    try:
        _wait_for_line(proc, b"daemon.started" if log_format == "json" else b"serving", out)
        listen = re.search(rb"listen[\"=: ]+\"?([\d.]+):(\d+)", bytes(out))
        assert listen, bytes(out)
        server = (listen.group(1).decode(), int(listen.group(2)))
        # Clients keep asking while the daemon keeps failing to log in.
        with probe(server, "127.0.0.7") as p:
            for port in (7001, 7002, 7003):
                reply = p.tcp(port)
                assert reply.result == 3
                gevent.sleep(0.6)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        rest, _ = proc.communicate(timeout=20)
        out += rest
        emu.stop()
        gateway.stop()
    text = out.decode("utf-8", "replace")
    assert "login" in text or "certificate" in text, text[-2000:]  # it did fail, and said so
    assert not leaks(text, password), text


@pytest.mark.parametrize("how", ["environment", "file"])
def test_help_never_shows_the_password(how: str, tmp_path: Path) -> None:
    password = PASSWORDS[0]
    env = _base_env()
    if how == "environment":
        env["MIKROTIK_API_PASSWORD"] = password
    else:
        (tmp_path / "pw").write_text(password)
        env["MIKROTIK_API_PASSWORD_FILE"] = str(tmp_path / "pw")
    for args in (["serve", "--help"], ["--help"]):
        done = subprocess.run([sys.executable, "-m", "doublenat.cli", *args], env=env,
                              capture_output=True, timeout=30)
        text = (done.stdout + done.stderr).decode("utf-8", "replace")
        assert done.returncode == 0, text
        assert "MIKROTIK_API_PASSWORD" in text or args == ["--help"]
        assert not leaks(text, password), text


def test_a_settings_error_does_not_show_the_password() -> None:
    password = PASSWORDS[1]
    env = _base_env() | {"MIKROTIK_API_PASSWORD": password, "VPN_GATEWAY": "10.2.0.1",
                         "MIKROTIK_API_ADDRESS": "192.168.88.1", "MIKROTIK_API_TLS": "maybe"}
    done = subprocess.run([sys.executable, "-m", "doublenat.cli", "serve"], env=env,
                          capture_output=True, timeout=30)
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 2 and "MIKROTIK_API_TLS" in text, text
    assert not leaks(text, password), text


# ------------------------------------------------------------------ the scrubber


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_scrubber_masks_the_password_whatever_the_quoting(
    password: str, log_format: str
) -> None:
    """What routeros-api would put in an error if its text ever reached a log: the /login
    sentence as bytes, whose repr() quoting depends on the other words (a `"` elsewhere
    makes a `'` in the password come out as `\\'`)."""
    stream = io.StringIO()
    logger = logging.getLogger("doublenat.test_secrets")
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("doublenat").level,
             sys.excepthook, threading.excepthook, sys.unraisablehook)
    try:
        logs.configure("DEBUG", log_format, stream=stream, secrets=[password])
        for user in ("admin", 'ad"min', "ad'min"):
            sentence = f"/login =name={user} =password={password} .tag=1".encode()
            logger.error("Error executing command %r", sentence)
            logger.error("as text: %s", sentence.decode())
            logger.error("as str repr: %r", sentence.decode())
            try:
                raise RuntimeError(f"Error executing command {sentence!r}")
            except RuntimeError:
                logger.exception("failed", extra={"words": [sentence], "text": password})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("doublenat").setLevel(saved[2])
        sys.excepthook, threading.excepthook, sys.unraisablehook = saved[3:]
    text = stream.getvalue()
    assert text.count("***") >= 9
    assert not leaks(text, password), text
