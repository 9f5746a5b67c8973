"""Small network tools the end-to-end bed runs inside its namespaces.

    python tools.py listen --tcp 6881 --udp 6881 --expect 1 --seconds 5
        Listen on the LAN client's ports; print {"ready": true} once bound, then one JSON
        line per TCP connection or UDP datagram received (protocol, local port, peer,
        payload), answering each with b"ack:" + payload so the sender sees the way back.
        Exits after --expect arrivals (0: never) or --seconds.
    python tools.py send --proto tcp --to 11.22.33.44:40001 --sport 20001 --data x
        Connect (or send a datagram) from a fixed source port, so no two sends share a
        conntrack entry; print {"connected": bool, "reply": str|None, "error": str|None}.
    python tools.py address --gateway 192.168.88.1 --timeout 1
        One NAT-PMP opcode 0 request; print the parsed reply or {"error": ...}.

Only the standard library and doublenat's codec: no gevent, starts in ~50 ms.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    pack_request,
    parse_reply,
)


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def listen(args: argparse.Namespace) -> int:
    sockets: dict[socket.socket, str] = {}
    for port in args.tcp:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", port))
        tcp.listen(16)
        sockets[tcp] = "tcp"
    for port in args.udp:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", port))
        sockets[udp] = "udp"
    emit(ready=True)
    deadline = time.monotonic() + args.seconds
    arrived = 0
    while args.expect == 0 or arrived < args.expect:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select(list(sockets), [], [], left)
        for sock in readable:
            port = sock.getsockname()[1]
            if sockets[sock] == "tcp":
                conn, peer = sock.accept()
                conn.settimeout(2.0)
                try:
                    data = conn.recv(4096)
                    conn.sendall(b"ack:" + data)
                except OSError as exc:
                    data = f"<{exc}>".encode()
                finally:
                    conn.close()
            else:
                data, peer = sock.recvfrom(4096)
                sock.sendto(b"ack:" + data, peer)
            arrived += 1
            emit(proto=sockets[sock], port=port, peer=f"{peer[0]}:{peer[1]}",
                 data=data.decode(errors="replace"))
    return 0


def send(args: argparse.Namespace) -> int:
    host, _, port = args.to.rpartition(":")
    kind = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", args.sport))
    sock.settimeout(args.timeout)
    connected = False
    reply = error = None
    try:
        sock.connect((host, int(port)))
        connected = args.proto == "tcp"
        sock.send(args.data.encode())
        reply = sock.recv(4096).decode(errors="replace")
    except ConnectionRefusedError:
        error = "refused"
    except TimeoutError:
        error = "timeout"
    except OSError as exc:
        error = exc.strerror or str(exc)
    finally:
        sock.close()
    emit(connected=connected, reply=reply, error=error)
    return 0


def address(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    try:
        sock.connect((args.gateway, 5351))
        sock.send(pack_request(AddressRequest()))
        data = sock.recv(64)
    except OSError as exc:
        emit(error=exc.strerror or type(exc).__name__)
        return 1
    reply = parse_reply(data)
    if not isinstance(reply, AddressReply):
        emit(error="bad reply", size=len(data), raw=data.hex())
        return 1
    emit(result=int(reply.result), address=str(reply.address), epoch=reply.epoch,
         size=len(data))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("listen")
    p.add_argument("--tcp", type=int, action="append", default=[])
    p.add_argument("--udp", type=int, action="append", default=[])
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.set_defaults(run=listen)
    p = sub.add_parser("send")
    p.add_argument("--proto", choices=["tcp", "udp"], required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--sport", type=int, required=True)
    p.add_argument("--data", default="hello")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(run=send)
    p = sub.add_parser("address")
    p.add_argument("--gateway", required=True)
    p.add_argument("--timeout", type=float, default=1.0)
    p.set_defaults(run=address)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
