"""The VPN gateway's NAT-PMP server, as doublenat's upstream (the `Gateway` contract).

One connected UDP socket (the kernel then accepts datagrams from the gateway's address
and port only), one reader greenlet handing replies to whoever waits for them, and the
RFC 6886 3.1 retransmission schedule (250 ms, doubling) cut off at a bounded budget.
Replies are checked strictly: exact size, version 0, the right opcode, our internal port.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Hashable

import gevent
from gevent.event import AsyncResult

from doublenat import stats
from doublenat.engine.contracts import AddressAnswer, Clock, GatewayError, MapAnswer, monotonic
from doublenat.engine.locks import KeyedLocks
from doublenat.protocol.natpmp import (
    RESPONSE_BIT,
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Result,
    pack_request,
    parse_reply,
)
from doublenat.settings import Endpoint

log = logging.getLogger("doublenat.upstream")

_FIRST_WAIT = 0.25
# RFC 6886 3.4 lets deletes be retried fewer times: 0, 0.25 and 0.75 s, then give up.
_DELETE_BUDGET = 1.0


class NatPmpClient:
    def __init__(self, gateway: Endpoint, budget: float = 3.0, clock: Clock = monotonic,
                 observe_request: Callable[[float], None] | None = None) -> None:
        self.gateway = gateway
        self.budget = budget
        self._clock = clock
        self._socket: socket.socket | None = None
        self._reader: gevent.Greenlet | None = None
        # key -> (the waiter, does a successful answer carry lifetime 0: a delete?)
        self._waiting: dict[Hashable, tuple[AsyncResult, bool]] = {}
        self._serial: KeyedLocks[Hashable] = KeyedLocks()
        self.sent = 0
        self.retransmitted = 0
        self.timeouts = 0
        self.ignored = 0
        self.latencies = stats.samples()
        self.observe_request = observe_request  # seconds of each answered exchange (metrics)
        self.last_timeout_at: float | None = None  # on the clock: for /status and /healthz

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((self.gateway.host, self.gateway.port))
        self._socket = sock
        self._reader = gevent.spawn(self._read_replies)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.kill()
            self._reader = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        for waiter, _ in self._waiting.values():
            waiter.set_exception(GatewayError("client closed"))
        self._waiting.clear()

    # --------------------------------------------------------------- contract

    def public_address(self) -> AddressAnswer:
        reply = self._exchange(RESPONSE_BIT, pack_request(AddressRequest()), self.budget, False)
        assert isinstance(reply, AddressReply)
        return AddressAnswer(reply.result, reply.address, reply.epoch)

    def map(
        self, proto: Proto, internal_port: int, suggested_port: int, lifetime: int
    ) -> MapAnswer:
        request = MapRequest(proto, internal_port, suggested_port, lifetime)
        budget = self.budget if lifetime else min(self.budget, _DELETE_BUDGET)
        reply = self._exchange(
            (RESPONSE_BIT | proto, internal_port), pack_request(request), budget, lifetime == 0
        )
        assert isinstance(reply, MapReply)
        return MapAnswer(reply.result, reply.external_port, reply.lifetime, reply.epoch)

    # -------------------------------------------------------------- internals

    def _exchange(self, key: Hashable, packet: bytes, budget: float,
                  deleting: bool) -> AddressReply | MapReply:
        if self._socket is None:
            raise GatewayError("upstream client is not started")
        with self._serial.hold(key):
            waiter = AsyncResult()
            self._waiting[key] = (waiter, deleting)
            started = self._clock()
            deadline = started + budget
            wait = _FIRST_WAIT
            try:
                while (left := deadline - self._clock()) > 0:
                    if wait != _FIRST_WAIT:
                        self.retransmitted += 1
                    self._send(packet)
                    waiter.wait(min(wait, left))
                    if waiter.ready():
                        reply = waiter.get()  # raises if the client was closed meanwhile
                        elapsed = self._clock() - started
                        self.latencies.append(elapsed)
                        if self.observe_request is not None:
                            self.observe_request(elapsed)
                        return reply
                    wait *= 2
            finally:
                self._waiting.pop(key, None)
            self.timeouts += 1
            self.last_timeout_at = self._clock()
            raise GatewayError(
                f"no valid answer from VPN_GATEWAY {self.gateway} within {budget:g} s"
            )

    def _send(self, packet: bytes) -> None:
        assert self._socket is not None
        try:
            self._socket.send(packet)
            self.sent += 1
        except OSError as exc:
            # ECONNREFUSED here reports an ICMP unreachable for an earlier datagram; the
            # schedule goes on, the gateway may be back by the next try.
            if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                raise GatewayError(f"cannot send to VPN_GATEWAY {self.gateway}: {exc}") from None

    def _read_replies(self) -> None:
        assert self._socket is not None
        sock = self._socket
        while True:
            try:
                data = sock.recv(2048)
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # ICMP for one of our datagrams; retransmission copes
                if exc.errno == errno.EBADF:
                    return
                log.warning("reading from the VPN gateway failed", extra={
                    "event": "upstream.read_error", "reason": str(exc)})
                gevent.sleep(0.1)
                continue
            reply = parse_reply(data)
            if isinstance(reply, AddressReply):
                key: Hashable = RESPONSE_BIT
            elif isinstance(reply, MapReply):
                key = (RESPONSE_BIT | reply.proto, reply.internal_port)
            else:
                key = None
            waiting = self._waiting.get(key) if key is not None else None
            if waiting is None or waiting[0].ready() or not _answers(reply, waiting[1]):
                # Malformed, late, duplicated or for someone else: drop it.
                self.ignored += 1
                continue
            waiting[0].set(reply)


def _answers(reply: AddressReply | MapReply, deleting: bool) -> bool:
    """Can this reply be the answer to the request waiting on its key? Replies name no
    request, so a late answer to a delete that timed out (lifetime 0) would otherwise be
    taken for the answer to the next mapping request on the same port, and a late grant
    for the answer to a delete."""
    if not isinstance(reply, MapReply) or reply.result != Result.SUCCESS:
        return True  # an error answers whatever was asked
    return (reply.lifetime == 0) == deleting
