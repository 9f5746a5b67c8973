"""The responder: policy, dispatch, and the answers given without a handler greenlet."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import gevent

from doublenat.engine.address import DEFAULT_TTL, REFRESH_AHEAD, STALE_FOR, AddressService
from doublenat.engine.contracts import GatewayError
from doublenat.engine.epoch import Epoch
from doublenat.engine.ratelimit import RateLimiter
from doublenat.engine.responder import LATER, Responder
from doublenat.protocol.natpmp import (
    AddressReply,
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


def test_opcode_zero_reply_is_packed_once_per_epoch_second() -> None:
    responder, _, _, gateway, clock = make_responder()
    ask = pack_request(AddressRequest())
    first = responder.answer(ask, A)
    done, again = responder.answer_now(ask, A)
    assert done and again == first
    _, same = responder.answer_now(ask + b"extra", A)  # bytes past the opcode: ignored
    assert same is again  # the very bytes, not packed again
    clock.advance(1)
    _, later = responder.answer_now(ask, A)
    assert later != again
    reply = parse_reply(later or b"")
    assert isinstance(reply, AddressReply) and reply.epoch == 1
    assert reply.result == Result.SUCCESS and reply.address == gateway.address
    assert responder.counts["op0.result0"] == 4  # the inline answers are counted too


def test_opcode_zero_reply_follows_a_new_address() -> None:
    responder, _, _, gateway, _ = make_responder()
    ask = pack_request(AddressRequest())
    responder.answer(ask, A)
    _, before = responder.answer_now(ask, A)
    gateway.address = IPv4Address("11.22.33.55")
    responder.addresses.refresh()  # the probe learns the new address
    _, after = responder.answer_now(ask, A)
    reply = parse_reply(after or b"")
    assert isinstance(reply, AddressReply) and str(reply.address) == "11.22.33.55"
    assert reply.epoch == responder.epoch.seconds() and after != before


def test_opcode_zero_reply_follows_an_epoch_reset() -> None:
    responder, _, _, _, clock = make_responder()
    ask = pack_request(AddressRequest())
    responder.answer(ask, A)
    clock.advance(5)
    _, before = responder.answer_now(ask, A)
    responder.epoch.reset()
    _, after = responder.answer_now(ask, A)
    reply = parse_reply(after or b"")
    assert isinstance(reply, AddressReply) and reply.epoch == 0 and after != before


def test_opcode_zero_past_the_ttl_is_still_answered_inline_from_the_stale_address() -> None:
    responder, _, _, gateway, clock = make_responder()
    ask = pack_request(AddressRequest())
    responder.answer(ask, A)
    gateway.fail_always = GatewayError("silent")
    clock.advance(DEFAULT_TTL + 1)
    done, raw = responder.answer_now(ask, A)
    reply = parse_reply(raw or b"")
    assert done and isinstance(reply, AddressReply) and reply.result == Result.SUCCESS
    gevent.sleep(0)  # the background refresh runs (and fails: the gateway is silent)
    assert gateway.calls["address"] == 2
    clock.advance(STALE_FOR)
    assert responder.answer_now(ask, A) == LATER  # too stale: a handler asks upstream
    responder.addresses.close()


def test_a_steady_stream_refreshes_the_address_before_it_expires() -> None:
    responder, _, _, gateway, clock = make_responder()
    ask = pack_request(AddressRequest())
    clock.advance(0.5)  # the refresh point falls inside an epoch second
    responder.answer(ask, A)
    clock.advance(DEFAULT_TTL * REFRESH_AHEAD - 0.3)
    _, first = responder.answer_now(ask, A)
    gevent.sleep(0)
    assert gateway.calls["address"] == 1  # still young: no refresh
    clock.advance(0.4)  # the same epoch second, but past the refresh point
    done, again = responder.answer_now(ask, A)
    assert done and again == first
    gevent.sleep(0)
    assert gateway.calls["address"] == 2  # refreshed in the background
    clock.advance(DEFAULT_TTL * REFRESH_AHEAD - 0.1)
    fresh = responder.addresses.fresh(clock())
    assert fresh is not None and fresh[0] == gateway.address  # young again


def test_fresh_is_none_without_an_address_or_past_the_ttl() -> None:
    responder, _, _, gateway, clock = make_responder()
    addresses = responder.addresses
    assert addresses.fresh(clock()) is None
    addresses.refresh()
    assert addresses.fresh(clock()) == (gateway.address, clock() + DEFAULT_TTL * REFRESH_AHEAD)
    gateway.delay = 1.0  # the background refresh started below does not answer in time
    assert addresses.fresh(clock() + DEFAULT_TTL - 0.01, margin=0.05) is None
    expires = clock() + DEFAULT_TTL - 0.05
    assert addresses.fresh(clock() + DEFAULT_TTL - 0.1, margin=0.05) == (gateway.address, expires)
    addresses.close()


def test_a_forgotten_address_is_not_served_from_the_packed_reply() -> None:
    responder, *_ = make_responder()
    ask = pack_request(AddressRequest())
    responder.answer(ask, A)
    assert responder.answer_now(ask, A)[0]
    responder.addresses.forget()  # e.g. the gateway said its address is gone
    assert responder.answer_now(ask, A) == LATER
