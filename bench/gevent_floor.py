"""The floor of a gevent design: a bare gevent `DatagramServer` answering an opcode-0
request with a fixed 12-byte reply, nothing else (no parsing, no admission, no state).

    python -m bench.gevent_floor 192.168.77.1:5397            # a handler greenlet per datagram
    python -m bench.gevent_floor 192.168.77.1:5396 --inline   # answered in do_read

The default is gevent's own design: `do_read` reads one datagram and the server spawns a
greenlet for `handle`. `--inline` answers in `do_read`, up to 64 datagrams per readiness,
as doublenat's front does for requests that need no waiting: what remains is the hub's
read watcher and one recvfrom/sendto pair per request. Whatever doublenat does on top,
it cannot go below these in the same run. Prints its bound address on one line; SIGTERM
ends it (the default action).
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from gevent.server import DatagramServer

REQUEST = b"\x00\x00"
REPLY = bytes((0, 128, 0, 0, 0, 0, 0, 1, 11, 22, 33, 44))
_INLINE = 64
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


class Spawning(DatagramServer):
    """A greenlet per datagram (gevent's default spawn)."""

    def handle(self, data: bytes, address: tuple[str, int]) -> None:
        if data == REQUEST:
            self.socket.sendto(REPLY, address)


class Inline(DatagramServer):
    """Answered while reading; `do_read` returns None, so no greenlet is spawned."""

    def do_read(self) -> None:
        recvfrom, sendto = self._socket.recvfrom, self._socket.sendto
        for _ in range(_INLINE):
            try:
                data, address = recvfrom(8192)
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    return None
                raise
            if data == REQUEST:
                try:
                    sendto(REPLY, address)
                except OSError as exc:
                    if exc.errno not in _WOULD_BLOCK:
                        raise
        return None

    def handle(self, data: bytes, address: tuple[str, int]) -> None:
        raise AssertionError("never called: do_read returns None")  # (gevent requires one)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gevent_floor")
    parser.add_argument("listen", help="IP:PORT (port 0: any free one)")
    parser.add_argument("--inline", action="store_true", help="no greenlet per datagram")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = (Inline if args.inline else Spawning)((host or "127.0.0.1", int(port)))
    server.init_socket()
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    print("{}:{}".format(*server.socket.getsockname()), flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
