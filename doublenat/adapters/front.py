"""The LAN-facing UDP socket: a gevent DatagramServer spawning handlers from a Pool.

A full pool stops reading (the kernel queue holds the burst); sources that may not be
served are dropped while reading, before a greenlet is spent on them.
"""

from __future__ import annotations

import errno
import logging
import socket
from ipaddress import IPv4Address

from gevent.pool import Pool
from gevent.server import DatagramServer

from doublenat.engine.responder import Responder
from doublenat.settings import Endpoint

log = logging.getLogger("doublenat.server")

HANDLERS = 100
# Larger than any request we answer (PCP's 1100 bytes), so nothing is cut silently.
_MAX_DATAGRAM = 8192
# Drops handled inline per wake-up, so a flood cannot keep the hub in one read loop.
_MAX_INLINE_DROPS = 64
_RECEIVE_BUFFER = 1 << 20


class BindError(OSError):
    pass


def bind_udp(listen: Endpoint) -> socket.socket:
    """The listening socket; no SO_REUSEADDR, so a second instance fails loudly."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        sock.bind((listen.host, listen.port))
    except OSError as exc:
        sock.close()
        raise BindError(exc.errno, f"LISTEN_ADDR {listen} cannot be bound: {exc.strerror}") \
            from None
    sock.setblocking(False)
    return sock


class NatPmpServer(DatagramServer):
    def __init__(self, sock: socket.socket, responder: Responder, handlers: int = HANDLERS):
        super().__init__(sock, spawn=Pool(handlers))
        self.responder = responder
        self.errors = 0

    def do_read(self) -> tuple[bytes, IPv4Address, tuple[str, int]] | None:
        for _ in range(_MAX_INLINE_DROPS):
            try:
                data, source = self._socket.recvfrom(_MAX_DATAGRAM)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return None
                raise
            client = self.responder.admit(source)
            if client is not None:
                return data, client, source
        return None

    def handle(self, data: bytes, client: IPv4Address, source: tuple[str, int]) -> None:
        try:
            reply = self.responder.answer(data, client)
            if reply is not None:
                self.sendto(reply, source)
        except Exception:
            # One bad request must never take the server down or print a loose traceback.
            self.errors += 1
            log.exception("request handler failed", extra={
                "event": "request.error", "client": source[0], "length": len(data)})

    def in_flight(self) -> int:
        assert self.pool is not None
        return self.pool.size - self.pool.free_count()
