"""A bare stdlib UDP echo server: a trivial target for the load generators' ceilings (what
a NAT-PMP server could at best do on this machine in Python, without gevent).

    python -m bench.echo 127.0.0.1:5399

A 2-byte opcode-0 request gets a fixed 12-byte reply (version 0, opcode 128, result 0),
as a NAT-PMP server would send; any other datagram is echoed back as it came (the mapping
generator's `--echo` ceiling accepts a copy of its request).
"""

from __future__ import annotations

import signal
import socket
import sys

REQUEST = b"\x00\x00"
REPLY = bytes((0, 128, 0, 0, 0, 0, 0, 1, 11, 22, 33, 44))


def main(argv: list[str]) -> int:
    host, _, port = argv[0].rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host or "127.0.0.1", int(port)))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("{}:{}".format(*sock.getsockname()), flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, source = recvfrom(2048)
        sendto(REPLY if data == REQUEST else data, source)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
