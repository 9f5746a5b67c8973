"""A NAT-PMP load generator: plain non-blocking UDP sockets and a window of requests in flight.

No gevent, no asyncio: one process, `epoll` and a tight loop, so that it costs a few
microseconds per request and is not what a measurement measures (`bench.run` reports its
ceiling against a bare UDP echo server in the same table). The opcode-0 figures are taken
with the compiled generator instead (bench/natpmp_load.c); `address` mode stays here for
quick checks without a compiler.

Two modes, each printing one JSON object on stdout:

    address   opcode 0, for a fixed time. `--window N` opens N sockets, each with one
              request in flight (every opcode-0 reply looks alike, so a reply is matched
              to its request by the socket it arrives on). N = 1 is a blocking
              send/recv loop: the lowest latency the generator can see.
    map       opcode 1/2 for a fixed list of (source address, internal port) pairs: job k
              asks for internal port p = `first + k` from source p % S, so every job is a
              distinct mapping, internal ports never repeat across sources, and any slice
              of a range asks for the same mappings again. Up to
              `--window` jobs are in flight; replies are matched by (socket, internal port).
              Running the same list again renews those mappings.

    python -m bench.loadgen address --target 127.0.0.1:5351 --window 16 --duration 3
    python -m bench.loadgen map --target 127.0.0.1:5351 --sources 127.0.1.1-127.0.1.10 \
        --first 20000 --count 5000 --window 64 --lifetime 3600

`--echo` accepts a copy of the request as the reply (the ceiling run against an echo server).
Latencies are from the request's first send to the moment the generator read the reply.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import select
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

_REQUEST = struct.Struct("!BBHHHI")
_RCVBUF = 4 << 20


@dataclass
class Result:
    mode: str
    window: int
    sent: int = 0  # requests sent, retransmissions included
    answered: int = 0  # requests answered within the measured span
    retransmitted: int = 0
    lost: int = 0  # address mode: requests given up after the timeout
    bad: int = 0  # replies that were not what was asked for
    seconds: float = 0.0  # measured span
    rate: float = 0.0  # answered / seconds
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    mean_us: float = 0.0
    results: dict[str, int] = field(default_factory=dict)  # NAT-PMP result code -> count

    def fill(self, latencies: list[float], seconds: float) -> Result:
        self.answered = len(latencies)
        self.seconds = seconds
        self.rate = self.answered / seconds if seconds > 0 else 0.0
        if latencies:
            ordered = sorted(latencies)
            n = len(ordered)

            def pick(q: float) -> float:
                return ordered[min(n - 1, int(q * n))] * 1e6

            self.p50_us, self.p90_us, self.p99_us = pick(0.50), pick(0.90), pick(0.99)
            self.max_us = ordered[-1] * 1e6
            self.mean_us = sum(ordered) / n * 1e6
        return self


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def address_range(text: str) -> list[str]:
    """`127.0.1.1-127.0.1.10` or `a,b,c` or a single address."""
    out: list[str] = []
    for part in text.split(","):
        first, sep, last = part.partition("-")
        if not sep:
            out.append(str(ipaddress.IPv4Address(first)))
            continue
        lo, hi = int(ipaddress.IPv4Address(first)), int(ipaddress.IPv4Address(last))
        out.extend(str(ipaddress.IPv4Address(v)) for v in range(lo, hi + 1))
    return out


def _udp(bind: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
    if bind:
        sock.bind((bind, 0))
    return sock


# ---------------------------------------------------------------------- opcode 0


def run_address(target: tuple[str, int], window: int, duration: float, warmup: float,
                echo: bool = False, timeout: float = 1.0, bind: str | None = None) -> Result:
    if window <= 1:
        return _address_sequential(target, duration, warmup, echo, timeout, bind)
    return _address_windowed(target, window, duration, warmup, echo, timeout, bind)


def run_paced(target: tuple[str, int], sources: list[str], rate: float, duration: float,
              warmup: float, timeout: float = 1.0) -> Result:
    """Polite clients: opcode 0, one at a time, from `sources` in turn, `rate` per second
    in all (each source stays far below a per-client rate limit)."""
    result = Result("paced", 1)
    socks = []
    for source in sources:
        sock = _udp(source)
        sock.connect(target)
        sock.settimeout(timeout)
        socks.append(sock)
    perf = time.perf_counter
    latencies: list[float] = []
    start = perf()
    measure_from, end = start + warmup, start + warmup + duration
    interval = 1.0 / rate
    due = start
    sent = lost = bad = 0
    while (now := perf()) < end:
        if now < due:
            time.sleep(due - now)
        due += interval
        sock = socks[sent % len(socks)]
        t0 = perf()
        sock.send(b"\x00\x00")
        sent += 1
        try:
            data = sock.recv(64)
        except (TimeoutError, ConnectionRefusedError):
            lost += 1
            continue
        if not _address_ok(data, False):
            bad += 1
        elif t0 >= measure_from:
            latencies.append(perf() - t0)
    for sock in socks:
        sock.close()
    result.sent, result.lost, result.bad = sent, lost, bad
    return result.fill(latencies, duration)


def run_flood(target: tuple[str, int], source: str, rate: float, duration: float) -> Result:
    """One greedy client: mapping requests at `rate` per second, never waiting for replies."""
    result = Result("flood", 0)
    sock = _udp(source)
    sock.setblocking(False)
    packets = [_REQUEST.pack(0, 2, 0, port, 0, 60) for port in range(1024, 5024)]
    perf = time.perf_counter
    start = perf()
    sent = 0
    while (now := perf()) - start < duration:
        while sent < (now - start) * rate:
            with contextlib.suppress(OSError):
                sock.sendto(packets[sent % len(packets)], target)
            sent += 1
        with contextlib.suppress(OSError):
            while True:
                sock.recv(64)  # drain, so the kernel never backs up on our side
                result.answered += 1
        time.sleep(0.0005)
    sock.close()
    result.sent, result.seconds = sent, perf() - start
    result.rate = sent / result.seconds
    return result


def _address_ok(data: bytes, echo: bool) -> bool:
    if echo and len(data) == 2:
        return True  # an echo server that copies the request back
    return len(data) == 12 and data[1] == 128 and data[3] == 0


def _address_sequential(target: tuple[str, int], duration: float, warmup: float, echo: bool,
                        timeout: float, bind: str | None) -> Result:
    result = Result("address", 1)
    request = b"\x00\x00"
    sock = _udp(bind)
    sock.connect(target)
    sock.settimeout(timeout)
    perf = time.perf_counter
    latencies: list[float] = []
    keep = latencies.append
    send, recv = sock.send, sock.recv
    start = perf()
    measure_from = start + warmup
    end = measure_from + duration
    sent = bad = lost = 0
    first = last = 0.0
    while True:
        t0 = perf()
        send(request)
        sent += 1
        try:
            data = recv(64)
        except (TimeoutError, ConnectionRefusedError):
            lost += 1
            if perf() >= end:
                break
            continue
        t1 = perf()
        if not _address_ok(data, echo):
            bad += 1
        elif t0 >= measure_from:
            if not latencies:
                first = t0
            keep(t1 - t0)
            last = t1
        if t1 >= end:
            break
    sock.close()
    result.sent, result.bad, result.lost = sent, bad, lost
    return result.fill(latencies, last - first)


def _address_windowed(target: tuple[str, int], window: int, duration: float, warmup: float,
                      echo: bool, timeout: float, bind: str | None) -> Result:
    result = Result("address", window)
    request = b"\x00\x00"
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    sent_at: dict[int, float] = {}
    perf = time.perf_counter
    for _ in range(window):
        sock = _udp(bind)
        sock.setblocking(False)
        sock.connect(target)
        socks[sock.fileno()] = sock
        poller.register(sock.fileno(), select.EPOLLIN)
    latencies: list[float] = []
    keep = latencies.append
    sent = bad = lost = 0
    start = perf()
    measure_from = start + warmup
    end = measure_from + duration
    for fd, sock in socks.items():
        sent_at[fd] = perf()
        sock.send(request)
        sent += 1
    first = last = 0.0
    poll = poller.poll
    now = start
    while now < end:
        events = poll(0.1)
        now = perf()
        if not events:
            for fd, t0 in list(sent_at.items()):
                if now - t0 > timeout:
                    lost += 1
                    sent_at[fd] = perf()
                    socks[fd].send(request)
                    sent += 1
            continue
        for fd, _ in events:
            sock = socks[fd]
            try:
                data = sock.recv(64)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:
                data = b""
            t0 = sent_at[fd]
            if not _address_ok(data, echo):
                bad += 1
            elif t0 >= measure_from:
                if not latencies:
                    first = t0
                keep(now - t0)
                last = now
            sent_at[fd] = perf()
            sock.send(request)
            sent += 1
    for sock in socks.values():
        sock.close()
    poller.close()
    result.sent, result.bad, result.lost = sent, bad, lost
    return result.fill(latencies, last - first)


# ---------------------------------------------------------------------- mappings


def run_map(target: tuple[str, int], sources: list[str], first: int, count: int, window: int,
            lifetime: int, proto: str = "udp", echo: bool = False,
            timeout: float = 2.0, give_up: float = 30.0) -> Result:
    """Send `count` mapping requests (see the module doc), `window` at a time."""
    result = Result("map", window)
    opcode = 1 if proto == "udp" else 2
    if not (first > 0 and first + count - 1 <= 65535):
        raise ValueError("internal ports out of range")
    poller = select.epoll()
    socks: list[socket.socket] = []
    fd_index: dict[int, int] = {}
    for index, source in enumerate(sources):
        sock = _udp(source)
        sock.setblocking(False)
        sock.connect(target)
        socks.append(sock)
        fd_index[sock.fileno()] = index
        poller.register(sock.fileno(), select.EPOLLIN)
    n_sources = len(socks)
    pack = _REQUEST.pack
    perf = time.perf_counter
    # (source index, internal port) -> [first send, last send]
    pending: dict[tuple[int, int], list[float]] = {}
    latencies: list[float] = []
    keep = latencies.append
    codes: Counter[int] = Counter()
    sent = bad = retransmitted = 0
    next_job = 0

    def send_job(k: int, now: float) -> None:
        nonlocal sent
        port = first + k
        index = port % n_sources  # by port: any slice of a range keeps its sources
        pending[(index, port)] = [now, now]
        socks[index].send(pack(0, opcode, 0, port, port, lifetime))
        sent += 1

    start = perf()
    while next_job < count and len(pending) < window:
        send_job(next_job, perf())
        next_job += 1
    poll = poller.poll
    last_check = start
    while pending:
        events = poll(0.05)
        now = perf()
        for fd, _ in events:
            index = fd_index[fd]
            sock = socks[index]
            while True:
                try:
                    data = sock.recv(64)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    break
                if echo:
                    ok = len(data) == 12
                    port = (data[4] << 8 | data[5]) if ok else -1
                    code = 0
                else:
                    ok = len(data) == 16 and data[1] == 128 + opcode
                    port = (data[8] << 8 | data[9]) if ok else -1
                    code = data[3] if ok else -1
                entry = pending.pop((index, port), None)
                if entry is None:
                    bad += 1  # duplicate, late, or garbage
                    continue
                now = perf()  # a reply to a request sent during this drain is later
                keep(now - entry[0])
                codes[code] += 1
                if next_job < count:
                    send_job(next_job, perf())
                    next_job += 1
        if now - last_check > 0.05:
            last_check = now
            for key, entry in list(pending.items()):
                if now - entry[0] > give_up:
                    del pending[key]
                    result.lost += 1
                elif now - entry[1] > timeout:
                    index, port = key
                    entry[1] = now
                    socks[index].send(pack(0, opcode, 0, port, port, lifetime))
                    sent += 1
                    retransmitted += 1
            while next_job < count and len(pending) < window:
                send_job(next_job, perf())
                next_job += 1
    seconds = perf() - start
    for sock in socks:
        sock.close()
    poller.close()
    result.sent, result.bad, result.retransmitted = sent, bad, retransmitted
    result.results = {str(k): v for k, v in sorted(codes.items())}
    return result.fill(latencies, seconds)


# ---------------------------------------------------------------------- readiness


def wait_ready(target: tuple[str, int], timeout: float, mapping: bool,
               bind: str | None = None) -> dict[str, object]:
    """Until the target answers opcode 0 and, with `mapping`, grants a mapping (a daemon
    that has synchronised with its router); that probe mapping is deleted again."""
    deadline = time.monotonic() + timeout
    sock = _udp(bind)
    sock.connect(target)
    sock.settimeout(0.2)
    probe_port = 9
    stages = [b"\x00\x00"]
    if mapping:
        stages.append(_REQUEST.pack(0, 1, 0, probe_port, probe_port, 60))
    try:
        for request in stages:
            while True:
                if time.monotonic() > deadline:
                    return {"ready": False, "stage": request[1]}
                try:
                    sock.send(request)
                    data = sock.recv(64)
                except (TimeoutError, ConnectionRefusedError):
                    continue
                if len(data) >= 4 and data[1] == 128 + request[1] and data[3] == 0:
                    break
                time.sleep(0.05)
        if mapping:
            sock.send(_REQUEST.pack(0, 1, 0, probe_port, 0, 0))
            with contextlib.suppress(TimeoutError):
                sock.recv(64)
    finally:
        sock.close()
    return {"ready": True}


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    address = sub.add_parser("address", help="opcode 0 for a fixed time")
    address.add_argument("--duration", type=float, default=3.0)
    address.add_argument("--warmup", type=float, default=0.5)
    address.add_argument("--bind", default=None, help="source address")
    mapping = sub.add_parser("map", help="mapping requests for a fixed list of mappings")
    mapping.add_argument("--sources", default="127.0.0.1",
                         help="source addresses: a-b range or comma list")
    mapping.add_argument("--first", type=int, default=20000, help="first internal port")
    mapping.add_argument("--count", type=int, required=True)
    mapping.add_argument("--lifetime", type=int, default=3600)
    mapping.add_argument("--proto", choices=("udp", "tcp"), default="udp")
    paced = sub.add_parser("paced", help="opcode 0 from polite clients at a fixed total rate")
    paced.add_argument("--sources", default="127.0.0.10-127.0.0.49")
    paced.add_argument("--rate", type=float, default=1000.0)
    paced.add_argument("--duration", type=float, default=4.0)
    paced.add_argument("--warmup", type=float, default=0.5)
    flood = sub.add_parser("flood", help="mapping requests from one source, not waiting")
    flood.add_argument("--bind", default="127.0.0.66")
    flood.add_argument("--rate", type=float, default=10000.0)
    flood.add_argument("--duration", type=float, default=6.0)
    wait = sub.add_parser("wait", help="until the target answers (and grants a mapping)")
    wait.add_argument("--timeout", type=float, default=20.0)
    wait.add_argument("--mapping", action="store_true")
    wait.add_argument("--bind", default=None, help="source address")
    for sub_parser in (address, mapping, wait, paced, flood):
        sub_parser.add_argument("--target", type=endpoint, required=True, metavar="IP:PORT")
        sub_parser.add_argument("--window", type=int, default=1, help="requests in flight")
        sub_parser.add_argument("--echo", action="store_true",
                                help="the target is an echo server")
    args = parser.parse_args(argv)
    if args.mode == "wait":
        ready = wait_ready(args.target, args.timeout, args.mapping, args.bind)
        print(json.dumps(ready), flush=True)
        return 0 if ready["ready"] else 1
    try:
        if args.mode == "address":
            result = run_address(args.target, args.window, args.duration, args.warmup,
                                 args.echo, bind=args.bind)
        elif args.mode == "paced":
            result = run_paced(args.target, address_range(args.sources), args.rate,
                               args.duration, args.warmup)
        elif args.mode == "flood":
            result = run_flood(args.target, args.bind, args.rate, args.duration)
        else:
            result = run_map(args.target, address_range(args.sources), args.first, args.count,
                             args.window, args.lifetime, args.proto, args.echo)
    except OSError as exc:
        if exc.errno == errno.EADDRNOTAVAIL:
            print(f"loadgen: source address not available: {exc}", file=sys.stderr)
            return 2
        raise
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
