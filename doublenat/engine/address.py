"""Opcode 0: the VPN gateway's public address, asked once for many clients.

Concurrent requests share one upstream query and a recent answer is reused for a short
while, so a burst of opcode-0 requests (natpmpc sends one before every mapping) costs
the gateway one round trip.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from doublenat.engine.contracts import Clock, Gateway, GatewayError, monotonic
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.locks import Joiner
from doublenat.protocol.natpmp import NO_ADDRESS, Result

log = logging.getLogger("doublenat.address")

DEFAULT_TTL = 10.0


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
        self._cached: tuple[float, Result, IPv4Address] | None = None
        self._joiner: Joiner[str, tuple[Result, IPv4Address]] = Joiner()
        self.queries = 0

    def cached(self, margin: float = 0.0) -> bool:
        """Would `lookup()` answer from its cache (for `margin` seconds more at least)?"""
        cached = self._cached
        return cached is not None and self.clock() - cached[0] < self.ttl - margin

    def lookup(self) -> tuple[Result, IPv4Address]:
        cached = self._cached
        if cached is not None and self.clock() - cached[0] < self.ttl:
            return cached[1], cached[2]
        return self._joiner.run("address", self.refresh)

    def refresh(self) -> tuple[Result, IPv4Address]:
        self.queries += 1
        try:
            answer = self.gateway.public_address()
        except GatewayError as exc:
            log.warning("VPN gateway did not tell its public address", extra={
                "event": "upstream.address_failed", "reason": str(exc)})
            self._cached = None
            return Result.NETWORK_FAILURE, NO_ADDRESS
        self.upstream.saw_epoch(answer.epoch)
        if answer.result != Result.SUCCESS:
            self._cached = None
            return answer.result, NO_ADDRESS
        self.upstream.saw_address(answer.address)
        self._cached = (self.clock(), Result.SUCCESS, answer.address)
        return Result.SUCCESS, answer.address

    def forget(self) -> None:
        self._cached = None
