"""The responder: policy, dispatch, and the answers given without a handler greenlet."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import gevent

from doublenat.engine.address import AddressService
from doublenat.engine.epoch import Epoch
from doublenat.engine.ratelimit import RateLimiter
from doublenat.engine.responder import LATER, Responder
from doublenat.protocol.natpmp import (
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Result,
    pack_request,
    parse_reply,
)
from tests.engine.fakes import make_mapper

A = IPv4Address("192.168.88.20")
LAN = (IPv4Network("192.168.88.0/24"),)


def make_responder(**limits: float):  # type: ignore[no-untyped-def]
    mapper, router, gateway, clock = make_mapper()
    limiter = RateLimiter(limits["rate"], int(limits["burst"]), clock) if limits else None
    responder = Responder(
        mapper, AddressService(gateway, mapper.upstream, clock), Epoch(clock), LAN, limiter
    )
    return responder, mapper, router, gateway, clock


def test_admit_applies_the_allow_list_and_remembers_verdicts() -> None:
    responder, *_ = make_responder()
    assert responder.admit(("192.168.88.20", 5000)) == A
    assert responder.admit(("10.0.0.1", 5000)) is None
    assert responder.admit(("10.0.0.1", 5000)) is None  # from the verdict cache
    assert responder.admit(("192.168.88.20", 0)) is None  # a reply could not be delivered
    assert responder.admit(("::1", 5000)) is None
    assert responder.counts["denied"] == 3


def test_rate_limit_per_source() -> None:
    responder, *_ = make_responder(rate=1, burst=2)
    assert [responder.admit(("192.168.88.20", 1)) is not None for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert responder.admit(("192.168.88.21", 1)) is not None
    assert responder.counts["rate_limited"] == 1


def test_opcode_zero_is_answered_inline_only_from_the_cache() -> None:
    responder, _, _, gateway, _ = make_responder()
    ask = pack_request(AddressRequest())
    assert responder.answer_now(ask, A) == LATER  # nothing cached: a handler asks upstream
    responder.answer(ask, A)
    done, reply = responder.answer_now(ask, A)
    assert done and reply is not None and len(reply) == 12
    assert gateway.calls["address"] == 1


def test_garbage_and_other_versions_are_answered_inline() -> None:
    responder, *_ = make_responder()
    assert responder.answer_now(b"\x00", A) == (True, None)
    done, reply = responder.answer_now(b"\x02\x01" + bytes(58), A)
    assert done and reply is not None and reply[:4] == bytes.fromhex("00800001")
    assert responder.answer_now(b"\x00\x02\x00", A) == (True, None)  # short map: dropped


def test_a_fresh_renewal_is_answered_inline_without_the_gateway() -> None:
    responder, _, router, gateway, clock = make_responder()
    request = pack_request(MapRequest(Proto.TCP, 6881, 6881, 60))
    assert responder.answer_now(request, A) == LATER  # a creation needs a handler
    first = parse_reply(responder.answer(request, A) or b"")
    clock.advance(1)
    done, raw = responder.answer_now(request, A)
    again = parse_reply(raw or b"")
    assert done and isinstance(first, MapReply) and isinstance(again, MapReply)
    assert again.external_port == first.external_port and again.result == Result.SUCCESS
    assert gateway.calls["renew"] == 0 and router.writes == 1
    clock.advance(10)  # past the fresh window (1/8 of 60 s)
    assert responder.answer_now(request, A) == LATER
    delete = pack_request(MapRequest(Proto.TCP, 6881, 0, 0))
    assert responder.answer_now(delete, A) == LATER  # deletes always get a handler


def test_a_renewal_of_a_busy_mapping_waits_for_a_handler() -> None:
    responder, mapper, _, gateway, _ = make_responder()
    request = MapRequest(Proto.TCP, 6881, 6881, 60)
    responder.answer(pack_request(request), A)
    gateway.delay = 0.05
    deleting = gevent.spawn(mapper.handle, A, MapRequest(Proto.TCP, 6881, 0, 0))
    gevent.sleep(0.01)  # the delete holds the mapping's lock
    assert responder.answer_now(pack_request(request), A) == LATER
    deleting.join()
