"""Ports for test servers that must be told their port before they bind it.

A port the kernel just handed out (bind to 0, then close) is in its ephemeral range, and
on a machine running several suites at once (CI runs the host's and each Debian
release's side by side) the next socket anywhere may get it before the test binds it:
"Address already in use". These come from below the ephemeral range instead, at random,
and are checked free.
"""

from __future__ import annotations

import random
import socket

_LOW, _HIGH = 20000, 32767  # below Linux's default ip_local_port_range (32768-60999)
_pick = random.SystemRandom()  # not the seeded `random` some tests reset


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _HIGH + 1


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port nobody holds on `host` for `kind` (UDP by default), outside the range the
    kernel gives out by itself."""
    high = min(_HIGH, _ephemeral_floor() - 1)
    for _ in range(200):
        port = _pick.randint(_LOW, high)
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_LOW}-{high}")


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def free_tcp_port() -> int:
    return free_port(socket.SOCK_STREAM)
