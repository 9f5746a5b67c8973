"""The periodic stats record and the mapping event records, as an aggregator reads them."""

from __future__ import annotations

import logging

import gevent
import pytest

from doublenat import daemon as daemon_module
from doublenat.protocol.natpmp import Result
from tests.lab_support import MakeLab
from tests.probe import probe

MAPPING_FIELDS = {
    "event",
    "client",
    "protocol",
    "internal_port",
    "router_port",
    "upstream_port",
    "external_port",
    "rule_id",
    "interface",
    "lifetime",
    "result",
}


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


def test_stats_every_interval_and_at_shutdown(
    make_lab: MakeLab, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="doublenat")
    monkeypatch.setattr(daemon_module, "STATS_INTERVAL", 0.3)
    lab = make_lab()
    with probe(lab.daemon.address) as client:
        assert client.tcp(6881, 6881).result == Result.SUCCESS
        assert client.address().result == Result.SUCCESS
    gevent.sleep(0.7)
    periodic = records(caplog, "stats")
    assert periodic, "no periodic stats record"
    last = periodic[-1].__dict__
    assert last["mappings_live"] == 1
    assert last["requests_op2_result0"] == 1 and last["requests_op0_result0"] >= 1
    assert last["mappings_created"] == 1 and last["reconcile_runs"] >= 1
    assert last["router_ready"] is True and last["interface"] == "wg-proton"
    for name in ("router_latency_p50_ms", "router_latency_p99_ms", "upstream_latency_p50_ms"):
        assert name in last
    lab.daemon.stop()
    [final] = records(caplog, "stats.final")
    assert final.__dict__["mappings_closed"] == 1 and final.__dict__["mappings_live"] == 0


def test_every_mapping_event_has_the_same_fields(
    make_lab: MakeLab, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="doublenat")
    lab = make_lab(settings={"MAX_MAPPINGS_PER_CLIENT": "1"})
    with probe(lab.daemon.address) as client:
        client.tcp(6881, 6881)
        client.tcp(6882, 6882)  # refused: quota
        client.tcp(6881, 0, 0)
    events = [r for r in caplog.records if str(getattr(r, "event", "")).startswith("mapping.")]
    assert [r.event for r in events] == [
        "mapping.created",
        "mapping.refused",  # type: ignore[attr-defined]
        "mapping.deleted",
    ]
    for record in events:
        assert record.__dict__.keys() >= MAPPING_FIELDS
    created = events[0].__dict__
    assert (
        created["router_port"],
        created["external_port"],
        created["lifetime"],
        created["result"],
    ) == (6881, 6881, 60, 0)
    assert created["rule_id"].startswith("*")
    assert events[1].__dict__["result"] == Result.OUT_OF_RESOURCES
