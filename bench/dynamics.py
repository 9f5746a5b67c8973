"""The upstream's dynamics (SPEC §8, issue #16): keep-alive and re-mapping after a loss.

Two phases of `bench.run`, each with its own daemon (`doublenat serve` pinned to CPU 0)
and emulators (bench.emulators, CPU 1):

- `keepalive` (`phase_keepalive`): the gateway grants 60 s leases (like ProtonVPN's);
  10,000 mappings are asked for with a lifetime of 3600 s, so only doublenat's own
  keep-alive renews them upstream. The gateway emulator counts the renewals it receives
  per second from the first creation on; over the window after the last creation (150 s,
  2.5 leases) the figure is the mean rate, the worst second and their ratio (target: no
  second above 2x the mean), the daemon's CPU (target ≤ 25% of a core), and that no
  mapping lapsed at the gateway (all still there at the end, none expired or renewed
  after its lease ran out, none re-created).
- `remap` (`phase_remap`): the gateway (profile proton: random ports, 60 s leases) holds
  every reply 20 ms; 1,000 mappings in `VPN_PORT_MODE=external` (the rule's dst-port is
  the granted port). Once keep-alive runs (20 s after the creations), the gateway
  reconnects (`GatewayEmulator.reconnect`: epoch reset, every mapping forgotten, a new
  public address; its next grants are new random ports). Times from that moment:
  doublenat noticing (its `upstream.lost` log record), every mapping asked for again at
  the gateway (its first request per mapping after the loss), and every router rule on
  the port the gateway now grants (the last change to a rule that had to move; every
  rule checked against the gateway's table through the upstream port in its comment).

`EmulatorWatch` is the emulators' side: control ops `watch`, `series`, `reconnect` and
`remap_status` (bench.emulators hands them over).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import BenchError, Doublenat, Emulators, loadgen

LISTEN_HOST = "127.77.0.1"
SOURCES = "127.0.1.1-127.0.1.16"
FIRST_PORT = 1100

KEEPALIVE_LEASE = 60  # the gateway's longest lease, as ProtonVPN's
KEEPALIVE_MAPPINGS = 10000
KEEPALIVE_WATCH = 150.0  # seconds after the last creation: 2.5 leases
KEEPALIVE_WATCH_QUICK = 35.0
CLIENT_LIFETIME = 3600  # what the clients ask for: only doublenat renews upstream
# Keep-alive renews at a fraction of the lease drawn evenly from [1/4, 1/2)
# (engine.upkeep), so each mapping is renewed every 0.375 leases on average.
MEAN_FRACTION = 0.375
STEADY_AFTER = KEEPALIVE_LEASE  # seconds after the last creation: the first rounds are over

REMAP_MAPPINGS = 1000
REMAP_GATEWAY_DELAY = 0.020
REMAP_ROUTER_LATENCY = 0.002
REMAP_SETTLE = 20.0  # after the creations: keep-alive renewals are under way (from 15 s)
REMAP_TIMEOUT = 30.0
REMAP_TARGET = 5.0

_COMMENT = re.compile(r"(tcp|udp) (\S+):(\d+) via (\d+)$")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_delay(pid: int) -> float:
    """Seconds the process has waited for a CPU while runnable (/proc/PID/schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _listen() -> str:
    return f"{LISTEN_HOST}:{procs.free_udp_port(LISTEN_HOST)}"


def _create(daemon: Doublenat, count: int, lifetime: int = CLIENT_LIFETIME) -> dict[str, Any]:
    result = loadgen("map", "--target", daemon.listen, "--sources", SOURCES,
                     "--first", str(FIRST_PORT), "--count", str(count), "--window", "64",
                     "--lifetime", str(lifetime))
    failed = count - result["results"].get("0", 0)
    if failed:
        raise BenchError(f"{failed} of {count} mapping requests failed: {result['results']}")
    return result


# ---------------------------------------------------------------------- keep-alive


def phase_keepalive(quick: bool, workdir: Path) -> dict[str, Any]:
    mappings = KEEPALIVE_MAPPINGS
    seconds = KEEPALIVE_WATCH_QUICK if quick else KEEPALIVE_WATCH
    password = procs.new_password()
    emulators = Emulators(workdir, password,
                          gateway_args=["--gateway-lifetime", str(KEEPALIVE_LEASE)])
    daemon = Doublenat(emulators, password, _listen())
    try:
        daemon.wait_ready()
        log(f"keep-alive: {mappings:,} mappings on a {KEEPALIVE_LEASE} s upstream lease, "
            f"then {seconds:.0f} s of watching")
        t0 = emulators.control("watch")["t0"]
        created = _create(daemon, mappings)
        start = time.monotonic()
        emulators.reset()  # router calls and gateway requests within the window
        pid, emulator_pid = daemon.pid, emulators.pids[0]
        cpu_start = previous = _cpu_seconds(pid)
        cpu_series = []
        # Seconds each process waited for its CPU, per second: a second in which one of
        # them was kept off its CPU (another program on a shared machine) shows as a dip
        # in the gateway's count followed by the catch-up, a burst that is not doublenat's.
        waits = {"daemon": [], "emulators": []}
        last_wait = {"daemon": _run_delay(pid), "emulators": _run_delay(emulator_pid)}
        for second in range(1, int(seconds) + 1):
            time.sleep(max(0.0, start + second - time.monotonic()))
            now_cpu = _cpu_seconds(pid)
            cpu_series.append(round(now_cpu - previous, 3))
            previous = now_cpu
            for name, who in (("daemon", pid), ("emulators", emulator_pid)):
                waited = _run_delay(who)
                waits[name].append(round(waited - last_wait[name], 3))
                last_wait[name] = waited
        wall = time.monotonic() - start
        cpu = (previous - cpu_start) / wall
        status = emulators.control("series")
        counters = emulators.counters()
        rss = daemon.rss_kib()
    finally:
        daemon.kill()
        emulators.stop()
    renewals = status["series"].get("renew", [])
    begin = math.ceil(start - t0)  # the first whole second after the last creation
    end = math.floor(start - t0 + seconds)  # the last whole second watched, excluded
    window = _rates(renewals, begin, end)
    steady = _rates(renewals, begin + STEADY_AFTER, end)
    first_renewal = next((i for i, n in enumerate(renewals) if n), None)
    return {
        "mappings": mappings,
        "lease": KEEPALIVE_LEASE,
        "client_lifetime": CLIENT_LIFETIME,
        "watch_seconds": seconds,
        "creations_seconds": round(start - t0, 2),
        "creation_rate": created["rate"],
        "window_from_second": begin,
        "expected_rate": round(mappings / (MEAN_FRACTION * KEEPALIVE_LEASE), 1),
        "window": window,
        "steady": steady,
        "steady_from_second": begin + STEADY_AFTER,
        "first_renewal_second": first_renewal,
        "daemon_cpu": round(cpu, 4),
        "daemon_cpu_series": cpu_series,  # CPU seconds per second, from `begin` on
        "run_queue_wait_series": waits,  # seconds kept off the CPU per second, likewise
        "run_queue_wait_at_worst": {name: _around(series, window.get("worst_second"), begin)
                                    for name, series in waits.items()},
        "daemon_rss_kib": rss,
        # Per second from the first creation (second 0 = the `watch` op), by kind.
        "series": status["series"],
        "gateway_present_at_end": status["present"],
        "gateway_lapsed": status["lapsed"],
        "gateway_expired": status["expired"],
        "gateway_requests_in_window": counters["gateway"]["by_kind"],
        "router_commands_in_window": _router_commands(counters),
    }


def _router_commands(counters: dict[str, Any]) -> dict[str, int]:
    """The router emulator's commands by name, logins left out."""
    return {k: v for k, v in counters["router"]["commands"].items() if k != "/login"}


def _around(series: list[float], second: int | None, begin: int) -> float | None:
    """The most waited in the worst second and the two before it (the stall, then the
    catch-up)."""
    if second is None:
        return None
    picked = series[max(0, second - begin - 2):max(0, second - begin + 1)]
    return max(picked) if picked else None


def _rates(series: list[int], begin: int, end: int) -> dict[str, Any]:
    counts = [series[i] if i < len(series) else 0 for i in range(begin, end)]
    if not counts:
        return {"seconds": 0}
    mean = sum(counts) / len(counts)
    worst = max(counts)
    return {"seconds": len(counts), "total": sum(counts), "mean": round(mean, 1),
            "worst": worst, "worst_second": begin + counts.index(worst),
            "least": min(counts), "ratio": round(worst / mean, 3) if mean else None}


# ---------------------------------------------------------------------- re-mapping


def phase_remap(quick: bool, workdir: Path) -> dict[str, Any]:
    mappings = REMAP_MAPPINGS
    settle = REMAP_SETTLE - (4.0 if quick else 0.0)
    password = procs.new_password()
    emulators = Emulators(workdir, password, router_latency=REMAP_ROUTER_LATENCY,
                          gateway_args=["--gateway-profile", "proton",
                                        "--gateway-delay", str(REMAP_GATEWAY_DELAY)])
    daemon = Doublenat(emulators, password, _listen(), settings={"VPN_PORT_MODE": "external"})
    out: dict[str, Any] = {"mappings": mappings, "gateway_delay": REMAP_GATEWAY_DELAY,
                           "router_latency": REMAP_ROUTER_LATENCY, "gateway_profile": "proton",
                           "port_mode": "external", "settle_seconds": settle}
    try:
        daemon.wait_ready()
        log(f"re-mapping: {mappings:,} mappings, gateway {REMAP_GATEWAY_DELAY * 1000:g} ms "
            f"away; the gateway reconnects {settle:.0f} s after the creations")
        _create(daemon, mappings)
        time.sleep(settle)
        before = emulators.counters()
        out["rules_before"] = before["router"]["rules"]
        out["gateway_mappings_before"] = before["gateway"]["mappings"]
        emulators.reset()
        cpu_before, wall_before = _cpu_seconds(daemon.pid), time.monotonic()
        emulator_cpu_before = _cpu_seconds(emulators.pids[0])
        loss = emulators.control("reconnect")
        out["lost_at_gateway"] = loss["lost"]
        deadline = time.monotonic() + REMAP_TIMEOUT
        while True:
            status = emulators.control("remap_status")
            done = (status["re_requested"] >= mappings and status["rules"] == mappings
                    and status["on_granted_port"] == mappings)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # The daemon's CPU from the loss until the poll saw everything in place (within
        # 0.1 s of the end): near 100% means the re-map was bound by doublenat's CPU.
        elapsed = time.monotonic() - wall_before
        out["daemon_cpu_during"] = round((_cpu_seconds(daemon.pid) - cpu_before) / elapsed, 3)
        out["emulator_cpu_during"] = round(
            (_cpu_seconds(emulators.pids[0]) - emulator_cpu_before) / elapsed, 3)
        out["settled"] = done
        records = _await_log(daemon, "upstream.remapped", 10.0)
        counters = emulators.counters()
    finally:
        daemon.kill()
        emulators.stop()
    lost = next((r for r in records if r.get("event") == "upstream.lost"), None)
    remapped = next((r for r in records if r.get("event") == "upstream.remapped"), None)
    out.update({
        "noticed_s": round(_wall(lost["timestamp"]) - loss["wall"], 4) if lost else None,
        "noticed_by": lost.get("shown_by") if lost else None,
        "re_requested": status["re_requested"],
        "re_requested_first_s": status["first_request_s"],
        "re_requested_all_s": status["last_first_request_s"],
        "rules": status["rules"],
        "rules_on_granted_port": status["on_granted_port"],
        "rules_disabled": status["disabled"],
        "rules_had_to_move": status["had_to_move"],
        "rules_moved": status["moved"],
        "rules_all_moved_s": status["last_rule_change_s"],
        "not_on_granted_port": status["wrong"],
        "gateway_mappings_after": status["gateway_mappings"],
        "gateway_requests_after_loss": counters["gateway"]["by_kind"],
        "router_commands_after_loss": _router_commands(counters),
        "daemon_remapped": {k: remapped.get(k) for k in ("mappings", "seconds", "moved",
                                                         "failed", "retried")}
        if remapped else None,
        "daemon_events": dict(Counter(r.get("event") for r in records)),
        "daemon_failures": [{k: r.get(k) for k in ("timestamp", "reason_code", "reason",
                                                    "internal_port", "router_port")}
                            for r in records if r.get("event") == "mapping.failed"][:10],
    })
    return out


def _wall(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _await_log(daemon: Doublenat, event: str, timeout: float) -> list[dict[str, Any]]:
    """The daemon's JSON log records, once one with `event` is there (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for line in daemon.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        if any(r.get("event") == event for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


# ---------------------------------------------------------------------- emulator side


class EmulatorWatch:
    """Inside bench.emulators: counts what the gateway gets per second, plays the loss and
    reads where the router's rules are against the gateway's table."""

    def __init__(self, router: Any, gateway: Any) -> None:
        self.router, self.gateway = router, gateway
        self.ops: dict[str, Any] = {}
        if gateway is None:
            return
        from doublenat.lab.gateway import MappingEvent, RequestKind

        self.ops = {"watch": self.watch, "series": self.series, "reconnect": self.reconnect,
                    "remap_status": self.remap_status}
        self._clock = gateway._clock
        self._t0: float | None = None
        self._series: dict[str, Counter[int]] = defaultdict(Counter)
        self._lapsed = 0  # renewed after its lease ran out, before the sweep saw it
        self._expired = 0
        self._loss: float | None = None
        self._first: dict[tuple[int, int], float] = {}  # (proto, internal) -> first request
        self._rules_at_loss: dict[str, str | None] = {}  # rule id -> dst-port
        self._rule_changed: dict[str, float] = {}  # rule id -> last change after the loss
        asked = (RequestKind.CREATE, RequestKind.RENEW)
        record, answer = gateway._record, gateway._map

        def counting_record(now: float, source: Any, request: Any, kind: Any, *rest: Any) -> None:
            record(now, source, request, kind, *rest)
            if self._t0 is not None:
                self._series[str(kind)][int(now - self._t0)] += 1
            if self._loss is not None and kind in asked:
                self._first.setdefault((int(request.proto), request.internal_port), now)

        def lapse_checking_map(request: Any, source_ip: str, now: float, epoch: int) -> Any:
            old = gateway._table.get((source_ip, request.proto, request.internal_port))
            if old is not None and old.expires <= now and self._t0 is not None:
                self._lapsed += 1
            return answer(request, source_ip, now, epoch)

        def on_mapping(event: Any, _mapping: Any) -> None:
            if event is MappingEvent.EXPIRED and self._t0 is not None:
                self._expired += 1

        gateway._record = counting_record
        gateway._map = lapse_checking_map
        gateway.add_observer(on_mapping)
        if router is not None:
            router.state.nat.add_observer(self._rule_event)

    def _rule_event(self, kind: str, row: dict[str, str]) -> None:
        if self._loss is not None and kind in ("add", "set"):
            self._rule_changed[row[".id"]] = self._clock()

    def watch(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Count the gateway's requests per second from now on."""
        self._t0 = self._clock()
        self._series.clear()
        self._lapsed = self._expired = 0
        return {"t0": self._t0}

    def series(self, _request: dict[str, Any]) -> dict[str, Any]:
        assert self._t0 is not None
        now = self._clock()
        length = int(now - self._t0) + 1
        table = list(self.gateway._table.values())
        return {
            "seconds": now - self._t0,
            "series": {kind: [counts.get(i, 0) for i in range(length)]
                       for kind, counts in self._series.items()},
            "lapsed": self._lapsed,
            "expired": self._expired + sum(1 for m in table if m.expires <= now),
            "present": sum(1 for m in table if m.expires > now),
        }

    def reconnect(self, _request: dict[str, Any]) -> dict[str, Any]:
        """A VPN reconnect: the lab's GatewayEmulator.reconnect (epoch 0, every mapping
        forgotten, a new public address)."""
        nat = self.router.state.nat if self.router is not None else None
        self._rules_at_loss = {r[".id"]: r.get("dst-port") for r in nat.rows()} if nat else {}
        self._first.clear()
        self._rule_changed.clear()
        epoch = self.gateway.epoch
        lost = len(self.gateway._table)
        wall, self._loss = time.time(), self._clock()
        address = self.gateway.reconnect()
        return {"at": self._loss, "wall": wall, "lost": lost, "epoch_before": epoch,
                "address": str(address)}

    def remap_status(self, _request: dict[str, Any]) -> dict[str, Any]:
        assert self._loss is not None and self.router is not None
        loss = self._loss
        granted = {(int(m.proto), m.internal_port): m.external_port
                   for m in self.gateway._table.values()}
        rules = on_port = disabled = had_to_move = moved = 0
        wrong: list[dict[str, Any]] = []
        last_change = None
        for row in self.router.state.nat.rows():
            match = _COMMENT.search(row.get("comment", ""))
            if not match:
                continue
            rules += 1
            proto = 1 if match.group(1) == "udp" else 2
            port = granted.get((proto, int(match.group(4))))
            now_port, then_port = row.get("dst-port"), self._rules_at_loss.get(row[".id"])
            off = row.get("disabled", "false") not in ("false", "no")
            disabled += off
            if port is not None and now_port == str(port) and not off:
                on_port += 1
            elif len(wrong) < 5:
                wrong.append({"comment": row.get("comment"), "dst-port": now_port,
                              "granted": port, "disabled": off})
            if port is not None and then_port != str(port):
                had_to_move += 1
                changed = self._rule_changed.get(row[".id"])
                if changed is not None and (last_change is None or changed > last_change):
                    last_change = changed
            moved += now_port != then_port
        firsts = self._first.values()
        return {
            "rules": rules, "on_granted_port": on_port, "disabled": disabled,
            "had_to_move": had_to_move, "moved": moved, "wrong": wrong,
            "re_requested": len(self._first),
            "first_request_s": round(min(firsts) - loss, 4) if firsts else None,
            "last_first_request_s": round(max(firsts) - loss, 4) if firsts else None,
            "last_rule_change_s": round(last_change - loss, 4) if last_change else None,
            "gateway_mappings": len(granted),
        }


# ---------------------------------------------------------------------- report


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    from bench.report import _verdict

    out: list[tuple[str, str, str, str, str]] = []
    keep = results.get("keepalive")
    if keep:
        w, s = keep["window"], keep["steady"]
        lapsed = keep["gateway_lapsed"] + keep["gateway_expired"]
        creates = keep["gateway_requests_in_window"].get("create", 0)
        router_calls = sum(keep["router_commands_in_window"].values())
        intact = (keep["gateway_present_at_end"] >= keep["mappings"] and lapsed == 0
                  and creates == 0)
        out.append((
            f"keep-alive: upstream renewals/s with {keep['mappings']:,} mappings on a "
            f"{keep['lease']} s upstream lease (clients ask {keep['client_lifetime']} s), "
            f"{w['seconds']} s after the last creation",
            f"mean {w['mean']:,.0f}/s, worst second {w['worst']:,}/s = {w['ratio']:.2f}x mean"
            + (f"; after the first lease ({s['seconds']} s): mean {s['mean']:,.0f}/s, worst "
               f"{s['worst']:,}/s = {s['ratio']:.2f}x" if s.get("seconds") else ""),
            f"expected {keep['mappings']:,} ÷ (0.375 x {keep['lease']} s) = "
            f"{keep['expected_rate']:,.0f}/s; at the gateway at the end "
            f"{keep['gateway_present_at_end']:,} present, {lapsed} lapsed, {creates} "
            f"re-created; {router_calls} router calls"
            + _stall(keep.get("run_queue_wait_at_worst")),
            "no second > 2x mean; none lapsed" if w["seconds"] >= keep["lease"] else
            "(window shorter than a lease, as with --quick: ratio not judged)",
            _verdict(intact and (w["seconds"] < keep["lease"]
                                 or (w["ratio"] is not None and w["ratio"] <= 2.0)))))
        out.append((f"keep-alive: daemon CPU over those {w['seconds']} s "
                    f"({w['mean']:,.0f} renewals/s)", f"{keep['daemon_cpu']:.1%} of a core",
                    f"RSS {keep['daemon_rss_kib'] / 1024:.1f} MB", "≤ 25%",
                    _verdict(keep["daemon_cpu"] <= 0.25)))
    remap = results.get("remap")
    if remap:
        n = remap["mappings"]
        all_s = remap["re_requested_all_s"]
        rules_s = remap["rules_all_moved_s"]
        noticed = remap["noticed_s"]
        ok = (remap["re_requested"] >= n and all_s is not None and all_s <= REMAP_TARGET
              and remap["rules_on_granted_port"] == remap["rules"] == n)
        daemon = remap.get("daemon_remapped") or {}
        out.append((
            f"re-mapping after an upstream loss (VPN reconnect: epoch 0, mappings forgotten, "
            f"new random ports), {n:,} mappings, gateway {remap['gateway_delay'] * 1000:g} ms "
            f"away, router {remap['router_latency'] * 1000:g} ms, external mode",
            (f"noticed after {noticed * 1000:.0f} ms (by the {remap['noticed_by']}); "
             if noticed is not None else "not noticed; ")
            + f"{remap['re_requested']:,} re-requested, the last after "
            + (f"{all_s:.2f} s" if all_s is not None else "—")
            + f"; {remap['rules_on_granted_port']:,} of {remap['rules']:,} rules on the "
            f"granted port ({remap['rules_had_to_move']:,} had to move), the last moved after "
            + (f"{rules_s:.2f} s" if rules_s is not None else "—"),
            f"{n:,} x {remap['gateway_delay'] * 1000:g} ms one at a time = "
            f"{n * remap['gateway_delay']:.0f} s; bound: {n:,} ÷ 64 in parallel x "
            f"{remap['gateway_delay'] * 1000:g} ms = {n / 64 * remap['gateway_delay']:.2f} s "
            f"upstream, {remap['rules_had_to_move']:,} rule moves ÷ (4 connections ÷ "
            f"{remap['router_latency'] * 1000:g} ms) = "
            f"{remap['rules_had_to_move'] * remap['router_latency'] / 4:.2f} s on the router; "
            f"daemon CPU meanwhile "
            f"{remap.get('daemon_cpu_during', 0):.0%} (emulators "
            f"{remap.get('emulator_cpu_during', 0):.0%}); doublenat's own count: "
            f"{daemon.get('mappings', '?')} re-mapped in {daemon.get('seconds', '?')} s, "
            f"{daemon.get('moved', '?')} moved, {daemon.get('failed', '?')} failed "
            f"({daemon.get('retried', 0)} tried again at once)",
            f"all re-requested ≤ {REMAP_TARGET:g} s; every rule that must follow moved",
            _verdict(ok)))
    return out


def _stall(waits: dict[str, float | None] | None) -> str:
    if not waits:
        return ""
    return ("; around the worst second the daemon waited "
            f"{waits.get('daemon') or 0:.2f} s for its CPU, the emulators "
            f"{waits.get('emulators') or 0:.2f} s")


def plot(results: dict[str, Any], out_dir: Path) -> Path | None:
    keep = results.get("keepalive")
    if not keep:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    renewals = keep["series"].get("renew", [])
    creates = keep["series"].get("create", [])
    begin = keep["window_from_second"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(range(len(renewals)), renewals, lw=0.9, label="upstream renewals per second")
    if creates:
        ax.plot(range(len(creates)), creates, lw=0.9, color="grey", label="creations per second")
    mean = keep["window"]["mean"]
    ax.axhline(mean, color="green", ls="--", lw=0.8, label=f"mean after creations ({mean:.0f}/s)")
    ax.axhline(2 * mean, color="red", ls=":", lw=0.8, label="2x mean")
    ax.axvline(begin, color="black", lw=0.6)
    ax.set_xlabel("seconds from the first creation")
    ax.set_ylabel("requests per second at the gateway")
    cpu = keep.get("daemon_cpu_series")
    if cpu:
        ax2 = ax.twinx()
        ax2.plot(range(begin, begin + len(cpu)), [c * 100 for c in cpu], lw=0.6,
                 color="orange", label="daemon CPU (% of a core)")
        ax2.set_ylabel("daemon CPU, % of a core")
        ax2.set_ylim(0, 100)
        ax2.legend(fontsize=7, loc="upper right")
    ax.set_title(f"Keep-alive: {keep['mappings']:,} mappings, {keep['lease']} s upstream "
                 f"lease ({results['machine']['date']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out_dir / "keepalive_renewals.png"
    fig.savefig(path)
    plt.close(fig)
    return path
