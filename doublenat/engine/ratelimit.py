"""Per-source token buckets: one client flooding cannot starve the others."""

from __future__ import annotations

from doublenat.engine.contracts import Clock, monotonic

# Buckets idle this long are full again anyway; dropping them bounds memory.
_IDLE = 60.0


class RateLimiter:
    def __init__(self, rate: float, burst: int, clock: Clock = monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, updated)
        self._next_prune = clock() + _IDLE

    def allow(self, source: str) -> bool:
        now = self.clock()
        tokens, updated = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        if now >= self._next_prune:
            self._prune(now)
        return allowed

    def _prune(self, now: float) -> None:
        self._buckets = {s: b for s, b in self._buckets.items() if now - b[1] < _IDLE}
        self._next_prune = now + _IDLE

    def __len__(self) -> int:
        return len(self._buckets)
