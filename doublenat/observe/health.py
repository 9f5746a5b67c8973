"""The /healthz decision: can doublenat serve a mapping now? Pure: a Snapshot in, a verdict out.

Healthy (200) when both hold:
- the router is synchronised: doublenat is logged in, has listed the rules and knows the
  VPN interface, and its last connection attempt succeeded (an unreachable router, a
  refused login or no tunnel interface is not). Between reconciliations the router is
  asked for its uptime every UPSTREAM_PROBE_INTERVAL, so a router gone is known by then;
- the VPN gateway answered within the last two UPSTREAM_PROBE_INTERVALs (it is probed
  every interval, with or without mappings).
Otherwise 503, with the first reason found.
"""

from __future__ import annotations

from dataclasses import dataclass

from doublenat.observe.snapshot import Snapshot

PROBES_MISSED = 2  # probe intervals the gateway may stay silent


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: str

    @property
    def status(self) -> int:
        return 200 if self.healthy else 503


def judge(snapshot: Snapshot) -> Health:
    router, upstream = snapshot.router, snapshot.upstream
    if not (router.synchronised and router.connected):
        what = "router not synchronised" if router.connected else "router unreachable"
        return Health(False, f"{what}: {router.problem or 'no contact yet'}")
    window = PROBES_MISSED * snapshot.probe_interval
    since = upstream.since_answer
    if since is None:
        return Health(False, f"the VPN gateway {upstream.gateway} has not answered since "
                             "doublenat started")
    if since <= window:
        return Health(True, f"router synchronised; the VPN gateway answered {since:.0f} s ago")
    live = sum(count for _, count in snapshot.mapping_counts)
    if not live and upstream.up:
        return Health(True, f"router synchronised; no mapping to probe the VPN gateway for, "
                            f"its last answer {since:.0f} s ago")
    return Health(False, f"the VPN gateway {upstream.gateway} last answered {since:.0f} s ago, "
                         f"more than {PROBES_MISSED} x UPSTREAM_PROBE_INTERVAL ({window:g} s)")
