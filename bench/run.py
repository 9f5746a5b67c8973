"""The benchmark: every figure of issue #7 beside its reference, measured in one run.

    make bench                       (= .venv/bin/python -m bench.run)
    make bench BENCH_ARGS=--quick    shorter runs, for a smoke test
    make bench BENCH_ARGS=--profile  also record py-spy profiles of the daemon

Processes, not greenlets sharing a hub: doublenat (`python -m doublenat.cli serve`) is
one process pinned to CPU 0; the lab's RouterOS and gateway emulators (bench.emulators)
are another and the load generator a third (bench/natpmp_load.c, compiled at bench
time; bench.loadgen for readiness probes and the flood phase), both pinned to CPU 1.

Phases:
1. opcode 0 through a veth pair between two network namespaces (natpmp-research §6), 1,
   16 and 64 in flight, from a compiled generator (bench/natpmp_load.c, built with gcc
   into build/bench/) in the client namespace: a C echo server (the generator's ceiling),
   two bare gevent DatagramServers (the floor of a gevent design), a stdlib echo,
   Debian's miniupnpd and doublenat, all on CPU 0 in the gateway namespace, runs
   alternating; then syscalls per request (perf's syscall tracepoints, or strace -c).
   miniupnpd's mapping creation and renewal are measured there too.
2. creations with the router emulator holding every command 2 ms: creations/s against
   the bound 4 connections / 2 ms and against a bare client (bench.rawros) on the same
   emulator, router writes and reads per creation, then renewals (lease path and
   upstream path) with the router calls they cost.
3. creation latency with 10, 1,000 and 10,000 live mappings (router at 0 and 2 ms), and
   the daemon's RSS idle and with 10,000 mappings.
4. shutdown: SIGTERM to exit with 1,000 mappings, the router at a realistic 5 ms.

Writes bench/results/table.md, results.json and latency_vs_mappings.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import dynamics, flame, procs, report
from bench.procs import (
    CLIENT_ADDRESS,
    GW_ADDRESS,
    BenchError,
    CEcho,
    Doublenat,
    EchoServer,
    Emulators,
    GeventFloor,
    Miniupnpd,
    Namespaces,
    loadgen,
)

RESULTS = Path(__file__).resolve().parent / "results"
LISTEN_HOST = "127.77.0.1"  # doublenat on loopback (phases 2-4), on a port found free
SOURCES = "127.0.1.1-127.0.1.16"  # 16 client identities on loopback
CREATE_LATENCY = 0.002
SHUTDOWN_LATENCY = 0.005
LEVELS = (10, 1000, 10000)
OP0_WARMUP = 0.3


class Budget:
    """Durations and counts; --quick shrinks them for a smoke test."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.op0_seconds = 0.8 if quick else 2.0
        self.op0_repeats = 1 if quick else 5
        self.syscall_requests = 5000 if quick else 20000
        self.creations = 2000 if quick else 8000
        self.warmup_creations = 300 if quick else 1000
        self.upstream_renewals = 600 if quick else 2000
        self.sample = 150 if quick else 500
        self.levels = (10, 300, 1000) if quick else LEVELS
        self.mu_levels = (10, 300) if quick else (10, 1000)
        self.shutdown_mappings = 300 if quick else 1000


def cpu_seconds(*pids: int) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_share(pids: int | list[int], into: dict[str, Any],
              key: str = "daemon_cpu") -> Iterator[None]:
    """The share of one CPU the process(es) used while the block ran."""
    pids = [pids] if isinstance(pids, int) else pids
    start_cpu, start = cpu_seconds(*pids), time.monotonic()
    yield
    wall = time.monotonic() - start
    into[key] = round((cpu_seconds(*pids) - start_cpu) / wall, 3) if wall > 0 else None


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (all runs kept under "runs")."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs"] = [round(r["rate"]) for r in runs]
    return chosen


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- helpers


class Work:
    """Mapping requests from SOURCES with internal ports handed out in blocks."""

    def __init__(self, target: str, sources: str = SOURCES, netns: str | None = None,
                 first_port: int = 1100) -> None:
        self.target = target
        self.sources = sources
        self.netns = netns
        self.next_port = first_port

    def take(self, count: int) -> int:
        first = self.next_port
        self.next_port += count
        if self.next_port > 65535:
            raise BenchError("out of internal ports")
        return first

    def run(self, first: int, count: int, window: int, lifetime: int = 3600) -> dict[str, Any]:
        return procs.c_loadgen("map", "--target", self.target, "--sources", self.sources,
                               "--first", str(first), "--count", str(count),
                               "--window", str(window), "--lifetime", str(lifetime),
                               netns=self.netns, timeout=300)

    def create(self, count: int, window: int, lifetime: int = 3600) -> tuple[int, dict]:
        first = self.take(count)
        result = self.run(first, count, window, lifetime)
        failed = count - result["results"].get("0", 0)
        if failed:
            raise BenchError(f"{failed} of {count} mapping requests failed: {result['results']}")
        return first, result


# ---------------------------------------------------------------------- phase 1


# The servers of the opcode-0 phase, in the order their runs alternate: the C echo (the
# generator's ceiling), the gevent floors, the stdlib echo, then the two compared.
OP0_SERVERS = ("echo_c", "gevent_inline", "gevent_spawn", "echo_stdlib", "miniupnpd",
               "doublenat")
OP0_WINDOWS = (1, 16, 64)
# Whose syscalls per request are counted (perf's tracepoints or strace -c).
SYSCALL_SERVERS = ("echo_c", "gevent_inline", "miniupnpd", "doublenat")


def phase_opcode0(budget: Budget, workdir: Path, py_spy: Path | None) -> dict[str, Any]:
    """The reference servers, miniupnpd and doublenat listen side by side in the gateway
    namespace (each alone on CPU 0 while it is measured: the others are idle), and their
    runs alternate, so a change in the machine's load hits all of them alike. The compiled
    generator (bench/natpmp_load.c) runs in the client namespace on CPU 1."""
    out: dict[str, Any] = {"layout": "veth between network namespaces",
                           "generator": "bench/natpmp_load.c",
                           "repeats": budget.op0_repeats, "seconds": budget.op0_seconds,
                           "warmup": OP0_WARMUP, "windows": list(OP0_WINDOWS)}
    ns = Namespaces()
    refs: dict[str, Any] = {}
    mu = emulators = daemon = None
    try:
        ns.setup()
        procs.natpmp_load()  # built before anything is measured
        log("opcode 0: C echo, gevent floors, stdlib echo, miniupnpd and doublenat, "
            "runs alternating")
        refs["echo_c"] = CEcho(f"{GW_ADDRESS}:5399", netns=ns.gw)
        refs["gevent_inline"] = GeventFloor(f"{GW_ADDRESS}:5398", inline=True, netns=ns.gw)
        refs["gevent_spawn"] = GeventFloor(f"{GW_ADDRESS}:5397", inline=False, netns=ns.gw)
        refs["echo_stdlib"] = EchoServer(f"{GW_ADDRESS}:5396", netns=ns.gw)
        mu = Miniupnpd(ns)
        mu_target, dn_target = f"{GW_ADDRESS}:5351", f"{GW_ADDRESS}:5352"
        ready = loadgen("wait", "--target", mu_target, "--timeout", "15", netns=ns.cli)
        if not ready.get("ready"):
            raise BenchError("miniupnpd did not answer")
        password = procs.new_password()
        emulators = Emulators(workdir, password, netns=ns.gw)
        daemon = Doublenat(emulators, password, dn_target, netns=ns.gw,
                           client_netns=ns.cli, py_spy=py_spy)
        daemon.wait_ready()
        assert mu.pid is not None
        targets: dict[str, tuple[str, int]] = {
            name: (server.address, server.pid) for name, server in refs.items()}
        targets["miniupnpd"] = (mu_target, mu.pid)
        targets["doublenat"] = (dn_target, daemon.pid)
        for name in OP0_SERVERS:
            out[name] = {}
        for window in OP0_WINDOWS:
            log(f"opcode 0, {window} in flight")
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in OP0_SERVERS}
            for _ in range(budget.op0_repeats):
                for name in OP0_SERVERS:
                    target, pid = targets[name]
                    stats: dict[str, Any] = {}
                    with cpu_share(pid, stats):
                        result = procs.c_loadgen(
                            "address", "--target", target, "--window", str(window),
                            "--duration", str(budget.op0_seconds),
                            "--warmup", str(OP0_WARMUP), netns=ns.cli)
                    runs[name].append({**result, **stats})
            for name in OP0_SERVERS:
                out[name][str(window)] = median_run(runs[name])

        tool = procs.syscall_counter()
        if tool is None:
            log("syscalls per request skipped (neither perf nor strace)")
        else:
            log(f"syscalls per opcode-0 request ({tool})")
            out["syscalls"] = syscalls_per_request(
                {name: targets[name] for name in SYSCALL_SERVERS}, budget, tool, workdir,
                ns.cli)

        log("miniupnpd: creations and renewals (references)")
        out["miniupnpd_create"] = scale_samples(
            Work(mu_target, CLIENT_ADDRESS, ns.cli), budget.mu_levels, budget.sample // 2)
        out["miniupnpd_renew"] = renew_sample(Work(mu_target, CLIENT_ADDRESS, ns.cli),
                                              budget.sample // 2)
    finally:
        if daemon is not None:
            daemon.terminate() if py_spy else daemon.kill()
        for proc in (emulators, mu, *refs.values()):
            if proc is not None:
                proc.stop()
        ns.teardown()
    return out


def syscalls_per_request(targets: dict[str, tuple[str, int]], budget: Budget, tool: str,
                         workdir: Path, netns: str) -> dict[str, Any]:
    """Each server's syscalls (all threads) while the generator sends a fixed number of
    opcode-0 requests at each window, divided by the requests answered."""
    count = budget.syscall_requests if tool == "perf" else budget.syscall_requests // 10
    out: dict[str, Any] = {"tool": tool, "requests": count}
    for name, (target, pid) in targets.items():
        out[name] = {}
        for window in OP0_WINDOWS:
            answered: dict[str, Any] = {}

            def send(target: str = target, window: int = window,
                     answered: dict[str, Any] = answered) -> None:
                answered.update(procs.c_loadgen(
                    "address", "--target", target, "--window", str(window),
                    "--count", str(count), "--timeout", "2", netns=netns))

            counts = procs.count_syscalls(pid, send, tool, workdir)
            n = answered["answered"] or 1
            total = sum(counts.values())
            out[name][str(window)] = {
                "per_request": round(total / n, 3),
                "answered": answered["answered"],
                "by_syscall": {k: round(v / n, 3) for k, v in
                               sorted(counts.items(), key=lambda kv: -kv[1]) if v / n >= 0.01},
            }
    return out


def scale_samples(work: Work, levels: tuple[int, ...], sample: int,
                  between: Callable[[int], None] | None = None,
                  latencies: tuple[float | None, ...] = (None,),
                  set_latency: Callable[[float], None] | None = None,
                  pid: int | None = None) -> list[dict[str, Any]]:
    """Creation latency (one request in flight) once `level` mappings are live; with
    `pid`, also that process's CPU time per creation (less sensitive to other load)."""
    live = 0
    out = []
    for level in levels:
        if level > live:
            work.create(level - live, window=16)
            live = level
        if between is not None:
            between(live)
        for latency in latencies:
            if latency is not None and set_latency is not None:
                set_latency(latency)
            cpu = cpu_seconds(pid) if pid is not None else 0.0
            _, result = work.create(sample, window=1)
            entry = {"live": live, "router_latency": latency, **_brief(result)}
            if pid is not None:
                entry["daemon_cpu_us"] = round((cpu_seconds(pid) - cpu) / sample * 1e6, 1)
            out.append(entry)
            live += sample
    return out


def renew_sample(work: Work, count: int) -> dict[str, Any]:
    first, _ = work.create(count, window=1)
    return _brief(work.run(first, count, window=1))


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    keep = ("rate", "p50_us", "p90_us", "p99_us", "max_us", "mean_us", "answered", "results",
            "retransmitted", "lost")
    return {k: result[k] for k in keep if k in result}


# ---------------------------------------------------------------------- phase 2


def phase_create(budget: Budget, workdir: Path, py_spy: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"router_latency": CREATE_LATENCY, "window": 64}
    log("a bare 4-connection RouterOS client against the emulator at 2 ms")
    password = procs.new_password()
    emulators = Emulators(workdir, password, router_latency=CREATE_LATENCY)
    try:
        runs = []
        for _ in range(1 if budget.quick else 3):
            run = procs.rawros(emulators, emulators.password_file, budget.creations // 2)
            holds = sorted(emulators.control("holds")["holds_us"])
            run["emulator_hold_p50_us"] = holds[len(holds) // 2]
            runs.append(run)
        out["bare_client"] = median_run(runs)
    finally:
        emulators.stop()
    password = procs.new_password()
    emulators = Emulators(workdir, password, router_latency=CREATE_LATENCY)
    daemon = Doublenat(emulators, password, listen_address(), py_spy=py_spy)
    try:
        daemon.wait_ready()
        work = Work(daemon.listen)
        log("creations at 2 ms per router command")
        work.create(budget.warmup_creations, window=64)
        emulators.reset()
        stats: dict[str, Any] = {}
        with cpu_share(daemon.pid, stats), cpu_share(emulators.pids, stats, "emulator_cpu"):
            first, result = work.create(budget.creations, window=64)
        counters = emulators.counters()
        n = budget.creations
        out["create"] = {**_brief(result), **stats, "count": n,
                         "bound": procs_bound(CREATE_LATENCY),
                         "router_writes_per_creation": counters["router"]["writes"] / n,
                         "router_reads_per_creation": counters["router"]["reads"] / n,
                         "router_commands": counters["router"]["commands"],
                         "gateway_requests": counters["gateway"]["by_kind"]}

        log("renewals from the lease (no upstream request)")
        emulators.reset()
        stats = {}
        with cpu_share(daemon.pid, stats):
            renew16 = work.run(first, n, window=16)
        renew1 = work.run(first, min(n, budget.sample), window=1)
        counters = emulators.counters()
        renewed = renew16["answered"] + renew1["answered"]
        out["renew_lease"] = {
            "window16": {**_brief(renew16), **stats}, "window1": _brief(renew1),
            "router_calls_per_renewal": _router_calls(counters) / renewed,
            "gateway_requests_per_renewal": _gateway_calls(counters) / renewed,
        }

        log("renewals through the gateway (past the fresh window)")
        lifetime = 8  # fresh window = lifetime / 8 = 1 s
        m = budget.upstream_renewals
        first_up, _ = work.create(m, window=64, lifetime=lifetime)
        time.sleep(1.3)
        emulators.reset()
        sequential = min(budget.sample, m // 4)
        up1 = work.run(first_up, sequential, window=1, lifetime=lifetime)
        stats = {}
        with cpu_share(daemon.pid, stats):
            up16 = work.run(first_up + sequential, m - sequential, window=16, lifetime=lifetime)
        counters = emulators.counters()
        renewed = up1["answered"] + up16["answered"]
        out["renew_upstream"] = {
            "window16": {**_brief(up16), **stats}, "window1": _brief(up1),
            "lifetime": lifetime,
            "router_calls_per_renewal": _router_calls(counters) / renewed,
            "gateway_requests_per_renewal": _gateway_calls(counters) / renewed,
        }

        log("the gateway emulator alone (the upstream path's bound)")
        gateway_work = Work(emulators.gateway, "127.0.0.1")
        g_first, _ = gateway_work.create(m, window=64)
        out["gateway_alone"] = {"window16": _brief(gateway_work.run(g_first, m, window=16)),
                                "window1": _brief(gateway_work.run(g_first, sequential, 1))}
    finally:
        daemon.terminate() if py_spy else daemon.kill()
        emulators.stop()
    return out


def listen_address() -> str:
    return f"{LISTEN_HOST}:{procs.free_udp_port(LISTEN_HOST)}"


def procs_bound(latency: float, connections: int = 4) -> float:
    return connections / latency


def _router_calls(counters: dict[str, Any]) -> int:
    return sum(n for word, n in counters["router"]["commands"].items() if word != "/login")


def _gateway_calls(counters: dict[str, Any]) -> int:
    return sum(n for kind, n in counters["gateway"]["by_kind"].items() if kind != "address")


# ---------------------------------------------------------------------- phase 3


def phase_scale(budget: Budget, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    password = procs.new_password()
    emulators = Emulators(workdir, password, router_latency=0.0)
    daemon = Doublenat(emulators, password, listen_address())
    try:
        daemon.wait_ready()
        time.sleep(1.0)
        out["rss_idle_kib"] = daemon.rss_kib()
        work = Work(daemon.listen)
        rss: dict[str, int] = {}

        def between(live: int) -> None:
            emulators.set_latency(0.0)
            rss[str(live)] = daemon.rss_kib()
            log(f"latency samples with {live} live mappings")

        out["samples"] = scale_samples(work, budget.levels, budget.sample, between,
                                       latencies=(0.0, CREATE_LATENCY),
                                       set_latency=emulators.set_latency, pid=daemon.pid)
        out["rss_by_live_kib"] = rss
        counters = emulators.counters()
        out["live_at_end"] = counters["router"]["rules"]
        out["rss_end_kib"] = daemon.rss_kib()
    finally:
        daemon.kill()
        emulators.stop()
    return out


# ---------------------------------------------------------------------- phase 4


def phase_shutdown(budget: Budget, workdir: Path) -> dict[str, Any]:
    password = procs.new_password()
    emulators = Emulators(workdir, password, router_latency=SHUTDOWN_LATENCY)
    daemon = Doublenat(emulators, password, listen_address())
    try:
        daemon.wait_ready()
        log(f"shutdown with {budget.shutdown_mappings} mappings")
        Work(daemon.listen).create(budget.shutdown_mappings, window=64)
        before = emulators.counters()
        emulators.reset()
        seconds = daemon.terminate()
        after = emulators.counters()
        return {
            "mappings": budget.shutdown_mappings,
            "router_latency": SHUTDOWN_LATENCY,
            "seconds": seconds,
            "exit_status": daemon.proc.returncode,
            "rules_before": before["router"]["rules"],
            "rules_after": after["router"]["rules"],
            "gateway_mappings_after": after["gateway"]["mappings"],
            "router_commands": after["router"]["commands"],
        }
    finally:
        daemon.kill()
        emulators.stop()


# ---------------------------------------------------------------------- flood


FLOOD_RATE = 10000.0
POLITE_RATE = 1000.0  # 40 sources at 25/s each: far inside the default limit of 50/s


def phase_flood(budget: Budget, workdir: Path) -> dict[str, Any]:
    """Polite clients' opcode-0 latency, quiet and while one client floods 10,000 req/s.

    doublenat runs with its default per-client rate limit (50/s, burst 100): the point is
    that the limit, not luck, keeps the others served."""
    password = procs.new_password()
    emulators = Emulators(workdir, password)
    daemon = Doublenat(emulators, password, listen_address(),
                       settings={"CLIENT_RATE_LIMIT": "50", "CLIENT_RATE_BURST": "100"})
    seconds = 2.0 if budget.quick else 4.0
    polite = ["paced", "--target", daemon.listen, "--rate", str(POLITE_RATE),
              "--duration", str(seconds)]
    try:
        daemon.wait_ready()
        log("flood: polite clients quiet, then while one client floods")
        quiet = loadgen(*polite)
        flooder = subprocess.Popen(
            procs.wrap([procs.PYTHON, "-m", "bench.loadgen", "flood", "--target",
                        daemon.listen, "--rate", str(FLOOD_RATE),
                        "--duration", str(seconds + 2)], procs.CLIENT_CPU),
            stdout=subprocess.PIPE, text=True, env=procs._env(), cwd=procs.ROOT)
        time.sleep(0.7)
        flooded = loadgen(*polite)
        out, _ = flooder.communicate(timeout=60)
        flood = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        return {"quiet": quiet, "flooded": flooded, "flood": flood,
                "daemon_cpu_note": "daemon pinned to CPU 0; both generators on CPU 1"}
    finally:
        daemon.kill()
        emulators.stop()


# ---------------------------------------------------------------------- ceiling


def generator_map_ceiling(budget: Budget) -> dict[str, Any]:
    """The compiled generator's mapping requests against the C echo, on loopback."""
    echo = CEcho("127.0.0.1:0")
    try:
        count = 20000 if budget.quick else 50000
        return _brief(procs.c_loadgen("map", "--target", echo.address, "--sources", SOURCES,
                                      "--first", "1100", "--count", str(count),
                                      "--window", "64", "--echo"))
    finally:
        echo.stop()


# ---------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import gevent

    versions = {"python": platform.python_version(), "gevent": gevent.__version__,
                "cc": procs.compiler_version()}
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        versions["routeros-api"] = version("routeros-api")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        versions["miniupnpd"] = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "miniupnpd"], capture_output=True,
            text=True, check=False).stdout.strip() or "?"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "load_at_start": os.getloadavg()[0],
        "pinned": procs.can_pin(),
        "nice": procs.nice_level(),
        "versions": versions,
    }


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke test)")
    parser.add_argument("--profile", action="store_true",
                        help="record py-spy profiles of the daemon (phases 1 and 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-netns", action="store_true",
                        help="skip phase 1 (needs root: namespaces and miniupnpd)")
    parser.add_argument("--nice", type=int, default=procs.NICE,
                        help="niceness of the measured processes when root (0: leave it)")
    parser.add_argument("--tree", type=Path, default=None,
                        help="run the daemon from this checkout (before/after comparisons)")
    parser.add_argument("--only", default=None,
                        help="comma list of phases to run: "
                             "opcode0,create,scale,shutdown,flood,keepalive,remap")
    args = parser.parse_args(argv)
    procs.NICE = args.nice
    if args.tree is not None:
        procs.DAEMON_TREE = args.tree.resolve()
    only = set(args.only.split(",")) if args.only else None

    def wanted(phase: str) -> bool:
        return only is None or phase in only
    budget = Budget(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    log(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"load {results['machine']['load_at_start']:.2f}")
    profiles = args.out / "profiles" if args.profile else None
    if profiles is not None:
        profiles.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="dnbench-"))
    if args.tree is not None:
        results["tree"] = str(procs.DAEMON_TREE)
    try:
        results["ceiling_map"] = generator_map_ceiling(budget)
        if not wanted("opcode0"):
            pass
        elif args.skip_netns or not procs.netns_available() or not shutil.which("miniupnpd"):
            log("phase 1 skipped (needs root, ip and miniupnpd)")
        else:
            results["opcode0"] = phase_opcode0(
                budget, workdir, profiles / "opcode0.txt" if profiles else None)
        if wanted("create"):
            results["create"] = phase_create(
                budget, workdir, profiles / "create.txt" if profiles else None)
        if wanted("scale"):
            results["scale"] = phase_scale(budget, workdir)
        if wanted("shutdown"):
            results["shutdown"] = phase_shutdown(budget, workdir)
        if wanted("flood"):
            results["flood"] = phase_flood(budget, workdir)
        if wanted("keepalive"):  # bench/dynamics.py: issue #16
            results["keepalive"] = dynamics.phase_keepalive(budget.quick, workdir)
        if wanted("remap"):
            results["remap"] = dynamics.phase_remap(budget.quick, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if profiles is not None:
        results["profiles"] = {path.stem: flame.summarise(path, 20)
                               for path in sorted(profiles.glob("*.txt"))}
    results["seconds"] = round(time.monotonic() - started, 1)
    results["load_at_end"] = os.getloadavg()[0]
    table = report.table(results)
    print(table)
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    png = report.plot(results, args.out / "latency_vs_mappings.png")
    keepalive_png = dynamics.plot(results, args.out)
    log(f"done in {results['seconds']:.0f} s; wrote {args.out}/table.md, results.json"
        + (f", {png.name}" if png else "") + (f", {keepalive_png.name}" if keepalive_png else ""))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

