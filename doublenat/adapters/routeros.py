"""The MikroTik, through a small pool of routeros-api connections (the `Router` contract).

routeros-api is one blocking request/response stream per connection with no locking, so:
- four connections sit in a gevent queue and each is used by one greenlet at a time;
- every call has a deadline; a transport error, timeout, `!fatal` or malformed reply
  discards the connection (the next use reconnects), a `!trap` does not;
- `TCP_NODELAY` is set after each connect, and the library's socket wrapper is made to
  write a whole sentence at once and to read from a buffer (it writes word by word and
  reads a byte or a word per `recv`: ten segments and a router wake-up per command);
- a connection that turns out dead after sitting in the pool does not cost the caller:
  a read is retried once on a fresh connection; a write first checks, by the rule's
  comment, whether it already took effect;
- no text from the library reaches a log unredacted: it quotes whole sentences,
  including `/login`'s password.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import gevent
import routeros_api
from gevent.queue import Empty, LifoQueue
from routeros_api.exceptions import (
    RouterOsApiCommunicationError,
    RouterOsApiConnectionClosedError,
    RouterOsApiError,
)

from doublenat import stats
from doublenat.engine.contracts import (
    AlreadyExists,
    Clock,
    InvalidValue,
    NatRule,
    NoSuchItem,
    NotPermitted,
    NotSent,
    RouterTrap,
    RouterUnavailable,
    Row,
    RuleRef,
    RuleSpec,
    StaleSession,
    UnknownCommand,
    monotonic,
)
from doublenat.redact import Redactor
from doublenat.settings import Endpoint, Settings

log = logging.getLogger("doublenat.router")

T = TypeVar("T")
Work = Callable[[Any, int], T]  # (the library's api object, the connection's session)
NAT = "/ip/firewall/nat"
_PROPLIST = (".id,chain,protocol,in-interface,in-interface-list,dst-port,to-addresses,"
             "to-ports,comment,disabled")
_ROUTE_PROPLIST = "dst-address,gateway,immediate-gw,distance,routing-table,routing-mark,active"
_UPTIME_SLACK = 5.0
_BACKOFF_FIRST, _BACKOFF_MAX = 0.5, 30.0
_END_OF_SENTENCE = b"\x00"  # the empty word, as routeros-api writes it
_READ_SIZE = 65536
ANONYMOUS_DH_CIPHERS = "ALL:ADH:@SECLEVEL=0"


class _Deadline(Exception):
    """Private timeout marker, so it cannot be confused with one raised by the caller."""


@dataclass(eq=False)
class _Connection:
    api_pool: routeros_api.RouterOsApiPool | None = None
    api: Any = None
    calls: int = 0  # successful calls on the current TCP connection
    ever_connected: bool = False  # so a new connection in this slot is a reconnect
    session: int = 0  # the router session (boot) this connection was opened in

    def discard(self) -> None:
        if self.api_pool is not None:
            with contextlib.suppress(Exception):  # closing a broken socket may fail any way
                self.api_pool.disconnect()
        self.api_pool, self.api, self.calls = None, None, 0


@dataclass
class RouterStats:
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    discarded: int = 0
    calls: int = 0
    traps: int = 0
    retries: int = 0
    latencies: deque[float] = field(default_factory=stats.samples)  # seconds


class _Transport(Exception):
    """A call failed below the API level; `reused` says the connection had worked before,
    `sent` that the command itself had been handed to the connection."""

    def __init__(self, message: str, reused: bool, sent: bool) -> None:
        super().__init__(message)
        self.reused = reused
        self.sent = sent

    def unavailable(self) -> RouterUnavailable:
        return RouterUnavailable(str(self)) if self.sent else NotSent(str(self))


class RouterOsClient:
    def __init__(
        self,
        address: Endpoint,
        user: str,
        password: str,
        *,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_verify: bool = True,
        size: int = 4,
        timeout: float = 5.0,
        clock: Clock = monotonic,
        observe_call: Callable[[float], None] | None = None,
    ) -> None:
        self.address = address
        self._user = user
        self._password = password
        self._redact = Redactor((password,))
        self.timeout = timeout
        self.size = size
        self._clock = clock
        self._ssl_context = _tls_context(tls_ca, tls_verify) if tls else None
        self._queue: LifoQueue[_Connection] = LifoQueue()
        for _ in range(size):
            self._queue.put(_Connection())
        self._failures = 0
        self._down_until = 0.0
        self._session = 0
        self._uptime_seen: tuple[float, float] | None = None  # (router uptime, our clock)
        self.observe_call = observe_call
        self._waiting = 0  # greenlets waiting for a connection
        self.stats = RouterStats()
        self.closed = False

    @classmethod
    def from_settings(
        cls, settings: Settings, size: int = 4, clock: Clock = monotonic
    ) -> RouterOsClient:
        return cls(
            settings.api_address,
            settings.api_user,
            settings.api_password,
            tls=settings.api_tls,
            tls_ca=settings.api_tls_ca,
            tls_verify=settings.api_tls_verify,
            size=size,
            timeout=settings.router_timeout,
            clock=clock,
        )

    # --------------------------------------------------------------- contract

    @property
    def session(self) -> int:
        return self._session

    def add_rule(self, spec: RuleSpec) -> RuleRef:
        # Bytes through the library's binary resource: the creation hot path skips its
        # typed str layer, which costs more than the command itself on a fast router.
        words = {
            "chain": b"dstnat",
            "action": b"dst-nat",
            "protocol": spec.proto.label.encode(),
            "in-interface": spec.interface.encode(),
            "dst-port": str(spec.dst_port).encode(),
            "to-addresses": str(spec.to_address).encode(),
            "to-ports": str(spec.to_port).encode(),
            "comment": spec.comment.encode(),
        }

        def add(api: Any, session: int) -> RuleRef:
            response = api.get_binary_resource(NAT).call("add", words)
            return RuleRef(response.done_message["ret"].decode(), session)

        try:
            return self._call(add)
        except _Transport as failed:
            if not failed.sent:
                raise failed.unavailable() from None
            # The add may have been applied before the connection broke: look first.
            try:
                existing = self.find_rules(spec.comment)
            except RouterUnavailable as exc:
                # The add was sent: whether it took effect is unknown, whatever stops the
                # lookup.
                raise RouterUnavailable(f"{failed}; then {exc}") from None
            if existing:
                return existing[0].ref
            if not failed.reused:
                raise RouterUnavailable(str(failed)) from None
            self.stats.retries += 1
            return self._call_or_raise(add)

    def remove_rule(self, ref: RuleRef) -> None:
        self._with_retry(lambda api, _s: api.get_resource(NAT).call(
            "remove", {"id": ref.rule_id}), session=ref.session)

    def update_rule(self, ref: RuleRef, **changes: str) -> None:
        words = {"id": ref.rule_id, **{k.replace("_", "-"): v for k, v in changes.items()}}
        self._with_retry(lambda api, _s: api.get_resource(NAT).call("set", words),
                         session=ref.session)

    def list_rules(self) -> list[NatRule]:
        return self._print_nat({"chain": "dstnat"})

    def find_rules(self, comment: str) -> list[NatRule]:
        return self._print_nat({"chain": "dstnat", "comment": comment})

    def route_check(self, destination: str) -> list[Row]:
        return self._rows("/ip/route", "check", {"dst-ip": destination, "once": None})

    def routes(self) -> list[Row]:
        # Active routes only: an inactive route (its tunnel down) carries no traffic.
        return self._rows("/ip/route", "print", {"proplist": _ROUTE_PROPLIST},
                          {"active": "true"})

    def interfaces(self) -> list[Row]:
        return self._rows("/interface", "print", {"proplist": "name,type,running,disabled"})

    def resource(self) -> Row:
        rows = self._rows("/system/resource", "print", {})
        return rows[0] if rows else {}

    def identity(self) -> str:
        rows = self._rows("/system/identity", "print", {})
        return str(rows[0].get("name", "")) if rows else ""

    def retry_at(self) -> float:
        """Before this monotonic time a new connection attempt is not worth making."""
        return self._down_until

    # ---------------------------------------------------- for the operator tools

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        """The context the API connections use (None without TLS)."""
        return self._ssl_context

    def read(self, path: str, verb: str = "print",
             words: dict[str, str | None] | None = None,
             queries: dict[str, str] | None = None) -> list[Row]:
        """Any read-only command; retried once if a pooled connection turned out dead."""
        return self._rows(path, verb, dict(words or {}), queries)

    def add_once(self, path: str, words: dict[str, str]) -> RuleRef:
        """`add` without any retry (the caller cleans up by comment); returns the new id."""

        def run(api: Any, session: int) -> RuleRef:
            response = api.get_resource(path).call("add", dict(words))
            return RuleRef(str(response.done_message["ret"]), session)

        return self._call_or_raise(run)

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                connection = self._queue.get_nowait()
            except Empty:
                break
            connection.discard()

    # -------------------------------------------------------------- internals

    def _rows(self, path: str, verb: str, words: dict[str, str | None],
              queries: dict[str, str] | None = None) -> list[Row]:
        def run(api: Any, _session: int) -> list[Row]:
            rows = api.get_resource(path).call(verb, words, queries or {})
            return [{str(k): str(v) for k, v in row.items()} for row in rows]

        return self._with_retry(run)

    def _print_nat(self, queries: dict[str, str]) -> list[NatRule]:
        def run(api: Any, session: int) -> list[NatRule]:
            rows = api.get_resource(NAT).call("print", {"proplist": _PROPLIST}, queries)
            return [_rule(row, session) for row in rows]

        return self._with_retry(run)

    def _with_retry(self, work: Work[T], session: int | None = None) -> T:
        """For reads and idempotent writes: one more try if a pooled connection was dead."""
        try:
            return self._call(work, session)
        except _Transport as failed:
            if not failed.reused:
                raise failed.unavailable() from None
            self.stats.retries += 1
            return self._call_or_raise(work, session)

    def _call_or_raise(self, work: Work[T], session: int | None = None) -> T:
        try:
            return self._call(work, session)
        except _Transport as failed:
            raise failed.unavailable() from None

    def _call(self, work: Work[T], session: int | None = None) -> T:
        """Run `work(api, session)` on a pooled connection. With `session`, the command
        is only sent on a connection of that router session (else StaleSession)."""
        self._waiting += 1
        try:
            connection = self._queue.get(timeout=self.timeout)
        except Empty:
            raise NotSent(
                f"all {self.size} API connections stayed busy for {self.timeout:g} s"
            ) from None
        finally:
            self._waiting -= 1
        reused = connection.api is not None
        started = self._clock()
        in_step = False  # is the connection known to be between two sentences?
        sent = False
        try:
            with gevent.Timeout(self.timeout, _Deadline):
                if connection.api is None:
                    self._connect(connection)
                if session is not None and session != connection.session:
                    in_step = True
                    raise StaleSession(
                        f"rule id from router session {session}, now {connection.session}")
                sent = True
                result = work(connection.api, connection.session)
            in_step = True
        except RouterOsApiCommunicationError as exc:
            # A trap: the router refused this command; the connection is still in step.
            in_step = True
            self.stats.traps += 1
            message = self._redact(exc.original_message)
            raise classify_trap(message)(message) from None
        except (RouterUnavailable, StaleSession):
            raise
        except (_Deadline, RouterOsApiError, OSError, KeyError, AssertionError, ValueError,
                IndexError) as exc:
            self.stats.discarded += 1
            self._suspect = True  # the router may restart while we cannot see it
            raise _Transport(self._describe(exc), reused, sent) from None
        finally:
            if not in_step:
                connection.discard()  # whatever broke it (a caller's timeout included)
            self._queue.put(connection)
        connection.calls += 1
        self.stats.calls += 1
        elapsed = self._clock() - started
        self.stats.latencies.append(elapsed)
        if self.observe_call is not None:
            self.observe_call(elapsed)
        if self._waiting:
            # Let the greenlet waiting for a connection send its command now, before this
            # one goes on with its own work: keeps all four connections busy.
            gevent.sleep(0)
        return result

    def _connect(self, connection: _Connection) -> None:
        now = self._clock()
        if now < self._down_until:
            raise NotSent(
                f"router {self.address} unreachable; next attempt in "
                f"{self._down_until - now:.1f} s"
            )
        api_pool = routeros_api.RouterOsApiPool(
            self.address.host,
            username=self._user,
            password=self._password,
            port=self.address.port,
            plaintext_login=True,
            ssl_context=self._ssl_context,
        )
        api_pool.set_timeout(self.timeout)
        try:
            api = api_pool.get_api()
        except RouterOsApiCommunicationError as exc:
            api_pool.disconnect()
            self._connect_failed()
            raise NotSent(
                f"login to {self.address} as {self._user!r} failed: "
                f"{self._redact(exc.original_message)}"
            ) from None
        except BaseException as exc:
            api_pool.disconnect()
            if isinstance(exc, Exception | _Deadline):
                self._connect_failed()
                raise NotSent(
                    f"cannot connect to {self.address}: {self._describe(exc)}"
                ) from None
            raise
        raw = getattr(api_pool.socket, "socket", None)
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _SentenceIO(api_pool.socket, raw)
        connection.api_pool, connection.api, connection.calls = api_pool, api, 0
        connection.session = self._session_of(api)
        self.stats.connects += 1
        if connection.ever_connected:
            self.stats.reconnects += 1
        connection.ever_connected = True
        if self._failures:
            log.info("router reachable again", extra={"event": "router.reconnected",
                                                      "router": str(self.address)})
        self._failures, self._down_until = 0, 0.0

    def _session_of(self, api: Any) -> int:
        """The router session of a new connection: the same as before unless the router's
        uptime shows it restarted since we last looked (or cannot be read: then assume it
        did). Ids learned in an older session are only used after re-identification."""
        try:
            rows = api.get_resource("/system/resource").call("print", {"proplist": "uptime"})
            uptime = parse_duration(str(rows[0].get("uptime", ""))) if rows else None
        except RouterOsApiCommunicationError:
            uptime = None
        now = self._clock()
        previous, self._uptime_seen = self._uptime_seen, (
            None if uptime is None else (uptime, now))
        if previous is None or uptime is None:
            restarted = self._session > 0
        else:
            elapsed = now - previous[1]
            restarted = uptime + max(_UPTIME_SLACK, elapsed * 0.01) < previous[0] + elapsed
        if restarted or self._session == 0:
            self._session += 1
            if restarted:
                log.warning("the router restarted (or its uptime cannot be read): rule ids "
                            "are confirmed by comment before use", extra={
                                "event": "router.restarted", "router": str(self.address),
                                "uptime": uptime, "session": self._session})
        return self._session

    def _connect_failed(self) -> None:
        self.stats.connect_failures += 1
        if self._clock() < self._down_until:
            return  # concurrent attempts failing together count as one step of backoff
        self._failures += 1
        delay = min(_BACKOFF_FIRST * 2 ** (self._failures - 1), _BACKOFF_MAX)
        self._down_until = self._clock() + delay

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, _Deadline):
            return f"no answer within {self.timeout:g} s"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return f"TLS certificate rejected: {exc.verify_message}"
        if isinstance(exc, ssl.SSLError) and "HANDSHAKE_FAILURE" in str(exc):
            hint = ("; api-ssl without a certificate offers only anonymous DH, which is "
                    "accepted only with MIKROTIK_API_TLS_VERIFY=false"
                    if self._ssl_context is not None
                    and self._ssl_context.verify_mode != ssl.CERT_NONE else "")
            return f"TLS handshake failed: no cipher both sides accept{hint}"
        text = " ".join(str(a) if not isinstance(a, bytes) else a.decode("utf-8", "replace")
                        for a in exc.args) or type(exc).__name__
        return self._redact(f"{type(exc).__name__}: {text}")

class _SentenceIO:
    """One write per sentence and buffered reads, on one connection's socket wrapper.

    routeros-api calls `wrapper.send` once per word (the length prefix and the word) and
    `wrapper.receive(n)` for every length byte and every word. Here words are collected
    until the empty word that ends every sentence and go out in one `sendall`; reads are
    served from the last `recv` (up to 64 KiB), refilled when used up. Behaviour is
    otherwise the library's: a closed connection raises its ConnectionClosed error, a
    timeout or socket error propagates. A call that fails half-way leaves the connection
    out of step, and `_call` discards it, these buffers with it.
    """

    __slots__ = ("_data", "_pending", "_pos", "_sendall", "_sock")

    def __init__(self, wrapper: Any, sock: socket.socket) -> None:
        self._sock = sock
        self._sendall = sock.sendall
        self._pending: list[bytes] = []
        self._data = b""
        self._pos = 0
        wrapper.send = self.send
        wrapper.receive = self.receive

    def send(self, word: bytes) -> None:
        pending = self._pending
        pending.append(word)
        if word == _END_OF_SENTENCE:
            payload = b"".join(pending)
            pending.clear()
            self._sendall(payload)

    def receive(self, length: int) -> bytes:
        data, pos = self._data, self._pos
        if pos >= len(data):
            data = self._sock.recv(_READ_SIZE)
            if not data:
                raise RouterOsApiConnectionClosedError
            self._data, pos = data, 0
        chunk = data[pos:pos + length]
        self._pos = pos + len(chunk)
        return chunk


def _rule(row: dict[str, Any], session: int) -> NatRule:
    return NatRule(
        rule_id=str(row.get("id", "")),
        protocol=str(row.get("protocol", "")),
        in_interface=str(row.get("in-interface", "")),
        dst_port=str(row.get("dst-port", "")),
        to_addresses=str(row.get("to-addresses", "")),
        to_ports=str(row.get("to-ports", "")),
        comment=str(row.get("comment", "")),
        disabled=str(row.get("disabled", "false")).lower() in ("true", "yes"),
        in_interface_list=str(row.get("in-interface-list", "")),
        session=session,
    )


# RouterOS wording, matched once, here: the engine acts on the error types.
_TRAPS: tuple[tuple[str, type[RouterTrap]], ...] = (
    ("no such item", NoSuchItem),
    ("no such command", UnknownCommand),  # also "no such command prefix"
    ("not enough permissions", NotPermitted),
    ("input does not match any value", InvalidValue),
    ("invalid value", InvalidValue),
    ("already have", AlreadyExists),
)


def classify_trap(message: str) -> type[RouterTrap]:
    """The error type of a `!trap` message (recorded wordings: the emulator's NOTES.md)."""
    lowered = message.lower()
    for words, kind in _TRAPS:
        if words in lowered:
            return kind
    return RouterTrap


_DURATION = re.compile(r"(\d+)(w|d|h|ms|m|s)")
_UNIT = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """RouterOS uptime: `1w2d3h4m5s` (v6 and v7) or `2d03:04:05`; None if unreadable."""
    text = text.strip()
    days = 0.0
    if ":" in text:
        head, _, clock = text.rpartition("d")
        parts = clock.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        days = float(head) if head.isdigit() else 0.0
        return days * 86400 + int(parts[0]) * 3600 + int(parts[1]) * 60 + int(parts[2])
    total, pos = 0.0, 0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += int(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and text else None


def _tls_context(ca: Path | None, verify: bool) -> ssl.SSLContext:
    # Built after gevent patched ssl, so wrapped sockets cooperate with the hub.
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # RouterOS's api-ssl without a certificate offers only anonymous-DH suites. OpenSSL
        # 3's DEFAULT removes those for good ("!aNULL"), so "DEFAULT:ADH" enables none;
        # ALL keeps them (mktxp fixed the same bug: its PR #263). SECLEVEL 0 allows them.
        context.set_ciphers(ANONYMOUS_DH_CIPHERS)
        log.warning("MIKROTIK_API_TLS_VERIFY=false: the router's certificate is not checked",
                    extra={"event": "tls.unverified"})
    return context
