"""The periodic stats record: flat, typed fields an aggregator can graph as they are."""

from __future__ import annotations

from collections import deque
from typing import Any

# Latency samples kept between two stats records: recent ones, and a bounded number, so
# memory stays flat however busy the daemon is.
SAMPLES = 4096


def samples() -> deque[float]:
    return deque(maxlen=SAMPLES)


def take(kept: deque[float]) -> list[float]:
    taken = list(kept)
    kept.clear()
    return taken


def percentile(samples: list[float], fraction: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def collect(*, table: Any, mapper: Any, responder: Any, reconciler: Any, router: Any,
            gateway: Any, server: Any, epoch: Any, upstream: Any, upkeep: Any
            ) -> dict[str, Any]:
    """Counters since start, latency percentiles since the previous record."""
    view = table.router
    out: dict[str, Any] = {
        "mappings_live": len(table.leases),
        "mappings_static": sum(1 for lease in table.leases.values() if lease.static),
        "mappings_adoptable": len(table.candidates),
        "rules_to_remove": len(table.doomed),
        "writes_unknown": sum(1 for w in table.writes.values() if w.unknown),
        "epoch": epoch.seconds(),
        "upstream_generation": upstream.generation,
        "upstream_losses": upstream.losses,
        "router_ready": view is not None,
        "interface": view.interface if view is not None else None,
        "keepalive_planned": len(upkeep.schedule),
        "keepalive_sent": upkeep.renewals_sent,
        "keepalive_failed": upkeep.renewals_failed,
    }
    for name, count in sorted(responder.counts.items()):
        out[f"requests_{name.replace('.', '_')}"] = count
    for name, count in sorted(mapper.counters.items()):
        out[f"mappings_{name}"] = count
    for name, count in reconciler.totals.items():
        out[f"reconcile_{name}"] = count
    router_stats = getattr(router, "stats", None)
    if router_stats is not None:
        samples = take(router_stats.latencies)
        out.update(
            router_calls=router_stats.calls,
            router_connects=router_stats.connects,
            router_reconnects=router_stats.reconnects,
            router_connect_failures=router_stats.connect_failures,
            router_retries=router_stats.retries,
            router_traps=router_stats.traps,
            router_latency_p50_ms=_ms(percentile(samples, 0.5)),
            router_latency_p99_ms=_ms(percentile(samples, 0.99)),
        )
    latencies = getattr(gateway, "latencies", None)
    if isinstance(latencies, deque):
        samples = take(latencies)
        out.update(
            upstream_sent=getattr(gateway, "sent", 0),
            upstream_retransmitted=getattr(gateway, "retransmitted", 0),
            upstream_timeouts=getattr(gateway, "timeouts", 0),
            upstream_latency_p50_ms=_ms(percentile(samples, 0.5)),
            upstream_latency_p99_ms=_ms(percentile(samples, 0.99)),
        )
    if server is not None and server.pool is not None:
        out["handlers_busy"] = server.in_flight()
        out["handler_errors"] = server.errors
    return out
