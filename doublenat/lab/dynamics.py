"""What a VPN gateway does on its own over time, as a seeded, replayable schedule.

A ProtonVPN session is not still: the gateway moves a forwarded port now and then, and the
VPN client reconnects (to the same or another server), which loses every mapping at once
(see GATEWAY_NOTES.md for the reports this models and what is a guess). `ProtonDynamics`
describes how often; `Happening`s are its schedule, a pure function of the seed and the
start time, so a test can run "Proton for ten simulated minutes" on a fake clock and get
the same story every time, and can read the schedule to know what to expect.

The gateway emulator (doublenat.lab.gateway) plays the schedule on its own clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

# Documentation ranges (RFC 5737): never a real server's address.
DEFAULT_ADDRESS_POOL = (IPv4Network("198.51.100.0/24"), IPv4Network("203.0.113.0/24"))


class HappeningKind(StrEnum):
    MOVE = "move"  # every live mapping gets another external port at its next renewal
    # (and, with ProtonDynamics.moves_change_address, opcode 0 shows a new address at once)
    RECONNECT = "reconnect"  # the VPN client is on another server: state lost, new address


@dataclass(frozen=True, slots=True)
class Happening:
    time: float  # on the gateway's clock
    kind: HappeningKind
    address: IPv4Address | None = None  # the new public address (RECONNECT; MOVE maybe)
    epoch: int = 0  # RECONNECT: the new server's epoch at that moment
    downtime: float = 0.0  # RECONNECT: seconds the gateway answers nothing first


@dataclass(frozen=True, slots=True)
class ProtonDynamics:
    """How often a Proton-like gateway moves ports and the client reconnects.

    Intervals are in seconds; None switches that kind off. With `jitter` j each interval is
    drawn uniformly from mean·(1-j) .. mean·(1+j). Reconnects draw the new server's epoch
    from `reconnect_epochs` (inclusive; (0, 0) is a fresh server, a wide range such as
    (0, 5_000_000) is a long-running one whose epoch may even be larger than the old one)
    and its address from `addresses` (default: the RFC 5737 ranges), never the address
    just left. With `moves_change_address` a move also shows a new public address while
    keeping every mapping (one report shows a moved port together with another exit
    address: GATEWAY_NOTES.md). Moves and reconnects use separate random streams for their
    times, so changing one leaves the other's times alone.
    """

    move_every: float | None = None
    reconnect_every: float | None = None
    jitter: float = 0.0
    seed: int = 0
    reconnect_downtime: float = 0.0
    reconnect_epochs: tuple[int, int] = (0, 0)
    addresses: tuple[IPv4Address, ...] = ()
    moves_change_address: bool = False

    def __post_init__(self) -> None:
        for name in ("move_every", "reconnect_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), not {self.jitter}")
        if self.reconnect_downtime < 0:
            raise ValueError("reconnect_downtime must not be negative")
        lo, hi = self.reconnect_epochs
        if not 0 <= lo <= hi < 2**32:
            raise ValueError(f"bad reconnect_epochs {self.reconnect_epochs}")
        if len(set(self.addresses)) == 1:
            raise ValueError("addresses needs at least two distinct addresses")

    def happenings(self, start: float, address: IPv4Address) -> Iterator[Happening]:
        """The endless schedule from `start`, for a gateway now showing `address`."""
        moves = self._times(start, self.move_every, "move")
        reconnects = self._times(start, self.reconnect_every, "reconnect")
        pick = random.Random(f"{self.seed}:address")
        epochs = random.Random(f"{self.seed}:epoch")
        next_move, next_reconnect = next(moves, None), next(reconnects, None)
        current = address
        while next_move is not None or next_reconnect is not None:
            # A reconnect and a move at the same instant: the reconnect first (it forgets
            # the mappings the move would have marked).
            if next_reconnect is not None and (next_move is None or next_reconnect <= next_move):
                current = self._next_address(pick, current)
                yield Happening(next_reconnect, HappeningKind.RECONNECT, current,
                                epochs.randint(*self.reconnect_epochs), self.reconnect_downtime)
                next_reconnect = next(reconnects, None)
            else:
                assert next_move is not None
                moved_to = None
                if self.moves_change_address:
                    current = moved_to = self._next_address(pick, current)
                yield Happening(next_move, HappeningKind.MOVE, moved_to)
                next_move = next(moves, None)

    def timeline(self, start: float, until: float, address: IPv4Address) -> list[Happening]:
        """The schedule from `start` up to and including `until`."""
        out = []
        for happening in self.happenings(start, address):
            if happening.time > until:
                break
            out.append(happening)
        return out

    def _times(self, start: float, every: float | None, stream: str) -> Iterator[float]:
        if every is None:
            return
        rng = random.Random(f"{self.seed}:{stream}")
        now = start
        while True:
            now += every * (1 + self.jitter * rng.uniform(-1, 1)) if self.jitter else every
            yield now

    def _next_address(self, rng: random.Random, current: IPv4Address) -> IPv4Address:
        if self.addresses:
            choices = [a for a in self.addresses if a != current]
            return rng.choice(choices)
        while True:
            network = rng.choice(DEFAULT_ADDRESS_POOL)
            candidate = network[rng.randrange(1, network.num_addresses - 1)]
            if candidate != current:
                return candidate
