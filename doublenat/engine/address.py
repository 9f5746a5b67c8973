"""Opcode 0: the VPN gateway's public address, asked once for many clients.

Concurrent requests share one upstream query and a recent answer is reused for a short
while (TTL, 10 s), so a burst of opcode-0 requests (natpmpc sends one before every
mapping) costs the gateway one round trip.

While requests keep coming, the address is refreshed in the background a little before
the TTL runs out (REFRESH_AHEAD), so a steady stream of opcode-0 requests keeps being
answered from a fresh cache and never waits for the gateway.

Once the cache is older than that, the last known address is still served at once
while a refresh runs in the background, as long as no upstream loss was seen since it
was learned and the gateway answered anything within STALE_FOR (120 s); a refresh that
fails is retried in the background. natpmpc asks opcode 0 before every mapping, and a
short gateway blip must not stop renewals that are answered from valid leases (SPEC §3);
nor may the answer wait for the gateway's retransmission budget: natpmpc retransmits
meanwhile, and the answers to its retransmissions, arriving after it moved on to its
mapping request, are read by it as the mapping's answer. Result 3 only when no address
was ever known or the outage outlived that.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

import gevent

from doublenat.engine.contracts import Clock, Gateway, GatewayError, monotonic
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.locks import Joiner
from doublenat.protocol.natpmp import NO_ADDRESS, Result

log = logging.getLogger("doublenat.address")

DEFAULT_TTL = 10.0
STALE_FOR = 120.0
# Fraction of the TTL after which a request starts a background refresh.
REFRESH_AHEAD = 0.8
_RETRY_EVERY = 2.0


class AddressService:
    def __init__(
        self,
        gateway: Gateway,
        upstream: UpstreamState,
        clock: Clock = monotonic,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.clock = clock
        self.ttl = ttl
        # (when, address, upstream generation it was learned in)
        self._cached: tuple[float, IPv4Address, int] | None = None
        self.changes = 0  # grows whenever the cache is set or dropped
        self._retrier: gevent.Greenlet | None = None
        self._joiner: Joiner[str, tuple[Result, IPv4Address]] = Joiner()
        self.queries = 0

    def cached(self, margin: float = 0.0) -> bool:
        """Would `lookup()` answer at once (for `margin` seconds more at least)?"""
        cached = self._cached
        if cached is None:
            return False
        return self.clock() - cached[0] < self.ttl - margin or self._stale_ok(margin)

    def fresh(self, now: float, margin: float = 0.0) -> tuple[IPv4Address, float] | None:
        """(address, until) while the cached address is younger than the TTL (for
        `margin` seconds more at least), else None; `now` is a reading of `clock`.

        The hot path of opcode 0: no lookup, no stale rules. Until `until` (and while
        `changes` stays the same) the answer would be the same with nothing to do, so a
        caller may keep it. Past REFRESH_AHEAD of the TTL it starts the background
        refresh, so under steady load the address never ages past the TTL.
        """
        cached = self._cached
        if cached is None:
            return None
        ahead, expires = cached[0] + self.ttl * REFRESH_AHEAD, cached[0] + self.ttl - margin
        if now < ahead:
            return cached[1], ahead
        if now >= expires:
            return None
        if self._retrier is None:
            self._retrier = gevent.spawn(self._retry)
        return cached[1], expires

    def lookup(self) -> tuple[Result, IPv4Address]:
        cached = self._cached
        if cached is not None and self.clock() - cached[0] < self.ttl:
            return Result.SUCCESS, cached[1]
        if cached is not None and self._stale_ok():
            if self._retrier is None:
                self._retrier = gevent.spawn(self._retry)
            return Result.SUCCESS, cached[1]
        return self._joiner.run("address", self.refresh)

    def _stale_ok(self, margin: float = 0.0) -> bool:
        cached, last = self._cached, self.upstream.last_answer_at
        return (cached is not None and last is not None
                and cached[2] == self.upstream.generation
                and self.clock() - last < STALE_FOR - margin)

    def refresh(self) -> tuple[Result, IPv4Address]:
        """Ask the gateway now (the probe also calls this)."""
        self.queries += 1
        try:
            answer = self.gateway.public_address()
        except GatewayError as exc:
            log.warning("VPN gateway did not tell its public address", extra={
                "event": "upstream.address_failed", "reason": str(exc)})
            return Result.NETWORK_FAILURE, NO_ADDRESS
        self.upstream.saw_epoch(answer.epoch)
        if answer.result != Result.SUCCESS:
            self._set(None)
            return answer.result, NO_ADDRESS
        self.upstream.saw_address(answer.address)
        self._set((self.clock(), answer.address, self.upstream.generation))
        return Result.SUCCESS, answer.address

    def _retry(self) -> None:
        """Refresh in the background until it works (or stale serving ends)."""
        try:
            while True:
                result, _ = self.refresh()
                if result == Result.SUCCESS or not self._stale_ok():
                    return
                gevent.sleep(_RETRY_EVERY)
        finally:
            self._retrier = None

    def _set(self, cached: tuple[float, IPv4Address, int] | None) -> None:
        self._cached = cached
        self.changes += 1

    def forget(self) -> None:
        self._set(None)

    def close(self) -> None:
        if self._retrier is not None:
            self._retrier.kill()
