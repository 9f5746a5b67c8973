"""The Debian package for real: build it with `make deb`, install it with apt, run it under
Debian's supervisord against the lab emulators, stop it, upgrade it, purge it.

Needs root and the build dependencies (`make deps`). It changes the machine (a package,
a system user, a supervisord on Debian's socket) and restores it afterwards, even when
it fails. Refuses to run where doublenat is already installed or supervisord already runs.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

import doublenat
from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.contracts import NatRule
from doublenat.settings import Endpoint
from tests.needs import need, need_program, need_root

pytestmark = [pytest.mark.deb, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SUPERVISOR_CONF = "/etc/supervisor/supervisord.conf"
SUPERVISOR_SOCKET = "/var/run/supervisor.sock"
ENV_FILE = Path("/etc/doublenat/doublenat.env")
LOG_FILE = Path("/var/log/doublenat/doublenat.log")
PROGRAM_FILE = Path("/etc/supervisor/conf.d/doublenat.conf")
API_USER = "doublenat"
# Quotes, a dollar and a semicolon: the env file is sourced by /bin/sh.
API_PASSWORD = "s3cret $HOME \"q\" 'x';y"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=120"]


# ------------------------------------------------------------------------------ helpers


def run(cmd: list[str], timeout: float = 300, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    if check and result.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} exited {result.returncode}\n"
                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}",
                    pytrace=False)
    return result


def apt(*args: str) -> subprocess.CompletedProcess[str]:
    return run([*APT, *args], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def package_state() -> str:
    """dpkg's status of doublenat: '' when unknown to dpkg."""
    out = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "doublenat"], check=False)
    return out.stdout.strip() if out.returncode == 0 else ""


def user_exists(name: str) -> bool:
    return run(["getent", "passwd", name], check=False).returncode == 0


def group_exists(name: str) -> bool:
    return run(["getent", "group", name], check=False).returncode == 0


def supervisord_listening() -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SUPERVISOR_SOCKET)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def supervisorctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["supervisorctl", "-c", SUPERVISOR_CONF, *args], timeout=120, check=check)


def daemon_pid() -> int:
    out = supervisorctl("pid", "doublenat", check=False).stdout.strip()
    return int(out) if out.isdigit() else 0


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def natpmp(address: tuple[str, int], request: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(request, address)
        try:
            return sock.recv(64)
        except TimeoutError:
            return None


def wait_answering(address: tuple[str, int], timeout: float = 30) -> float:
    """Until doublenat answers a public-address request with success (RUNNING is not ready).
    Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        reply = natpmp(address, struct.pack("!BB", 0, 0), timeout=0.25)
        if reply is not None and len(reply) == 12:
            version, opcode, result = struct.unpack("!BBH", reply[:4])
            if (version, opcode, result) == (0, 128, 0):
                return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"doublenat did not answer NAT-PMP on {address} within {timeout}s\n"
                + tail(LOG_FILE), pytrace=False)


def map_udp(address: tuple[str, int], internal_port: int) -> int:
    """A UDP mapping request; returns the external port granted."""
    reply = natpmp(address, struct.pack("!BBHHHI", 0, 1, 0, internal_port, 0, 3600),
                   timeout=5)
    assert reply is not None, "no reply to a mapping request"
    assert len(reply) == 16, reply.hex()
    _v, opcode, result, _epoch, internal, external, lifetime = struct.unpack("!BBHIHHI", reply)
    assert (opcode, result, internal) == (129, 0, internal_port), reply.hex()
    assert external > 0 and lifetime > 0
    return external


def eventually(check: Callable[[], object], timeout: float = 10) -> None:
    """Retry an assertion: supervisord copies the daemon's output to the log file from its
    own event loop, so a line can land there just after the event that caused it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return f"--- last lines of {path}\n" + "\n".join(text[-lines:])


def log_lines() -> list[dict[str, object]]:
    """Every line of the daemon's log, each checked to be one JSON object with the fields."""
    records = []
    for number, line in enumerate(LOG_FILE.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{LOG_FILE}:{number} is not JSON: {line!r}", pytrace=False)
        assert isinstance(record, dict), f"{LOG_FILE}:{number}: {line!r}"
        missing = {"timestamp", "level", "logger", "message"} - set(record)
        assert not missing, f"{LOG_FILE}:{number} lacks {missing}: {line!r}"
        stamp = datetime.fromisoformat(str(record["timestamp"]))
        assert stamp.utcoffset() is not None and not stamp.utcoffset(), line
        records.append(record)
    return records


@dataclass
class Machine:
    tmp: Path
    emulators: subprocess.Popen[str] | None = None
    supervisord: subprocess.Popen[bytes] | None = None
    supervisord_out: Path | None = None
    router: Endpoint | None = None
    gateway: Endpoint | None = None
    cleanup_errors: list[str] = field(default_factory=list)

    def start_emulators(self) -> None:
        password_file = self.tmp / "api-password"
        password_file.write_text(API_PASSWORD + "\n")
        with open(self.tmp / "emulators.log", "w") as log:
            self.emulators = subprocess.Popen(
                [sys.executable, "-m", "doublenat.lab.standalone", "--router", "127.0.0.1:0",
                 "--user", API_USER, "--password-file", str(password_file),
                 "--gateway", "127.0.0.1:0", "--route", "127.0.0.1=wg-proton"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.emulators.stdout is not None
        line = self.emulators.stdout.readline()
        assert line, "the emulators did not start:\n" + tail(self.tmp / "emulators.log")
        ready = json.loads(line)
        host, port = ready["router"].rsplit(":", 1)
        self.router = Endpoint(host, int(port))
        host, port = ready["gateway"].rsplit(":", 1)
        self.gateway = Endpoint(host, int(port))

    def start_supervisord(self) -> None:
        # Debian's own configuration, as its service would run it, in a bare environment.
        self.supervisord_out = self.tmp / "supervisord.out"
        with open(self.supervisord_out, "wb") as out:
            self.supervisord = subprocess.Popen(
                ["supervisord", "-n", "-c", SUPERVISOR_CONF], stdout=out,
                stderr=subprocess.STDOUT, env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
                start_new_session=True)
        deadline = time.monotonic() + 20
        while not supervisord_listening():
            assert self.supervisord.poll() is None, tail(self.supervisord_out)
            assert time.monotonic() < deadline, "supervisord did not open its socket"
            time.sleep(0.1)

    def supervisord_log(self) -> str:
        assert self.supervisord_out is not None
        return self.supervisord_out.read_text(errors="replace")

    def rules(self) -> list[NatRule]:
        assert self.router is not None
        client = RouterOsClient(self.router, API_USER, API_PASSWORD, timeout=5)
        try:
            return [r for r in client.list_rules() if r.comment.startswith("double-natpmp-")]
        finally:
            client.close()

    # ---------------------------------------------------------------- restore

    def restore(self, user_existed: bool) -> None:
        """Purge the package (with supervisord still up, so prerm stops the daemon
        gracefully), then stop supervisord and the emulators. The daemon's log is kept
        in the test's tmp_path."""
        if LOG_FILE.exists():
            shutil.copy(LOG_FILE, self.tmp / "doublenat.log")
        if package_state():
            result = run([*APT, "purge", "doublenat"], check=False,
                         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if result.returncode != 0:
                self.cleanup_errors.append(f"apt-get purge: {result.stderr[-2000:]}")
                run(["dpkg", "--purge", "--force-all", "doublenat"], check=False)
        if self.supervisord is not None and self.supervisord.poll() is None:
            supervisorctl("shutdown", check=False)
            try:
                self.supervisord.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.cleanup_errors.append("supervisord ignored shutdown; killed")
                os.killpg(self.supervisord.pid, 9)
                self.supervisord.wait()
        if self.emulators is not None and self.emulators.poll() is None:
            self.emulators.terminate()
            try:
                self.emulators.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.emulators.kill()
                self.emulators.wait()
        if not user_existed and user_exists("doublenat"):
            self.cleanup_errors.append("purge left the doublenat user")
            run(["deluser", "--system", "doublenat"], check=False)
        if group_exists("doublenat") and not user_existed:
            run(["delgroup", "--system", "doublenat"], check=False)


def supervisor_service_active() -> bool:
    """Debian's supervisor.service, as on a CI host with systemd where installing the
    supervisor package started it."""
    return shutil.which("systemctl") is not None and run(
        ["systemctl", "is-active", "--quiet", "supervisor"], check=False).returncode == 0


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    need_root()
    need_program("dpkg-buildpackage", "dh_virtualenv", "apt-get", "supervisord",
                 "supervisorctl", "make")
    need(not package_state(), "doublenat is already installed on this machine")
    need(not user_exists("doublenat"), "a doublenat user already exists on this machine")
    # The test runs its own supervisord on Debian's socket: a systemd-managed one is
    # paused for the test and started again afterwards; any other one is left alone.
    paused_service = supervisord_listening() and supervisor_service_active()
    if paused_service:
        run(["systemctl", "stop", "supervisor"])
    need(not supervisord_listening(), f"a supervisord already listens on {SUPERVISOR_SOCKET}")
    box = Machine(tmp_path)
    try:
        yield box
    finally:
        box.restore(user_existed=False)
        if paused_service:
            run(["systemctl", "start", "supervisor"], check=False)
    assert not box.cleanup_errors, box.cleanup_errors
    assert not package_state() and not user_exists("doublenat")


def build(tmp: Path, name: str, version: str | None = None) -> subprocess.Popen[bytes]:
    """`make deb` into tmp/name (started, not waited for)."""
    cmd = ["make", "-C", str(ROOT), "--no-print-directory", "deb",
           f"DEB_OUT={tmp / name}", f"DEB_BUILDDIR={tmp / (name + '-build')}"]
    if version:
        cmd.append(f"DEB_VERSION={version}")
    with open(tmp / f"{name}.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def built(tmp: Path, name: str, process: subprocess.Popen[bytes]) -> Path:
    assert process.wait(timeout=600) == 0, tail(tmp / f"{name}.log", 60)
    (deb,) = (tmp / name).glob("doublenat_*.deb")
    return deb


# --------------------------------------------------------------------------------- test


def test_deb_install_run_stop_upgrade_purge(machine: Machine, tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        timings[name] = round(time.monotonic() - mark, 1)
        mark = time.monotonic()

    # Both packages at once: the current tree, and the same tree as a newer version.
    old_version = doublenat.__version__
    new_version = old_version + (".debtest1" if "+" in old_version else "+debtest1")
    first_build = build(tmp_path, "v1")
    second_build = build(tmp_path, "v2", new_version)
    first = built(tmp_path, "v1", first_build)
    second = built(tmp_path, "v2", second_build)
    lap("build both")
    assert first.name == f"doublenat_{old_version}_amd64.deb"
    assert second.name == f"doublenat_{new_version}_amd64.deb"
    fields = run(["dpkg-deb", "-f", str(first), "Depends", "Recommends"]).stdout
    assert "python3 (<< 3.12)" in fields and "Recommends: supervisor" in fields

    # ---- install, as on a host whose supervisord already runs (the README's order)
    machine.start_supervisord()
    apt("install", str(first))
    lap("install")
    # not configured yet: the program is not added, so it cannot crash-loop meanwhile
    assert "no such process" in supervisorctl("status", "doublenat", check=False).stdout.lower()
    assert package_state() == "ii"
    assert user_exists("doublenat") and group_exists("doublenat")
    info = os.stat(ENV_FILE)
    assert stat.S_IMODE(info.st_mode) == 0o640
    assert (pwd.getpwuid(info.st_uid).pw_name, info.st_gid) == (
        "root", pwd.getpwnam("doublenat").pw_gid)
    assert PROGRAM_FILE.is_file() and LOG_FILE.parent.is_dir()
    conffiles = Path("/var/lib/dpkg/info/doublenat.conffiles").read_text().split()
    assert sorted(conffiles) == [str(ENV_FILE), str(PROGRAM_FILE)]
    assert run(["doublenat", "--version"]).stdout.strip().endswith(old_version)
    assert os.path.realpath("/usr/bin/doublenat").startswith("/opt/venvs/doublenat/")

    # ---- configure: the emulators, and the env file pointing at them
    machine.start_emulators()
    assert machine.router is not None and machine.gateway is not None
    listen = ("127.0.0.1", free_udp_port())
    with ENV_FILE.open("a") as env:
        env.write("\n# --- written by tests/packaging/test_deb.py\n"
                  f"VPN_GATEWAY={machine.gateway}\n"
                  f"MIKROTIK_API_ADDRESS={machine.router}\n"
                  f"MIKROTIK_API_USER={API_USER}\n"
                  f"MIKROTIK_API_PASSWORD={shlex.quote(API_PASSWORD)}\n"
                  f"LISTEN_ADDR={listen[0]}:{listen[1]}\n"
                  "ALLOWED_CLIENTS=127.0.0.0/8\n"
                  "LOG_LEVEL=DEBUG\n")

    # ---- start, as the README says; ready = answering, not RUNNING
    supervisorctl("update", "doublenat")
    timings["ready after supervisorctl update"] = round(wait_answering(listen), 1)
    lap("start")
    pid = daemon_pid()
    assert pid > 0
    status = Path(f"/proc/{pid}/status").read_text()
    uid = pwd.getpwnam("doublenat").pw_uid
    assert f"\nUid:\t{uid}\t{uid}\t" in status, "the daemon does not run as doublenat"
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"/usr/bin/doublenat" in cmdline and b"serve" in cmdline, cmdline

    external = map_udp(listen, 40001)
    (rule,) = machine.rules()
    assert (rule.protocol, rule.to_addresses, rule.to_ports, rule.in_interface) == (
        "udp", "127.0.0.1", "40001", "wg-proton"), rule
    assert rule.dst_port == str(external)

    # ---- the secret is nowhere visible
    assert API_PASSWORD.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert API_PASSWORD not in run(["ps", "-eo", "args"]).stdout
    config_info = run(["/usr/bin/python3", "-c",
                       "import xmlrpc.client\n"
                       "from supervisor.xmlrpc import SupervisorTransport\n"
                       f"t = SupervisorTransport(None, None, 'unix://{SUPERVISOR_SOCKET}')\n"
                       "p = xmlrpc.client.ServerProxy('http://localhost', transport=t)\n"
                       "print(p.supervisor.getAllConfigInfo())"]).stdout
    assert "doublenat-supervised" in config_info and API_PASSWORD not in config_info
    assert "s3cret" not in LOG_FILE.read_text()

    # ---- stop: graceful, rules removed, exit status 0
    started = time.monotonic()
    supervisorctl("stop", "doublenat")
    assert time.monotonic() - started < 30
    lap("stop")
    assert machine.rules() == []

    def stopped_cleanly() -> None:
        assert "stopped: doublenat (exit status 0)" in machine.supervisord_log()
        assert log_lines()[-1]["message"] == "doublenat stopped"

    eventually(stopped_cleanly)

    # ---- the README's check recipe, with the installed command and the env file
    checked = run(["sh", "-c", "set -a; . /etc/doublenat/doublenat.env; set +a; "
                   "doublenat check --json"], check=False)
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["ok"], checked.stdout + checked.stderr
    assert API_PASSWORD not in checked.stdout + checked.stderr

    # ---- upgrade while running: the new code must run afterwards
    supervisorctl("start", "doublenat")
    wait_answering(listen)
    map_udp(listen, 40002)
    old_pid = daemon_pid()
    lap("restart")
    apt("install", str(second))
    lap("upgrade")
    assert package_state() == "ii"
    wait_answering(listen)
    new_pid = daemon_pid()
    assert new_pid > 0 and new_pid != old_pid, "the upgrade did not restart the daemon"
    assert run(["doublenat", "--version"]).stdout.strip().endswith(new_version)

    def upgraded() -> None:
        records = log_lines()
        served = [r for r in records if r["message"] == "doublenat serving NAT-PMP"]
        assert len(served) == 3, served
        assert served[-1]["version"] == new_version, served
        # The old daemon stopped gracefully before the new one started.
        stops = [r for r in records if r["message"] == "doublenat stopped"]
        assert len(stops) == 2 and stops[-1]["left_behind"] == 0, stops
        assert stops[-1]["mappings_closed"] == 1, stops
        assert records.index(stops[-1]) < records.index(served[-1])
        assert machine.supervisord_log().count("stopped: doublenat (exit status 0)") == 2

    eventually(upgraded)
    map_udp(listen, 40003)
    assert [r.to_ports for r in machine.rules()] == ["40003"]
    records = log_lines()
    assert all(r.get("level") != "ERROR" for r in records), [
        r for r in records if r.get("level") == "ERROR"]

    # ---- purge: daemon stopped gracefully, program, files and user gone
    apt("purge", "doublenat")
    lap("purge")
    assert not package_state()
    assert machine.rules() == [], "purge left rules on the router"

    def purge_stopped_cleanly() -> None:
        log = machine.supervisord_log()
        assert log.count("stopped: doublenat (exit status 0)") == 3, log

    eventually(purge_stopped_cleanly)
    assert "no such process" in supervisorctl("status", "doublenat", check=False).stdout.lower()
    assert not user_exists("doublenat") and not group_exists("doublenat")
    for path in ("/etc/doublenat", str(PROGRAM_FILE), "/opt/venvs/doublenat",
                 "/usr/bin/doublenat", "/usr/sbin/doublenat-supervised", str(LOG_FILE.parent)):
        assert not os.path.lexists(path), f"purge left {path}"
    print(f"\ntimings (s): {timings}")
