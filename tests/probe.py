"""A tiny NAT-PMP client for tests: sends from a chosen loopback source, parses strictly."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Reply,
    pack_request,
    parse_reply,
)


class Probe:
    def __init__(self, server: tuple[str, int], source: str = "127.0.0.1") -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((source, 0))
        self.sock.connect(server)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def receive(self, timeout: float = 2.0) -> bytes | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(2048)
        except (TimeoutError, ConnectionRefusedError):  # nothing, or nobody, answered
            return None

    def raw(self, data: bytes, timeout: float = 2.0) -> bytes | None:
        self.send(data)
        return self.receive(timeout)

    def ask(self, request: AddressRequest | MapRequest, timeout: float = 5.0) -> Reply | None:
        data = self.raw(pack_request(request), timeout)
        return None if data is None else parse_reply(data)

    def address(self, timeout: float = 5.0) -> AddressReply:
        reply = self.ask(AddressRequest(), timeout)
        assert isinstance(reply, AddressReply), reply
        return reply

    def map(
        self,
        proto: Proto,
        internal: int,
        suggested: int = 0,
        lifetime: int = 60,
        timeout: float = 8.0,
    ) -> MapReply:
        reply = self.ask(MapRequest(proto, internal, suggested, lifetime), timeout)
        assert isinstance(reply, MapReply), reply
        assert reply.proto is proto and reply.internal_port == internal
        return reply

    def tcp(self, internal: int, suggested: int = 0, lifetime: int = 60) -> MapReply:
        return self.map(Proto.TCP, internal, suggested, lifetime)

    def udp(self, internal: int, suggested: int = 0, lifetime: int = 60) -> MapReply:
        return self.map(Proto.UDP, internal, suggested, lifetime)


@contextmanager
def probe(server: tuple[str, int], source: str = "127.0.0.1") -> Iterator[Probe]:
    p = Probe(server, source)
    try:
        yield p
    finally:
        p.close()
