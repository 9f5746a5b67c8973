"""A fake upstream NAT-PMP gateway for the lab: a VPN provider's, or an RFC-correct router's.

doublenat talks NAT-PMP to its upstream as a client. This emulator plays that upstream on
a UDP socket so tests can drive the proxy (or a real client such as natpmpc) against a known,
switchable behaviour:

- profile ``rfc``: miniupnpd-like but RFC 6886-correct. The suggested port (0 means the
  internal port) or the next free one; renewals keep their port; lifetimes capped at 7200 s;
  internal port 0 with a lifetime is refused with result 2, as miniupnpd does. Traffic is
  delivered to the internal port.
- profile ``proton``: like ProtonVPN's gateway (sources and guesses: GATEWAY_NOTES.md). A
  random port from a range, shared by the UDP and TCP mappings of one internal port;
  lifetimes capped at 60 s; internal port 0 with a lifetime is granted and echoed (Proton's
  documented ``natpmpc -a 1 0 udp 60``); traffic is delivered to the granted external port.

What a real upstream does to its clients is switched at run time through methods:

- short leases: ``max_lifetime`` (per profile, per emulator, or ``set_max_lifetime``);
- a moved port: ``change_ports`` (all), ``change_port`` (one mapping, optionally to a
  given port), ``move_every_renewals`` (every Nth renewal of each mapping);
- a reboot (``restart``), a VPN reconnect to another server (``reconnect``: epoch reset,
  every mapping forgotten, a new public address, optionally some downtime, all at once);
- silence: ``silence`` (until turned off), ``silence_for`` (for a while on the emulator's
  clock, state intact); a fixed error result, latency, dropping the first N requests;
- a Proton-like session: ``set_dynamics(ProtonDynamics(...))`` plays a seeded schedule of
  moves and reconnects on the emulator's clock (doublenat.lab.dynamics).

Tests observe the table (``mappings``), the ``history`` of public addresses, epochs,
silences and moves, the ``renewals`` and ``moves`` per mapping, request counters and the
transcript. Time comes from an injectable clock, so expiry, schedules and silences run
without sleeping: they take effect lazily when a request arrives, on ``tick()``, and from
the janitor.

All state is touched only from greenlets of one hub, so it needs no locks: nothing between
reading and writing the table yields, and observers are told only once a change is whole.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Address
from types import TracebackType
from typing import cast

import gevent
from gevent.pool import Pool
from gevent.server import DatagramServer

from doublenat.lab.dynamics import Happening, HappeningKind, ProtonDynamics
from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Reply,
    Request,
    Result,
    UnknownOpcodeRequest,
    UnsupportedOpcodeReply,
    UnsupportedVersionReply,
    UnsupportedVersionRequest,
    map_failure,
    pack_reply,
    parse_request,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Source = tuple[str, int]
MappingKey = tuple[str, Proto, int]

MIN_PORT = 1
MAX_PORT = 65535
# Random picks before falling back to a scan, so a nearly full range still finds its holes.
RANDOM_TRIES = 64


class Profile(StrEnum):
    RFC = "rfc"
    PROTON = "proton"


DEFAULT_MAX_LIFETIME = {Profile.RFC: 7200, Profile.PROTON: 60}
# Where an inbound packet for a mapping goes on the requester: the port it asked for (RFC
# 6886, miniupnpd) or the port it was granted (ProtonVPN; hence VPN_PORT_MODE=external).
DELIVERY = {Profile.RFC: "internal", Profile.PROTON: "external"}
# Fresh public addresses for reconnect() without one: RFC 5737 TEST-NET-3.
FRESH_ADDRESSES = "203.0.113."


class MappingEvent(StrEnum):
    """What an observer is told about; the mapping's key (source, proto, internal) is stable."""

    CREATED = "created"
    CHANGED = "changed"  # a renewal moved the mapping to another external port
    DELETED = "deleted"  # by a request, or forgotten by restart()
    EXPIRED = "expired"


class RequestKind(StrEnum):
    """How the emulator classified (and handled) one datagram."""

    ADDRESS = "address"
    CREATE = "create"
    RENEW = "renew"
    DELETE = "delete"
    DELETE_ALL = "delete_all"
    REFUSED = "refused"  # the emulator's own policy said no (result 2 or 4)
    FAILED = "failed"  # the fail_result fault answered
    SILENCED = "silenced"  # a silence fault swallowed it
    DROPPED = "dropped"  # the drop-first-N fault swallowed it
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OPCODE = "unknown_opcode"
    MALFORMED = "malformed"  # the codec said drop


class StateChangeKind(StrEnum):
    """What happened to the gateway as a whole (its history), as opposed to one mapping."""

    INITIAL = "initial"  # the emulator was made
    ADDRESS = "address"  # set_public_address: a new address, mappings and epoch kept
    RESTART = "restart"  # a reboot: epoch reset, mappings forgotten, address kept
    RECONNECT = "reconnect"  # another server: epoch reset, mappings forgotten, new address
    SILENCE = "silence"  # silence_for: nothing answered until `until`
    MOVE = "move"  # live mappings marked to move at their next renewal


@dataclass(frozen=True, slots=True)
class StateChange:
    time: float  # on the emulator's clock
    kind: StateChangeKind
    public_address: IPv4Address  # from this moment on
    epoch: int  # the epoch at this moment
    until: float | None = None  # SILENCE and RECONNECT with downtime: silent up to here
    mappings: int = 0  # RESTART and RECONNECT: forgotten; MOVE: marked


@dataclass(frozen=True, slots=True)
class GatewayMapping:
    source: str  # the requester's IP: NAT-PMP always maps to the packet's source
    proto: Proto
    internal_port: int
    external_port: int
    lifetime: int  # granted by the last create or renewal
    expires: float  # on the emulator's clock
    renewals: int = field(default=0, compare=False)  # since this mapping was created

    @property
    def key(self) -> MappingKey:
        return (self.source, self.proto, self.internal_port)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One transcript line; reply and sent are None when nothing was sent back."""

    time: float
    source: Source
    request: Request | None
    kind: RequestKind
    reply: Reply | None
    sent: bytes | None  # differs from pack_reply(reply) only under the mangle hook


Observer = Callable[[MappingEvent, GatewayMapping], None]


class _Server(DatagramServer):
    # SO_REUSEADDR would let two UDP servers share a port and split the traffic silently.
    reuse_addr = None


class GatewayEmulator:
    """An upstream NAT-PMP gateway on (host, port); port 0 binds a random free port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        profile: Profile | str = Profile.RFC,
        public_address: IPv4Address | str = "11.22.33.44",
        max_lifetime: int | None = None,
        port_range: tuple[int, int] = (32768, 65535),
        max_mappings: int | None = None,
        epoch_base: int = 0,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        janitor_interval: float | None = 1.0,
        transcript_size: int = 1000,
        dynamics: ProtonDynamics | None = None,
    ) -> None:
        lo, hi = port_range
        if not MIN_PORT <= lo <= hi <= MAX_PORT:
            raise ValueError(f"bad port range {port_range}")
        self._bind = (host, port)
        self.profile = Profile(profile)
        self._public = IPv4Address(public_address)
        self.max_lifetime = (
            DEFAULT_MAX_LIFETIME[self.profile] if max_lifetime is None else max_lifetime
        )
        self.port_range = (lo, hi)
        self.max_mappings = max_mappings
        self._clock = clock
        self._rng = rng or random.Random()
        self._janitor_interval = janitor_interval
        self._started = clock()
        self._epoch_base = epoch_base
        self._table: dict[MappingKey, GatewayMapping] = {}
        # Keys whose next renewal takes a new port: to the one given, or any (None).
        self._rotate: dict[MappingKey, int | None] = {}
        self._observers: list[Observer] = []
        self._server: _Server | None = None
        self._janitor: gevent.Greenlet | None = None
        self._silent_until: float | None = None
        self._upcoming: Iterator[Happening] | None = None
        self._next_happening: Happening | None = None

        # Faults: plain attributes, so tests may also flip them directly.
        self.silent_address = False
        self.silent_mapping = False
        self.fail_result: Result | int | None = None
        self.delay = 0.0
        self.drop_next = 0
        # Every Nth renewal of each mapping moves it to another port (None: never).
        self.move_every_renewals: int | None = None
        # Rewrites every reply's bytes before sending (short, long, wrong iport, ...).
        self.mangle: Callable[[bytes], bytes] | None = None

        self.requests_by_opcode: Counter[int] = Counter()
        self.requests_by_kind: Counter[RequestKind] = Counter()
        self.transcript: deque[Exchange] = deque(maxlen=transcript_size)
        self.history: deque[StateChange] = deque(maxlen=transcript_size)
        self.renewals: Counter[MappingKey] = Counter()  # per key, across re-creations
        self.moves: Counter[MappingKey] = Counter()  # port changes granted, per key
        self._note(StateChangeKind.INITIAL, self._started)
        if dynamics is not None:
            self.set_dynamics(dynamics)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind and serve; returns once the socket is bound, so .address is usable."""
        if self._server is not None:
            raise RuntimeError("gateway emulator already started")
        server = _Server(self._bind, self._handle, spawn=Pool())
        server.start()
        self._server = server
        if self._janitor_interval is not None:
            self._janitor = gevent.spawn(self._janitor_loop, self._janitor_interval)
        log.info("gateway emulator (%s) on %s:%d", self.profile, *self.address)

    def stop(self, timeout: float = 0.5) -> None:
        """Close the socket; replies still waiting out a delay get `timeout` to go out."""
        if self._janitor is not None:
            self._janitor.kill()
            self._janitor = None
        if self._server is not None:
            self._server.stop(timeout=timeout)
            self._server = None

    def __enter__(self) -> GatewayEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> Source:
        if self._server is None:
            raise RuntimeError("gateway emulator not started")
        host, port = self._server.address[:2]
        return (host, port)

    # --------------------------------------------------------------------- faults

    def silence(self, *, address: bool = True, mapping: bool = True) -> None:
        """Answer nothing to opcode 0 and/or to mapping requests (False turns it back on)."""
        self.silent_address = address
        self.silent_mapping = mapping

    def silence_for(self, seconds: float) -> float:
        """Answer nothing at all until `seconds` have passed on the emulator's clock, then
        answer again with state intact: mappings kept (their leases still run out), epoch
        still counting. Not a reconnect. Returns the time the silence ends."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        now = self._clock()
        self._advance(now)
        until = now + seconds
        self._silent_until = until
        self._note(StateChangeKind.SILENCE, now, until=until)
        return until

    @property
    def silent(self) -> bool:
        """True while a silence_for() (or a reconnect's downtime) lasts."""
        return self._silent_until is not None and self._clock() < self._silent_until

    def fail_with(self, result: Result | int = Result.NETWORK_FAILURE) -> None:
        """Answer every address and mapping request with `result`, granting nothing."""
        self.fail_result = result

    def drop_first(self, count: int) -> None:
        """Swallow the next `count` datagrams of any kind, then answer normally."""
        self.drop_next = count

    def set_delay(self, seconds: float) -> None:
        """Hold every reply back this long (real time), like a slow tunnel."""
        self.delay = seconds

    def set_max_lifetime(self, seconds: int) -> None:
        """Cap granted lifetimes from now on (leases already granted keep their expiry)."""
        if not 1 <= seconds < 2**32:
            raise ValueError(f"bad max lifetime {seconds}")
        self.max_lifetime = seconds

    def set_public_address(self, address: IPv4Address | str) -> None:
        """Change the address opcode 0 reports; mappings and epoch stay (no validation, so
        a private address can be served on purpose)."""
        now = self._clock()
        self._advance(now)
        self._public = IPv4Address(address)
        self._note(StateChangeKind.ADDRESS, now)

    def restart(self, epoch: int = 0) -> None:
        """Reboot: the epoch starts again from `epoch` and every mapping is forgotten.

        Observers get DELETED for each forgotten mapping, since its forwarding is gone.
        """
        now = self._clock()
        self._advance(now)
        self._expire(now)
        lost = self._forget_all(now, epoch)
        self._note(StateChangeKind.RESTART, now, mappings=len(lost))
        self._notify_all(MappingEvent.DELETED, lost)

    def reconnect(
        self,
        new_address: IPv4Address | str | None = None,
        *,
        epoch: int = 0,
        downtime: float = 0.0,
    ) -> IPv4Address:
        """The VPN client reconnected to another server, as seen from inside the tunnel.

        At once: the epoch starts again from `epoch`, every mapping is forgotten (observers
        get DELETED), and opcode 0 reports `new_address` (default: a fresh documentation
        address never served before). With `downtime` the gateway first answers nothing
        for that long, like a client that takes a while to come back. Returns the address.
        """
        now = self._clock()
        self._advance(now)
        address = IPv4Address(new_address) if new_address is not None else self._fresh_address()
        self._reconnect_at(now, address, epoch, downtime)
        return address

    def change_ports(self) -> None:
        """Every live mapping moves to another external port at its next renewal.

        In the proton profile the UDP and TCP companions move to the same new port.
        """
        now = self._clock()
        self._advance(now)
        self._expire(now)
        self._mark_all(now)

    def change_port(
        self,
        source: str,
        proto: Proto,
        internal_port: int,
        *,
        to: int | None = None,
        companion: bool = True,
    ) -> None:
        """This mapping moves at its next renewal: to port `to` if that is free then,
        else to any other port. In the proton profile its companion (the other protocol of
        the same internal port) moves with it unless `companion` is False."""
        if to is not None and not MIN_PORT <= to <= MAX_PORT:
            raise ValueError(f"bad port {to}")
        key: MappingKey = (source, proto, internal_port)
        now = self._clock()
        self._advance(now)
        self._expire(now)
        if key not in self._table:
            raise KeyError(f"no mapping {key}")
        self._rotate[key] = to
        if companion and self.profile is Profile.PROTON:
            other: MappingKey = (source, _other(proto), internal_port)
            if other in self._table:
                self._rotate[other] = to

    def set_dynamics(self, dynamics: ProtonDynamics | None, start: float | None = None) -> None:
        """Play `dynamics`' schedule from `start` (default: now) on the emulator's clock;
        None stops it. The schedule is `dynamics.timeline(start, ..., public_address)`."""
        if dynamics is None:
            self._upcoming = self._next_happening = None
            return
        begin = self._clock() if start is None else start
        self._upcoming = dynamics.happenings(begin, self._public)
        self._next_happening = next(self._upcoming, None)

    def clear_faults(self) -> None:
        """Back to normal answering; the dynamics schedule, if any, keeps playing."""
        self.silent_address = False
        self.silent_mapping = False
        self.fail_result = None
        self.delay = 0.0
        self.drop_next = 0
        self.move_every_renewals = None
        self.mangle = None
        self._silent_until = None
        self._rotate.clear()

    # -------------------------------------------------------------- introspection

    @property
    def public_address(self) -> IPv4Address:
        self._advance(self._clock())
        return self._public

    @property
    def epoch(self) -> int:
        now = self._clock()
        self._advance(now)
        return self._epoch(now)

    @property
    def delivery(self) -> str:
        """"internal" or "external": the port inbound traffic is delivered to."""
        return DELIVERY[self.profile]

    def delivery_port(self, mapping: GatewayMapping) -> int:
        """The port on the requester that traffic for `mapping` arrives at."""
        return mapping.external_port if self.delivery == "external" else mapping.internal_port

    def mappings(self) -> list[GatewayMapping]:
        """The live table, expired entries removed first."""
        self.tick()
        return list(self._table.values())

    def mapping(self, source: str, proto: Proto, internal_port: int) -> GatewayMapping | None:
        self.tick()
        return self._table.get((source, proto, internal_port))

    def reset_counters(self) -> None:
        self.requests_by_opcode.clear()
        self.requests_by_kind.clear()
        self.transcript.clear()
        self.renewals.clear()
        self.moves.clear()

    def add_observer(self, observer: Observer) -> None:
        """Called synchronously, before the reply is sent, in the handler greenlet: keep it
        quick. Exceptions are logged and swallowed."""
        self._observers.append(observer)

    def remove_observer(self, observer: Observer) -> None:
        self._observers.remove(observer)

    def tick(self) -> None:
        """Catch up with the clock: play due scheduled happenings, then expire leases.
        Requests, the janitor and the introspection methods do it on their own."""
        now = self._clock()
        self._advance(now)
        self._expire(now)

    def expire(self) -> list[GatewayMapping]:
        """Drop mappings whose lifetime ran out; also done lazily and by the janitor."""
        now = self._clock()
        self._advance(now)
        return self._expire(now)

    # ------------------------------------------------------------------- serving

    def _handle(self, data: bytes, source: Source) -> None:
        # Never let an exception out: gevent would print it and a test would miss it.
        try:
            self._serve(data, (source[0], source[1]))
        except Exception:
            log.exception("gateway emulator: failed on a datagram from %s:%d", *source[:2])

    def _serve(self, data: bytes, source: Source) -> None:
        now = self._clock()
        request = parse_request(data)
        if request is None:
            self._record(now, source, None, RequestKind.MALFORMED, None, None)
            return
        self.requests_by_opcode[data[1]] += 1
        self._advance(now)
        if self._silent_until is not None and now < self._silent_until:
            self._record(now, source, request, RequestKind.SILENCED, None, None)
            return
        if self.drop_next > 0:
            self.drop_next -= 1
            self._record(now, source, request, RequestKind.DROPPED, None, None)
            return
        if (isinstance(request, AddressRequest) and self.silent_address) or (
            isinstance(request, MapRequest) and self.silent_mapping
        ):
            self._record(now, source, request, RequestKind.SILENCED, None, None)
            return
        self._expire(now)
        reply, kind = self._answer(request, source[0], now)
        sent = pack_reply(reply)
        if self.mangle is not None:
            sent = self.mangle(sent)
        self._record(now, source, request, kind, reply, sent)
        if self.delay > 0:
            gevent.sleep(self.delay)
        server = self._server
        if server is not None and not server.closed:  # a delayed reply may outlive stop()
            server.sendto(sent, source)

    def _answer(self, request: Request, source_ip: str, now: float) -> tuple[Reply, RequestKind]:
        epoch = self._epoch(now)
        if isinstance(request, UnsupportedVersionRequest):
            return UnsupportedVersionReply(epoch), RequestKind.UNSUPPORTED_VERSION
        if isinstance(request, UnknownOpcodeRequest):
            return UnsupportedOpcodeReply(epoch, request.raw), RequestKind.UNKNOWN_OPCODE
        if self.fail_result is not None:
            # Any code, even one outside the RFC's list, so client robustness can be tested.
            result = cast(Result, self.fail_result)
            if isinstance(request, AddressRequest):
                return AddressReply(epoch, result, self._public), RequestKind.FAILED
            return map_failure(request, epoch, result), RequestKind.FAILED
        if isinstance(request, AddressRequest):
            return AddressReply(epoch, Result.SUCCESS, self._public), RequestKind.ADDRESS
        if request.lifetime == 0:
            return self._delete(request, source_ip, epoch)
        return self._map(request, source_ip, now, epoch)

    def _map(
        self, request: MapRequest, source_ip: str, now: float, epoch: int
    ) -> tuple[MapReply, RequestKind]:
        if request.internal_port == 0 and self.profile is Profile.RFC:
            # Undefined by the RFC; miniupnpd refuses it, so the rfc profile does too.
            return map_failure(request, epoch, Result.NOT_AUTHORIZED), RequestKind.REFUSED
        key: MappingKey = (source_ip, request.proto, request.internal_port)
        lifetime = min(request.lifetime, self.max_lifetime)
        existing = self._table.get(key)
        event: MappingEvent | None = None
        if existing is not None:
            # A renewal (or a retransmission) keeps its port whatever it suggests, unless
            # a fault or the schedule says this one moves.
            port = existing.external_port
            renewals = existing.renewals + 1
            self.renewals[key] += 1
            every = self.move_every_renewals
            if key in self._rotate or (every and renewals % every == 0):
                wish = self._rotate.pop(key, None)
                moved = self._pick_port(key, request.suggested_port, avoid=port, wish=wish)
                if moved is not None and moved != port:
                    port, event = moved, MappingEvent.CHANGED
                    self.moves[key] += 1
            mapping = replace(
                existing,
                external_port=port,
                lifetime=lifetime,
                expires=now + lifetime,
                renewals=renewals,
            )
            kind = RequestKind.RENEW
        else:
            chosen = None
            if self.max_mappings is None or len(self._table) < self.max_mappings:
                chosen = self._pick_port(key, request.suggested_port)
            if chosen is None:
                return map_failure(request, epoch, Result.OUT_OF_RESOURCES), RequestKind.REFUSED
            mapping = GatewayMapping(
                source_ip, request.proto, request.internal_port, chosen, lifetime, now + lifetime
            )
            event, kind = MappingEvent.CREATED, RequestKind.CREATE
        self._table[key] = mapping
        if event is not None:
            self._notify(event, mapping)
        reply = MapReply(
            request.proto,
            epoch,
            Result.SUCCESS,
            request.internal_port,
            mapping.external_port,
            lifetime,
        )
        return reply, kind

    def _delete(
        self, request: MapRequest, source_ip: str, epoch: int
    ) -> tuple[MapReply, RequestKind]:
        # The suggested port is ignored (RFC 3.4); deleting nothing is still a success.
        if request.internal_port == 0:
            keys = [k for k in self._table if k[0] == source_ip and k[1] == request.proto]
            kind = RequestKind.DELETE_ALL
        else:
            key: MappingKey = (source_ip, request.proto, request.internal_port)
            keys = [key] if key in self._table else []
            kind = RequestKind.DELETE
        gone = [self._table.pop(k) for k in keys]
        for k in keys:
            self._rotate.pop(k, None)
        for mapping in gone:
            self._notify(MappingEvent.DELETED, mapping)
        return MapReply(request.proto, epoch, Result.SUCCESS, request.internal_port, 0, 0), kind

    # ------------------------------------------------------------- port choice

    def _pick_port(
        self, key: MappingKey, suggested: int, avoid: int | None = None, wish: int | None = None
    ) -> int | None:
        if wish is not None and wish != avoid and wish not in self._taken(key):
            return wish
        if self.profile is Profile.PROTON:
            return self._pick_proton(key, avoid)
        return self._pick_rfc(key, suggested, avoid)

    def _taken(self, key: MappingKey) -> set[int]:
        source, proto, internal = key
        if self.profile is Profile.PROTON:
            # Everyone else's; the companion of the same internal port shares its port.
            return {
                m.external_port
                for m in self._table.values()
                if not (m.source == source and m.internal_port == internal)
            }
        # A port is taken by another client whatever the protocol (the companion port is
        # reserved for its owner, RFC 3.3), and by this client for the same protocol.
        return {
            m.external_port
            for m in self._table.values()
            if m.key != key and (m.source != source or m.proto == proto)
        }

    def _pick_rfc(self, key: MappingKey, suggested: int, avoid: int | None) -> int | None:
        internal = key[2]
        taken = self._taken(key)
        if avoid is not None:
            taken.add(avoid)
            start = avoid % MAX_PORT + 1
        else:
            start = suggested or internal
        for offset in range(MAX_PORT):
            port = (start - MIN_PORT + offset) % MAX_PORT + MIN_PORT
            if port not in taken:
                return port
        return None

    def _pick_proton(self, key: MappingKey, avoid: int | None) -> int | None:
        source, proto, internal = key
        companion = self._table.get((source, _other(proto), internal))
        # UDP and TCP of one internal port share their port; after a move the companion
        # that renewed first has already moved, so follow it.
        if (
            companion is not None
            and companion.external_port != avoid
            and companion.key not in self._rotate
        ):
            return companion.external_port
        taken = self._taken(key)
        if avoid is not None:
            taken.add(avoid)
        lo, hi = self.port_range
        for _ in range(RANDOM_TRIES):
            port = self._rng.randint(lo, hi)
            if port not in taken:
                return port
        size = hi - lo + 1
        start = self._rng.randrange(size)
        for offset in range(size):
            port = lo + (start + offset) % size
            if port not in taken:
                return port
        return None

    # ------------------------------------------------------------------- helpers

    def _epoch(self, now: float) -> int:
        return max(0, int(now - self._started)) + self._epoch_base

    def _advance(self, now: float) -> None:
        """Play every scheduled happening due by `now`, each at its own time."""
        while self._next_happening is not None and self._next_happening.time <= now:
            happening = self._next_happening
            assert self._upcoming is not None
            self._next_happening = next(self._upcoming, None)
            self._expire(happening.time)
            if happening.kind is HappeningKind.MOVE:
                if happening.address is not None:
                    self._public = happening.address
                    self._note(StateChangeKind.ADDRESS, happening.time)
                self._mark_all(happening.time)
            else:
                assert happening.address is not None
                self._reconnect_at(
                    happening.time, happening.address, happening.epoch, happening.downtime
                )

    def _expire(self, now: float) -> list[GatewayMapping]:
        gone = [m for m in self._table.values() if m.expires <= now]
        for mapping in gone:
            del self._table[mapping.key]
            self._rotate.pop(mapping.key, None)
        self._notify_all(MappingEvent.EXPIRED, gone)
        return gone

    def _mark_all(self, now: float) -> None:
        self._rotate = dict.fromkeys(self._table)
        self._note(StateChangeKind.MOVE, now, mappings=len(self._rotate))

    def _forget_all(self, now: float, epoch: int) -> list[GatewayMapping]:
        """Epoch from `epoch` at `now`, empty table; the caller notifies (state whole first)."""
        if not 0 <= epoch < 2**32:
            raise ValueError(f"bad epoch {epoch}")
        self._started = now
        self._epoch_base = epoch
        lost = list(self._table.values())
        self._table.clear()
        self._rotate.clear()
        return lost

    def _reconnect_at(
        self, now: float, address: IPv4Address, epoch: int, downtime: float
    ) -> None:
        if downtime < 0:
            raise ValueError("downtime must not be negative")
        self._expire(now)  # leases already over by then expired; the rest are lost
        lost = self._forget_all(now, epoch)
        self._public = address
        until = None
        if downtime > 0:
            until = now + downtime
            self._silent_until = until
        self._note(StateChangeKind.RECONNECT, now, until=until, mappings=len(lost))
        self._notify_all(MappingEvent.DELETED, lost)

    def _fresh_address(self) -> IPv4Address:
        seen = {change.public_address for change in self.history} | {self._public}
        for last in range(1, 255):
            candidate = IPv4Address(FRESH_ADDRESSES + str(last))
            if candidate not in seen:
                return candidate
        raise RuntimeError("no fresh public address left")

    def _note(
        self, kind: StateChangeKind, now: float, *, until: float | None = None, mappings: int = 0
    ) -> None:
        change = StateChange(now, kind, self._public, self._epoch(now), until, mappings)
        self.history.append(change)
        log.debug("gateway emulator: %s", change)

    def _notify_all(self, event: MappingEvent, mappings: list[GatewayMapping]) -> None:
        for mapping in mappings:
            self._notify(event, mapping)

    def _notify(self, event: MappingEvent, mapping: GatewayMapping) -> None:
        for observer in list(self._observers):
            try:
                observer(event, mapping)
            except Exception:
                log.exception("gateway emulator: observer failed on %s %s", event, mapping)

    def _record(
        self,
        now: float,
        source: Source,
        request: Request | None,
        kind: RequestKind,
        reply: Reply | None,
        sent: bytes | None,
    ) -> None:
        self.requests_by_kind[kind] += 1
        self.transcript.append(Exchange(now, source, request, kind, reply, sent))
        log.debug("gateway emulator: %s:%d %s %r -> %r", *source, kind, request, reply)

    def _janitor_loop(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            try:
                self.tick()
            except Exception:
                log.exception("gateway emulator: janitor failed")


def _other(proto: Proto) -> Proto:
    return Proto.TCP if proto is Proto.UDP else Proto.UDP
