"""One warning per client and reason per period, however often the reason recurs.

A client hammering past its quota, or every request while the router is down, must be
one WARNING per period, not a flood. The reason is a short stable code ("quota",
"router-down"...), never the message: messages carry changing details (a countdown to
the next connection attempt, a port), which made every record look new.
"""

from __future__ import annotations

from collections.abc import Hashable

from doublenat.engine.contracts import Clock

PERIOD = 10.0
_MAX_MARKS = 10_000


class Throttle:
    def __init__(self, clock: Clock, period: float = PERIOD) -> None:
        self._clock = clock
        self.period = period
        self._last: dict[tuple[Hashable, str], float] = {}

    def allow(self, who: Hashable, reason: str) -> bool:
        """True if this (who, reason) has not been allowed within the period."""
        now = self._clock()
        mark = (who, reason)
        last = self._last.get(mark)
        if last is not None and now - last < self.period:
            return False
        self._last[mark] = now
        if len(self._last) > _MAX_MARKS:
            # Bounded memory: marks older than the period no longer throttle anything.
            self._last = {m: t for m, t in self._last.items() if now - t < self.period}
        return True
