"""The Prometheus metrics: a private registry, read at scrape time.

Gauges and counters are not kept twice: a collector turns a `Snapshot` of the daemon
into metric families when Prometheus scrapes, so request handling pays nothing for them.
The two latencies are real `Histogram`s, observed by the adapters as calls complete
(`observe_router_call`, `observe_upstream_request`).

Bucket bounds come from figures measured or recorded for this project:
- a RouterOS API call takes ~0.3 ms against the lab's emulator on loopback
  (routeros-research.md §4.5) and 2 ms per command in the benchmark's slow router; a
  real router on the LAN is expected at 1-20 ms (a guess: no recording of a real
  MikroTik's API latency yet), and ROUTER_TIMEOUT (5 s) ends every call;
- the VPN gateway answered in ~18 ms over WireGuard in a qBittorrent trace
  (natpmp-research.md), so buckets are tens of milliseconds around that; an answer
  after one retransmission takes 250-750 ms, after two 750-1750 ms, and
  UPSTREAM_TIMEOUT (3 s) ends the exchange.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from doublenat.observe.health import judge
from doublenat.observe.snapshot import Snapshot
from doublenat.protocol.natpmp import Result

ROUTER_CALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5, 5.0)
UPSTREAM_REQUEST_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                            0.5, 1.0, 2.0, 3.0)

# Opcodes other than these are folded into "other", so a scanner sending every opcode
# cannot make hundreds of series.
_OPCODES = {0: "0", 1: "1", 2: "2"}

SnapshotSource = Callable[[], Snapshot]


def result_label(result: int) -> str:
    try:
        return Result(result).name.lower()
    except ValueError:
        return str(result)


class Metrics:
    """The registry served at /metrics, and the two histograms the adapters feed."""

    def __init__(self) -> None:
        # The `_created` series of the histograms would only double the series count.
        disable_created = getattr(prometheus_client, "disable_created_metrics", None)
        if disable_created is not None:  # prometheus_client >= 0.17
            disable_created()
        else:  # 0.16 (bookworm's python3-prometheus-client): the switch that function sets
            prometheus_client.metrics._use_created = False
        self.registry = CollectorRegistry()
        self.router_call_seconds = Histogram(
            "doublenat_router_call_seconds",
            "RouterOS API calls answered without a trap, in seconds.",
            buckets=ROUTER_CALL_BUCKETS, registry=self.registry)
        self.upstream_request_seconds = Histogram(
            "doublenat_upstream_request_seconds",
            "NAT-PMP exchanges with the VPN gateway that got an answer, in seconds "
            "(retransmissions included).",
            buckets=UPSTREAM_REQUEST_BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)
        self._watching = False

    def observe_router_call(self, seconds: float) -> None:
        self.router_call_seconds.observe(seconds)

    def observe_upstream_request(self, seconds: float) -> None:
        self.upstream_request_seconds.observe(seconds)

    def watch(self, snapshot: SnapshotSource) -> None:
        """Serve the gauges and counters of `snapshot()` from now on (once)."""
        if not self._watching:
            self.registry.register(SnapshotCollector(snapshot))
            self._watching = True

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type (OpenMetrics if the scraper asks for it)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class SnapshotCollector:
    """Gauges and counters made from one snapshot per scrape."""

    def __init__(self, snapshot: SnapshotSource) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._snapshot()))


def families(s: Snapshot) -> list[Metric]:
    """The metric families of one snapshot (histograms and process metrics aside)."""
    out: list[Metric] = []

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(GaugeMetricFamily(name, doc, value=value))

    def counter(name: str, doc: str, value: float) -> None:
        out.append(CounterMetricFamily(name, doc, value=value))

    info = GaugeMetricFamily("doublenat_info", "Always 1; the version as a label.",
                             labels=["version"])
    info.add_metric([s.version], 1)
    out.append(info)
    if s.started_at is not None:
        gauge("doublenat_start_time_seconds", "When the daemon started, Unix time.",
              s.started_at)
    gauge("doublenat_healthy", "1 when /healthz would answer 200, else 0.", int(judge(s).healthy))

    mappings = GaugeMetricFamily("doublenat_mappings", "Live mappings.", labels=["protocol"])
    for protocol, count in s.mapping_counts:
        mappings.add_metric([protocol], count)
    out.append(mappings)

    requests = CounterMetricFamily(
        "doublenat_requests", "Requests answered, by opcode (0, 1, 2, other) and result.",
        labels=["opcode", "result"])
    folded: dict[tuple[str, str], int] = {}
    for r in s.requests:
        key = (_OPCODES.get(r.opcode, "other"), result_label(r.result))
        folded[key] = folded.get(key, 0) + r.count
    for labels, count in sorted(folded.items()):
        requests.add_metric(list(labels), count)
    out.append(requests)
    dropped = CounterMetricFamily(
        "doublenat_requests_dropped", "Datagrams not answered, by reason (not_allowed: "
        "outside ALLOWED_CLIENTS; malformed; rate_limited: over CLIENT_RATE_LIMIT).",
        labels=["reason"])
    for reason, count in s.dropped:
        dropped.add_metric([reason], count)
    out.append(dropped)

    router, upstream = s.router, s.upstream
    gauge("doublenat_router_up", "1 when doublenat is synchronised with the router (logged "
          "in, rules listed, VPN interface known) and still reaches it, else 0.",
          int(router.synchronised and router.connected))
    gauge("doublenat_router_connected", "1 when the last connection attempt to the RouterOS "
          "API succeeded, else 0.", int(router.connected))
    gauge("doublenat_upstream_up", "1 when the VPN gateway has answered and nothing asked of "
          "it since went unanswered, else 0.", int(upstream.up))
    if upstream.since_answer is not None:
        gauge("doublenat_upstream_last_answer_age_seconds",
              "Seconds since the VPN gateway last answered anything.", upstream.since_answer)
    gauge("doublenat_epoch_seconds", "doublenat's NAT-PMP epoch (resets at start and after "
          "an upstream loss).", s.epoch)
    counter("doublenat_port_changes", "Mappings whose external port the VPN gateway moved.",
            s.port_changes)
    counter("doublenat_upstream_losses", "Times the VPN gateway lost its mappings (its epoch "
            "went back or its public address changed).", s.upstream_losses)
    counter("doublenat_hook_failures", "HOOK_COMMAND runs that failed, timed out or could "
            "not start, and events dropped because too many were queued.", s.hook_failures)
    return out
