"""The NAT-PMP codec against golden bytes, and properties over arbitrary datagrams."""

from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Result,
    UnknownOpcodeRequest,
    UnsupportedOpcodeReply,
    UnsupportedVersionReply,
    UnsupportedVersionRequest,
    map_failure,
    pack_reply,
    pack_request,
    parse_reply,
    parse_request,
)

H = bytes.fromhex


# ------------------------------------------------------------- golden requests

GOLDEN_REQUESTS = [
    # opcode 0, exact and with trailing bytes (ignored)
    ("address", H("0000"), AddressRequest()),
    ("address with padding", H("0000 deadbeef"), AddressRequest()),
    # TCP 6881 -> suggest 6881 for 3600 s
    ("map tcp", H("0002 0000 1ae1 1ae1 00000e10"), MapRequest(Proto.TCP, 6881, 6881, 3600)),
    # UDP, reserved field set: ignored
    ("map udp reserved", H("0001 beef 1ae1 0000 0000003c"), MapRequest(Proto.UDP, 6881, 0, 60)),
    # delete-all of TCP
    ("delete all", H("0002 0000 0000 0000 00000000"), MapRequest(Proto.TCP, 0, 0, 0)),
    # ProtonVPN's "natpmpc -a 1 0 udp 60"
    ("proton", H("0001 0000 0000 0001 0000003c"), MapRequest(Proto.UDP, 0, 1, 60)),
    ("lifetime max", H("0002 0000 0050 0050 ffffffff"), MapRequest(Proto.TCP, 80, 80, 0xFFFFFFFF)),
    ("long map", H("0002 0000 0050 0050 00000001") + bytes(1088), MapRequest(Proto.TCP, 80, 80, 1)),
    # PCP (version 2) MAP, 60 bytes, and version 1 and 255
    ("pcp", H("0201") + bytes(58), UnsupportedVersionRequest(2, 1)),
    ("v1", H("0100"), UnsupportedVersionRequest(1, 0)),
    ("v255", H("ff7f 0000"), UnsupportedVersionRequest(255, 127)),
    (
        "unknown opcode",
        H("0003 0000 0001 0002 00000003"),
        UnknownOpcodeRequest(3, H("0003 0000 0001 0002 00000003")),
    ),
    ("unknown opcode short", H("007f"), UnknownOpcodeRequest(127, H("007f"))),
]


@pytest.mark.parametrize(
    ("name", "data", "expected"), GOLDEN_REQUESTS, ids=[g[0] for g in GOLDEN_REQUESTS]
)
def test_golden_requests(name: str, data: bytes, expected: object) -> None:
    assert parse_request(data) == expected


DROPPED = [
    ("empty", b""),
    ("one byte", H("00")),
    ("map 8 bytes", H("0002 0000 1ae1 1ae1")),
    ("map 11 bytes", H("0001 0000 1ae1 1ae1 000000")),
    ("response opcode 128", H("0080 0000 00000001 0b16212c")),
    ("response opcode 129", H("0081") + bytes(14)),
    ("response 255", H("00ff")),
    ("pcp response", H("0281") + bytes(58)),
    ("v1 response", H("0180")),
]


@pytest.mark.parametrize(("name", "data"), DROPPED, ids=[d[0] for d in DROPPED])
def test_dropped_requests(name: str, data: bytes) -> None:
    assert parse_request(data) is None


# --------------------------------------------------------------- golden replies

GOLDEN_REPLIES = [
    (
        "address",
        AddressReply(7, Result.SUCCESS, IPv4Address("11.22.33.44")),
        H("0080 0000 00000007 0b16212c"),
    ),
    (
        "address failure hides the address",
        AddressReply(7, Result.NETWORK_FAILURE, IPv4Address("11.22.33.44")),
        H("0080 0003 00000007 00000000"),
    ),
    (
        "map tcp",
        MapReply(Proto.TCP, 300, Result.SUCCESS, 6881, 40001, 60),
        H("0082 0000 0000012c 1ae1 9c41 0000003c"),
    ),
    (
        "map udp failure",
        map_failure(MapRequest(Proto.UDP, 6881, 6881, 3600), 9, Result.NETWORK_FAILURE),
        H("0081 0003 00000009 1ae1 0000 00000000"),
    ),
    (
        "delete-all echo of internal 0",
        MapReply(Proto.TCP, 1, Result.SUCCESS, 0, 0, 0),
        H("0082 0000 00000001 0000 0000 00000000"),
    ),
    ("unsupported version", UnsupportedVersionReply(1234), H("0080 0001 000004d2")),
    (
        "unknown opcode echo",
        UnsupportedOpcodeReply(5, H("0003 0000 0001 0002 00000003")),
        H("0083 0005 0001 0002 00000003"),
    ),
    ("unknown opcode short", UnsupportedOpcodeReply(5, H("007f")), H("00ff 0005 00000005")),
    ("epoch wraps", UnsupportedVersionReply(2**32 + 3), H("0080 0001 00000003")),
]


@pytest.mark.parametrize(
    ("name", "reply", "data"), GOLDEN_REPLIES, ids=[g[0] for g in GOLDEN_REPLIES]
)
def test_golden_replies(name: str, reply: object, data: bytes) -> None:
    assert pack_reply(reply) == data  # type: ignore[arg-type]


def test_reply_sizes_are_exact() -> None:
    assert len(pack_reply(AddressReply(0, Result.SUCCESS, IPv4Address("1.2.3.4")))) == 12
    assert len(pack_reply(MapReply(Proto.UDP, 0, Result.OUT_OF_RESOURCES, 1, 0, 0))) == 16
    assert len(pack_reply(UnsupportedVersionReply(0))) == 8


def test_unknown_opcode_echo_is_capped() -> None:
    request = parse_request(H("0042") + bytes(4000))
    assert isinstance(request, UnknownOpcodeRequest)
    reply = pack_reply(UnsupportedOpcodeReply(0, request.raw))
    assert len(reply) == 1100
    assert reply[:4] == H("00c2 0005")


def test_golden_client_requests() -> None:
    assert pack_request(AddressRequest()) == H("0000")
    assert pack_request(MapRequest(Proto.UDP, 51413, 0, 0)) == H("0001 0000 c8d5 0000 00000000")


# --------------------------------------------------------------- client parsing


def test_parse_reply_strict_sizes() -> None:
    good = H("0082 0000 0000012c 1ae1 9c41 0000003c")
    assert parse_reply(good) == MapReply(Proto.TCP, 300, Result.SUCCESS, 6881, 40001, 60)
    assert parse_reply(good[:12]) is None
    assert parse_reply(good + b"\x00") is None
    assert parse_reply(H("0080 0000 00000007 0b16212c 00")) is None
    assert parse_reply(H("0180 0000 00000007 0b16212c")) is None  # version 1
    assert parse_reply(H("0002 0000 0000012c 1ae1 9c41 0000003c")) is None  # a request
    assert parse_reply(H("0082 0009 0000012c 1ae1 9c41 0000003c")) is None  # result 9
    assert parse_reply(H("0080 0001 000004d2")) == UnsupportedVersionReply(1234)


# ------------------------------------------------------------------ properties

requests = st.one_of(
    st.just(AddressRequest()),
    st.builds(
        MapRequest,
        st.sampled_from(Proto),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
    ),
)

replies = st.one_of(
    st.builds(
        AddressReply,
        st.integers(0, 0xFFFFFFFF),
        st.just(Result.SUCCESS),
        st.builds(IPv4Address, st.integers(0, 0xFFFFFFFF)),
    ),
    st.builds(
        MapReply,
        st.sampled_from(Proto),
        st.integers(0, 0xFFFFFFFF),
        st.sampled_from(Result),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
    ),
    st.builds(UnsupportedVersionReply, st.integers(0, 0xFFFFFFFF)),
)


@given(requests)
def test_request_round_trip(request: AddressRequest | MapRequest) -> None:
    assert parse_request(pack_request(request)) == request


@given(replies)
def test_reply_round_trip(reply: object) -> None:
    assert parse_reply(pack_reply(reply)) == reply  # type: ignore[arg-type]


@given(st.binary(max_size=1500))
def test_parse_never_raises_and_answers_by_the_rules(data: bytes) -> None:
    request = parse_request(data)
    reply = parse_reply(data)  # the client-side parser must not raise either
    assert reply is None or len(data) in (8, 12, 16) or data[1] & 0x7F > 2
    if len(data) < 2 or data[1] >= 128:
        assert request is None
    elif data[0] != 0:
        assert request == UnsupportedVersionRequest(data[0], data[1])
        assert len(pack_reply(UnsupportedVersionReply(1))) == 8
    elif data[1] == 0:
        assert request == AddressRequest()
    elif data[1] in (1, 2):
        assert (request is None) == (len(data) < 12)
        if request is not None:
            assert isinstance(request, MapRequest)
            assert request.internal_port == int.from_bytes(data[4:6], "big")
    else:
        assert isinstance(request, UnknownOpcodeRequest)
        echoed = pack_reply(UnsupportedOpcodeReply(0, request.raw))
        assert echoed[1] == data[1] | 0x80 and echoed[2:4] == H("0005")
        assert len(echoed) == max(8, min(len(data), 1100))


@given(st.binary(min_size=12, max_size=64), st.integers(0, 0xFFFFFFFF))
def test_map_failure_echoes_internal_port(data: bytes, epoch: int) -> None:
    data = b"\x00\x02" + data[2:]
    request = parse_request(data)
    assert isinstance(request, MapRequest)
    packed = pack_reply(map_failure(request, epoch, Result.NETWORK_FAILURE))
    assert len(packed) == 16 and packed[8:10] == data[4:6] and packed[10:] == bytes(6)
