"""Snapshots made by hand for the unit tests of doublenat/observe/."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from doublenat.observe.snapshot import (
    MappingStatus,
    RequestCount,
    RouterStatus,
    Snapshot,
    UpstreamStatus,
)

ROUTER = RouterStatus(connected=True, synchronised=True, version="7.16.2", board="hEX",
                      interface="wg-proton", interface_source="route check", problem=None)
UPSTREAM = UpstreamStatus(gateway="10.2.0.1:5351", public_address="11.22.33.44", epoch=5000,
                          since_answer=4.0, up=True)
MAPPINGS = (
    MappingStatus("192.168.88.20", "tcp", 6881, 41234, 41234, "*1A", 52.5, 60, False),
    MappingStatus("192.168.88.20", "udp", 6881, 41234, 41234, "*1B", 52.5, 60, False),
    MappingStatus("192.168.88.10", "tcp", 32400, 50000, 50000, "*2", 86000.0, 86400, True),
)


def snapshot(**changes: Any) -> Snapshot:
    """A healthy daemon with three mappings; `router=`/`upstream=` take dicts of changes."""
    router = replace(ROUTER, **changes.pop("router", {}))
    upstream = replace(UPSTREAM, **changes.pop("upstream", {}))
    base = Snapshot(
        version="0.1.0", started_at=1_700_000_000.0, epoch=1234, probe_interval=30.0,
        router=router, upstream=upstream,
        mapping_counts=(("tcp", 2), ("udp", 1)), mappings=MAPPINGS,
        requests=(RequestCount(0, 0, 10), RequestCount(1, 0, 3), RequestCount(2, 0, 5),
                  RequestCount(2, 3, 2), RequestCount(3, 5, 1), RequestCount(77, 5, 4),
                  RequestCount(1, 1, 6)),
        dropped=(("not_allowed", 7), ("malformed", 8), ("rate_limited", 9)),
        port_changes=2, upstream_losses=1, hook_failures=3,
    )
    return replace(base, **changes)
