"""`RouterOsEmulator`: a RouterOS API server on a gevent `StreamServer`, for tests and benchmarks.

Per connection, one greenlet reads and parses sentences as they arrive (so the in-flight
count is real even when a client pipelines), and one worker runs the commands in order, as
the router does. Streaming commands get a greenlet of their own, and `/cancel` is served by
the reader at once so it can interrupt a stalled or streaming command. Each reply batch goes
out in one `sendall` on a `TCP_NODELAY` socket, so the emulator adds no Nagle delay.

Tests reach the router state (`emu.state`), the transcript and counters, and the fault plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import gevent
import gevent.event
import gevent.lock
import gevent.queue
import gevent.server
from gevent import ssl as gevent_ssl

from doublenat.lab.routeros.commands import DONE, Command, Outcome, Router, Stream, trap
from doublenat.lab.routeros.faults import Fault, FaultKind, FaultPlan, FaultSpec, Match
from doublenat.lab.routeros.profile import CURRENT, Profile
from doublenat.lab.routeros.recorder import Counters, Recorder, TranscriptEntry
from doublenat.lab.routeros.state import RouterState, User
from doublenat.lab.routeros.tls import anonymous_dh_context
from doublenat.lab.routeros.wire import (
    ProtocolError,
    Sentence,
    SentenceReader,
    encode_text_sentences,
    to_text,
)

log = logging.getLogger(__name__)

LOGIN_FAILED = "invalid user name or password (6)"
LEGACY_LOGIN_FAILED = "cannot log in"
QUIT_REASON = "session terminated on request"

BeforeLogin = Literal["trap", "fatal"]
RefuseMode = Literal["close", "rst", "ignore"]


def _close(sock: socket.socket, rst: bool = False) -> None:
    try:
        if rst:
            # Linger 0 makes close() send RST and drop unsent data, like a crashed peer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


@dataclass(frozen=True)
class ConnectionInfo:
    id: int
    peer: tuple[str, int]
    tls: bool
    user: str | None
    in_flight: int


@dataclass(eq=False)
class _Job:
    command: Command
    received_at: float = field(default_factory=time.monotonic)
    cancelled: gevent.event.Event = field(default_factory=gevent.event.Event)
    finished: bool = False

    def hold_for(self, delay: float) -> float:
        """What is left of `delay` counted from arrival: the emulator's own work is part of it."""
        return self.received_at + delay - time.monotonic() if delay > 0 else 0.0


class _Session:
    def __init__(
        self,
        emulator: RouterOsEmulator,
        sock: socket.socket,
        peer: tuple[str, int],
        number: int,
        tls: bool,
    ) -> None:
        self.emu = emulator
        self.sock = sock
        self.peer = peer
        self.id = number
        self.tls = tls
        self.user: str | None = None
        self.closed = False
        self._challenge: bytes | None = None
        self._write_lock = gevent.lock.Semaphore()
        self._jobs: gevent.queue.Queue[_Job] = gevent.queue.Queue()
        # Jobs that have started and may still answer: cancellable by /cancel.
        self._running: list[_Job] = []
        self.in_flight = 0
        self._helpers: set[gevent.Greenlet] = set()
        # Set by a failed login when the emulator closes after refusing.
        self._close_after_reply = False

    # -- lifecycle ---------------------------------------------------------------------

    def run(self) -> None:
        reader = SentenceReader()
        worker = gevent.spawn(self._work)
        self._helpers.add(worker)
        try:
            while not self.closed:
                data = self.sock.recv(65536)
                if not data:
                    break
                for raw in reader.feed(data):
                    self._received(tuple(to_text(w) for w in raw))
        except ProtocolError as exc:
            self.emu.recorder.counters.protocol_errors += 1
            log.debug("connection %d: protocol error: %s", self.id, exc)
        except OSError:
            pass
        except Exception:
            log.exception("connection %d: emulator bug", self.id)
        finally:
            self.close()
            current = gevent.getcurrent()
            gevent.killall([g for g in self._helpers if g is not current], block=False)

    def close(self, rst: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        for job in self._running:
            job.cancelled.set()
        _close(self.sock, rst)
        self.emu._session_ended(self)

    def _spawn(self, func: Callable[..., object], *args: object) -> None:
        greenlet = gevent.spawn(func, *args)
        self._helpers.add(greenlet)
        greenlet.link(self._helpers.discard)

    # -- reading -----------------------------------------------------------------------

    def _received(self, words: Sentence) -> None:
        recorder = self.emu.recorder
        recorder.record(self.id, "in", words)
        command = Command.parse(words)
        recorder.counters.commands[command.word] += 1
        if command.word == "/cancel" and self.user is not None:
            # Out of band, so it can interrupt whatever the worker is stuck in.
            self._cancel(command)
            return
        self.in_flight += 1
        recorder.note_in_flight(self.id, self.in_flight)
        self._jobs.put(_Job(command))

    # -- writing -----------------------------------------------------------------------

    def _write(
        self,
        sentences: Iterable[Sentence],
        *,
        guard: _Job | None = None,
        finishes: Iterable[_Job] = (),
    ) -> bool:
        """Write sentences in one `sendall`, unless `guard` was cancelled meanwhile.

        The jobs in `finishes` are complete once written; doing that under the lock keeps
        the in-flight count exact.
        """
        batch = list(sentences)
        with self._write_lock:
            if self.closed or (guard is not None and guard.cancelled.is_set()):
                return False
            try:
                self.sock.sendall(encode_text_sentences(batch))
            except OSError:
                self.close()
                return False
            for sentence in batch:
                self.emu.recorder.record(self.id, "out", sentence)
            for job in finishes:
                self._finish(job)
        return True

    def _send(self, sentences: Iterable[Sentence], job: _Job | None = None) -> bool:
        """Write the final reply of `job` (or an unrelated sentence when None)."""
        return self._write(sentences, guard=job, finishes=(job,) if job else ())

    def _finish(self, job: _Job) -> None:
        if not job.finished:
            job.finished = True
            self.in_flight -= 1
            if job in self._running:
                self._running.remove(job)

    @staticmethod
    def _tagged(sentences: Iterable[Sentence], tag: str | None) -> list[Sentence]:
        if tag is None:
            return list(sentences)
        return [(*s, f".tag={tag}") for s in sentences]

    def _reply(self, job: _Job, sentences: Iterable[Sentence]) -> None:
        self._send(self._tagged(sentences, job.command.tag), job)

    def _fatal(self, reason: str, job: _Job | None = None, rst: bool = False) -> None:
        # The reason is a bare word and the sentence has no tag: that is the real format.
        self._send([("!fatal", reason)], job)
        self.close(rst)

    # -- the worker --------------------------------------------------------------------

    def _work(self) -> None:
        while not self.closed:
            job = self._jobs.get()
            try:
                self._execute(job)
            except Exception:
                log.exception("connection %d: command %s failed", self.id, job.command.word)
                self._reply(job, [trap("internal emulator error", 4), DONE])

    def _execute(self, job: _Job) -> None:
        emu = self.emu
        command = job.command
        verdict = emu.faults.take(self.id, command)
        fault = verdict.outcome
        delay = verdict.delay + emu.latency
        if fault is not None:
            emu.recorder.counters.faults_fired += 1
            if self._pre_execution_fault(job, fault, delay):
                return
        outcome = self._run(job)
        if outcome is None:
            return
        if fault is not None and fault.kind is FaultKind.EXECUTE_THEN_DROP:
            self.close(fault.rst)
            return
        if outcome.stream is not None:
            self._running.append(job)
            self._spawn(self._stream, job, outcome.stream, job.hold_for(delay))
            return
        if self._held_back(job, delay):
            return
        if fault is not None and fault.kind is FaultKind.DROP_MID_REPLY:
            self._drop_mid_reply(job, outcome, fault.rst)
            return
        self._reply(job, outcome.sentences)
        if self._close_after_reply:
            self.close()

    def _held_back(self, job: _Job, delay: float) -> bool:
        """Hold the reply until `delay` after arrival; True if /cancel or a disconnect ended it."""
        remaining = job.hold_for(delay)
        if remaining <= 0:
            return False
        self._running.append(job)
        cancelled = job.cancelled.wait(remaining)
        if job in self._running:
            self._running.remove(job)
        return cancelled or self.closed

    def _pre_execution_fault(self, job: _Job, fault: FaultSpec, delay: float) -> bool:
        """Apply a fault that replaces the command; True when the command must not run."""
        kind = fault.kind
        if kind in (FaultKind.EXECUTE_THEN_DROP, FaultKind.DROP_MID_REPLY):
            return False
        if self._held_back(job, delay):
            return True
        if kind is FaultKind.DROP_BEFORE_REPLY:
            self.close(fault.rst)
        elif kind is FaultKind.FATAL:
            self._fatal(fault.message or "fatal error", job, fault.rst)
        elif kind is FaultKind.STALL:
            self._running.append(job)
            job.cancelled.wait()
        elif kind is FaultKind.TRAP:
            self._reply(job, [trap(fault.message or "failure", fault.category), DONE])
        elif kind is FaultKind.TRAP_WITHOUT_MESSAGE:
            self._reply(job, [trap(None, fault.category), DONE])
        elif kind is FaultKind.RAW:
            with self._write_lock, contextlib.suppress(OSError):
                self.sock.sendall(fault.payload)
            self._finish(job)
            if fault.close:
                self.close(fault.rst)
        return True

    def _drop_mid_reply(self, job: _Job, outcome: Outcome, rst: bool) -> None:
        first = encode_text_sentences(self._tagged(outcome.sentences[:1], job.command.tag))
        # Cut inside the first sentence, so the client sees EOF mid-sentence.
        with self._write_lock, contextlib.suppress(OSError):
            self.sock.sendall(first[: max(1, len(first) // 2)])
        self.close(rst)

    # -- commands ----------------------------------------------------------------------

    def _run(self, job: _Job) -> Outcome | None:
        """Session-level commands here, router commands to the router; None: handled."""
        command = job.command
        emu = self.emu
        if command.word == "/quit":
            self._fatal(QUIT_REASON, job)
            return None
        if command.word == "/login":
            return self._login(command)
        if self.user is None:
            if emu.before_login == "fatal":
                self._fatal("not logged in", job)
                return None
            return Outcome((trap("not logged in"), DONE))
        if command.word == "/cancel":
            self._cancel(command, job)
            return None
        # A user removed since logging in keeps the session but may do nothing.
        user = emu.state.users.get(self.user) or User(self.user, "", frozenset())
        return emu.router.execute(command, user)

    def _login(self, command: Command) -> Outcome:
        emu = self.emu
        profile = emu.profile
        name = command.attrs.get("name")
        password = command.attrs.get("password")
        response = command.attrs.get("response")
        user = emu.state.users.get(name or "")
        # GUESS: a user without the `api` policy is refused like a wrong password.
        if user is not None and "api" not in user.policies:
            user = None
        if response is not None:
            ok = (
                profile.challenge_login
                and self._challenge is not None
                and user is not None
                and response == self._expected_response(user.password, self._challenge)
            )
            self._challenge = None
            failure = LOGIN_FAILED if profile.plaintext_login else LEGACY_LOGIN_FAILED
        elif password is not None and profile.plaintext_login:
            ok = user is not None and user.password == password
            failure = LOGIN_FAILED
        else:
            # A bare /login (or any /login on a pre-6.43 router) is answered with a challenge;
            # modern routers still hand it out, then refuse the MD5 response.
            self._challenge = os.urandom(16)
            return Outcome((("!done", f"=ret={self._challenge.hex()}"),))
        counters = emu.recorder.counters
        if ok:
            self.user = name
            counters.logins_ok += 1
            return Outcome((DONE,))
        counters.logins_failed += 1
        self._close_after_reply = emu.close_after_failed_login
        return Outcome((trap(failure), DONE))

    @staticmethod
    def _expected_response(password: str, challenge: bytes) -> str:
        digest = hashlib.md5(b"\x00" + password.encode() + challenge).hexdigest()
        return "00" + digest

    def _cancel(self, command: Command, job: _Job | None = None) -> None:
        target = command.attrs.get("tag")
        victims = [j for j in self._running if target is None or j.command.tag == target]
        for victim in victims:
            victim.cancelled.set()
        out: list[Sentence] = []
        for victim in victims:
            out += self._tagged([trap("interrupted", 2)], victim.command.tag)
        out += self._tagged([DONE], command.tag)
        for victim in victims:
            out += self._tagged([DONE], victim.command.tag)
        self._write(out, finishes=[*victims, *([job] if job else [])])

    def _stream(self, job: _Job, stream: Stream, delay: float) -> None:
        if delay > 0 and job.cancelled.wait(delay):
            return
        started = time.monotonic()
        tag = job.command.tag
        while True:
            rows = self._tagged([("!re", *_attr_words(r)) for r in stream.rows()], tag)
            if not self._write(rows, guard=job):
                return
            elapsed = time.monotonic() - started
            if stream.duration is not None and elapsed + stream.interval > stream.duration:
                if not job.cancelled.wait(max(stream.duration - elapsed, 0)):
                    self._reply(job, [DONE])
                return
            if job.cancelled.wait(stream.interval):
                return


def _attr_words(row: Mapping[str, str]) -> list[str]:
    return [f"={k}={v}" for k, v in row.items()]


class RouterOsEmulator:
    """A RouterOS API server (plain, plus TLS when given a context) on 127.0.0.1.

    `users` maps user names to passwords (each gets the full group; `add_user` sets
    policies). `profile` is a version ("6.49", "7.16", "7.21", any other) or a `Profile`;
    None keeps the given state's, else the current 7.x. `latency` (seconds) holds back
    every reply. `before_login` picks the answer to commands sent before logging in:
    `!fatal not logged in` (recorded) or a "not logged in" trap. `ssl_context` adds an
    api-ssl listener; "adh" makes it offer only anonymous DH, as api-ssl does without a
    certificate.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        users: Mapping[str, str] | None = None,
        profile: str | Profile | None = None,
        state: RouterState | None = None,
        ssl_context: ssl.SSLContext | Literal["adh"] | None = None,
        tls_port: int = 0,
        latency: float = 0.0,
        close_after_failed_login: bool = False,
        before_login: BeforeLogin = "fatal",
        max_sessions: int | None = None,
        route_check_interval: float = 1.0,
        transcript_limit: int | None = 100_000,
        tls_handshake_timeout: float = 5.0,
    ) -> None:
        if profile is None:
            resolved = state.profile if state is not None else Profile.named(CURRENT)
        else:
            resolved = profile if isinstance(profile, Profile) else Profile.named(profile)
        self.host = host
        self.state = state if state is not None else RouterState(profile=resolved)
        self.state.profile = resolved
        if users is not None or not self.state.users:
            for name, password in (users if users is not None else {"admin": ""}).items():
                self.state.add_user(name, password)
        self.router = Router(self.state, route_check_interval)
        if ssl_context == "adh":
            ssl_context = anonymous_dh_context()
        self.latency = latency
        self.close_after_failed_login = close_after_failed_login
        self.before_login: BeforeLogin = before_login
        self.max_sessions = max_sessions
        self.tls_handshake_timeout = tls_handshake_timeout
        self.faults = FaultPlan()
        self.recorder = Recorder(transcript_limit)
        self._ssl_context = ssl_context
        self._ports = {"plain": port, "tls": tls_port}
        self._servers: dict[str, gevent.server.StreamServer] = {}
        self._sessions: dict[int, _Session] = {}
        self._next_connection = 1
        self._refusing: RefuseMode | None = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> RouterOsEmulator:
        """Bind and listen; returns once connections are accepted."""
        self._listen()
        self._started = True
        return self

    def stop(self) -> None:
        self._started = False
        self._unlisten()
        self.drop_all_connections()

    def __enter__(self) -> RouterOsEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _listen(self) -> None:
        kinds = ["plain"] + (["tls"] if self._ssl_context is not None else [])
        for kind in kinds:
            if kind in self._servers:
                continue
            server = gevent.server.StreamServer(
                (self.host, self._ports[kind]),
                lambda sock, peer, tls=(kind == "tls"): self._accept(sock, peer, tls),
            )
            server.start()
            if self._refusing == "ignore":
                server.stop_accepting()
            # Keep the port: a "router up" after "router down" comes back on the same one.
            self._ports[kind] = server.server_port
            self._servers[kind] = server

    def _unlisten(self) -> None:
        for server in self._servers.values():
            server.close()
        self._servers.clear()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self._ports["plain"])

    @property
    def tls_address(self) -> tuple[str, int] | None:
        return (self.host, self._ports["tls"]) if self._ssl_context is not None else None

    @property
    def profile(self) -> Profile:
        return self.router.profile

    @profile.setter
    def profile(self, value: str | Profile) -> None:
        self.router.profile = value if isinstance(value, Profile) else Profile.named(value)

    @property
    def users(self) -> dict[str, str]:
        """User names and passwords (a copy; `add_user` changes them)."""
        return {name: user.password for name, user in self.state.users.items()}

    def add_user(self, name: str, password: str = "", group: str | Iterable[str] = "full") -> None:
        """Add or replace a user; `group` is full/read/write or policies (`api,read`)."""
        self.state.add_user(name, password, group)

    # -- outages -----------------------------------------------------------------------

    def router_down(self, rst: bool = False) -> None:
        """The router goes away: connects are refused and every session drops."""
        self._unlisten()
        self.drop_all_connections(rst)

    def router_up(self) -> None:
        """Listen again, on the same port(s). State was kept."""
        if self._started:
            self._listen()

    def refuse_connections(self, mode: RefuseMode | None = "close") -> None:
        """Turn new connections away; None goes back to normal. Open sessions are untouched.

        "close" / "rst": accept, then close at once with FIN / RST. "ignore": stop calling
        accept(), so the kernel completes the handshake but nothing ever answers the login.
        """
        self._refusing = mode
        for server in self._servers.values():
            if mode == "ignore":
                server.stop_accepting()
            else:
                server.start_accepting()

    def reboot(self, renumber: bool | Literal["compact"] = False, rst: bool = False) -> None:
        """The router restarts: every session drops, uptime starts again, state stays.

        `renumber=True` also gives every row a new `.id` (rows and order kept);
        `"compact"` numbers them from *1 again, so an old id may name another row.
        Whether a real reboot renumbers is not recorded (GUESS), so it is a switch.
        """
        self.drop_all_connections(rst)
        self.state.reboot_clock()
        if renumber:
            self.state.renumber(compact=renumber == "compact")

    def drop_all_connections(self, rst: bool = False) -> None:
        """A router restart as the client sees it: every session ends, state stays."""
        for session in list(self._sessions.values()):
            session.close(rst)

    def connections(self) -> list[ConnectionInfo]:
        return [
            ConnectionInfo(s.id, s.peer, s.tls, s.user, s.in_flight)
            for s in self._sessions.values()
        ]

    def _accept(self, sock: socket.socket, peer: tuple[str, int], tls: bool) -> None:
        counters = self.recorder.counters
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        full = self.max_sessions is not None and len(self._sessions) >= self.max_sessions
        if self._refusing is not None or full:
            counters.connections_refused += 1
            _close(sock, rst=self._refusing == "rst")
            return
        if tls:
            assert self._ssl_context is not None
            try:
                sock.settimeout(self.tls_handshake_timeout)
                # gevent's SSLSocket keeps the handshake cooperative whatever module made
                # the context.
                sock = gevent_ssl.SSLSocket(sock=sock, server_side=True, _context=self._ssl_context)
                sock.settimeout(None)
            except (OSError, ValueError):
                counters.tls_handshake_failures += 1
                _close(sock)
                return
        number = self._next_connection
        self._next_connection += 1
        session = _Session(self, sock, peer, number, tls)
        self._sessions[number] = session
        counters.connections_accepted += 1
        counters.connections_open += 1
        counters.max_connections_open = max(
            counters.max_connections_open, counters.connections_open
        )
        session.run()

    def _session_ended(self, session: _Session) -> None:
        if self._sessions.pop(session.id, None) is not None:
            counters = self.recorder.counters
            counters.connections_open -= 1
            counters.disconnects += 1

    # -- transcript and counters -------------------------------------------------------

    @property
    def transcript(self) -> list[TranscriptEntry]:
        """Every sentence read and written, oldest first (bounded by `transcript_limit`)."""
        return self.recorder.transcript

    def sent(self, command: str | None = None) -> list[TranscriptEntry]:
        """Sentences the clients sent, optionally only those with this command word."""
        return [
            e
            for e in self.recorder.transcript
            if e.direction == "in" and (command is None or e.command == command)
        ]

    def clear_transcript(self) -> None:
        self.recorder.clear_transcript()

    @property
    def counters(self) -> Counters:
        return self.recorder.counters

    def reset_counters(self) -> None:
        self.recorder.reset()

    def writes(self) -> int:
        """NAT add/set/remove/unset/enable/disable commands received since the last reset."""
        return self.recorder.writes()

    def reads(self) -> int:
        """NAT prints and route checks received since the last reset."""
        return self.recorder.reads()

    # -- faults ------------------------------------------------------------------------

    def inject(
        self,
        kind: FaultKind,
        command: str | None = None,
        *,
        attrs: Mapping[str, str | None] | None = None,
        connection: int | None = None,
        times: int | None = 1,
        **params: object,
    ) -> Fault:
        """Arm a fault; `times=None` keeps it armed until cancelled or `clear_faults()`."""
        spec = FaultSpec(kind, Match.of(command, attrs, connection), times, **params)  # type: ignore[arg-type]
        return self.faults.arm(spec)

    def clear_faults(self) -> None:
        self.faults.clear()

    def delay(self, seconds: float, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.DELAY, command, delay=seconds, **match)  # type: ignore[arg-type]

    def drop_before_reply(self, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.DROP_BEFORE_REPLY, command, **match)  # type: ignore[arg-type]

    def drop_mid_reply(self, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.DROP_MID_REPLY, command, **match)  # type: ignore[arg-type]

    def execute_then_drop(self, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.EXECUTE_THEN_DROP, command, **match)  # type: ignore[arg-type]

    def fatal(self, reason: str, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.FATAL, command, message=reason, **match)  # type: ignore[arg-type]

    def stall(self, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.STALL, command, **match)  # type: ignore[arg-type]

    def trap(
        self,
        message: str,
        command: str | None = None,
        category: int | None = None,
        **match: object,
    ) -> Fault:
        return self.inject(
            FaultKind.TRAP,
            command,
            message=message,
            category=category,
            **match,  # type: ignore[arg-type]
        )

    def trap_without_message(self, command: str | None = None, **match: object) -> Fault:
        return self.inject(FaultKind.TRAP_WITHOUT_MESSAGE, command, **match)  # type: ignore[arg-type]

    def raw(
        self, payload: bytes, command: str | None = None, close: bool = False, **match: object
    ) -> Fault:
        return self.inject(FaultKind.RAW, command, payload=payload, close=close, **match)  # type: ignore[arg-type]
