"""/healthz decisions: router synchronised or not, the gateway heard from within two probe
intervals or not, and the reason given."""

from __future__ import annotations

import pytest

from doublenat.observe.health import judge
from tests.observe.samples import snapshot

NO_MAPPINGS = (("tcp", 0), ("udp", 0))


def test_healthy_when_synchronised_and_the_gateway_answered_recently() -> None:
    health = judge(snapshot(upstream={"since_answer": 12.0}))
    assert (health.healthy, health.status) == (True, 200)
    assert "answered 12 s ago" in health.reason


@pytest.mark.parametrize(("interval", "since", "healthy"), [
    (30.0, 59.9, True), (30.0, 60.0, True), (30.0, 60.1, False), (10.0, 25.0, False),
    (60.0, 119.0, True),
])
def test_the_window_is_two_probe_intervals(interval: float, since: float, healthy: bool) -> None:
    health = judge(snapshot(probe_interval=interval, upstream={"since_answer": since}))
    assert health.healthy is healthy
    if not healthy:
        assert health.status == 503
        assert f"last answered {since:.0f} s ago" in health.reason
        assert f"2 x UPSTREAM_PROBE_INTERVAL ({2 * interval:g} s)" in health.reason
        assert "10.2.0.1:5351" in health.reason


def test_router_not_synchronised_wins_and_says_why() -> None:
    health = judge(snapshot(router={"synchronised": False,
                                    "problem": "the router has no route toward VPN_GATEWAY"},
                            upstream={"since_answer": None, "up": False}))
    assert health.status == 503
    assert health.reason == "router not synchronised: the router has no route toward VPN_GATEWAY"


def test_router_unreachable() -> None:
    health = judge(snapshot(router={"connected": False, "problem": "cannot connect: refused"}))
    assert health.status == 503
    assert health.reason == "router unreachable: cannot connect: refused"


def test_gateway_never_answered() -> None:
    health = judge(snapshot(upstream={"since_answer": None, "up": False}))
    assert health.status == 503
    assert "has not answered since doublenat started" in health.reason


def test_idle_daemon_without_mappings_is_not_probed_so_an_old_answer_counts() -> None:
    idle = judge(snapshot(mapping_counts=NO_MAPPINGS, upstream={"since_answer": 3600.0}))
    assert idle.healthy and "no mapping" in idle.reason
    # ... unless what was asked since went unanswered
    down = judge(snapshot(mapping_counts=NO_MAPPINGS,
                          upstream={"since_answer": 3600.0, "up": False}))
    assert down.status == 503 and "last answered 3600 s ago" in down.reason


def test_with_mappings_an_old_answer_is_unhealthy_even_if_nothing_failed() -> None:
    # Probes run while mappings exist: no answer for so long means they are not answered.
    health = judge(snapshot(upstream={"since_answer": 3600.0, "up": True}))
    assert health.status == 503
