"""The bench's outputs: one Markdown table (each figure beside its reference and goal) and
a plot of creation latency against live mappings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MET, MISSED, INFO = "met", "**missed**", "—"


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _us(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.0f} µs"


def _lat(result: dict[str, Any]) -> str:
    return f"p50 {_us(result['p50_us'])}, p99 {_us(result['p99_us'])}"


def _rate_lat(result: dict[str, Any]) -> str:
    return f"{_rate(result['rate'])}; {_lat(result)}"


def _mb(kib: int) -> str:
    return f"{kib / 1024:.1f} MB"


def _verdict(ok: bool) -> str:
    return MET if ok else MISSED


def _cpu(result: dict[str, Any], whose: str = "daemon") -> str:
    share = result.get("daemon_cpu")
    return f" ({whose} CPU {share:.0%})" if share is not None else ""


def _bare(bare: dict[str, Any] | None) -> str:
    if not bare:
        return ""
    return (f". A bare 4-connection client (bench/rawros.py) gets {_rate(bare['rate'])} "
            f"from the same emulator (its hold: p50 {_us(bare['emulator_hold_p50_us'])})")


Row = tuple[str, str, str, str, str]


# The servers the generator's ceiling must stay above.
_MEASURED = ("gevent_inline", "gevent_spawn", "echo_stdlib", "miniupnpd", "doublenat")


def _windows(op0: dict[str, Any]) -> list[str]:
    return [str(w) for w in op0.get("windows", (1, 16))]


def _op0_references(op0: dict[str, Any]) -> list[Row]:
    """The compiled generator's ceiling and the gevent floor, per window."""
    out: list[Row] = []
    runs = f"median of {op0['repeats']} runs of {op0['seconds']:g} s"
    for window in _windows(op0):
        echo = op0["echo_c"][window]
        measured = max(op0[name][window]["rate"] for name in _MEASURED if name in op0)
        out.append((f"generator ceiling: bench/natpmp_load.c to a C echo server "
                    f"(recvmmsg/sendmmsg), opcode 0, {window} in flight (veth; {runs})",
                    INFO, f"C echo: {_rate_lat(echo)}; {echo['rate'] / measured:.1f}x the "
                    f"fastest server measured", "above every server measured",
                    _verdict(echo["rate"] > measured)))
    for window in _windows(op0):
        inline, spawn = op0["gevent_inline"][window], op0["gevent_spawn"][window]
        dn = op0["doublenat"][window]
        out.append((f"gevent floor: a bare gevent DatagramServer with a fixed reply, "
                    f"{window} in flight",
                    f"doublenat at {dn['rate'] / inline['rate']:.0%} of the inline floor",
                    f"answered in do_read: {_rate_lat(inline)}; a greenlet per datagram: "
                    f"{_rate_lat(spawn)}", INFO, INFO))
    stdlib = " / ".join(_rate(op0["echo_stdlib"][w]["rate"]) for w in _windows(op0))
    out.append((f"stdlib UDP echo (Python, no gevent), {' / '.join(_windows(op0))} in flight",
                INFO, stdlib, INFO, INFO))
    return out


def _op0_compared(op0: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for window in _windows(op0):
        dn, mu = op0["doublenat"][window], op0["miniupnpd"][window]
        ratio = dn["rate"] / mu["rate"] if mu["rate"] else float("inf")
        out.append((f"opcode 0, {window} in flight (veth)",
                    f"{_rate_lat(dn)}{_cpu(dn)}; **{ratio:.2f}x** miniupnpd",
                    f"miniupnpd: {_rate_lat(mu)}{_cpu(mu, 'its')}", "≥ 1.0x miniupnpd",
                    _verdict(ratio >= 1.0)))
    sys = op0.get("syscalls")
    if sys:
        def per(name: str) -> str:
            return " / ".join(f"{sys[name][w]['per_request']:.2f}" for w in _windows(op0)
                              if w in sys.get(name, {}))

        def top(name: str, window: str) -> str:
            calls = sys[name][window]["by_syscall"]
            return ", ".join(f"{k} {v:.2f}" for k, v in list(calls.items())[:4])

        last = _windows(op0)[-1]
        out.append((f"syscalls per opcode-0 request, {' / '.join(_windows(op0))} in flight "
                    f"({sys['tool']}, {sys['requests']:,} requests each)",
                    f"{per('doublenat')} (at {last}: {top('doublenat', last)})",
                    f"miniupnpd: {per('miniupnpd')} (at {last}: {top('miniupnpd', last)}); "
                    f"gevent inline floor: {per('gevent_inline')}; C echo: {per('echo_c')}",
                    INFO, INFO))
    return out


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    op0 = results.get("opcode0")
    if op0:
        out += _op0_references(op0)
    ceiling = results.get("ceiling_map")
    if ceiling:
        out.append(("generator ceiling: bench/natpmp_load.c's mapping requests to the C echo "
                    "server, 64 in flight (loopback)", INFO, f"C echo: {_rate_lat(ceiling)}",
                    "≫ 2,000/s", INFO))
    if op0:
        out += _op0_compared(op0)
    create = results.get("create")
    if create:
        c = create["create"]
        bound = c["bound"]
        out.append((f"creations/s, router emulator {create['router_latency'] * 1000:g} ms "
                    f"per command, {create['window']} in flight",
                    f"{_rate_lat(c)}{_cpu(c)}",
                    f"bound: 4 connections ÷ {create['router_latency'] * 1000:g} ms = "
                    f"{_rate(bound)}; reached {c['rate'] / bound:.0%}"
                    + _bare(create.get("bare_client")),
                    f"≥ 90% ({_rate(0.9 * bound)})", _verdict(c["rate"] >= 0.9 * bound)))
        writes, reads = c["router_writes_per_creation"], c["router_reads_per_creation"]
        out.append(("router writes / reads per creation (emulator's counters)",
                    f"{writes:.3f} / {reads:.3f}", INFO, "1 / 0",
                    _verdict(abs(writes - 1) < 0.0005 and reads == 0)))
        lease, up = create["renew_lease"], create["renew_upstream"]
        out.append(("router calls per renewal: lease path / upstream path",
                    f"{lease['router_calls_per_renewal']:.3f} / "
                    f"{up['router_calls_per_renewal']:.3f}", INFO, "0",
                    _verdict(lease["router_calls_per_renewal"] == 0
                             and up["router_calls_per_renewal"] == 0)))
        mu_renew = (op0 or {}).get("miniupnpd_renew")
        out.append(("renewal, lease path (answered from doublenat's lease, "
                     f"{lease['gateway_requests_per_renewal']:.2f} gateway requests each), "
                     "16 in flight / 1 in flight",
                     f"{_rate_lat(lease['window16'])}{_cpu(lease['window16'])} / "
                     f"{_rate_lat(lease['window1'])}",
                     f"miniupnpd renewal, 1 in flight: {_rate_lat(mu_renew)}" if mu_renew
                     else INFO, "0 router calls", INFO))
        gateway = create["gateway_alone"]
        out.append(("renewal, upstream path (past the fresh window: "
                    f"{up['gateway_requests_per_renewal']:.2f} gateway requests each), "
                    "16 in flight / 1 in flight",
                    f"{_rate_lat(up['window16'])}{_cpu(up['window16'])} / "
                    f"{_rate_lat(up['window1'])}",
                    f"the gateway emulator asked directly: {_rate_lat(gateway['window16'])} / "
                    f"{_rate_lat(gateway['window1'])}",
                    "bounded by the gateway round trip", INFO))
    scale = results.get("scale")
    if scale:
        samples = scale["samples"]
        for latency in sorted({s["router_latency"] for s in samples}):
            series = [s for s in samples if s["router_latency"] == latency]
            first, last = series[0], series[-1]
            ratio = last["p50_us"] / first["p50_us"]
            values = " / ".join(f"{_us(s['p50_us'])}" for s in series)
            p99 = " / ".join(f"{_us(s['p99_us'])}" for s in series)
            lives = " / ".join(f"{s['live']:,}" for s in series)
            reference = f"{last['live']:,} ÷ {first['live']:,} live: p50 x{ratio:.2f}"
            if "daemon_cpu_us" in first:
                reference += ("; daemon CPU per creation " + " / ".join(
                    f"{s['daemon_cpu_us']:.0f}" for s in series) + " µs")
            mu = (op0 or {}).get("miniupnpd_create")
            if mu and latency == samples[0]["router_latency"]:
                reference += "; miniupnpd p50 at " + " / ".join(
                    f"{s['live']:,}: {_us(s['p50_us'])}" for s in mu)
            out.append((f"create latency, 1 in flight, router {latency * 1000:g} ms, "
                        f"with {lives} live mappings",
                        f"p50 {values}; p99 {p99}", reference, "flat: ≤ 1.2x",
                        _verdict(ratio <= 1.2)))
        out.append(("RSS of the daemon, idle", _mb(scale["rss_idle_kib"]), INFO, INFO, INFO))
        rss = scale["rss_by_live_kib"]
        top = max(rss, key=int)
        out.append((f"RSS of the daemon with {int(top):,} live mappings "
                    f"({scale['live_at_end']:,} at the end: {_mb(scale['rss_end_kib'])})",
                    _mb(rss[top]), INFO, "≤ 60 MB", _verdict(rss[top] <= 60 * 1024)))
    flood = results.get("flood")
    if flood:
        quiet, flooded = flood["quiet"], flood["flooded"]
        ratio = flooded["p99_us"] / quiet["p99_us"] if quiet["p99_us"] else float("inf")
        out.append((
            f"opcode 0 from 40 polite clients ({flooded['rate']:,.0f}/s in all, 1 in flight), "
            f"while one client floods {flood['flood']['rate']:,.0f} req/s (rate limit "
            f"50/s per client; {flood['flood']['answered']:,} of its "
            f"{flood['flood']['sent']:,} got an answer)",
            f"{_lat(flooded)}; p99 x{ratio:.2f} of quiet",
            f"the same clients with no flood: {_lat(quiet)}",
            "p99 ≤ 2x quiet", _verdict(ratio <= 2.0)))
    shutdown = results.get("shutdown")
    if shutdown:
        seconds = shutdown["seconds"]
        clean = shutdown["rules_after"] == 0 and shutdown["gateway_mappings_after"] == 0
        out.append((f"shutdown: SIGTERM to exit with {shutdown['mappings']:,} mappings, router "
                    f"{shutdown['router_latency'] * 1000:g} ms per command",
                    f"{seconds:.2f} s" if seconds is not None else "killed",
                    f"rules left {shutdown['rules_after']}, gateway mappings left "
                    f"{shutdown['gateway_mappings_after']}, exit status "
                    f"{shutdown['exit_status']}", "≤ 5 s, nothing left",
                    _verdict(seconds is not None and seconds <= 5 and clean)))
    from bench import dynamics  # keep-alive and re-mapping (issue #16)

    out += dynamics.rows(results)
    return out


def table(results: dict[str, Any]) -> str:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        "# doublenat benchmark",
        "",
        f"{m['date']} · {m['cpu']} · {m['cores']} cores · kernel {m['kernel']} · {versions}",
        "",
        "doublenat on CPU 0; load generator and emulators on CPU 1"
        + ("" if m["pinned"] else " (NOT pinned: taskset or a second core missing)")
        + (f" · measured processes at nice {m['nice']}" if m.get("nice") else "")
        + f" · load average {m['load_at_start']:.2f} at start, "
        f"{results.get('load_at_end', 0):.2f} at the end · run took {results['seconds']:.0f} s"
        + (" · --quick" if results.get("quick") else ""),
        "",
        "| figure | doublenat | reference (same run) | goal | |",
        "|---|---|---|---|---|",
    ]
    for row in rows(results):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Command: `make bench` (`.venv/bin/python -m bench.run`); how each figure "
              "is measured: bench/README.md.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path | None:
    scale = results.get("scale")
    if not scale:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    samples = scale["samples"]
    for latency in sorted({s["router_latency"] for s in samples}):
        series = [s for s in samples if s["router_latency"] == latency]
        xs = [s["live"] for s in series]
        label = f"doublenat, router {latency * 1000:g} ms"
        ax.plot(xs, [s["p50_us"] / 1000 for s in series], "o-", label=f"{label}, p50")
        ax.plot(xs, [s["p99_us"] / 1000 for s in series], "o--", label=f"{label}, p99")
    mu = (results.get("opcode0") or {}).get("miniupnpd_create")
    if mu:
        xs = [s["live"] for s in mu]
        ax.plot(xs, [s["p50_us"] / 1000 for s in mu], "s-", color="grey",
                label="miniupnpd (nftables), p50")
        ax.plot(xs, [s["p99_us"] / 1000 for s in mu], "s--", color="grey",
                label="miniupnpd (nftables), p99")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live mappings")
    ax.set_ylabel("creation latency, one request in flight (ms)")
    ax.set_title(f"Creation latency vs live mappings ({results['machine']['date']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
