"""The Debian package for real, on every release and architecture it serves (SPEC §11).

One architecture-independent package, built by `make deb` (with a second, newer build of
the same tree for the upgrade), then, in a fresh chroot of bookworm or trixie, amd64 or
arm64 (arm64 under qemu; tests/packaging/chroots.py), as its user would:

    apt-get install ./doublenat_*.deb     dependencies from the release's own archive
    the env file                          filled in, as the README says
    supervisord                           the release's, with Debian's configuration
    natpmpc                               the release's client, against the installed daemon,
                                          which maps through the lab emulators
    stop, upgrade while running, purge    every rule removed; nothing left behind

The emulators run from this checkout on the host, in the chroot's own network namespace
(only loopback), so the daemon's port 5351, which natpmpc insists on, meets nobody else's.
Which installs run: DEB_MATRIX (tests/packaging/conftest.py); `make deb-matrix` runs all.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.needs import need_program, need_root
from tests.packaging import chroots
from tests.packaging.chroots import Instance, Spec
from tests.packaging.conftest import ALL, Prepared, install_matrix

ROOT = Path(__file__).resolve().parents[2]
SUPERVISOR_CONF = "/etc/supervisor/supervisord.conf"
ENV_FILE = "/etc/doublenat/doublenat.env"
LOG_FILE = "/var/log/doublenat/doublenat.log"
PROGRAM_FILE = "/etc/supervisor/conf.d/doublenat.conf"
API_USER = "doublenat"
# Quotes, a dollar and a semicolon: the env file is sourced by /bin/sh.
API_PASSWORD = "s3cret $HOME \"q\" 'x';y"
LISTEN = "127.0.0.1"
DEPENDENCIES = ("python3-gevent", "python3-click", "python3-pythonjsonlogger",
                "python3-prometheus-client")
# What natpmpc prints for a mapping; older releases spell it "liftime".
MAPPED = re.compile(r"Mapped public port (\d+) protocol (UDP|TCP) to local port (\d+) "
                    r"li(?:f|fe)time (\d+)")
# Under qemu everything is slower; these bound waits, they assert no speed.
READY_TIMEOUT = {"amd64": 60, "arm64": 300}
SLOWER = {"amd64": 1, "arm64": 8}


# ------------------------------------------------------------------------------ helpers


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return f"--- last lines of {path}\n" + "\n".join(text[-lines:])


def eventually(check: Callable[[], object], timeout: float = 20) -> None:
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
            time.sleep(0.2)


@dataclass
class Target:
    """A chroot instance as the machine the package is installed on."""

    spec: Spec
    instance: Instance
    tmp: Path
    supervisord: subprocess.Popen[bytes] | None = None
    emulators: subprocess.Popen[str] | None = None
    router: str = ""
    gateway: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _mark: float = field(default_factory=time.monotonic)

    # ---------------------------------------------------------------- running things

    def run(self, *argv: str, check: bool = True, timeout: float = 900,
            env: dict[str, str] | None = None) -> chroots.Result:
        try:
            return self.instance.run(list(argv), check=check, timeout=timeout, env=env)
        except chroots.ChrootError as exc:
            pytest.fail(f"in {self.spec.name}: {exc}\n{self.diagnostics()}", pytrace=False)

    def apt(self, *args: str) -> chroots.Result:
        return self.run("apt-get", "-y", "-q", *args,
                        env={"DEBIAN_FRONTEND": "noninteractive"})

    def install(self, deb: str, *options: str) -> chroots.Result:
        """The README's command, `apt-get install ./<file>.deb`, in /root where it is."""
        command = shlex.join(["apt-get", "install", "-y", "-q", *options, f"./{deb}"])
        return self.run("sh", "-c", f"cd /root && {command}",
                        env={"DEBIAN_FRONTEND": "noninteractive"})

    def supervisorctl(self, *args: str, check: bool = True) -> chroots.Result:
        return self.run("supervisorctl", "-c", SUPERVISOR_CONF, *args, check=check,
                        timeout=180)

    def natpmpc(self, *args: str) -> chroots.Result:
        """The release's natpmpc, with doublenat as its gateway."""
        return self.run("natpmpc", "-g", LISTEN, *args, check=False, timeout=120)

    def file(self, path: str) -> Path:
        return self.instance.path(path)

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = round(now - self._mark, 1)
        self._mark = now

    # ---------------------------------------------------------------- state

    def package_state(self) -> str:
        """dpkg's status of `name`: '' when unknown to dpkg."""
        out = self.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "doublenat", check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    def installed(self, name: str) -> bool:
        out = self.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", name, check=False)
        return out.returncode == 0 and out.stdout.startswith("ii")

    def getent(self, database: str, name: str) -> bool:
        return self.run("getent", database, name, check=False).returncode == 0

    def daemon_pid(self) -> int:
        """The PID (inside) of the running `doublenat serve`, 0 if none: read from the
        instance's /proc, which costs nothing, where supervisorctl under qemu costs seconds."""
        found = []
        for proc in self.file("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    args = (proc / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                # python3 /usr/bin/doublenat serve (under qemu, its interpreter first)
                if b"/usr/bin/doublenat" in args and b"serve" in args:
                    found.append(int(proc.name))
        assert len(found) <= 1, f"more than one doublenat serve: {found}"
        return found[0] if found else 0

    def rules(self) -> list[dict[str, Any]]:
        """doublenat's rules on the emulated router, read with the real client."""
        cmd = self.instance.host_command([
            sys.executable, "-m", "tests.packaging.router_rules", self.router, API_USER,
            str(self.tmp / "api-password")])
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout))

    def log_lines(self) -> list[dict[str, Any]]:
        """Every line of the daemon's log, each checked to be one JSON object."""
        records = []
        for number, line in enumerate(self.file(LOG_FILE).read_text().splitlines(), 1):
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

    def served(self) -> list[dict[str, Any]]:
        return [r for r in self.log_lines() if r["message"] == "doublenat serving NAT-PMP"]

    def wait_serving(self, count: int) -> None:
        """Until the log says the `count`th start serves (RUNNING is not ready)."""
        deadline = time.monotonic() + READY_TIMEOUT[self.spec.arch]
        while True:
            if self.file(LOG_FILE).exists() and len(self.served()) >= count:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"doublenat did not serve within {READY_TIMEOUT[self.spec.arch]}"
                            f" s\n{self.diagnostics()}", pytrace=False)
            time.sleep(0.2)

    def map(self, protocol: str, internal: int) -> tuple[int, int]:
        """natpmpc -a: (external port, lifetime) granted."""
        done = self.natpmpc("-a", str(internal), str(internal), protocol, "3600")
        mapped = MAPPED.findall(done.stdout)
        assert done.returncode == 0 and len(mapped) == 1, (
            f"natpmpc did not map ({done.returncode}):\n{done.stdout}{done.stderr}")
        external, proto, local, lifetime = mapped[0]
        assert (proto.lower(), int(local)) == (protocol, internal), done.stdout
        return int(external), int(lifetime)

    def supervisord_log(self) -> str:
        return (self.tmp / "supervisord.out").read_text(errors="replace")

    def diagnostics(self) -> str:
        parts = [f"=== {self.spec.name}", tail(self.tmp / "supervisord.out"),
                 tail(self.tmp / "emulators.log")]
        with_log = self.instance.pid and self.file(LOG_FILE)
        if with_log:
            parts.append(tail(with_log))
        return "\n".join(parts)

    # ---------------------------------------------------------------- starting things

    def start_supervisord(self) -> None:
        """Debian's supervisord with Debian's configuration, as its service runs it."""
        with open(self.tmp / "supervisord.out", "wb") as out:
            self.supervisord = self.instance.popen(
                ["supervisord", "-n", "-c", SUPERVISOR_CONF], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT[self.spec.arch]
        while self.supervisorctl("pid", check=False).returncode != 0:
            assert self.supervisord.poll() is None, self.supervisord_log()
            assert time.monotonic() < deadline, "supervisord did not answer supervisorctl"
            time.sleep(0.3)

    def start_emulators(self) -> None:
        """The lab's router and gateway, from this checkout, in the chroot's network."""
        password_file = self.tmp / "api-password"
        password_file.write_text(API_PASSWORD + "\n")
        cmd = self.instance.host_command([
            sys.executable, "-m", "doublenat.lab.standalone", "--router", f"{LISTEN}:0",
            "--user", API_USER, "--password-file", str(password_file),
            "--gateway", f"{LISTEN}:0", "--route", f"{LISTEN}=wg-proton"])
        with open(self.tmp / "emulators.log", "w") as log:
            self.emulators = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                              stderr=log, text=True)
        assert self.emulators.stdout is not None
        line = self.emulators.stdout.readline()
        assert line, "the emulators did not start:\n" + tail(self.tmp / "emulators.log")
        ready = json.loads(line)
        self.router, self.gateway = ready["router"], ready["gateway"]

    def configure(self) -> None:
        """The emulators, and the env file filled in to use them, as an operator edits it."""
        self.start_emulators()
        with self.file(ENV_FILE).open("a") as env:
            env.write("\n# --- written by tests/packaging/test_deb.py\n"
                      f"VPN_GATEWAY={self.gateway}\n"
                      f"MIKROTIK_API_ADDRESS={self.router}\n"
                      f"MIKROTIK_API_USER={API_USER}\n"
                      f"MIKROTIK_API_PASSWORD={shlex.quote(API_PASSWORD)}\n"
                      f"LISTEN_ADDR={LISTEN}:5351\n"
                      "ALLOWED_CLIENTS=127.0.0.0/8\n"
                      "LOG_LEVEL=DEBUG\n")

    def stop_all(self) -> None:
        if self.supervisord is not None and self.supervisord.poll() is None:
            self.supervisorctl("shutdown", check=False)
            try:
                self.supervisord.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.supervisord.kill()
                self.supervisord.wait()
        if self.emulators is not None and self.emulators.poll() is None:
            self.emulators.terminate()
            try:
                self.emulators.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.emulators.kill()
                self.emulators.wait()


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Path,
           prepared: Prepared) -> Iterator[Target]:
    release, arch = request.param
    need_root()
    need_program("unshare", "nsenter")
    spec = Spec(release, arch)
    prepared.wait(f"chroot:{spec.name}", timeout=3600)
    with Instance(spec, tmp_path / "instance", own_network=True) as instance:
        box = Target(spec, instance, tmp_path)
        try:
            yield box
        finally:
            box.stop_all()
            # The kernel ends whatever is left when the instance's PID 1 goes.


def matrix_params() -> list[Any]:
    chosen = install_matrix()
    return [pytest.param(combo, id=f"{combo[0]}-{combo[1]}",
                         marks=[pytest.mark.prepare(f"chroot:{combo[0]}-{combo[1]}")])
            for combo in ALL if combo in chosen]


# --------------------------------------------------------------------------------- tests


pytestmark = [pytest.mark.deb, pytest.mark.slow, pytest.mark.prepare("deb")]


def test_one_package_for_every_release_and_architecture(debs: dict[str, Any]) -> None:
    old, new = Path(debs["old"]), Path(debs["new"])
    assert old.name == f"doublenat_{debs['versions']['old']}_all.deb"
    assert new.name == f"doublenat_{debs['versions']['new']}_all.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(old)], capture_output=True, text=True,
                            check=True).stdout
    assert re.search(r"^Architecture: all$", fields, re.M)
    depends = re.search(r"^Depends: (.*)$", fields, re.M)
    assert depends, fields
    relations = {r.strip() for r in depends.group(1).split(",")}
    # Debian's libraries, nothing pinned to one python3 minor version.
    assert {"python3-gevent (>= 22.10)", "python3-click (>= 8.1)",
            "python3-pythonjsonlogger (>= 2.0)", "python3-prometheus-client (>= 0.16)",
            "adduser"} <= relations, relations
    assert not [r for r in relations if "<<" in r], relations
    assert re.search(r"^Recommends: supervisor$", fields, re.M)
    listing = subprocess.run(["dpkg-deb", "-c", str(old)], capture_output=True, text=True,
                             check=True).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    assert "/usr/share/doublenat/routeros_api/__init__.py" in paths
    assert "/usr/share/doublenat/doublenat/cli.py" in paths
    # where the README's HOOK_COMMAND recipe copies it from, executable
    hook = next(line for line in listing.splitlines()
                if line.endswith("/usr/share/doublenat/examples/qbittorrent-port-hook"))
    assert hook.startswith("-rwxr-xr-x"), hook
    # No compiled code, no byte code: the same file for every architecture and python3.
    assert not [p for p in paths if p.endswith((".so", ".pyc"))]
    assert not [p for p in paths if "/dist-packages/" in p or p.startswith("/opt/")]


def test_lintian_reports_no_error(debs: dict[str, Any]) -> None:
    need_program("lintian")
    done = subprocess.run(["lintian", "--no-tag-display-limit", "--display-info",
                           debs["old"]], capture_output=True, text=True, timeout=600,
                          check=False)
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EWIPXO]: ", line)]
    errors = [t for t in tags if t.startswith("E: ")]
    assert not errors, "\n".join(tags)
    # Every warning is explained in the README's packaging notes, by its tag.
    readme = (ROOT / "README.md").read_text()
    notes = readme.split("### Packaging notes", 1)[-1].split("\n## ", 1)[0]
    warnings = {t.split()[2] for t in tags if t.startswith("W: ")}
    unexplained = sorted(tag for tag in warnings if f"`{tag}`" not in notes)
    assert not unexplained, f"lintian warnings the README does not explain: {unexplained}"
    print(f"\nlintian: {len(tags)} tags\n" + "\n".join(tags))


@pytest.mark.parametrize("target", matrix_params(), indirect=True)
def test_install_configure_run_stop_upgrade_purge(target: Target,
                                                  debs: dict[str, Any]) -> None:
    box = target
    old, new = Path(debs["old"]), Path(debs["new"])
    old_version, new_version = debs["versions"]["old"], debs["versions"]["new"]
    box.instance.copy_in(old, f"/root/{old.name}")
    box.instance.copy_in(new, f"/root/{new.name}")
    # The dependencies are not there yet: apt must resolve them from the release.
    assert not [name for name in DEPENDENCIES if box.installed(name)]
    box.lap("prepare")

    # ---- install, on a host whose supervisord already runs (the README's order)
    box.start_supervisord()
    box.install(old.name)
    box.lap("install")
    assert all(box.installed(name) for name in DEPENDENCIES)
    versions = box.run("dpkg-query", "-W", "-f", "${Package} ${Version}\\n", "python3",
                       *DEPENDENCIES, "natpmpc", "supervisor").stdout
    print(f"\n{box.spec.name}:\n{versions}")
    # not configured yet: the program is not added, so it cannot crash-loop meanwhile
    status = box.supervisorctl("status", "doublenat", check=False)
    assert "no such process" in status.stdout.lower(), status
    assert box.package_state() == "ii"
    assert box.getent("passwd", "doublenat") and box.getent("group", "doublenat")
    mode = box.run("stat", "-c", "%a %U %G", ENV_FILE).stdout.split()
    assert mode == ["640", "root", "doublenat"], mode
    assert box.file(PROGRAM_FILE).is_file() and box.file(LOG_FILE).parent.is_dir()
    conffiles = box.file("/var/lib/dpkg/info/doublenat.conffiles").read_text().split()
    assert sorted(conffiles) == [ENV_FILE, PROGRAM_FILE]
    assert box.run("doublenat", "--version").stdout.strip().endswith(old_version)
    # byte-compiled at install, for the release's python3, so the daemon (which cannot
    # write there) never compiles at start
    python = box.run("python3", "-c", "import sys; print(sys.implementation.cache_tag)")
    tag = python.stdout.strip()
    compiled = box.file(f"/usr/share/doublenat/doublenat/__pycache__/cli.{tag}.pyc")
    assert compiled.is_file(), f"no {compiled.name}"

    # ---- configure: the emulators, and the env file pointing at them
    box.configure()

    # ---- start, as the README says; ready = serving, not RUNNING
    box.supervisorctl("update", "doublenat")
    box.wait_serving(1)
    box.lap("start")
    pid = box.daemon_pid()
    assert pid > 0
    status_text = box.file(f"/proc/{pid}/status").read_text()
    uid = box.run("id", "-u", "doublenat").stdout.strip()
    assert f"\nUid:\t{uid}\t{uid}\t" in status_text, "the daemon does not run as doublenat"
    cmdline = box.file(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"/usr/bin/doublenat" in cmdline and b"serve" in cmdline, cmdline

    # ---- the release's natpmpc: public address, then a mapping through both emulators
    address = box.natpmpc()
    assert address.returncode == 0, address.stdout + address.stderr
    assert "Public IP address : 11.22.33.44" in address.stdout, address.stdout
    external, lifetime = box.map("udp", 40001)
    assert lifetime > 0
    (rule,) = box.rules()
    assert (rule["protocol"], rule["to_addresses"], rule["to_ports"], rule["in_interface"]) \
        == ("udp", "127.0.0.1", "40001", "wg-proton"), rule
    assert rule["dst_port"] == str(external)
    box.lap("map")

    # ---- the secret is nowhere visible
    assert API_PASSWORD.encode() not in box.file(f"/proc/{pid}/cmdline").read_bytes()
    for proc in box.file("/proc").iterdir():
        if proc.name.isdigit():
            try:
                args = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            assert b"s3cret" not in args, args
    config_info = box.run("python3", "-c",
                          "import xmlrpc.client\n"
                          "from supervisor.xmlrpc import SupervisorTransport\n"
                          "t = SupervisorTransport(None, None, 'unix:///run/supervisor.sock')\n"
                          "p = xmlrpc.client.ServerProxy('http://localhost', transport=t)\n"
                          "print(p.supervisor.getAllConfigInfo())").stdout
    assert "doublenat-supervised" in config_info and "s3cret" not in config_info
    assert "s3cret" not in box.file(LOG_FILE).read_text()

    # ---- stop: graceful, rules removed, exit status 0
    box.supervisorctl("stop", "doublenat")
    box.lap("stop")
    assert box.rules() == []

    def stopped_cleanly() -> None:
        assert "stopped: doublenat (exit status 0)" in box.supervisord_log()
        last = box.log_lines()[-1]
        assert last["message"] == "doublenat stopped" and last["left_behind"] == 0, last

    eventually(stopped_cleanly, 20 * SLOWER[box.spec.arch])

    # ---- the README's check recipe, with the installed command and the env file
    checked = box.run("sh", "-c", "set -a; . /etc/doublenat/doublenat.env; set +a; "
                      "doublenat check --json", check=False)
    report = json.loads(checked.stdout)
    assert checked.returncode == 0 and report["ok"], checked.stdout + checked.stderr
    assert "s3cret" not in checked.stdout + checked.stderr

    # ---- upgrade while running: the new code must run afterwards
    box.supervisorctl("start", "doublenat")
    box.wait_serving(2)
    box.map("tcp", 40002)
    old_pid = box.daemon_pid()
    box.lap("restart")
    box.install(new.name)
    box.lap("upgrade")
    assert box.package_state() == "ii"
    box.wait_serving(3)
    new_pid = box.daemon_pid()
    assert new_pid > 0 and new_pid != old_pid, "the upgrade did not restart the daemon"
    assert box.run("doublenat", "--version").stdout.strip().endswith(new_version)

    def upgraded() -> None:
        records = box.log_lines()
        served = [r for r in records if r["message"] == "doublenat serving NAT-PMP"]
        assert len(served) == 3, served
        assert served[-1]["version"] == new_version, served
        # The old daemon stopped gracefully before the new one started.
        stops = [r for r in records if r["message"] == "doublenat stopped"]
        assert len(stops) == 2 and stops[-1]["left_behind"] == 0, stops
        assert stops[-1]["mappings_closed"] == 1, stops
        assert records.index(stops[-1]) < records.index(served[-1])
        assert box.supervisord_log().count("stopped: doublenat (exit status 0)") == 2

    eventually(upgraded, 20 * SLOWER[box.spec.arch])
    box.map("udp", 40003)
    assert [r["to_ports"] for r in box.rules()] == ["40003"]
    records = box.log_lines()
    assert all(r.get("level") != "ERROR" for r in records), [
        r for r in records if r.get("level") == "ERROR"]

    # ---- purge: daemon stopped gracefully, program, files and user gone
    box.apt("purge", "doublenat")
    box.lap("purge")
    assert not box.package_state()
    assert box.rules() == [], "purge left rules on the router"

    def purge_stopped_cleanly() -> None:
        log = box.supervisord_log()
        assert log.count("stopped: doublenat (exit status 0)") == 3, log

    eventually(purge_stopped_cleanly, 20 * SLOWER[box.spec.arch])
    status = box.supervisorctl("status", "doublenat", check=False)
    assert "no such process" in status.stdout.lower(), status
    assert box.daemon_pid() == 0, "a doublenat process outlived the purge"
    assert not box.getent("passwd", "doublenat") and not box.getent("group", "doublenat")
    for path in ("/etc/doublenat", PROGRAM_FILE, "/usr/share/doublenat", "/usr/bin/doublenat",
                 "/usr/sbin/doublenat-supervised", "/var/log/doublenat",
                 "/usr/share/python3/runtime.d/doublenat.rtupdate", "/usr/share/doc/doublenat"):
        assert not box.file(path).exists() and not box.file(path).is_symlink(), \
            f"purge left {path}"
    print(f"timings (s): {box.timings}")


def shipped_env(deb: Path) -> str:
    """The env file as a package ships it."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                         check=True).stdout
    return subprocess.run(["tar", "-xO", "./etc/doublenat/doublenat.env"], input=tar,
                          capture_output=True, check=True).stdout.decode()


@pytest.mark.prepare("olddeb")
@pytest.mark.parametrize("target", [
    pytest.param(("bookworm", "amd64"), id="bookworm-amd64",
                 marks=[pytest.mark.prepare("chroot:bookworm-amd64")])], indirect=True)
def test_upgrade_from_the_virtualenv_package(target: Target, debs: dict[str, Any],
                                             prepared: Prepared) -> None:
    """Today's users run the first package (dh-virtualenv in /opt/venvs, bookworm amd64
    only): `apt-get install` of this one must take over the running daemon and its
    configuration, and leave nothing of the old layout."""
    box = target
    old = Path(prepared.wait("olddeb", timeout=900)["deb"])
    new, new_version = Path(debs["new"]), debs["versions"]["new"]
    assert old.name.endswith("_amd64.deb")
    box.instance.copy_in(old, f"/root/{old.name}")
    box.instance.copy_in(new, f"/root/{new.name}")
    box.start_supervisord()
    box.install(old.name)
    assert box.file("/opt/venvs/doublenat/bin/python3").exists()
    box.configure()
    box.supervisorctl("update", "doublenat")
    box.wait_serving(1)
    box.map("udp", 40001)
    old_pid = box.daemon_pid()
    box.run("doublenat", "--version")  # as root, as an operator runs it
    box.lap("old package running")

    # The env file shipped has changed since (new settings) and the operator's has too: dpkg
    # would ask. Without anyone to answer, the README's way to keep the operator's.
    box.install(new.name, "-o", "Dpkg::Options::=--force-confold")
    box.lap("upgrade")
    box.wait_serving(2)
    assert box.daemon_pid() not in (0, old_pid), "the upgrade did not restart the daemon"
    arch = box.run("dpkg-query", "-W", "-f=${Architecture} ${Version}", "doublenat").stdout
    assert arch == f"all {new_version}", arch
    assert box.run("doublenat", "--version").stdout.strip().endswith(new_version)
    # Nothing of the old layout is left.
    assert not box.file("/opt/venvs").exists(), "the upgrade left /opt/venvs"
    assert not box.file("/usr/bin/doublenat").is_symlink()
    # The operator's configuration stays, with its permissions; the new file is beside it.
    assert f"MIKROTIK_API_ADDRESS={box.router}" in box.file(ENV_FILE).read_text()
    shipped = (ROOT / "packaging" / "etc" / "doublenat.env").read_text()
    if shipped_env(old) != shipped:
        assert box.file(ENV_FILE + ".dpkg-dist").read_text() == shipped
    else:
        assert not box.file(ENV_FILE + ".dpkg-dist").exists()
    mode = box.run("stat", "-c", "%a %U %G", ENV_FILE).stdout.split()
    assert mode == ["640", "root", "doublenat"], mode

    def handed_over() -> None:
        records = box.log_lines()
        stops = [r for r in records if r["message"] == "doublenat stopped"]
        assert len(stops) == 1 and stops[0]["left_behind"] == 0, stops
        served = [r for r in records if r["message"] == "doublenat serving NAT-PMP"]
        assert served[-1]["version"] == new_version, served

    eventually(handed_over, 20 * SLOWER[box.spec.arch])
    box.map("tcp", 40002)
    assert [r["to_ports"] for r in box.rules()] == ["40002"]

    box.apt("purge", "doublenat")
    assert box.rules() == [] and not box.package_state()
    for path in ("/etc/doublenat", "/usr/share/doublenat", "/opt/venvs", "/var/log/doublenat"):
        assert not box.file(path).exists(), f"purge left {path}"
    print(f"timings (s): {box.timings}")
