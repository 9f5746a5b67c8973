"""A bare RouterOS API client: N connections, one thread each, `/ip/firewall/nat/add` in a
loop, each sentence in one write, replies parsed by hand. No library, no gevent.

It plays doublenat's part against the router emulator to show what the emulator itself
allows at a given latency (the bound "connections / latency" assumes a router that
answers exactly on time and a client that costs nothing).

    python -m bench.rawros --router 127.0.0.1:8728 --password-file pw --count 4000
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from itertools import count
from pathlib import Path


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return (n | 0x8000).to_bytes(2, "big")
    if n < 0x200000:
        return (n | 0xC00000).to_bytes(3, "big")
    raise ValueError("word too long")


def sentence(words: list[bytes]) -> bytes:
    return b"".join(_length(len(w)) + w for w in words) + b"\x00"


class Connection:
    def __init__(self, address: tuple[str, int], user: str, password: str) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        reply = self.call([b"/login", b"=name=" + user.encode(),
                           b"=password=" + password.encode()])
        if reply[0] != b"!done":
            raise RuntimeError(f"login refused: {reply}")

    def call(self, words: list[bytes]) -> list[bytes]:
        """Send one sentence; return the reply's last sentence (read up to `!done`)."""
        self.sock.sendall(sentence(words))
        while True:
            words_in = self._sentence()
            if words_in[0] in (b"!done", b"!fatal"):
                return words_in

    def _sentence(self) -> list[bytes]:
        while True:
            parsed = _parse(self.buffer)
            if parsed is not None:
                words, used = parsed
                self.buffer = self.buffer[used:]
                return words
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("router closed the connection")
            self.buffer += data


def _parse(buffer: bytes) -> tuple[list[bytes], int] | None:
    words: list[bytes] = []
    pos = 0
    while pos < len(buffer):
        first = buffer[pos]
        if first < 0x80:
            n, size = first, 1
        elif first < 0xC0:
            size = 2
            n = int.from_bytes(buffer[pos:pos + 2], "big") & 0x3FFF
        else:
            size = 3
            n = int.from_bytes(buffer[pos:pos + 3], "big") & 0x1FFFFF
        if pos + size > len(buffer):
            return None
        pos += size
        if n == 0:
            return words, pos
        if pos + n > len(buffer):
            return None
        words.append(buffer[pos:pos + n])
        pos += n
    return None


def run(address: tuple[str, int], user: str, password: str, connections: int,
        total: int, first_port: int = 30000) -> dict[str, float]:
    numbers = count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    conns = [Connection(address, user, password) for _ in range(connections)]
    per = total // connections

    def worker(conn: Connection) -> None:
        mine: list[float] = []
        try:
            for _ in range(per):
                with lock:
                    i = next(numbers)
                port = first_port + i % 30000
                words = [b"/ip/firewall/nat/add", b"=chain=dstnat", b"=action=dst-nat",
                         b"=protocol=udp", b"=in-interface=wg-proton",
                         b"=dst-port=%d" % port, b"=to-addresses=127.0.0.2",
                         b"=to-ports=%d" % port, b"=comment=bench-rawros-%d" % i]
                started = time.perf_counter()
                reply = conn.call(words)
                mine.append(time.perf_counter() - started)
                if reply[0] != b"!done":
                    errors.append(repr(reply))
                    return
        except (OSError, EOFError) as exc:
            errors.append(repr(exc))
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(c,)) for c in conns]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for conn in conns:
        conn.sock.close()
    latencies.sort()
    n = len(latencies)
    return {
        "connections": connections,
        "commands": n,
        "seconds": seconds,
        "rate": n / seconds if seconds else 0.0,
        "p50_us": latencies[n // 2] * 1e6 if n else 0.0,
        "p99_us": latencies[min(n - 1, int(n * 0.99))] * 1e6 if n else 0.0,
        "errors": len(errors),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rawros")
    parser.add_argument("--router", required=True, metavar="IP:PORT")
    parser.add_argument("--user", default="doublenat")
    parser.add_argument("--password-file", type=Path, required=True)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--count", type=int, default=4000)
    args = parser.parse_args(argv)
    host, _, port = args.router.rpartition(":")
    result = run((host, int(port)), args.user, args.password_file.read_text().strip(),
                 args.connections, args.count)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
