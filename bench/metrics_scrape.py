"""Does scraping slow NAT-PMP? Opcode 0 with and without an HTTP scrape every second.

doublenat runs as in `make bench` (its own process on CPU 0, the emulators and the load
generator on CPU 1) with METRICS_ADDR set and `--mappings` live mappings, so that /status
has something to list. Then, for each window (requests in flight), runs of opcode 0 for
`--duration` seconds alternate between three conditions, `--repeats` times each:

    none      nothing scrapes
    metrics   GET /metrics every `--interval` s (what Prometheus does)
    status    GET /status every `--interval` s (every mapping as JSON: the worst case)

The scraper is a thread of this process (pinned to CPU 1), with a keep-alive connection
like Prometheus's. Printed: per condition, the median rate and p50/p99 over the repeats,
and the scrapes' own latency and size. `--out FILE` also writes every number as JSON.

Rates and percentiles move with whatever else runs on a shared machine; the daemon's
CPU time per scrape does not (much): before the load runs, `--cost-scrapes` scrapes of
each path are made back to back against the idle daemon and its CPU time (utime + stime
from /proc) is divided by their number. For /metrics that is also how long a scrape
holds the event loop (it never yields); /status yields every 256 mappings.

    python -m bench.metrics_scrape                     # about a minute
    python -m bench.metrics_scrape --mappings 1000 --repeats 2 --duration 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import procs

CONDITIONS = ("none", "metrics", "status")


class Scraper(threading.Thread):
    """GET `path` every `interval` seconds until stopped; keeps each scrape's latency."""

    def __init__(self, address: str, path: str, interval: float) -> None:
        super().__init__(daemon=True)
        host, port = address.rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=10)
        self.path, self.interval = path, interval
        self.latencies: list[float] = []
        self.sizes: list[int] = []
        self.failures = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.connection.request("GET", self.path)
                response = self.connection.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures += 1
                self.latencies.append(time.monotonic() - started)
                self.sizes.append(len(body))
            except (OSError, http.client.HTTPException):
                self.failures += 1
                self.connection.close()
            next_at += self.interval
            self._stopping.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)
        self.connection.close()


def free_tcp_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape_cost(pid: int, address: str, path: str, count: int) -> dict[str, float]:
    """Daemon CPU per scrape of `path`, `count` back-to-back scrapes on one connection."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    size = 0
    try:
        before, started = cpu_seconds(pid), time.monotonic()
        for _ in range(count):
            connection.request("GET", path)
            size = len(connection.getresponse().read())
        cpu, wall = cpu_seconds(pid) - before, time.monotonic() - started
    finally:
        connection.close()
    return {"path": path, "scrapes": count, "cpu_ms_per_scrape": cpu / count * 1000,
            "wall_ms_per_scrape": wall / count * 1000, "bytes": size}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if procs.can_pin():
        os.sched_setaffinity(0, {procs.CLIENT_CPU})  # the scraper thread stays off CPU 0
    workdir = Path(tempfile.mkdtemp(prefix="doublenat-scrape-"))
    password = procs.new_password()
    emulators = procs.Emulators(workdir, password)
    daemon = None
    try:
        listen = f"127.77.0.1:{procs.free_udp_port('127.77.0.1')}"
        metrics_addr = f"127.0.0.1:{free_tcp_port('127.0.0.1')}"
        daemon = procs.Doublenat(emulators, password, listen,
                                 settings={"METRICS_ADDR": metrics_addr})
        daemon.wait_ready()
        if args.mappings:
            made = procs.loadgen("map", "--target", listen, "--sources", "127.0.1.1-127.0.1.16",
                                 "--first", "20000", "--count", str(args.mappings),
                                 "--window", "64", "--lifetime", "3600")
            if made["answered"] != args.mappings:
                raise procs.BenchError(f"only {made['answered']} mappings made: {made}")
        costs = [scrape_cost(daemon.pid, metrics_addr, path, count) for path, count in
                 (("/metrics", args.cost_scrapes), ("/status", max(5, args.cost_scrapes // 10)),
                  ("/healthz", args.cost_scrapes))]
        for cost in costs:
            print(json.dumps(cost), flush=True)
        runs: list[dict[str, Any]] = []
        for window in args.windows:
            for repeat in range(args.repeats):
                for condition in CONDITIONS:
                    scraper = None
                    if condition != "none":
                        scraper = Scraper(metrics_addr, f"/{condition}", args.interval)
                        scraper.start()
                    result = procs.loadgen("address", "--target", listen, "--window",
                                           str(window), "--duration", str(args.duration))
                    if scraper is not None:
                        scraper.stop()
                    runs.append({
                        "window": window, "repeat": repeat, "condition": condition,
                        "rate": result["rate"], "p50_us": result["p50_us"],
                        "p99_us": result["p99_us"], "lost": result["lost"],
                        "scrapes": len(scraper.latencies) if scraper else 0,
                        "scrape_failures": scraper.failures if scraper else 0,
                        "scrape_ms": [round(s * 1000, 3) for s in scraper.latencies]
                        if scraper else [],
                        "scrape_bytes": max(scraper.sizes) if scraper and scraper.sizes else 0,
                    })
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "scrape_ms"}),
                          flush=True)
        return {"mappings": args.mappings, "duration": args.duration,
                "interval": args.interval, "repeats": args.repeats,
                "load_average": os.getloadavg(), "costs": costs, "runs": runs}
    finally:
        if daemon is not None:
            daemon.terminate()
        emulators.stop()


def summarise(results: dict[str, Any]) -> list[str]:
    lines = [f"opcode 0 with {results['mappings']:,} live mappings, {results['duration']:g} s "
             f"runs, median of {results['repeats']}; a scrape every "
             f"{results['interval']:g} s",
             "",
             "| in flight | scraping | req/s | vs none | p50 | p99 | scrape p50 / max | "
             "scrape size |",
             "|---|---|---|---|---|---|---|---|"]
    windows = sorted({r["window"] for r in results["runs"]})
    for window in windows:
        base = None
        for condition in CONDITIONS:
            runs = [r for r in results["runs"]
                    if r["window"] == window and r["condition"] == condition]
            rate = statistics.median(r["rate"] for r in runs)
            p50 = statistics.median(r["p50_us"] for r in runs)
            p99 = statistics.median(r["p99_us"] for r in runs)
            base = base or rate
            scrapes = [ms for r in runs for ms in r["scrape_ms"]]
            scrape = (f"{statistics.median(scrapes):.2f} ms / {max(scrapes):.2f} ms"
                      if scrapes else "—")
            size = max(r["scrape_bytes"] for r in runs)
            lines.append(f"| {window} | {condition} | {rate:,.0f} | x{rate / base:.3f} | "
                         f"{p50:.0f} µs | {p99:.0f} µs | {scrape} | "
                         f"{f'{size:,} B' if size else '—'} |")
    lines += ["", "| path | daemon CPU per scrape | wall per scrape | size |", "|---|---|---|---|"]
    for cost in results["costs"]:
        lines.append(f"| {cost['path']} | {cost['cpu_ms_per_scrape']:.2f} ms | "
                     f"{cost['wall_ms_per_scrape']:.2f} ms | {cost['bytes']:,} B |")
    lines.append(f"(load average at the end: {results['load_average'][0]:.2f})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_scrape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mappings", type=int, default=10_000)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--cost-scrapes", type=int, default=200,
                        help="back-to-back scrapes for the CPU cost (/status: a tenth)")
    parser.add_argument("--out", type=Path, help="write every number here as JSON")
    args = parser.parse_args(argv)
    results = measure(args)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    print("\n".join(summarise(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
