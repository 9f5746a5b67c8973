"""What the emulator saw: a transcript of sentences and counters tests can assert on."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Literal

from doublenat.lab.routeros.wire import Sentence

NAT = "/ip/firewall/nat"
WRITE_COMMANDS = frozenset(
    f"{NAT}/{verb}" for verb in ("add", "set", "remove", "unset", "enable", "disable")
)
READ_COMMANDS = frozenset({f"{NAT}/print", f"{NAT}/getall", "/ip/route/check", "/ip/route/print"})


@dataclass(frozen=True)
class TranscriptEntry:
    connection: int
    # time.monotonic() when the sentence was read or written.
    at: float
    direction: Literal["in", "out"]
    words: Sentence

    @property
    def command(self) -> str:
        return self.words[0] if self.words else ""


@dataclass
class Counters:
    commands: Counter[str] = field(default_factory=Counter)
    logins_ok: int = 0
    logins_failed: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0  # refused on purpose or over max_sessions
    tls_handshake_failures: int = 0
    connections_open: int = 0
    max_connections_open: int = 0
    disconnects: int = 0
    # Highest number of commands one connection had outstanding at once.
    max_in_flight: int = 0
    max_in_flight_by_connection: dict[int, int] = field(default_factory=dict)
    faults_fired: int = 0
    protocol_errors: int = 0


class Recorder:
    def __init__(self, transcript_limit: int | None = 100_000) -> None:
        self._transcript: deque[TranscriptEntry] = deque(maxlen=transcript_limit)
        self.counters = Counters()

    def record(self, connection: int, direction: Literal["in", "out"], words: Sentence) -> None:
        self._transcript.append(TranscriptEntry(connection, time.monotonic(), direction, words))

    @property
    def transcript(self) -> list[TranscriptEntry]:
        return list(self._transcript)

    def clear_transcript(self) -> None:
        self._transcript.clear()

    def reset(self) -> None:
        """Zero the counters; the gauges (open connections) keep describing the present."""
        old = self.counters
        self.counters = Counters(
            connections_open=old.connections_open,
            max_connections_open=old.connections_open,
        )

    def writes(self) -> int:
        return sum(n for word, n in self.counters.commands.items() if word in WRITE_COMMANDS)

    def reads(self) -> int:
        return sum(n for word, n in self.counters.commands.items() if word in READ_COMMANDS)

    def note_in_flight(self, connection: int, in_flight: int) -> None:
        c = self.counters
        if in_flight > c.max_in_flight_by_connection.get(connection, 0):
            c.max_in_flight_by_connection[connection] = in_flight
        c.max_in_flight = max(c.max_in_flight, in_flight)
