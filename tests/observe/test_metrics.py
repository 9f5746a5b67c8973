"""The /metrics exposition for a given snapshot, parsed back with prometheus_client's parser."""

from __future__ import annotations

import math

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from doublenat.observe.metrics import ROUTER_CALL_BUCKETS, UPSTREAM_REQUEST_BUCKETS, Metrics
from doublenat.observe.snapshot import Snapshot
from tests.observe.samples import snapshot

# SPEC §10's metrics: name -> (type, label names).
REQUIRED = {
    "doublenat_mappings": ("gauge", {"protocol"}),
    "doublenat_requests": ("counter", {"opcode", "result"}),
    "doublenat_router_up": ("gauge", set()),
    "doublenat_upstream_up": ("gauge", set()),
    "doublenat_port_changes": ("counter", set()),
    "doublenat_upstream_losses": ("counter", set()),
    "doublenat_router_call_seconds": ("histogram", set()),
    "doublenat_upstream_request_seconds": ("histogram", set()),
    "doublenat_hook_failures": ("counter", set()),
}


def scrape(s: Snapshot, metrics: Metrics | None = None) -> dict[str, object]:
    metrics = metrics or Metrics()
    metrics.watch(lambda: s)
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def values(family: object) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples}  # type: ignore[attr-defined]


def test_every_metric_of_the_spec_with_its_type_and_labels() -> None:
    families = scrape(snapshot())
    for name, (kind, labels) in REQUIRED.items():
        family = families[name]
        assert family.type == kind, name  # type: ignore[attr-defined]
        for sample in family.samples:  # type: ignore[attr-defined]
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert all(name.startswith(("doublenat_", "process_")) for name in families)


def test_values_come_from_the_snapshot() -> None:
    families = scrape(snapshot())
    assert values(families["doublenat_mappings"]) == {
        (("protocol", "tcp"),): 2, (("protocol", "udp"),): 1}
    requests = values(families["doublenat_requests"])
    assert requests == {
        (("opcode", "0"), ("result", "success")): 10,
        (("opcode", "1"), ("result", "success")): 3,
        (("opcode", "1"), ("result", "unsupported_version")): 6,
        (("opcode", "2"), ("result", "success")): 5,
        (("opcode", "2"), ("result", "network_failure")): 2,
        # opcodes 3 and 77 are one series: a scanner cannot make hundreds
        (("opcode", "other"), ("result", "unsupported_opcode")): 5,
    }
    assert values(families["doublenat_requests_dropped"]) == {
        (("reason", "not_allowed"),): 7, (("reason", "malformed"),): 8,
        (("reason", "rate_limited"),): 9}
    single = {name: next(iter(values(families[name]).values())) for name in (
        "doublenat_router_up", "doublenat_router_connected", "doublenat_upstream_up",
        "doublenat_port_changes", "doublenat_upstream_losses", "doublenat_hook_failures",
        "doublenat_epoch_seconds", "doublenat_upstream_last_answer_age_seconds",
        "doublenat_healthy", "doublenat_start_time_seconds")}
    assert single == {
        "doublenat_router_up": 1, "doublenat_router_connected": 1, "doublenat_upstream_up": 1,
        "doublenat_port_changes": 2, "doublenat_upstream_losses": 1,
        "doublenat_hook_failures": 3, "doublenat_epoch_seconds": 1234,
        "doublenat_upstream_last_answer_age_seconds": 4.0, "doublenat_healthy": 1,
        "doublenat_start_time_seconds": 1_700_000_000.0}
    assert values(families["doublenat_info"]) == {(("version", "0.1.0"),): 1}


@pytest.mark.parametrize(("router", "upstream", "router_up", "upstream_up", "healthy"), [
    ({"synchronised": False, "problem": "no route"}, {}, 0, 1, 0),
    ({"connected": False}, {}, 0, 1, 0),
    ({}, {"up": False, "since_answer": 100.0}, 1, 0, 0),
    ({}, {"up": False, "since_answer": None}, 1, 0, 0),
])
def test_up_gauges_follow_router_and_gateway(
    router: dict[str, object], upstream: dict[str, object], router_up: int, upstream_up: int,
    healthy: int,
) -> None:
    families = scrape(snapshot(router=router, upstream=upstream))
    got = [next(iter(values(families[name]).values())) for name in (
        "doublenat_router_up", "doublenat_upstream_up", "doublenat_healthy")]
    assert got == [router_up, upstream_up, healthy]
    if upstream.get("since_answer", 0) is None:
        assert "doublenat_upstream_last_answer_age_seconds" not in families


def test_series_exist_with_zero_before_anything_happened() -> None:
    empty = snapshot(mapping_counts=(("tcp", 0), ("udp", 0)), mappings=(), requests=(),
                     port_changes=0, upstream_losses=0, hook_failures=0, started_at=None)
    families = scrape(empty)
    assert values(families["doublenat_mappings"]) == {
        (("protocol", "tcp"),): 0, (("protocol", "udp"),): 0}
    assert values(families["doublenat_hook_failures"]) == {(): 0}
    assert "doublenat_start_time_seconds" not in families


def bucket_counts(family: object) -> dict[float, float]:
    return {float(s.labels["le"]): s.value for s in family.samples  # type: ignore[attr-defined]
            if s.name.endswith("_bucket")}


def test_histogram_buckets_fit_router_calls_in_ms_and_the_gateway_in_tens_of_ms() -> None:
    metrics = Metrics()
    for seconds in (0.0003, 0.0015, 0.004, 0.004, 0.7, 6.0):  # 6 s: past any bound
        metrics.observe_router_call(seconds)
    for seconds in (0.012, 0.018, 0.018, 0.045, 0.3):  # 0.3: after one retransmission
        metrics.observe_upstream_request(seconds)
    families = scrape(snapshot(), metrics)
    router = bucket_counts(families["doublenat_router_call_seconds"])
    assert list(router) == [*ROUTER_CALL_BUCKETS, math.inf]
    assert router[0.0005] == 1 and router[0.002] == 2 and router[0.005] == 4
    assert router[5.0] == 5 and router[math.inf] == 6
    upstream = bucket_counts(families["doublenat_upstream_request_seconds"])
    assert list(upstream) == [*UPSTREAM_REQUEST_BUCKETS, math.inf]
    assert upstream[0.01] == 0 and upstream[0.015] == 1 and upstream[0.02] == 3
    assert upstream[0.05] == 4 and upstream[0.25] == 4 and upstream[0.5] == 5
    # Most router buckets are below 100 ms, most gateway buckets between 5 and 100 ms.
    assert sum(b < 0.1 for b in ROUTER_CALL_BUCKETS) >= 6
    assert sum(0.005 <= b <= 0.1 for b in UPSTREAM_REQUEST_BUCKETS) >= 7
    assert ROUTER_CALL_BUCKETS[-1] == 5.0  # ROUTER_TIMEOUT's default ends every call
    assert UPSTREAM_REQUEST_BUCKETS[-1] == 3.0  # UPSTREAM_TIMEOUT's default


def test_no_created_series_for_the_histograms() -> None:
    families = scrape(snapshot())
    samples = [s.name for f in families.values() for s in f.samples]  # type: ignore[attr-defined]
    assert not [name for name in samples if name.endswith("_created")]


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    metrics = Metrics()
    metrics.watch(lambda: snapshot())
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(body.decode())}
    assert families["doublenat_requests"].type == "counter"
    assert families["doublenat_mappings"].type == "gauge"


def test_the_snapshot_is_read_at_each_scrape() -> None:
    current = [snapshot()]
    metrics = Metrics()
    metrics.watch(lambda: current[0])
    metrics.watch(lambda: snapshot(port_changes=99))  # a second watch is ignored
    first = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
    current[0] = snapshot(mapping_counts=(("tcp", 5), ("udp", 0)))
    second = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
    assert values(first["doublenat_mappings"])[(("protocol", "tcp"),)] == 2
    assert values(second["doublenat_mappings"])[(("protocol", "tcp"),)] == 5
    assert values(second["doublenat_port_changes"]) == {(): 2}
