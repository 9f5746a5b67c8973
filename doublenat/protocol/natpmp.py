"""NAT-PMP (RFC 6886) wire format, both directions, with no I/O.

Server side: `parse_request` turns a datagram into a request (or None: drop it), and
`pack_reply` turns a reply into bytes. Client side (the upstream gateway, test probes):
`pack_request` and `parse_reply`.

Rules decided here, because they concern bytes only:
- fewer than 2 bytes, or an opcode with the top bit set (a response): dropped;
- version != 0: the 8-byte "unsupported version" answer (opcode 128, per erratum 3618);
- opcode 1/2 shorter than 12 bytes: dropped; bytes past what an opcode needs: ignored;
- opcode 3..127: echoed back with the top bit set and result 5.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address

PORT = 5351
VERSION = 0
RESPONSE_BIT = 0x80
U32 = 0xFFFFFFFF
# An unknown-opcode echo never grows past the PCP maximum message size.
MAX_ECHO = 1100

ADDRESS_REPLY_SIZE = 12
MAP_REQUEST_SIZE = 12
MAP_REPLY_SIZE = 16
SHORT_REPLY_SIZE = 8

_HEADER = struct.Struct("!BBH")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_ADDRESS_REPLY = struct.Struct("!BBHI4s")
_MAP_REPLY = struct.Struct("!BBHIHHI")
_SHORT_REPLY = struct.Struct("!BBHI")


class Opcode(IntEnum):
    ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class Proto(IntEnum):
    """Transport protocol of a mapping; the value is the request opcode."""

    UDP = 1
    TCP = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> Proto:
        return cls[label.upper()]


class Result(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2
    NETWORK_FAILURE = 3
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


# ---------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class AddressRequest:
    """Opcode 0: what is the external address?"""


@dataclass(frozen=True, slots=True)
class MapRequest:
    """Opcode 1 (UDP) or 2 (TCP): create, renew or delete a mapping."""

    proto: Proto
    internal_port: int
    suggested_port: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class UnsupportedVersionRequest:
    """A request of another version (PCP is 2); answered with the 8-byte NAT-PMP reply."""

    version: int
    opcode: int


@dataclass(frozen=True, slots=True)
class UnknownOpcodeRequest:
    """Version 0 with an opcode this server does not know (3..127)."""

    opcode: int
    raw: bytes


Request = AddressRequest | MapRequest | UnsupportedVersionRequest | UnknownOpcodeRequest


def parse_request(data: bytes) -> Request | None:
    """Decode a datagram from a client; None means drop it without an answer."""
    if len(data) < 2:
        return None
    version, opcode = data[0], data[1]
    if opcode & RESPONSE_BIT:
        return None  # a response, never answered: two servers must not bounce errors
    if version != VERSION:
        return UnsupportedVersionRequest(version, opcode)
    if opcode == Opcode.ADDRESS:
        return AddressRequest()
    if opcode in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        if len(data) < MAP_REQUEST_SIZE:
            return None
        _, _, _reserved, internal, suggested, lifetime = _MAP_REQUEST.unpack_from(data)
        return MapRequest(Proto(opcode), internal, suggested, lifetime)
    return UnknownOpcodeRequest(opcode, bytes(data[:MAX_ECHO]))


def pack_request(request: AddressRequest | MapRequest) -> bytes:
    if isinstance(request, AddressRequest):
        return bytes((VERSION, Opcode.ADDRESS))
    return _MAP_REQUEST.pack(
        VERSION,
        request.proto,
        0,
        request.internal_port,
        request.suggested_port,
        request.lifetime & U32,
    )


# ------------------------------------------------------------------ replies


@dataclass(frozen=True, slots=True)
class AddressReply:
    epoch: int
    result: Result
    address: IPv4Address


@dataclass(frozen=True, slots=True)
class MapReply:
    proto: Proto
    epoch: int
    result: Result
    internal_port: int
    external_port: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class UnsupportedVersionReply:
    epoch: int


@dataclass(frozen=True, slots=True)
class UnsupportedOpcodeReply:
    epoch: int
    request: bytes


Reply = AddressReply | MapReply | UnsupportedVersionReply | UnsupportedOpcodeReply

NO_ADDRESS = IPv4Address(0)


def pack_reply(reply: Reply) -> bytes:
    if isinstance(reply, MapReply):
        return _MAP_REPLY.pack(
            VERSION,
            RESPONSE_BIT | reply.proto,
            reply.result,
            reply.epoch & U32,
            reply.internal_port,
            reply.external_port,
            reply.lifetime & U32,
        )
    if isinstance(reply, AddressReply):
        # RFC 6886 3.2: a failed lookup carries 0.0.0.0, whatever address is known.
        address = reply.address if reply.result == Result.SUCCESS else NO_ADDRESS
        return _ADDRESS_REPLY.pack(
            VERSION, RESPONSE_BIT, reply.result, reply.epoch & U32, address.packed
        )
    if isinstance(reply, UnsupportedVersionReply):
        return _SHORT_REPLY.pack(
            VERSION, RESPONSE_BIT, Result.UNSUPPORTED_VERSION, reply.epoch & U32
        )
    raw = reply.request
    opcode = raw[1] | RESPONSE_BIT
    if len(raw) < SHORT_REPLY_SIZE:
        # Too short to echo past the header: give the 8-byte form with the epoch.
        return _SHORT_REPLY.pack(VERSION, opcode, Result.UNSUPPORTED_OPCODE, reply.epoch & U32)
    return _HEADER.pack(VERSION, opcode, Result.UNSUPPORTED_OPCODE) + raw[4:MAX_ECHO]


def parse_reply(data: bytes) -> Reply | None:
    """Decode a server's answer strictly: exact sizes, version 0, a known result code.

    Used for the upstream gateway and by test probes; anything else is None.
    """
    if len(data) < SHORT_REPLY_SIZE or data[0] != VERSION or not data[1] & RESPONSE_BIT:
        return None
    opcode = data[1] & ~RESPONSE_BIT
    try:
        result = Result(_HEADER.unpack_from(data)[2])
    except ValueError:
        return None
    if opcode == Opcode.ADDRESS:
        if len(data) == ADDRESS_REPLY_SIZE:
            _, _, _, epoch, raw_address = _ADDRESS_REPLY.unpack(data)
            return AddressReply(epoch, result, IPv4Address(raw_address))
        if len(data) == SHORT_REPLY_SIZE and result == Result.UNSUPPORTED_VERSION:
            return UnsupportedVersionReply(_SHORT_REPLY.unpack(data)[3])
        return None
    if opcode in (Opcode.MAP_UDP, Opcode.MAP_TCP) and len(data) == MAP_REPLY_SIZE:
        _, _, _, epoch, internal, external, lifetime = _MAP_REPLY.unpack(data)
        return MapReply(Proto(opcode), epoch, result, internal, external, lifetime)
    if result == Result.UNSUPPORTED_OPCODE:
        return UnsupportedOpcodeReply(_SHORT_REPLY.unpack_from(data)[3], bytes(data))
    return None


def map_failure(request: MapRequest, epoch: int, result: Result) -> MapReply:
    """The complete 16-byte error answer: internal port echoed, nothing granted."""
    return MapReply(request.proto, epoch, result, request.internal_port, 0, 0)
