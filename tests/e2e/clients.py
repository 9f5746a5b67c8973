"""Client probes that behave like two picky real NAT-PMP clients; run inside the bed's LAN.

    python clients.py libtorrent --gateway 192.168.88.1 --port 6890
    python clients.py gluetun --gateway 192.168.88.1 --renewals 3 --interval 2

Each prints one JSON object: {"ok": bool, "error": str|None, ...what it saw}. Replies the
real client would drop are dropped here too (and counted under "ignored"), so a server
that sends them shows up as a timeout, as it would for a user. One kind is not the
server's fault and is counted apart, under "late": a second answer to a request the probe
sent more than once (its first reply took longer than the retry interval, as on a loaded
machine), which the real clients drop the same way.

libtorrent (src/natpmp.cpp, 2.x): starts in PCP mode with a 60-byte version-2 MAP request
and switches to NAT-PMP only on the reply "version 0 (or 2), result 1"; here the reply must
also be exactly the 8-byte NAT-PMP form `00 80 00 01` + epoch. Its socket is not connected:
it checks the source address and port itself. Mapping replies must be exactly 16 bytes and
are matched on internal port and protocol; an opcode-0 reply needs at least 12 bytes.
Retries: 250 ms x attempt.

gluetun (internal/natpmp): a connected socket, opcode 0 then UDP then TCP with internal 0,
external 0, lifetime 60; exact sizes (12 and 16), version 0, the exact opcode; renews by
suggesting the port it was given last. Retries: 250 ms doubling.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Result,
    pack_request,
    parse_reply,
)

PORT = 5351
PCP_VERSION = 2
PCP_MAP = 1
PCP_MAP_SIZE = 60


class ProbeError(Exception):
    pass


def pcp_map_request(client: IPv4Address, internal: int, proto: int, lifetime: int) -> bytes:
    """RFC 6887 MAP request: 24-byte header + 36-byte MAP body = 60 bytes."""
    mapped = b"\x00" * 10 + b"\xff\xff" + client.packed
    header = struct.pack("!BBHI16s", PCP_VERSION, PCP_MAP, 0, lifetime, mapped)
    body = struct.pack("!12sB3xHH16s", os.urandom(12), proto, internal, internal,
                       b"\x00" * 10 + b"\xff\xff" + b"\x00" * 4)
    packet = header + body
    assert len(packet) == PCP_MAP_SIZE
    return packet


class Exchange:
    """Send, then wait for an acceptable reply, retrying on a schedule."""

    def __init__(self, sock: socket.socket, gateway: str, connected: bool) -> None:
        self.sock = sock
        self.gateway = (gateway, PORT)
        self.connected = connected
        self.ignored: list[dict[str, object]] = []
        self.late: list[dict[str, object]] = []
        self.sent = 0
        # What identifies the answers to requests that were sent more than once.
        self._resent_answers: set[bytes] = set()

    def ask(
        self,
        packet: bytes,
        accept: Callable[[bytes], object | None],
        waits: list[float],
        what: str,
    ) -> object:
        sends = 0
        for wait in waits:
            self._send(packet)
            sends += 1
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                try:
                    if self.connected:
                        data, source = self.sock.recv(2048), self.gateway
                    else:
                        data, source = self.sock.recvfrom(2048)
                except TimeoutError:
                    break
                if source[:2] != self.gateway:
                    self.ignored.append({"what": what, "why": f"from {source[0]}:{source[1]}"})
                    continue
                value = accept(data)
                if value is None:
                    entry = {"what": what, "raw": data.hex()}
                    if answer_key(data) in self._resent_answers:
                        self.late.append({**entry, "why": "another answer to a resent request"})
                    else:
                        self.ignored.append({**entry, "why": "rejected"})
                    continue
                if sends > 1:
                    self._resent_answers.add(answer_key(data))
                return value
        raise ProbeError(f"{what}: no acceptable reply after {len(waits)} attempts")

    def _send(self, packet: bytes) -> None:
        self.sent += 1
        if self.connected:
            self.sock.send(packet)
        else:
            self.sock.sendto(packet, self.gateway)


def answer_key(data: bytes) -> bytes:
    """What two answers to one request share whatever their epoch and remaining lifetime:
    version, opcode and result, plus the ports (mapping) or the address (opcode 0)."""
    return data[:4] + data[8:12] if len(data) >= 12 else data[:4]


def _map_accept(proto: Proto, internal: int, exact: bool) -> Callable[[bytes], MapReply | None]:
    def accept(data: bytes) -> MapReply | None:
        if exact and len(data) != 16:
            return None
        reply = parse_reply(data)
        if not isinstance(reply, MapReply) or reply.proto != proto:
            return None
        if reply.internal_port != internal:
            return None  # matched on internal port: anything else is someone else's reply
        return reply

    return accept


def _need_success(reply: MapReply, what: str) -> None:
    if reply.result != Result.SUCCESS:
        raise ProbeError(f"{what}: result {int(reply.result)}")
    if reply.external_port == 0 or reply.lifetime == 0:
        raise ProbeError(f"{what}: external port or lifetime 0 (mapping closed)")


# ---------------------------------------------------------------- libtorrent


def libtorrent(args: argparse.Namespace, out: dict[str, object]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((args.bind, 0))
    client = IPv4Address(sock.getsockname()[0])
    ex = Exchange(sock, args.gateway, connected=False)
    out["ignored"] = ex.ignored
    out["late"] = ex.late
    linear = [0.25 * n for n in range(1, 10)]  # libtorrent: 250 ms x attempt, 9 attempts

    def fallback(data: bytes) -> bytes | None:
        # libtorrent itself needs only "version 0 or 2, result 1"; Bitcoin Core and the RFC
        # want exactly the 8-byte NAT-PMP answer, so the probe wants that.
        if len(data) == 8 and data[:4] == b"\x00\x80\x00\x01":
            return data
        return None

    pcp = pcp_map_request(client, args.port, 6, args.lifetime)
    raw = ex.ask(pcp, fallback, linear, "PCP MAP (expecting the NAT-PMP fallback)")
    assert isinstance(raw, bytes)
    out["fallback"] = raw.hex()
    out["fallback_epoch"] = struct.unpack("!I", raw[4:])[0]

    ports: dict[str, list[int]] = {}
    for proto in (Proto.TCP, Proto.UDP):
        request = MapRequest(proto, args.port, args.port, args.lifetime)
        accept = _map_accept(proto, args.port, exact=True)
        first = ex.ask(pack_request(request), accept, linear, f"{proto.label} map")
        assert isinstance(first, MapReply)
        _need_success(first, f"{proto.label} map")
        # The renewal (3/4 of the lifetime in libtorrent) suggests what it was given.
        again = MapRequest(proto, args.port, first.external_port, args.lifetime)
        second = ex.ask(pack_request(again), accept, linear, f"{proto.label} renewal")
        assert isinstance(second, MapReply)
        _need_success(second, f"{proto.label} renewal")
        ports[proto.label] = [first.external_port, second.external_port]
        out[f"{proto.label}_lifetime"] = second.lifetime
    out["ports"] = ports

    def address(data: bytes) -> AddressReply | None:
        if len(data) < 12:
            return None
        reply = parse_reply(data[:12])
        return reply if isinstance(reply, AddressReply) else None

    reply = ex.ask(pack_request(AddressRequest()), address, linear, "opcode 0")
    assert isinstance(reply, AddressReply)
    out["address"] = str(reply.address)
    out["address_result"] = int(reply.result)


# ------------------------------------------------------------------- gluetun


def gluetun(args: argparse.Namespace, out: dict[str, object]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((args.gateway, PORT))
    ex = Exchange(sock, args.gateway, connected=True)
    out["ignored"] = ex.ignored
    out["late"] = ex.late
    doubling = [0.25 * 2**n for n in range(args.attempts)]

    def address(data: bytes) -> AddressReply | None:
        if len(data) != 12 or data[:2] != b"\x00\x80":
            return None
        reply = parse_reply(data)
        return reply if isinstance(reply, AddressReply) else None

    reply = ex.ask(pack_request(AddressRequest()), address, doubling, "opcode 0")
    assert isinstance(reply, AddressReply)
    if reply.result != Result.SUCCESS:
        raise ProbeError(f"opcode 0: result {int(reply.result)}")
    out["address"] = str(reply.address)

    last = {Proto.UDP: 0, Proto.TCP: 0}
    rounds: list[dict[str, object]] = []
    out["rounds"] = rounds
    for n in range(args.renewals + 1):
        if n:
            time.sleep(args.interval)
        entry: dict[str, object] = {}
        for proto in (Proto.UDP, Proto.TCP):
            request = MapRequest(proto, 0, last[proto], args.lifetime)
            got = ex.ask(pack_request(request), _map_accept(proto, 0, exact=True), doubling,
                         f"round {n} {proto.label}")
            assert isinstance(got, MapReply)
            _need_success(got, f"round {n} {proto.label}")
            last[proto] = got.external_port
            entry[proto.label] = {"port": got.external_port, "lifetime": got.lifetime}
        rounds.append(entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="client", required=True)
    p = sub.add_parser("libtorrent")
    p.add_argument("--gateway", required=True)
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--lifetime", type=int, default=3600)
    p.set_defaults(run=libtorrent)
    p = sub.add_parser("gluetun")
    p.add_argument("--gateway", required=True)
    p.add_argument("--lifetime", type=int, default=60)
    p.add_argument("--renewals", type=int, default=3)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--attempts", type=int, default=5)
    p.set_defaults(run=gluetun)
    args = parser.parse_args(argv)
    result: dict[str, object] = {"ok": False, "error": None}
    try:
        args.run(args, result)
        result["ok"] = True
    except (ProbeError, OSError) as exc:
        result["error"] = str(exc)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
