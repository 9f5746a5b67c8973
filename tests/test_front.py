"""The UDP front: bursts read in bounded batches, inline answers, the per-client reserve."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from ipaddress import IPv4Network

import gevent
import pytest

from doublenat.adapters import front
from doublenat.adapters.front import NatPmpServer
from doublenat.engine.address import AddressService
from doublenat.engine.epoch import Epoch
from doublenat.engine.ratelimit import RateLimiter
from doublenat.engine.responder import Responder
from doublenat.protocol.natpmp import AddressReply, Result, parse_reply
from tests.engine.fakes import make_mapper

ASK = b"\x00\x00"


def make_server(limiter: RateLimiter | None = None) -> NatPmpServer:
    mapper, _, gateway, clock = make_mapper()
    responder = Responder(mapper, AddressService(gateway, mapper.upstream, clock),
                          Epoch(clock), (IPv4Network("127.0.0.0/8"),), limiter)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    server = NatPmpServer(sock, responder)
    server.init_socket()  # what start() does first; the tests drive do_read themselves
    return server


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    yield sock
    sock.close()


def replies(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(64))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(0.5)


def test_cached_opcode_zero_is_answered_inline_in_bounded_batches(
        client: socket.socket) -> None:
    server = make_server()
    server.responder.addresses.refresh()  # the address is cached
    burst = front._MAX_INLINE + 10
    for _ in range(burst):
        client.sendto(ASK, server.address)
    assert server.do_read() is None  # all answered inline: nothing for a handler
    first = replies(client)
    assert len(first) == front._MAX_INLINE  # the batch stops at its bound
    assert server.do_read() is None  # the loop calls again while the socket is readable
    assert len(replies(client)) == burst - front._MAX_INLINE
    reply = parse_reply(first[0])
    assert isinstance(reply, AddressReply) and reply.result == Result.SUCCESS
    assert server.responder.counts["op0.result0"] == burst
    assert server.pool is not None and server.pool.free_count() == front.HANDLERS


def test_inline_answers_are_rate_limited(client: socket.socket) -> None:
    server = make_server(RateLimiter(1, 3, lambda: 0.0))  # a frozen clock: no refill
    server.responder.addresses.refresh()
    for _ in range(5):
        client.sendto(ASK, server.address)
    assert server.do_read() is None
    assert len(replies(client)) == 3
    assert server.responder.counts["rate_limited"] == 2
    assert server.responder.counts["op0.result0"] == 3


def test_a_request_that_must_wait_goes_to_a_handler(client: socket.socket) -> None:
    server = make_server()  # no address cached yet: a handler must ask upstream
    client.sendto(b"garbage!", server.address)  # answered inline (other version)
    client.sendto(ASK, server.address)
    request = server.do_read()
    assert request is not None and request[0] == ASK
    assert len(replies(client)) == 1
    data, who, source = request
    server.handle(data, who, source)
    reply = parse_reply(client.recv(64))
    assert isinstance(reply, AddressReply) and reply.result == Result.SUCCESS
    assert not server._busy  # the handler's hold is released


def test_a_client_holding_many_handlers_is_dropped_while_the_pool_runs_low(
        client: socket.socket) -> None:
    server = make_server()
    assert server.pool is not None
    for _ in range(front.HANDLERS - front.RESERVE):
        server.pool.spawn(gevent.sleep, 60)  # the pool is down to its reserve
    for _ in range(front.PER_CLIENT + 1):
        client.sendto(ASK, server.address)
    held = []
    while (request := server.do_read()) is not None:
        held.append(request)
    assert len(held) == front.PER_CLIENT
    assert server.busy_dropped == 1
    server.pool.kill()
