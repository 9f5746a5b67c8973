"""`doublenat serve` (issue #2 item 4): every setting an option with its environment
variable, one-line errors with exit status 2, and a password that never shows."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result

from doublenat.cli import _register_extra_commands, cli
from doublenat.settings import SETTINGS
from tests.clirunner import cli_runner

# The console script next to the interpreter running the tests: the virtualenv's, or the
# Debian package's /usr/bin/doublenat when the suite runs under a release's python3.
SCRIPT = Path(sys.executable).with_name("doublenat")
PASSWORD = "Pa55-w0rd!xyzzy"
WRONG_PASSWORD = "Wr0ng-pa55word!plugh"
VALID = {
    "VPN_GATEWAY": "10.2.0.1",
    "MIKROTIK_API_ADDRESS": "192.168.88.1",
    "MIKROTIK_API_PASSWORD": PASSWORD,
}
# One invalid value of each kind (the full list is in test_settings.py).
INVALID = [
    ("VPN_GATEWAY", "gateway.vpn"),
    ("VPN_GATEWAY", "10.2.0.1:99999"),
    ("MIKROTIK_API_ADDRESS", "router lan"),
    ("MIKROTIK_API_TLS", "ture"),
    ("MIKROTIK_API_TLS_VERIFY", "maybe"),
    ("MIKROTIK_API_TLS_CA", "/nonexistent/ca.pem"),
    ("VPN_PORT_MODE", "both"),
    ("LISTEN_ADDR", "5351"),
    ("LISTEN_ADDR", "localhost:5351"),
    ("ALLOWED_CLIENTS", "everyone"),
    ("MAX_MAPPINGS_PER_CLIENT", "0"),
    ("RECONCILE_INTERVAL", "soon"),
    ("LOG_LEVEL", "TRACE"),
    ("LOG_FORMAT", "xml"),
    ("PORT_RANGE", "2000-1000"),
    ("SHUTDOWN_TIMEOUT", "nan"),
]


def clean_env(**values: str | None) -> dict[str, str | None]:
    """Every setting unset (whatever the developer's shell has), then `values`."""
    return {**{var.env: None for var in SETTINGS}, **values}


def serve(*args: str, **env: str | None) -> Result:
    _register_extra_commands()
    return cli_runner().invoke(cli, ["serve", *args], env=clean_env(**env))


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_naming(stderr: str, variable: str) -> None:
    lines = stderr_lines(stderr)
    assert len(lines) == 1, stderr
    assert variable in lines[0]
    assert "Traceback" not in stderr
    assert PASSWORD not in stderr


# -------------------------------------------------------------- CliRunner


def test_help_lists_every_setting_with_its_envvar() -> None:
    result = serve("--help", **VALID)
    assert result.exit_code == 0
    flat = " ".join(result.output.split())  # click wraps "[env var: X]" across lines
    for var in SETTINGS:
        assert f"env var: {var.env}]" in flat, var.env
        assert var.option in flat
    assert PASSWORD not in result.output


def test_top_level_help_lists_serve() -> None:
    _register_extra_commands()
    result = cli_runner().invoke(cli, ["--help"], env=clean_env())
    assert result.exit_code == 0
    assert "serve" in result.output


@pytest.mark.parametrize("missing", list(VALID))
def test_missing_required_setting(missing: str) -> None:
    result = serve(**{**VALID, missing: None})
    assert result.exit_code == 2
    assert_one_line_naming(result.stderr, missing)
    assert result.stdout == ""


@pytest.mark.parametrize(("variable", "value"), INVALID, ids=lambda x: str(x))
def test_invalid_setting(variable: str, value: str) -> None:
    result = serve(**{**VALID, variable: value})
    assert result.exit_code == 2
    assert_one_line_naming(result.stderr, variable)


def test_option_overrides_environment() -> None:
    result = serve("--vpn-gateway", "not-an-ip", **VALID)
    assert result.exit_code == 2
    assert_one_line_naming(result.stderr, "VPN_GATEWAY")
    assert "not-an-ip" in result.stderr


def test_password_file_setting_is_read(tmp_path: Path) -> None:
    # The file is read (it is a directory: refused, named) before anything starts.
    result = serve(**{**VALID, "MIKROTIK_API_PASSWORD": None,
                      "MIKROTIK_API_PASSWORD_FILE": str(tmp_path)})
    assert result.exit_code == 2
    assert_one_line_naming(result.stderr, "MIKROTIK_API_PASSWORD_FILE")
    assert str(tmp_path) in result.stderr


def test_unreadable_password_file_content_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_bytes(b"\xff" + PASSWORD.encode())
    result = serve(**{**VALID, "MIKROTIK_API_PASSWORD": None,
                      "MIKROTIK_API_PASSWORD_FILE": str(path)})
    assert result.exit_code == 2
    assert_one_line_naming(result.stderr, "MIKROTIK_API_PASSWORD_FILE")


# ------------------------------------------------------ the console script


def script_env(**values: str) -> dict[str, str]:
    names = {var.env for var in SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(values)
    return env


def run_script(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], env=script_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def test_script_help() -> None:
    done = run_script("serve", "--help", **VALID)
    assert done.returncode == 0, done.stderr
    flat = " ".join(done.stdout.split())
    for var in SETTINGS:
        assert f"env var: {var.env}]" in flat, var.env
    assert PASSWORD not in done.stdout + done.stderr


def test_script_missing_setting() -> None:
    done = run_script("serve", **{k: v for k, v in VALID.items() if k != "VPN_GATEWAY"})
    assert done.returncode == 2
    assert_one_line_naming(done.stderr, "VPN_GATEWAY")


def test_script_invalid_listen_addr_keeps_password_out() -> None:
    done = run_script("serve", **VALID, LISTEN_ADDR="127.0.0.1:http")
    assert done.returncode == 2
    assert_one_line_naming(done.stderr, "LISTEN_ADDR")
    assert PASSWORD not in done.stdout


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_script_bind_failure_keeps_password_out(log_format: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = run_script("serve", **VALID, LISTEN_ADDR=f"127.0.0.1:{port}",
                          LOG_FORMAT=log_format, RECONCILE_INTERVAL="3600")
    assert done.returncode == 1
    lines = stderr_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "LISTEN_ADDR" in lines[0]
    if log_format == "json":
        record = json.loads(lines[0])
        assert record["level"] == "ERROR"
    else:
        assert " ERROR " in lines[0]
    assert PASSWORD not in done.stdout + done.stderr


# ---------------------------------------------- a serve run against the lab


def wait_for(path: Path, predicate, timeout: float) -> str:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if predicate(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.fixture(scope="module")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The standalone RouterOS and gateway emulators; the router knows PASSWORD."""
    where = tmp_path_factory.mktemp("emulators")
    password_file = where / "password"
    password_file.write_text(PASSWORD + "\n")
    out = where / "stdout"
    with out.open("w") as stdout, (where / "stderr").open("w") as stderr:
        emulator = subprocess.Popen(
            [sys.executable, "-m", "doublenat.lab.standalone",
             "--router", "127.0.0.1:0", "--password-file", str(password_file),
             "--gateway", "127.0.0.1:0", "--route", "127.0.0.1=wg-proton"],
            stdout=stdout, stderr=stderr, env=script_env())
    try:
        text = wait_for(out, lambda t: t.endswith("\n"), 15)
        assert text, "emulators did not start: " + (where / "stderr").read_text()
        addresses = json.loads(text)
        yield {"VPN_GATEWAY": addresses["gateway"], "MIKROTIK_API_ADDRESS": addresses["router"],
               "MIKROTIK_API_USER": "doublenat"}
    finally:
        emulator.send_signal(signal.SIGTERM)
        try:
            emulator.wait(timeout=10)
        except subprocess.TimeoutExpired:
            emulator.kill()
            emulator.wait()


def run_serve(tmp_path: Path, until: str, **env: str) -> tuple[int, str]:
    """`doublenat serve` until a log line contains `until`, then SIGTERM; (status, stderr)."""
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        daemon = subprocess.Popen(
            [str(SCRIPT), "serve"], stdout=subprocess.DEVNULL, stderr=stderr,
            env=script_env(LISTEN_ADDR="127.0.0.1:0", **env))
    try:
        wait_for(log, lambda text: until in text, 10)
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(timeout=15)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    return status, log.read_text()


def json_records(text: str) -> list[dict[str, object]]:
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # every line: nothing loose
        assert isinstance(record, dict)
        assert list(record)[:4] == ["timestamp", "level", "logger", "message"]
        records.append(record)
    return records


def test_refused_login_is_logged_without_any_password(
    emulators: dict[str, str], tmp_path: Path
) -> None:
    status, text = run_serve(tmp_path, "login", **emulators,
                             MIKROTIK_API_PASSWORD=WRONG_PASSWORD)
    assert status == 0, text
    assert WRONG_PASSWORD not in text and PASSWORD not in text
    records = json_records(text)
    assert any(r.get("event") == "daemon.started" for r in records), text
    failed = [r for r in records if "login" in json.dumps(r) and "fail" in json.dumps(r)]
    assert failed, text
    assert all(r["level"] in ("WARNING", "ERROR") for r in failed)
    assert records[-1].get("event") == "daemon.stopped"


def test_password_file_logs_in(emulators: dict[str, str], tmp_path: Path) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    status, text = run_serve(tmp_path, "reconcile.done", **emulators,
                             MIKROTIK_API_PASSWORD_FILE=str(password_file))
    assert status == 0, text
    assert PASSWORD not in text
    records = json_records(text)
    assert any(r.get("event") == "reconcile.done" for r in records), text
    assert not any("login" in json.dumps(r) for r in records), text


def test_a_settings_error_is_a_json_record_when_stderr_is_a_log() -> None:
    result = serve(**{**VALID, "VPN_GATEWAY": "not-an-ip"})
    assert result.exit_code == 2
    [line] = stderr_lines(result.stderr)
    record = json.loads(line)
    assert record["level"] == "ERROR" and record["variable"] == "VPN_GATEWAY"
    assert record["message"].startswith("doublenat: error: VPN_GATEWAY:")
    text = serve(**{**VALID, "VPN_GATEWAY": "not-an-ip", "LOG_FORMAT": "text"})
    assert stderr_lines(text.stderr)[0].startswith("doublenat: error: VPN_GATEWAY:")
