"""The LAN-facing UDP socket: a gevent DatagramServer spawning handlers from a Pool.

A full pool stops reading (the kernel queue holds the burst); sources that may not be
served are dropped while reading, before a greenlet is spent on them, and requests whose
answer needs no waiting (opcode 0 with the address cached, malformed or unsupported
datagrams) are answered right there: a handler greenlet per datagram costs more than
the answer itself.
"""

from __future__ import annotations

import errno
import logging
import socket
from ipaddress import IPv4Address

import gevent
from gevent.pool import Pool
from gevent.server import DatagramServer

from doublenat.engine.responder import Responder
from doublenat.settings import Endpoint

log = logging.getLogger("doublenat.server")

HANDLERS = 100
# Larger than any request we answer (PCP's 1100 bytes), so nothing is cut silently.
_MAX_DATAGRAM = 8192
# Datagrams dropped or answered inline per read, so a flood cannot keep the hub in one
# read loop (gevent calls the read again at once while the socket stays readable).
_MAX_INLINE = 64
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)
_RECEIVE_BUFFER = 1 << 20
# Handlers one client may hold once the pool runs low. A request waiting on a silent
# gateway holds its handler for the whole upstream budget: without a bound, two clients
# retransmitting new mappings could take the whole pool, and a full pool stops reading
# (so even answers that need no handler stop). While fewer than RESERVE handlers are
# free, a client already holding PER_CLIENT gets its datagram dropped (it retransmits);
# the reserve stays for everyone else. A busy but lone client is never held back.
PER_CLIENT = 16
RESERVE = 20


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
        self.busy_dropped = 0
        self._busy: dict[IPv4Address, int] = {}  # handlers held per client

    def do_read(self) -> tuple[bytes, IPv4Address, tuple[str, int]] | None:
        """The next request that needs a handler; the others are dropped or answered here.

        Reads until the socket is empty or _MAX_INLINE datagrams were handled: one wake-up
        of the loop then serves a whole burst.
        """
        sock = self._socket
        recvfrom, sendto = sock.recvfrom, sock.sendto
        admit, answer_now = self.responder.admit, self.responder.answer_now
        for _ in range(_MAX_INLINE):
            try:
                data, source = recvfrom(_MAX_DATAGRAM)
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    return None
                raise
            client = admit(source)
            if client is None:
                continue
            try:
                done, reply = answer_now(data, client)
            except Exception:
                self._failed(data, source)
                continue
            if not done:
                held = self._busy.get(client, 0)
                if held >= PER_CLIENT and self.pool.free_count() <= RESERVE:  # type: ignore[union-attr]
                    self.busy_dropped += 1
                    continue
                self._busy[client] = held + 1
                return data, client, source
            if reply is not None:
                # sendto inline, not through a helper: this is the per-datagram path.
                try:
                    sendto(reply, source)
                except OSError as exc:
                    self._send_failed(exc, reply, source)
        return None

    def _send_failed(self, exc: OSError, reply: bytes, source: tuple[str, int]) -> None:
        if exc.errno not in _WOULD_BLOCK:
            self._failed(reply, source)
            return
        # The send buffer is full: a greenlet waits for room instead of the loop.
        gevent.spawn(self._send_later, reply, source)

    def _send_later(self, reply: bytes, source: tuple[str, int]) -> None:
        try:
            self.sendto(reply, source)
        except Exception:
            self._failed(reply, source)

    def _failed(self, data: bytes, source: tuple[str, int]) -> None:
        self.errors += 1
        log.exception("request handler failed", extra={
            "event": "request.error", "client": source[0], "length": len(data)})

    def handle(self, data: bytes, client: IPv4Address, source: tuple[str, int]) -> None:
        try:
            reply = self.responder.answer(data, client)
            if reply is not None:
                self.sendto(reply, source)
        except Exception:
            # One bad request must never take the server down or print a loose traceback.
            self._failed(data, source)
        finally:
            held = self._busy.get(client, 1) - 1
            if held > 0:
                self._busy[client] = held
            else:
                self._busy.pop(client, None)

    def in_flight(self) -> int:
        assert self.pool is not None
        return self.pool.size - self.pool.free_count()
