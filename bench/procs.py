"""The processes a bench run starts: doublenat, the emulators, the load generator, an echo
server, miniupnpd, and the network namespaces the opcode-0 comparison runs in.

Everything is started pinned (`taskset`) and, where asked, inside a namespace
(`ip netns exec`), and is stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from doublenat.lab import miniupnpd

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent

SERVER_CPU = 0  # doublenat, miniupnpd, the echo server
CLIENT_CPU = 1  # the load generator and the emulators


class BenchError(RuntimeError):
    pass


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


# Every measured process runs at this niceness when we may raise priority (root): on a
# shared machine it keeps other work from preempting the measurement. 0 turns it off.
NICE = -10


def nice_level() -> int:
    return NICE if NICE and os.geteuid() == 0 and shutil.which("nice") else 0


def wrap(cmd: Sequence[str], cpu: int | None = None, netns: str | None = None) -> list[str]:
    out: list[str] = []
    if netns is not None:
        out += ["ip", "netns", "exec", netns]
    if nice_level():
        out += ["nice", "-n", str(nice_level())]
    if cpu is not None and can_pin():
        out += ["taskset", "-c", str(cpu)]
    return out + list(cmd)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# Where the measured daemon imports doublenat from (`bench.run --tree`, for before/after
# comparisons); the emulators and the generator always come from this tree.
DAEMON_TREE: Path = ROOT


def _env(tree: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def _read_json_line(proc: subprocess.Popen[str], timeout: float, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line:
            with contextlib.suppress(ValueError):
                return json.loads(line)  # type: ignore[no-any-return]
            continue
        if proc.poll() is not None:
            break
    raise BenchError(f"{what} did not start (exit status {proc.poll()})")


def stop_process(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> float | None:
    """Signal one process we started; return the seconds it took to exit (None: killed)."""
    if proc is None or proc.poll() is not None:
        return 0.0
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
        return time.monotonic() - started
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return None


# ---------------------------------------------------------------------- load generator


def loadgen(*args: str, cpu: int | None = CLIENT_CPU, netns: str | None = None,
            timeout: float = 300.0) -> dict[str, Any]:
    cmd = wrap([PYTHON, "-m", "bench.loadgen", *args], cpu, netns)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          cwd=ROOT, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"load generator failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- emulators


class _EmulatorProcess:
    """One bench.emulators process and its control socket."""

    def __init__(self, workdir: Path, part: str, args: list[str], cpu: int | None,
                 netns: str | None) -> None:
        self.control_path = str(workdir / f"emu-{part}-{uuid.uuid4().hex[:8]}.sock")
        cmd = wrap([PYTHON, "-m", "bench.emulators", "--part", part,
                    "--control", self.control_path, *args], cpu, netns)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=_env(), cwd=ROOT)
        try:
            self.ready = _read_json_line(self.proc, 20, f"the {part} emulator")
        except BaseException:
            self.stop()
            raise

    def control(self, op: str, **fields: object) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.control_path)
            sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        if "error" in reply:
            raise BenchError(f"emulator control {op}: {reply['error']}")
        return reply  # type: ignore[no-any-return]

    def stop(self) -> None:
        stop_process(self.proc)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)


class Emulators:
    """The router emulator and the gateway emulator, each in its own process (in a real
    network they are two machines; here they at least do not share one event loop)."""

    def __init__(self, workdir: Path, password: str, router_latency: float = 0.0,
                 cpu: int | None = CLIENT_CPU, netns: str | None = None,
                 hub_timers: bool = False, gateway_args: Sequence[str] = ()) -> None:
        """`gateway_args`: bench.emulators' --gateway-* options (profile, lifetime, delay)."""
        self.workdir = workdir
        password_file = self.password_file = workdir / f"router-password-{uuid.uuid4().hex[:6]}"
        password_file.write_text(password)
        password_file.chmod(0o600)
        # One process for both: in two, on the same CPU, the router answered no sooner.
        self.process = _EmulatorProcess(workdir, "both", [
            "--password-file", str(password_file), "--router-latency", str(router_latency),
            *(["--hub-timers"] if hub_timers else []), *gateway_args], cpu, netns)
        self.gateway: str = self.process.ready["gateway"]
        self.router: str = self.process.ready["router"]

    @property
    def pids(self) -> list[int]:
        return [self.process.proc.pid]

    def control(self, op: str, **fields: object) -> dict[str, Any]:
        return self.process.control(op, **fields)

    def counters(self) -> dict[str, Any]:
        return self.control("counters")

    def reset(self) -> None:
        self.control("reset")

    def set_latency(self, seconds: float) -> None:
        self.control("latency", seconds=seconds)

    def stop(self) -> None:
        self.process.stop()
        with contextlib.suppress(FileNotFoundError):
            self.password_file.unlink()


def rawros(emulators: Emulators, password_file: Path, total: int,
           connections: int = 4, cpu: int | None = SERVER_CPU) -> dict[str, Any]:
    """bench.rawros against these emulators' router, from doublenat's CPU."""
    cmd = wrap([PYTHON, "-m", "bench.rawros", "--router", emulators.router,
                "--password-file", str(password_file), "--connections", str(connections),
                "--count", str(total)], cpu)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(),
                          cwd=ROOT, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"bench.rawros failed: {done.stderr.strip()[-500:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- doublenat


class Doublenat:
    """`doublenat serve` as its own process, configured through the environment."""

    def __init__(self, emulators: Emulators, password: str, listen: str,
                 settings: Mapping[str, str] | None = None, cpu: int | None = SERVER_CPU,
                 netns: str | None = None, client_netns: str | None = None,
                 py_spy: Path | None = None) -> None:
        self.listen = listen
        self.client_netns = client_netns  # where the readiness probe runs
        env = _env(DAEMON_TREE)
        env.update({
            "VPN_GATEWAY": emulators.gateway,
            "MIKROTIK_API_ADDRESS": emulators.router,
            "MIKROTIK_API_USER": "doublenat",
            "MIKROTIK_API_PASSWORD": password,
            "LISTEN_ADDR": listen,
            "ALLOWED_CLIENTS": "127.0.0.0/8,192.168.77.0/24",
            "CLIENT_RATE_LIMIT": "0",
            "MAX_MAPPINGS_PER_CLIENT": "65535",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "json",
            "RECONCILE_INTERVAL": "3600",  # no reconciliation pass inside a measurement
            "SHUTDOWN_TIMEOUT": "30",
        })
        env.update(settings or {})
        self.log_path = emulators.workdir / f"doublenat-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("w")
        cmd = [PYTHON, "-m", "doublenat.cli", "serve"]
        if py_spy is not None:
            cmd = [str(Path(PYTHON).parent / "py-spy"), "record", "--format", "raw",
                   "--rate", "250", "--nonblocking", "-o", str(py_spy), "--", *cmd]
        self.proc = subprocess.Popen(wrap(cmd, cpu, netns), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env, cwd=DAEMON_TREE)
        self.netns = netns

    @property
    def pid(self) -> int:
        """The daemon's own pid (under py-spy, its child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            kids = children.read_text().split()
            if kids and "py-spy" in Path(f"/proc/{self.proc.pid}/cmdline").read_text():
                return int(kids[0])
        return self.proc.pid

    def wait_ready(self, source: str | None = None, timeout: float = 30.0) -> None:
        args = ["wait", "--target", self.listen, "--timeout", str(timeout), "--mapping"]
        if source:
            args += ["--bind", source]
        ready = loadgen(*args, netns=self.client_netns, timeout=timeout + 10)
        if not ready.get("ready") or self.proc.poll() is not None:
            # (an exited daemon that "answered": something else listens on that address)
            raise BenchError(f"doublenat did not get ready: {self.log_path.read_text()[-500:]}")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def terminate(self, timeout: float = 60.0) -> float | None:
        """SIGTERM; the seconds until the daemon exited (None if it had to be killed)."""
        if self.proc.poll() is not None:
            return 0.0
        pid = self.pid
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while time.monotonic() - started < timeout:
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                elapsed = time.monotonic() - started
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(30)
                self._log.close()
                return elapsed
            time.sleep(0.005)
        self.kill()
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            stop_process(self.proc, signal.SIGTERM, 10)
        self._log.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------- reference servers


class _Listener:
    """A reference server that prints its bound address on its first line of output."""

    what = "server"

    def __init__(self, cmd: Sequence[str], cpu: int | None, netns: str | None) -> None:
        self.proc = subprocess.Popen(wrap(cmd, cpu, netns), stdout=subprocess.PIPE, text=True,
                                     env=_env(), cwd=ROOT)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            self.stop()
            raise BenchError(f"{self.what} did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid  # ip netns exec, nice and taskset all exec the command

    def stop(self) -> None:
        stop_process(self.proc)


class EchoServer(_Listener):
    """bench/echo.py: stdlib sockets, no gevent."""

    what = "the stdlib echo server"

    def __init__(self, listen: str, cpu: int | None = SERVER_CPU, netns: str | None = None):
        super().__init__([PYTHON, "-m", "bench.echo", listen], cpu, netns)


class CEcho(_Listener):
    """`natpmp_load echo`: the compiled echo (recvmmsg/sendmmsg), the generator's ceiling."""

    what = "the C echo server"

    def __init__(self, listen: str, cpu: int | None = SERVER_CPU, netns: str | None = None):
        super().__init__([str(natpmp_load()), "echo", "--listen", listen], cpu, netns)


class GeventFloor(_Listener):
    """bench/gevent_floor.py: a bare gevent DatagramServer with a fixed reply."""

    what = "the gevent floor server"

    def __init__(self, listen: str, inline: bool, cpu: int | None = SERVER_CPU,
                 netns: str | None = None):
        super().__init__([PYTHON, "-m", "bench.gevent_floor", listen,
                          *(["--inline"] if inline else [])], cpu, netns)


# ---------------------------------------------------------------------- the C generator


C_SOURCE = ROOT / "bench" / "natpmp_load.c"
BUILD_DIR = ROOT / "build" / "bench"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BenchError("no C compiler: bench/natpmp_load.c needs gcc (make deps)")
    return cc


def compiler_version() -> str:
    with contextlib.suppress(BenchError, OSError):
        done = subprocess.run([compiler(), "--version"], capture_output=True, text=True,
                              check=False)
        return done.stdout.splitlines()[0] if done.stdout else "?"
    return "?"


def natpmp_load() -> Path:
    """bench/natpmp_load.c built with this machine's compiler into build/bench/ (again
    whenever the source is newer than the binary)."""
    binary = BUILD_DIR / "natpmp_load"
    if binary.exists() and binary.stat().st_mtime >= C_SOURCE.stat().st_mtime:
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    partial = BUILD_DIR / f"natpmp_load.{os.getpid()}.tmp"
    done = subprocess.run([compiler(), *CFLAGS, "-o", str(partial), str(C_SOURCE)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BenchError(f"building bench/natpmp_load.c failed: {done.stderr.strip()}")
    partial.replace(binary)
    return binary


def c_loadgen(*args: str, cpu: int | None = CLIENT_CPU, netns: str | None = None,
              timeout: float = 120.0) -> dict[str, Any]:
    """`natpmp_load address ...`: its JSON result."""
    cmd = wrap([str(natpmp_load()), *args], cpu, netns)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"natpmp_load failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- syscall counts


def syscall_counter() -> str | None:
    """"perf" when perf's syscall tracepoints count here, else "strace", else None."""
    if shutil.which("perf"):
        done = subprocess.run(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "--",
                               "true"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and "raw_syscalls:sys_enter" in done.stderr \
                and "<not" not in done.stderr:
            return "perf"
    return "strace" if shutil.which("strace") else None


# Counted one by one (perf's syscalls:sys_enter_* glob takes ~10 s to attach); the rest
# are counted together through raw_syscalls:sys_enter and reported as "other".
PERF_SYSCALLS = ("recvfrom", "sendto", "recvmsg", "sendmsg", "recvmmsg", "sendmmsg",
                 "epoll_wait", "epoll_pwait", "epoll_ctl", "pselect6", "select", "poll",
                 "ppoll", "ioctl", "close", "socket", "getpid", "clock_gettime",
                 "gettimeofday", "read", "write", "futex", "fcntl")


def count_syscalls(pid: int, during: Callable[[], object], tool: str,
                   workdir: Path) -> dict[str, int]:
    """Syscalls by name that `pid` (every thread) made while `during()` ran.

    perf: the syscall tracepoints, counted in the kernel (the server runs at its normal
    speed). strace: `strace -c -f`, which stops the server at every syscall (the counts
    are right, the speed is not)."""
    out_file = workdir / f"syscalls-{uuid.uuid4().hex[:6]}.txt"
    if tool == "perf":
        events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{name}"
                                              for name in PERF_SYSCALLS)]
        cmd = ["perf", "stat", "-x,", "-e", ",".join(events), "-p", str(pid),
               "-o", str(out_file)]
    else:
        events = []
        cmd = ["strace", "-c", "-f", "-q", "-p", str(pid), "-o", str(out_file)]
    counter = subprocess.Popen(wrap(cmd, CLIENT_CPU), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_attached(counter.pid, len(events) * len(os.listdir(f"/proc/{pid}/task")))
        during()
    finally:
        if counter.poll() is None:
            counter.send_signal(signal.SIGINT)
        try:
            counter.wait(30)
        except subprocess.TimeoutExpired:
            counter.kill()
            counter.wait(5)
    text = out_file.read_text() if out_file.exists() else ""
    with contextlib.suppress(FileNotFoundError):
        out_file.unlink()
    counts = _parse_perf(text) if tool == "perf" else _parse_strace(text)
    if not counts:
        raise BenchError(f"{tool} counted no syscalls of pid {pid}")
    return counts


def _wait_attached(counter: int, perf_fds: int, timeout: float = 20.0) -> None:
    """Until perf holds a counter for every event and thread (strace: a moment)."""
    if not perf_fds:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            held = sum(1 for fd in os.listdir(f"/proc/{counter}/fd") if "perf_event" in
                       os.readlink(f"/proc/{counter}/fd/{fd}"))
            if held >= perf_fds:
                time.sleep(0.1)  # (they are enabled once all are open)
                return
        time.sleep(0.02)
    raise BenchError("perf stat did not attach")


def _parse_perf(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) < 3 or line.startswith("#") or not fields[0].strip().isdigit():
            continue
        name = fields[2].removeprefix("syscalls:sys_enter_")
        counts[name] = int(fields[0])
    total = counts.pop("raw_syscalls:sys_enter", None)
    if total is not None:
        counts["other"] = total - sum(counts.values())
    return {name: n for name, n in counts.items() if n}


def _parse_strace(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


# ---------------------------------------------------------------------- namespaces


GW_ADDRESS = "192.168.77.1"
CLIENT_ADDRESS = "192.168.77.2"
WAN_ADDRESS = "11.22.33.44"  # public-looking: miniupnpd 2.3.1 refuses a private WAN



def netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


class Namespaces:
    """client ns <-veth-> gateway ns <-veth-> wan ns, as natpmp-research §6 (names unique
    to this run, so parallel test beds are not disturbed)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.gw, self.cli, self.wan = f"dnb{tag}gw", f"dnb{tag}cli", f"dnb{tag}wan"
        self.created: list[str] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def setup(self) -> Namespaces:
        for ns in (self.gw, self.cli, self.wan):
            self._ip("netns", "add", ns)
            self.created.append(ns)
        self._ip("link", "add", "vgw0", "netns", self.gw, "type", "veth",
                 "peer", "name", "vcli0", "netns", self.cli)
        self._ip("link", "add", "wan0", "netns", self.gw, "type", "veth",
                 "peer", "name", "wanpeer", "netns", self.wan)
        for ns in (self.gw, self.cli, self.wan):
            self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.gw, "addr", "add", f"{GW_ADDRESS}/24", "dev", "vgw0")
        self._ip("-n", self.gw, "link", "set", "vgw0", "up")
        self._ip("-n", self.gw, "addr", "add", f"{WAN_ADDRESS}/24", "dev", "wan0")
        self._ip("-n", self.gw, "link", "set", "wan0", "up")
        self._ip("-n", self.gw, "route", "add", "default", "via", "11.22.33.1", "dev", "wan0")
        self._ip("-n", self.wan, "addr", "add", "11.22.33.1/24", "dev", "wanpeer")
        self._ip("-n", self.wan, "link", "set", "wanpeer", "up")
        self._ip("-n", self.cli, "addr", "add", f"{CLIENT_ADDRESS}/24", "dev", "vcli0")
        self._ip("-n", self.cli, "link", "set", "vcli0", "up")
        self._ip("-n", self.cli, "route", "add", "default", "via", GW_ADDRESS)
        return self

    def teardown(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.created.clear()


class Miniupnpd:
    """Debian's miniupnpd (nftables build), NAT-PMP only, daemonised (no -d: logging at
    debug level would dominate), in the gateway namespace."""

    def __init__(self, ns: Namespaces, cpu: int | None = SERVER_CPU) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dnbench-mu-"))
        self.ns = ns
        self.pid: int | None = None
        subprocess.run(["ip", "netns", "exec", ns.gw, "nft", "-f", "-"],
                       input=miniupnpd.ruleset(), text=True, check=True, capture_output=True)
        conf = self.dir / "miniupnpd.conf"
        conf.write_text(miniupnpd.config("wan0", "vgw0", "192.168.77.0/24",
                                         self.dir / "upnp.leases"))
        pidfile = self.dir / "miniupnpd.pid"
        subprocess.run(wrap(["miniupnpd", "-f", str(conf), "-P", str(pidfile)], cpu, ns.gw),
                       check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int(pidfile.read_text().strip())
                break
            time.sleep(0.05)
        if self.pid is None:
            raise BenchError("miniupnpd did not write its pidfile")

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


def new_password() -> str:
    return secrets.token_hex(8)


def free_udp_port(host: str) -> int:
    """A UDP port free on `host` right now (other test beds may share this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
