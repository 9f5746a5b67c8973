"""A bare stdlib UDP echo server: the trivial target the load generator's ceiling is
measured against (what a NAT-PMP server could at best do on this machine in Python).

    python -m bench.echo 127.0.0.1:5399
"""

from __future__ import annotations

import signal
import socket
import sys


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
        sendto(data, source)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
