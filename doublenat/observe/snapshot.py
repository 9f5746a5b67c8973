"""What /metrics, /status and /healthz show, as plain frozen values.

`snapshot_of(daemon)` is the one place that reads the daemon's internals; everything
else in this package reads a `Snapshot`. When the engine moves its state, only
`snapshot_of` follows it.

Building a snapshot does not yield to other greenlets: it is a consistent picture of
one moment. It costs a fraction of a microsecond per live mapping (counting them by
protocol); the mappings themselves are copied as the engine's immutable leases in one
step and turned into `MappingStatus` only as they are read (`MappingList`), so /status
can hand the hub back between chunks of a long list.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from doublenat import __version__
from doublenat.protocol.natpmp import Proto

InterfaceSource = Literal["setting", "route check", "route table"]


@dataclass(frozen=True, slots=True)
class RouterStatus:
    connected: bool  # the last connection attempt to the API succeeded
    synchronised: bool  # rules listed, ports loaded and the VPN interface known
    version: str | None  # RouterOS version, e.g. "7.16.2"
    board: str | None
    interface: str | None  # the VPN interface doublenat's rules use
    interface_source: InterfaceSource | None
    problem: str | None  # why not synchronised, in the operator's words


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    gateway: str  # VPN_GATEWAY as IP:PORT
    public_address: str | None
    epoch: int | None  # the gateway's epoch in its last answer
    since_answer: float | None  # seconds since the gateway last answered anything
    up: bool  # it answered, and nothing asked of it since has gone unanswered


@dataclass(frozen=True, slots=True)
class MappingStatus:
    client: str
    protocol: str  # "tcp" or "udp"
    internal_port: int
    external_port: int  # what the client was told (the gateway's port)
    router_port: int  # dst-port of the rule on the VPN interface
    rule_id: str
    expires_in: float  # seconds until it ends unless renewed
    lifetime: int | None  # seconds the client was last told
    static: bool  # a STATIC_MAPPINGS entry


@dataclass(frozen=True, slots=True)
class RequestCount:
    opcode: int
    result: int
    count: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    started_at: float | None  # Unix time
    epoch: int  # doublenat's own Seconds Since Start of Epoch
    probe_interval: float  # UPSTREAM_PROBE_INTERVAL: /healthz judges the gateway by it
    router: RouterStatus
    upstream: UpstreamStatus
    mapping_counts: tuple[tuple[str, int], ...]  # (protocol, live mappings), both protocols
    mappings: Sequence[MappingStatus]  # every live mapping; empty unless asked for
    requests: tuple[RequestCount, ...]  # answered requests by opcode and result
    dropped: tuple[tuple[str, int], ...]  # unanswered datagrams: not_allowed, malformed,
    # rate_limited
    port_changes: int  # the gateway moved a mapping's external port
    upstream_losses: int  # the gateway lost its mappings (epoch back, address changed)
    hook_failures: int  # HOOK_COMMAND runs that failed, timed out or could not start, and
    # events dropped because too many were queued


class MappingList(Sequence[MappingStatus]):
    """Live mappings as copied at the snapshot's moment, converted when read."""

    def __init__(self, items: Sequence[Any], convert: Callable[[Any], MappingStatus]) -> None:
        self._items, self._convert = items, convert

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> MappingStatus: ...
    @overload
    def __getitem__(self, index: slice) -> list[MappingStatus]: ...

    def __getitem__(self, index: int | slice) -> MappingStatus | list[MappingStatus]:
        if isinstance(index, slice):
            return [self._convert(item) for item in self._items[index]]
        return self._convert(self._items[index])

    def __iter__(self) -> Iterator[MappingStatus]:
        return map(self._convert, self._items)


_COUNT_KEY = re.compile(r"op(\d+)\.result(\d+)")
# The responder's names of unanswered datagrams -> the names shown.
_DROP_REASONS = {"denied": "not_allowed", "dropped": "malformed", "rate_limited": "rate_limited"}


def snapshot_of(daemon: Any, mappings: bool = False) -> Snapshot:
    """The daemon (a `doublenat.daemon.Daemon`, not imported: the daemon imports this
    package) as it is now. `mappings`: list every live mapping (for /status)."""
    table, mapper, router, gateway, upstream = daemon.table, daemon.mapper, daemon.router, \
        daemon.gateway, daemon.upstream
    now = daemon.clock()

    stats = getattr(router, "stats", None)
    retry_at = getattr(router, "retry_at", None)  # 0.0 once a connection attempt succeeded
    connected = bool(stats is not None and stats.connects) and \
        (retry_at is None or retry_at() == 0.0)
    view = table.router  # None unless synchronised
    problem = table.problem
    if problem is None and stats is not None and stats.connects and not connected:
        problem = "the last connection attempt to the RouterOS API failed"
    router_status = RouterStatus(
        connected=connected,
        synchronised=view is not None,
        version=view.version if view is not None else None,
        board=view.board if view is not None else None,
        interface=view.interface if view is not None else None,
        interface_source=view.source if view is not None else None,
        problem=problem,
    )

    answered_at = upstream.last_answer_at
    failed_at = getattr(gateway, "last_timeout_at", None)
    upstream_status = UpstreamStatus(
        gateway=str(daemon.settings.vpn_gateway),
        public_address=str(upstream.address) if upstream.address is not None else None,
        epoch=upstream.epoch,
        since_answer=None if answered_at is None else max(0.0, now - answered_at),
        up=answered_at is not None and (failed_at is None or answered_at >= failed_at),
    )

    tcp = sum(key.proto is Proto.TCP for key in table.leases)
    counts = {"tcp": tcp, "udp": len(table.leases) - tcp}

    def status(lease: Any) -> MappingStatus:  # a Lease: frozen, safe to read later
        return MappingStatus(
            client=str(lease.key.client),
            protocol=lease.key.proto.label,
            internal_port=lease.key.internal_port,
            external_port=lease.external_port,
            router_port=lease.router_port,
            rule_id=lease.rule.rule_id,
            expires_in=max(0.0, lease.expires_at - now),
            lifetime=lease.told,
            static=lease.static,
        )

    listed = MappingList(tuple(table.leases.values()) if mappings else (), status)

    requests, responder_counts = [], daemon.responder.counts
    for name, count in responder_counts.items():
        match = _COUNT_KEY.fullmatch(name)
        if match:
            requests.append(RequestCount(int(match[1]), int(match[2]), count))

    return Snapshot(
        version=__version__,
        started_at=daemon.started_at,
        epoch=daemon.epoch.seconds(),
        probe_interval=daemon.settings.upstream_probe_interval,
        router=router_status,
        upstream=upstream_status,
        mapping_counts=tuple(counts.items()),
        mappings=listed,
        requests=tuple(sorted(requests, key=lambda r: (r.opcode, r.result))),
        dropped=tuple((shown, responder_counts.get(name, 0))
                      for name, shown in _DROP_REASONS.items()),
        port_changes=mapper.counters.get("port_changes", 0),
        upstream_losses=upstream.losses,
        hook_failures=0 if daemon.hooks is None else daemon.hooks.failed + daemon.hooks.dropped,
    )
