# ruff: noqa: E402  (gevent patches before anything else is imported)
"""The lab's RouterOS and gateway emulators in their own process, with a control socket.

The bench runs doublenat as its own process, so the emulators' counters live here and are
read through a Unix socket (one JSON object per line each way; a Unix socket because it is
reachable from outside the network namespace the emulators may run in):

    {"op": "counters"}          router commands/writes/reads, gateway requests by kind, sizes
    {"op": "reset"}             zero both emulators' counters
    {"op": "latency", "seconds": 0.002}   the router's per-command latency from now on
    {"op": "watch"} ...          bench.dynamics' ops (per-second series, reconnect, remap state)

    python -m bench.emulators --control /tmp/x.sock --password-file pw --router-latency 0.002

The gateway is profile rfc with long lifetimes unless told otherwise (`--gateway-profile
proton`, `--gateway-lifetime 60`, `--gateway-delay 0.02`: every reply held 20 ms in its own
greenlet, the other requests still served meanwhile).

Once listening it prints one JSON line: {"router": "ip:port", "gateway": "ip:port"}.

The gateway is the lab's emulator (profile rfc) with two of its test-oriented costs taken
out, so that it stays flat with 10,000 mappings and what grows, if anything, is doublenat:
- a new mapping's port is chosen with an index of the ports in use instead of a set built
  from the whole table on every request;
- expired mappings are swept every 10 s instead of scanning the table on every request.
Its replies are the same; the bench's lifetimes are long enough that nothing expires.

The router's per-command latency is held with a timerfd (one per connection, armed at the
command's arrival + latency) instead of a hub timer: libev's epoll backend waits in whole
milliseconds (a 2 ms hold became 2.4 ms at p50 and up to 3 ms), which would lower the
"4 connections / latency" bound the bench compares doublenat with. The `holds` control op
reports what the emulator actually held.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from gevent.server import StreamServer

from bench.dynamics import EmulatorWatch
from doublenat.lab.gateway import (
    MAX_PORT,
    MIN_PORT,
    GatewayEmulator,
    GatewayMapping,
    MappingEvent,
    MappingKey,
)
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.lab.routeros import server as routeros_server

VPN_INTERFACE = "wg-proton"
_SWEEP_EVERY = 10.0


class BenchGateway(GatewayEmulator):
    """The rfc gateway emulator with an O(1) port choice and a periodic expiry sweep."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, janitor_interval=None, **kwargs)  # type: ignore[arg-type]
        self._by_port: dict[int, set[MappingKey]] = defaultdict(set)
        self._port_of: dict[MappingKey, int] = {}
        self._next_sweep = 0.0
        self.add_observer(self._index)

    def _index(self, event: MappingEvent, mapping: GatewayMapping) -> None:
        key = mapping.key
        old = self._port_of.pop(key, None)
        if old is not None:
            holders = self._by_port[old]
            holders.discard(key)
            if not holders:
                del self._by_port[old]
        if event in (MappingEvent.CREATED, MappingEvent.CHANGED):
            self._port_of[key] = mapping.external_port
            self._by_port[mapping.external_port].add(key)

    def _expire(self, now: float) -> list[GatewayMapping]:
        # The lab's scan of the whole table runs on every request (and on every tick):
        # here at most once per _SWEEP_EVERY. A lease that ran out and is renewed before
        # the next sweep is renewed, not re-created (bench.dynamics counts such lapses).
        if now < self._next_sweep:
            return []
        self._next_sweep = now + _SWEEP_EVERY
        return super()._expire(now)

    def _pick_rfc(self, key: MappingKey, suggested: int, avoid: int | None) -> int | None:
        # The same rule as the lab's: a port is taken by another client whatever the
        # protocol, and by this client for the same protocol.
        source, proto, _internal = key

        def taken(port: int) -> bool:
            if port == avoid:
                return True
            return any(other != key and (other[0] != source or other[1] == proto)
                       for other in self._by_port.get(port, ()))

        start = avoid % MAX_PORT + 1 if avoid is not None else (suggested or key[2])
        for offset in range(MAX_PORT):
            port = (start - MIN_PORT + offset) % MAX_PORT + MIN_PORT
            if not taken(port):
                return port
        return None


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_CLOCK_MONOTONIC, _TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 1, 0o4000, 0o2000000, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd (time.monotonic's clock) the hub can wait on."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self.fd = fd
        self.watcher = gevent.get_hub().loop.io(fd, 1)

    def arm(self, deadline: float) -> None:
        """Fire at `deadline` on time.monotonic()'s clock."""
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)  # the last expiry, so the fd is not readable at once
        spec = _Itimerspec()
        seconds = int(deadline)
        spec.it_value.tv_sec = seconds
        spec.it_value.tv_nsec = max(1, int((deadline - seconds) * 1e9))
        if _libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def disarm(self) -> None:
        _libc.timerfd_settime(self.fd, 0, ctypes.byref(_Itimerspec()), None)


_timers: dict[int, _TimerFd] = {}  # one per emulator session (its commands run in turn)


def _precise_hold(self: Any, job: Any, delay: float) -> bool:
    """The lab session's hold (`_Session._held_back`), woken by a timerfd."""
    if job.hold_for(delay) <= 0:
        return False
    timer = _timers.get(id(self))
    if timer is None:
        timer = _timers[id(self)] = _TimerFd()
    self._running.append(job)
    fired = Event()
    timer.arm(job.received_at + delay)
    timer.watcher.start(fired.set)
    try:
        gevent.wait([fired, job.cancelled], count=1)
    finally:
        timer.watcher.stop()
        if not fired.is_set():
            timer.disarm()
    cancelled = job.cancelled.is_set()
    if job in self._running:
        self._running.remove(job)
    return cancelled or self.closed


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.emulators")
    parser.add_argument("--control", required=True, help="Unix socket path")
    parser.add_argument("--part", choices=("router", "gateway", "both"), default="both",
                        help="which emulator this process runs")
    parser.add_argument("--router", default="127.0.0.1:0")
    parser.add_argument("--gateway", default="127.0.0.1:0")
    parser.add_argument("--user", default="doublenat")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--router-latency", type=float, default=0.0)
    parser.add_argument("--gateway-profile", choices=("rfc", "proton"), default="rfc")
    parser.add_argument("--gateway-lifetime", type=int, default=None,
                        help="the gateway's longest lease (default: the profile's)")
    parser.add_argument("--gateway-delay", type=float, default=0.0,
                        help="seconds every gateway reply is held back")
    parser.add_argument("--hub-timers", action="store_true",
                        help="hold router latency with the lab's hub timers (ms resolution)")
    args = parser.parse_args(argv)
    if not args.hub_timers:
        routeros_server._Session._held_back = _precise_hold  # type: ignore[method-assign]

    router = gateway = None
    ready: dict[str, str] = {}
    if args.part in ("gateway", "both"):
        gateway = BenchGateway(*_endpoint(args.gateway), profile=args.gateway_profile,
                               public_address="11.22.33.44", transcript_size=16,
                               max_lifetime=args.gateway_lifetime)
        gateway.set_delay(args.gateway_delay)
        gateway.start()
        ready["gateway"] = "{}:{}".format(*gateway.address)
    if args.part in ("router", "both"):
        password = args.password_file.read_text().strip() if args.password_file else ""
        router = RouterOsEmulator(*_endpoint(args.router), users={args.user: password},
                                  latency=args.router_latency, transcript_limit=1000)
        router.state.interfaces.update({VPN_INTERFACE, "bridge"})
        # The router reaches the VPN gateway through the tunnel interface.
        gateway_host = gateway.address[0] if gateway else _endpoint(args.gateway)[0]
        router.state.routes.set(f"{gateway_host}/32", interface=VPN_INTERFACE,
                                nexthop=gateway_host)
        router.start()
        ready["router"] = "{}:{}".format(*router.address)
    watch = EmulatorWatch(router, gateway)

    def counters() -> dict[str, object]:
        out: dict[str, object] = {}
        if router is not None:
            c = router.counters
            out["router"] = {
                "commands": dict(c.commands),
                "writes": router.writes(),
                "reads": router.reads(),
                "logins": c.logins_ok,
                "connections": c.connections_accepted,
                "rules": len(router.state.nat),
                "latency": router.latency,
            }
        if gateway is not None:
            out["gateway"] = {
                "by_kind": {str(k): v for k, v in gateway.requests_by_kind.items()},
                "mappings": len(gateway._table),
            }
        return out

    def holds() -> dict[str, list[float]]:
        """For the commands still in the transcript, per connection: read-to-reply time
        (the emulator's hold) and reply-to-next-command time (the client's turnaround,
        transit both ways included)."""
        waiting: dict[int, float] = {}
        replied: dict[int, float] = {}
        held: list[float] = []
        turnaround: list[float] = []
        for entry in router.transcript if router is not None else ():
            if entry.direction == "in":
                waiting[entry.connection] = entry.at
                if entry.connection in replied:
                    turnaround.append((entry.at - replied.pop(entry.connection)) * 1e6)
            elif entry.connection in waiting:
                held.append((entry.at - waiting.pop(entry.connection)) * 1e6)
                replied[entry.connection] = entry.at
        return {"holds_us": held, "turnaround_us": turnaround}

    def control(sock: object, _peer: object) -> None:
        stream = sock.makefile("rwb")  # type: ignore[attr-defined]
        for line in stream:
            try:
                request = json.loads(line)
                op = request.get("op")
                if op == "counters":
                    reply: dict[str, object] = counters()
                elif op == "reset":
                    for emulator in (router, gateway):
                        if emulator is not None:
                            emulator.reset_counters()
                    reply = {"ok": True}
                elif op == "holds":
                    reply = dict(holds())
                elif op in watch.ops:
                    reply = watch.ops[op](request)
                elif op == "latency" and router is not None:
                    router.latency = float(request["seconds"])
                    reply = {"ok": True}
                else:
                    reply = {"error": f"unknown op {op!r} for the {args.part} emulator"}
            except Exception as exc:  # a bad request must not stop the emulators
                reply = {"error": repr(exc)}
            stream.write(json.dumps(reply).encode() + b"\n")
            stream.flush()

    path = args.control
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    server = StreamServer(listener, control)
    server.start()
    print(json.dumps(ready), flush=True)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    server.stop()
    for emulator in (gateway, router):
        if emulator is not None:
            emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
