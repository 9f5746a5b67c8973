"""Seconds Since Start of Epoch, and noticing when the gateway lost its mappings.

doublenat's epoch starts when it starts and restarts whenever the upstream state is
lost: the gateway's own epoch runs backwards (RFC 6886 3.6's client rule) or its public
address changes. Clients that see our epoch go back re-create their mappings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address

from doublenat.engine.contracts import Clock

log = logging.getLogger("doublenat.epoch")

# RFC 6886 3.6: a client expects at least 7/8 of the elapsed time, with 2 s of slack.
_EXPECTED_RATE = 7 / 8
_SLACK = 2.0


class Epoch:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._start = clock()

    def seconds(self) -> int:
        return int(self._clock() - self._start)

    def reset(self) -> None:
        self._start = self._clock()


class UpstreamState:
    """Tracks the gateway's epoch and address; `generation` grows each time its state is lost."""

    def __init__(self, clock: Clock, on_lost: Callable[[str], None] | None = None) -> None:
        self._clock = clock
        self._on_lost = on_lost
        self._last_epoch: tuple[int, float] | None = None
        self.address: IPv4Address | None = None
        self.generation = 0

    def saw_epoch(self, epoch: int) -> None:
        now = self._clock()
        last = self._last_epoch
        self._last_epoch = (epoch, now)
        if last is not None:
            expected = last[0] + (now - last[1]) * _EXPECTED_RATE
            if epoch < expected - _SLACK:
                self._lost("gateway epoch went backwards", previous=last[0], epoch=epoch)

    def saw_address(self, address: IPv4Address) -> None:
        previous, self.address = self.address, address
        if previous is not None and previous != address:
            self._lost("gateway public address changed", previous=str(previous),
                       address=str(address))

    def _lost(self, why: str, **fields: object) -> None:
        self.generation += 1
        log.warning("%s; upstream mappings are lost, epoch reset", why,
                    extra={"event": "upstream.reset", **fields})
        if self._on_lost is not None:
            self._on_lost(why)
