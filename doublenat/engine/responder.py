"""From a client's datagram to doublenat's answer: policy, dispatch and the reply bytes.

No sockets here: the UDP front calls `respond(data, source)` and sends what it returns.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

from doublenat.engine.address import AddressService
from doublenat.engine.epoch import Epoch
from doublenat.engine.mapper import Mapper
from doublenat.engine.ratelimit import RateLimiter
from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Reply,
    Result,
    UnknownOpcodeRequest,
    UnsupportedOpcodeReply,
    UnsupportedVersionReply,
    map_failure,
    pack_reply,
    parse_request,
)

log = logging.getLogger("doublenat.requests")


class Responder:
    def __init__(
        self,
        mapper: Mapper,
        addresses: AddressService,
        epoch: Epoch,
        allowed: Sequence[IPv4Network],
        limiter: RateLimiter | None = None,
    ) -> None:
        self.mapper = mapper
        self.addresses = addresses
        self.epoch = epoch
        self.limiter = limiter
        # Integer masks: the allow-list check runs for every datagram.
        self._allowed = [(int(n.network_address), int(n.netmask)) for n in allowed]
        self.counts: Counter[str] = Counter()  # "op<N>.result<R>", "denied", "dropped", ...

    def allowed(self, client: IPv4Address) -> bool:
        value = int(client)
        return any(value & mask == network for network, mask in self._allowed)

    def respond(self, data: bytes, source: tuple[str, int]) -> bytes | None:
        """The reply to send back to `source`, or None to stay silent."""
        client = self.admit(source)
        return None if client is None else self.answer(data, client)

    def admit(self, source: tuple[str, int]) -> IPv4Address | None:
        """The client, if this source may be served now (allow-list, rate limit)."""
        host, port = source[0], source[1]
        try:
            client = IPv4Address(host)
        except ValueError:
            return None
        if port == 0 or not self.allowed(client):
            self.counts["denied"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request from a source outside ALLOWED_CLIENTS dropped",
                          extra={"event": "request.denied", "client": host})
            return None
        if self.limiter is not None and not self.limiter.allow(host):
            self.counts["rate_limited"] += 1
            return None
        return client

    def answer(self, data: bytes, client: IPv4Address) -> bytes | None:
        request = parse_request(data)
        if request is None:
            self.counts["dropped"] += 1
            return None
        reply = self._answer(client, request)
        self.counts[f"op{data[1]}.result{int(_result_of(reply))}"] += 1
        return pack_reply(reply)

    def _answer(
        self, client: IPv4Address, request: object
    ) -> Reply:
        if isinstance(request, MapRequest):
            outcome = self.mapper.handle(client, request)
            epoch = self.epoch.seconds()
            if outcome.result != Result.SUCCESS:
                return map_failure(request, epoch, outcome.result)
            if request.lifetime == 0:
                return MapReply(request.proto, epoch, Result.SUCCESS, request.internal_port, 0, 0)
            lifetime = max(1, min(request.lifetime, self.mapper.config.max_lifetime,
                                  outcome.lifetime))
            return MapReply(request.proto, epoch, Result.SUCCESS, request.internal_port,
                            outcome.external_port, lifetime)
        if isinstance(request, AddressRequest):
            result, address = self.addresses.lookup()
            return AddressReply(self.epoch.seconds(), result, address)
        if isinstance(request, UnknownOpcodeRequest):
            return UnsupportedOpcodeReply(self.epoch.seconds(), request.raw)
        return UnsupportedVersionReply(self.epoch.seconds())


def _result_of(reply: Reply) -> Result:
    if isinstance(reply, UnsupportedVersionReply):
        return Result.UNSUPPORTED_VERSION
    if isinstance(reply, UnsupportedOpcodeReply):
        return Result.UNSUPPORTED_OPCODE
    return reply.result
