"""Seconds Since Start of Epoch, and noticing when the gateway lost its mappings.

doublenat's epoch starts when it starts and restarts whenever the upstream state is
lost: the gateway's own epoch runs backwards (RFC 6886 3.6's client rule) or its public
address changes (a VPN reconnect to another server). Clients that see our epoch go back
re-create their mappings; doublenat re-maps every live mapping itself (engine.upkeep).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Literal

from doublenat.engine.contracts import Clock
from doublenat.engine.events import mapping_fields

log = logging.getLogger("doublenat.epoch")

# RFC 6886 3.6: a client expects at least 7/8 of the elapsed time, with 2 s of slack.
_EXPECTED_RATE = 7 / 8
_SLACK = 2.0

Shown = Literal["epoch", "address"]


class Epoch:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.started = clock()  # a reading of `clock`; moves forward on reset

    def seconds(self, now: float | None = None) -> int:
        """Seconds since the epoch began, at `now` (a reading of `clock`) or now."""
        return int((self.clock() if now is None else now) - self.started)

    def reset(self) -> None:
        self.started = self.clock()


class UpstreamState:
    """The gateway's epoch and address as last seen; `generation` grows each time its
    state is lost. Every valid reply passes through `saw_epoch`."""

    def __init__(self, clock: Clock,
                 on_lost: Callable[[Shown, str], None] | None = None) -> None:
        self._clock = clock
        self._on_lost = on_lost
        self._last_epoch: tuple[int, float] | None = None
        self.address: IPv4Address | None = None
        self.generation = 0
        self.losses = 0
        self.last_answer_at: float | None = None  # any valid reply from the gateway
        self.answers = 0  # valid replies so far
        self.epoch: int | None = None

    def saw_epoch(self, epoch: int) -> None:
        now = self._clock()
        self.last_answer_at = now
        self.answers += 1
        self.epoch = epoch
        last = self._last_epoch
        self._last_epoch = (epoch, now)
        if last is not None:
            expected = last[0] + (now - last[1]) * _EXPECTED_RATE
            if epoch < expected - _SLACK:
                self._lost("epoch", f"the gateway's epoch went back from {last[0]} to {epoch}",
                           previous=last[0], epoch=epoch)

    def saw_address(self, address: IPv4Address) -> None:
        previous, self.address = self.address, address
        if previous is not None and previous != address:
            self._lost("address", f"the gateway's public address changed from {previous} to "
                       f"{address}", previous=str(previous), address=str(address))

    def _lost(self, shown: Shown, why: str, **fields: object) -> None:
        self.generation += 1
        self.losses += 1
        log.warning("upstream mappings lost (VPN reconnect?); epoch reset, re-mapping",
                    extra=mapping_fields("upstream.lost", None, None, {
                        "shown_by": shown, "reason": why, "generation": self.generation,
                        **fields}))
        if self._on_lost is not None:
            self._on_lost(shown, why)
