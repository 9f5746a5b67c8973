"""Programmable misbehaviour: which command goes wrong, how, and how many times.

A fault is armed with a matcher (command word, optionally attributes and a connection) and a
count. Delays stack with each other and with at most one "outcome" fault, which replaces the
normal reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from fnmatch import fnmatchcase

from doublenat.lab.routeros.commands import Command


class FaultKind(Enum):
    DELAY = "delay"  # hold the reply back; the command itself runs at once
    DROP_BEFORE_REPLY = "drop-before-reply"  # close without running the command
    DROP_MID_REPLY = "drop-mid-reply"  # run it, send part of the first sentence, close
    EXECUTE_THEN_DROP = "execute-then-drop"  # run it, close before any reply
    FATAL = "fatal"  # "!fatal <reason>" instead of running it, then close
    STALL = "stall"  # never answer (until /cancel or the connection ends)
    TRAP = "trap"  # a made-up "!trap" + "!done" instead of running it
    TRAP_WITHOUT_MESSAGE = "trap-without-message"  # "!trap" lacking =message=, then "!done"
    RAW = "raw"  # these bytes instead of the reply, optionally then close


@dataclass(frozen=True)
class Match:
    """Which commands a fault applies to.

    `command` is an exact command word or a shell pattern (`/ip/firewall/nat/*`); None
    matches every command. Each `attrs` entry must be present with that value (a None value:
    present with any value). `connection` restricts it to one connection id.
    """

    command: str | None = None
    attrs: tuple[tuple[str, str | None], ...] = ()
    connection: int | None = None

    @classmethod
    def of(
        cls,
        command: str | None = None,
        attrs: Mapping[str, str | None] | None = None,
        connection: int | None = None,
    ) -> Match:
        return cls(command, tuple(sorted((attrs or {}).items())), connection)

    def matches(self, connection: int, command: Command) -> bool:
        if self.connection is not None and connection != self.connection:
            return False
        if self.command is not None and not fnmatchcase(command.word, self.command):
            return False
        for name, value in self.attrs:
            if name not in command.attrs:
                return False
            if value is not None and command.attrs[name] != value:
                return False
        return True


@dataclass(frozen=True)
class FaultSpec:
    kind: FaultKind
    match: Match = Match()
    # None: every matching command, for as long as the fault stays armed.
    times: int | None = 1
    delay: float = 0.0
    message: str | None = None  # FATAL reason, TRAP message
    category: int | None = None  # TRAP / TRAP_WITHOUT_MESSAGE category
    rst: bool = False  # close with RST (SO_LINGER 0) instead of FIN
    payload: bytes = b""  # RAW
    close: bool = False  # RAW: close after sending the payload


@dataclass(eq=False)
class Fault:
    """An armed fault; `hits` counts how often it fired."""

    spec: FaultSpec
    hits: int = 0
    cancelled: bool = field(default=False)

    @property
    def remaining(self) -> int | None:
        if self.spec.times is None:
            return None
        return max(self.spec.times - self.hits, 0)

    @property
    def active(self) -> bool:
        return not self.cancelled and (self.spec.times is None or self.hits < self.spec.times)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(frozen=True)
class Verdict:
    """What the faults say about one command: extra delay, and maybe an outcome fault."""

    delay: float = 0.0
    outcome: FaultSpec | None = None


class FaultPlan:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def arm(self, spec: FaultSpec) -> Fault:
        fault = Fault(spec)
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        for fault in self._faults:
            fault.cancel()
        self._faults.clear()

    @property
    def armed(self) -> list[Fault]:
        return [f for f in self._faults if f.active]

    def take(self, connection: int, command: Command) -> Verdict:
        """Consume the faults that apply to this command."""
        if not self._faults:
            return Verdict()
        delay = 0.0
        outcome: FaultSpec | None = None
        for fault in self._faults:
            if not fault.active or not fault.spec.match.matches(connection, command):
                continue
            if fault.spec.kind is FaultKind.DELAY:
                delay += fault.spec.delay
                fault.hits += 1
            elif outcome is None:
                outcome = fault.spec
                delay += fault.spec.delay
                fault.hits += 1
        self._faults = [f for f in self._faults if f.active]
        return Verdict(delay, outcome)
