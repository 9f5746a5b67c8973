"""From a client's datagram to doublenat's answer: policy, dispatch and the reply bytes.

No sockets here: for every datagram the UDP front asks `admit` (allow-list, rate limit),
sends at once what `answer_now` can answer, and hands the rest to a handler greenlet,
which calls `answer`.

Requests that cannot wait on anything (a malformed datagram, another version, an unknown
opcode, opcode 0 while the address is cached) are answered by `answer_now` right where
the front reads them, without a handler greenlet; the rest go to a handler (`answer`).

Opcode 0 with a fresh address is the hot path (natpmpc asks it before every mapping, and
floods are mostly it): its 12 bytes depend only on the epoch second and the address, so
they are packed at most once per second and reused (no parsing, no reply objects) until
the second ends, the address changes or reaches its refresh point, or the epoch restarts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import cast

from doublenat.engine.address import AddressService
from doublenat.engine.epoch import Epoch
from doublenat.engine.mapper import Mapper, Outcome
from doublenat.engine.ratelimit import RateLimiter
from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Opcode,
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

# answer_now's "a handler must do this": it may wait on the router or the gateway.
LATER: tuple[bool, bytes | None] = (False, None)
# Sources remembered by admit() (the allow-list verdict per address); cleared when full.
_ADMIT_CACHE = 4096
_DENIED, _NOT_IPV4 = "denied", "not IPv4"
_CACHE_MARGIN = 0.05  # seconds
_ADDRESS_REQUEST = b"\x00\x00"  # version 0, opcode 0 (longer datagrams: the rest ignored)
_ADDRESS_SUCCESS = f"op{int(Opcode.ADDRESS)}.result{int(Result.SUCCESS)}"  # as _count names it


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
        self._sources: dict[str, IPv4Address | str] = {}  # host -> client or a refusal
        self._count_keys: dict[tuple[int, int], str] = {}
        # The last opcode-0 success packed: (valid until, address cache's `changes`,
        # epoch start, reply bytes); valid until the epoch second or the address's
        # freshness ends, whichever is first.
        self._address_reply: tuple[float, int, float, bytes] = (float("-inf"), -1, 0.0, b"")

    def allowed(self, client: IPv4Address) -> bool:
        value = int(client)
        return any(value & mask == network for network, mask in self._allowed)

    def admit(self, source: tuple[str, int]) -> IPv4Address | None:
        """The client, if this source may be served now (allow-list, rate limit)."""
        host, port = source[0], source[1]
        sources = self._sources
        try:
            client = sources[host]
        except KeyError:
            client = self._classify(host)
            if len(sources) >= _ADMIT_CACHE:
                sources.clear()
            sources[host] = client
        if client is _NOT_IPV4:
            return None
        if client is _DENIED or port == 0:
            self.counts["denied"] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request from a source outside ALLOWED_CLIENTS dropped",
                          extra={"event": "request.denied", "client": host})
            return None
        if self.limiter is not None and not self.limiter.allow(host):
            self.counts["rate_limited"] += 1
            return None
        return cast(IPv4Address, client)

    def _classify(self, host: str) -> IPv4Address | str:
        try:
            client = IPv4Address(host)
        except ValueError:
            return _NOT_IPV4
        return client if self.allowed(client) else _DENIED

    def answer_now(self, data: bytes, client: IPv4Address) -> tuple[bool, bytes | None]:
        """(True, reply or None for silence) when the answer needs no waiting; else LATER.

        Safe to call from the event loop itself: nothing on the (True, ...) path yields.
        """
        if data[:2] == _ADDRESS_REQUEST:
            now = self.epoch.clock()
            until, changes, started, reply = self._address_reply
            if (now >= until or changes != self.addresses.changes
                    or started != self.epoch.started):
                reply = self._pack_address_reply(now)
            if reply is not None:
                self.counts[_ADDRESS_SUCCESS] += 1
                return True, reply
            if not self.addresses.cached(_CACHE_MARGIN):
                return LATER
            return True, self.answer(data, client)  # stale but servable
        if len(data) >= 2 and data[0] == 0:
            opcode = data[1]
            if opcode in (1, 2):
                request = parse_request(data)
                if not isinstance(request, MapRequest):
                    return True, self.answer(data, client)  # too short: dropped
                outcome = self.mapper.renew_now(client, request)
                if outcome is None:
                    return LATER
                return True, self._count(data, self._map_reply(request, outcome))
        return True, self.answer(data, client)

    def _pack_address_reply(self, now: float) -> bytes | None:
        """Opcode 0's success reply while the cached address is fresh, else None."""
        fresh = self.addresses.fresh(now, _CACHE_MARGIN)
        if fresh is None:
            return None
        address, until = fresh
        seconds = self.epoch.seconds(now)
        reply = pack_reply(AddressReply(seconds, Result.SUCCESS, address))
        # The bytes depend on the epoch second and the address alone.
        second_ends = self.epoch.started + seconds + 1
        self._address_reply = (min(until, second_ends), self.addresses.changes,
                               self.epoch.started, reply)
        return reply

    def answer(self, data: bytes, client: IPv4Address) -> bytes | None:
        request = parse_request(data)
        if request is None:
            self.counts["dropped"] += 1
            return None
        return self._count(data, self._answer(client, request))

    def _count(self, data: bytes, reply: Reply) -> bytes:
        key = (data[1], _result_of(reply))
        name = self._count_keys.get(key)
        if name is None:
            name = self._count_keys[key] = f"op{key[0]}.result{int(key[1])}"
        self.counts[name] += 1
        return pack_reply(reply)

    def _map_reply(self, request: MapRequest, outcome: Outcome) -> MapReply:
        epoch = self.epoch.seconds()  # after the work: it may have reset the epoch
        if outcome.result != Result.SUCCESS:
            return map_failure(request, epoch, outcome.result)
        if request.lifetime == 0:
            return MapReply(request.proto, epoch, Result.SUCCESS, request.internal_port, 0, 0)
        lifetime = max(1, min(request.lifetime, self.mapper.settings.max_lifetime,
                              outcome.lifetime))
        return MapReply(request.proto, epoch, Result.SUCCESS, request.internal_port,
                        outcome.external_port, lifetime)

    def _answer(
        self, client: IPv4Address, request: object
    ) -> Reply:
        if isinstance(request, MapRequest):
            return self._map_reply(request, self.mapper.handle(client, request))
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
