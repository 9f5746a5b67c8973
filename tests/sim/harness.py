"""The seeded simulation of the mapping engine.

One `Simulation` is one seed: a world (router, gateway, clock: tests.sim.world) and one
or more daemon runs over it (`Run`: the engine wired as doublenat.daemon wires it, its
timers driven by the fake clock instead of sleeping greenlets). Each step picks one
action with the seeded RNG (a client request, a retransmission, time passing, a router
or gateway fault, a kill of in-flight work, a healthy reconciliation to check against),
lets the greenlets run a few turns, and checks the invariants (tests.sim.invariants).
A run ends in a shutdown (a graceful one, maybe cut short, or a crash); the next run
starts over the same router and gateway, as a restarted daemon would.

Everything runs on greenlets with no real I/O and no real timers, so a seed replays
exactly; `digest()` fingerprints a run to prove it.
"""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import gevent
from gevent import Greenlet, GreenletExit
from gevent.pool import Pool

import doublenat.engine.mapper as mapper_module
import doublenat.engine.upkeep as upkeep_module
from doublenat.engine.address import AddressService
from doublenat.engine.contracts import NatRule, RouterError
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.events import ChangeKind, MappingChange
from doublenat.engine.mapper import Mapper, Outcome
from doublenat.engine.model import MappingKey, rule_comment
from doublenat.engine.reconcile import NoInterface, Reconciler
from doublenat.engine.state import MappingTable
from doublenat.engine.upkeep import FLUSH_EVERY, JANITOR_TICK, STATIC_RETRY, Upkeep
from doublenat.protocol.natpmp import MapRequest, Proto, Result
from doublenat.settings import Settings, StaticMapping
from tests.engine.fakes import make_settings
from tests.sim.invariants import (
    Violation,
    check_converged,
    check_foreign,
    check_leases_have_rules,
    check_shutdown,
    check_state,
)
from tests.sim.world import OTHER_TUNNEL, TUNNEL, UPLINK, SimGateway, SimRouter, Weather, World

GATEWAY_IP = "10.2.0.1"
CLIENTS = tuple(IPv4Address(f"192.168.88.{n}") for n in (20, 21, 22))
INTERNAL_PORTS = (0, 6881, 6882, 6883, 6890, 8080, 51413)
LIFETIMES = (1, 10, 60, 120, 600, 3600, 7200)
HANDLERS = 100  # the front's pool
STUCK = 20_000  # turns with nothing failing in which any piece of work must finish


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The daemon's settings for one seed (drawn from it)."""

    port_mode: str
    keepalive: bool
    port_range: tuple[int, int]
    max_per_client: int
    max_lifetime: int
    gateway_lifetime: int
    statics: tuple[StaticMapping, ...]
    adopt_grace: float
    expiry_grace: float

    @classmethod
    def draw(cls, rng: Any) -> SimConfig:
        low = 6880
        span = rng.choice((6, 12, 40))
        static_ports = rng.sample((6881, 6884, 51413), rng.choice((0, 0, 1, 2)))
        statics = tuple(StaticMapping(rng.choice((Proto.TCP, Proto.UDP)), CLIENTS[0], port)
                        for port in static_ports)
        return cls(
            port_mode=rng.choice(("internal", "internal", "external")),
            keepalive=rng.random() < 0.7,
            port_range=(low, low + span - 1),
            max_per_client=rng.choice((2, 4, 64)),
            max_lifetime=rng.choice((120, 3600, 86400)),
            gateway_lifetime=rng.choice((30, 60, 3600)),
            statics=statics,
            adopt_grace=rng.choice((30.0, 900.0)),
            expiry_grace=rng.choice((0.0, 10.0)),
        )

    def settings(self) -> Settings:
        return make_settings(
            port_mode=self.port_mode, upstream_keepalive=self.keepalive,
            port_range=self.port_range, max_mappings_per_client=self.max_per_client,
            max_lifetime=self.max_lifetime, static_mappings=self.statics,
            adopt_grace=self.adopt_grace, expiry_grace=self.expiry_grace)


class SimFailure(AssertionError):
    def __init__(self, seed: int, steps: int, step: int, violation: BaseException,
                 trace: list[str], state: str = "") -> None:
        self.seed, self.step, self.violation, self.trace = seed, step, violation, trace
        super().__init__(
            f"seed {seed}, step {step}: {violation}\n"
            f"replay: python -m tests.sim.run --seed {seed} --steps {steps} --per-seed {steps} -v\n"
            "last steps:\n  " + "\n  ".join(trace[-40:]) + (f"\n{state}" if state else ""))


# ------------------------------------------------------------- greenlet tracking


class _Registry:
    """Where the engine's own greenlets (pool workers) are recorded, per daemon run."""

    current: list[Greenlet] | None = None
    timers: list[tuple[float, Callable[..., object], tuple[object, ...]]] | None = None
    clock: Callable[[], float] = staticmethod(lambda: 0.0)


class TrackedPool(Pool):
    """gevent's Pool, its greenlets recorded so a daemon's end can kill them all."""

    def add(self, greenlet: Greenlet, *args: Any, **kwargs: Any) -> None:
        super().add(greenlet, *args, **kwargs)
        if _Registry.current is not None:
            _Registry.current.append(greenlet)

    def map(self, func: Callable[..., Any], iterable: Any) -> list[Any]:
        # As Group.map, with the greenlet that spawns the workers recorded too.
        spawner = Greenlet.spawn(self._GroupMappingMixin__map, func, iterable)  # type: ignore[attr-defined]
        spawner.sim_name = "pool spawner"  # gevent's internals: nothing else can kill it
        if _Registry.current is not None:
            _Registry.current.append(spawner)
        return spawner.get()  # type: ignore[no-any-return]


class _GeventShim:
    """The `gevent` the upkeep module sees: spawn_later on the fake clock."""

    def __getattr__(self, name: str) -> Any:
        return getattr(gevent, name)

    @staticmethod
    def spawn_later(seconds: float, func: Callable[..., object], *args: object) -> None:
        assert _Registry.timers is not None
        _Registry.timers.append((_Registry.clock() + seconds, func, args))


@contextmanager
def engine_patched() -> Iterator[None]:
    """Pools and timers of the engine under the simulation's control (restored after)."""
    saved = (mapper_module.Pool, upkeep_module.Pool, upkeep_module.gevent)
    mapper_module.Pool = upkeep_module.Pool = TrackedPool  # type: ignore[misc]
    upkeep_module.gevent = _GeventShim()  # type: ignore[assignment]
    try:
        yield
    finally:
        mapper_module.Pool, upkeep_module.Pool, upkeep_module.gevent = saved  # type: ignore[misc]
        _Registry.current = _Registry.timers = None


_RECORD_FIELDS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime"}


class _ErrorLog(logging.Handler):
    """A logged exception anywhere in the engine is a finding."""

    def __init__(self, errors: list[str], echo: Callable[[str], None] | None) -> None:
        super().__init__(logging.DEBUG if echo else logging.ERROR)
        self.errors = errors
        self.echo = echo


    def emit(self, record: logging.LogRecord) -> None:
        if self.echo is not None:
            fields = {k: v for k, v in record.__dict__.items()
                      if k not in _RECORD_FIELDS and v is not None}
            self.echo(f"    log {record.getMessage()} {fields}")
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            self.errors.append(f"logged exception ({record.getMessage()}): {text}")


@contextmanager
def quiet_engine_logs(errors: list[str], echo: Callable[[str], None] | None = None
                      ) -> Iterator[None]:
    """Engine logs off (a logged exception is recorded as an error); with `echo`, every
    record goes there (verbose replays)."""
    root = logging.getLogger("doublenat")
    handler = _ErrorLog(errors, echo)
    saved = root.level, root.propagate
    root.setLevel(logging.DEBUG if echo else logging.ERROR)
    root.propagate = False
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


# ----------------------------------------------------------------- one daemon run


class Run:
    """One daemon lifetime: the engine as doublenat.daemon wires it; its loops are
    replaced by `tick()`, which starts what the loops would start at this fake time."""

    def __init__(self, sim: Simulation, number: int) -> None:
        self.sim = sim
        self.number = number
        clock = sim.world.clock
        self.settings = settings = sim.config.settings()
        self.upstream = UpstreamState(clock, on_lost=self._lost)
        self.table = MappingTable(settings.port_range, settings.max_mappings_per_client)
        self.mapper = Mapper(sim.router, sim.gateway, self.upstream, settings, clock=clock,
                             table=self.table, router_wanted=self._wanted,
                             on_granted=self._granted, on_change=self._changed)
        self.changes = 0
        self.created: dict[MappingKey, int] = {}  # when each mapping was last created
        self.reconciler = Reconciler(self.mapper, sim.router, GATEWAY_IP, None)
        self.addresses = AddressService(sim.gateway, self.upstream, clock)
        self.upkeep = Upkeep(self.mapper, self.addresses, keepalive=settings.upstream_keepalive,
                             probe_interval=settings.upstream_probe_interval, clock=clock,
                             router_synced=lambda: self.table.router is not None)
        self.greenlets: list[Greenlet] = []
        self.timers: list[tuple[float, Callable[..., object], tuple[object, ...]]] = []
        self.slots: dict[str, Greenlet] = {}
        self.handlers: list[Greenlet] = []
        self.wanted = False
        self.lost = False
        now = clock()
        self.next_reconcile = now  # at start, as ReconcileLoop
        self.next_janitor = now + JANITOR_TICK
        self.next_probe = now + settings.upstream_probe_interval
        self.last_flush = self.last_static = now
        # Rules this run's engine has not listed yet (an earlier run's, an administrator's).
        self.exempt = {sim.router.uid[i] for i in sim.router.prefixed()}
        sim.gateway.run = number
        _Registry.current, _Registry.timers = self.greenlets, self.timers
        _Registry.clock = clock

    # ------------------------------------------------------------- wiring

    def _lost(self, shown: str, why: str) -> None:
        self.addresses.forget()
        self.lost = True

    def _wanted(self) -> None:
        self.wanted = True

    def _granted(self, lease: Any) -> None:
        self.upkeep.granted(lease)

    def _changed(self, change: MappingChange) -> None:
        self.changes += 1
        if change.kind == ChangeKind.CREATED:
            key = MappingKey(change.client, change.proto, change.internal_port)
            self.created[key] = self.changes

    # ------------------------------------------------------------- greenlets

    def spawn(self, name: str, func: Callable[..., object], *args: object) -> Greenlet:
        greenlet = Greenlet(self._guard, name, func, *args)
        greenlet.sim_name = name
        self.greenlets.append(greenlet)
        greenlet.start()
        return greenlet

    def _guard(self, name: str, func: Callable[..., object], *args: object) -> object:
        try:
            return func(*args)
        except GreenletExit:
            raise
        except Exception:
            self.sim.errors.append(f"{name} raised: {traceback.format_exc()}")
            return None

    def busy(self, slot: str) -> bool:
        greenlet = self.slots.get(slot)
        return greenlet is not None and not greenlet.dead

    def start(self, slot: str, func: Callable[..., object], *args: object) -> Greenlet | None:
        if self.busy(slot):
            return None
        self.slots[slot] = greenlet = self.spawn(slot, func, *args)
        return greenlet

    def alive(self) -> list[Greenlet]:
        self.greenlets[:] = [g for g in self.greenlets if not g.dead]
        self.handlers[:] = [g for g in self.handlers if not g.dead]
        return self.greenlets

    def kill_all(self) -> None:
        """The process ends: every greenlet of this run dies where it is."""
        while alive := self.alive():
            gevent.killall(list(alive), block=True)
        self.timers.clear()

    # ------------------------------------------------------------- loops

    def tick(self) -> None:
        """What the daemon's loops start at this point of the fake clock."""
        now = self.sim.world.clock()
        if (self.wanted or now >= self.next_reconcile) and not self.busy("reconcile"):
            self.wanted = False
            self.start("reconcile", self.reconcile_pass)
        if now >= self.next_janitor and not self.busy("janitor"):
            self.next_janitor = now + JANITOR_TICK
            self.start("janitor", self.janitor_pass)
        due = self.upkeep.schedule.next_due()
        if due is not None and due <= now:
            for key in self.upkeep.schedule.pop_due(now):
                self.spawn("keep-alive", self.upkeep._renew, key, "keep-alive")
        if self.lost and not self.busy("remap"):
            self.lost = False
            self.start("remap", self.upkeep.remap)
        if now >= self.next_probe and not self.busy("probe"):
            self.next_probe = now + self.settings.upstream_probe_interval
            if self.table.leases:
                self.start("probe", self.addresses.refresh)
        if self.timers:
            due_timers = [t for t in self.timers if t[0] <= now]
            self.timers[:] = [t for t in self.timers if t[0] > now]
            for _, func, args in due_timers:
                self.spawn("retry", func, *args)

    def reconcile_pass(self) -> bool:
        """One turn of ReconcileLoop: True when the router is synchronised."""
        router = self.sim.router
        me = gevent.getcurrent()
        clock = self.sim.world.clock
        try:
            self.reconciler.run_once()
            ok = True
        except NoInterface:
            ok = False
            self.next_reconcile = clock() + 5.0
        except RouterError as exc:
            router.listings.pop(me, None)
            self.table.unsynchronised(f"router unreachable: {exc}")
            self.next_reconcile = clock() + 1.0
            return False
        # The rules this run listed are now the engine's to own (or to remove).
        self.exempt -= router.listings.pop(me, set())
        if ok:
            self.next_reconcile = clock() + self.settings.reconcile_interval
            if self.mapper.statics:
                # Daemon._router_synced: a greenlet of its own, not stopped at shutdown.
                self.spawn("statics", self.mapper.ensure_statics)
        return ok

    def janitor_pass(self) -> None:
        now = self.sim.world.clock()
        self.mapper.expire_due()
        if now - self.last_flush >= FLUSH_EVERY:
            self.last_flush = now
            self.mapper.flush()
        if self.mapper.statics and self.table.router is not None and \
                now - self.last_static >= STATIC_RETRY:
            self.last_static = now
            self.mapper.ensure_statics()

    def handle(self, client: IPv4Address, request: MapRequest) -> None:
        outcome = self.mapper.handle(client, request)
        self.sim.check_outcome(client, request, outcome)


# -------------------------------------------------------------------- simulation


class Simulation:
    def __init__(self, seed: int, steps: int, *, verbose: bool = False) -> None:
        self.seed = seed
        self.steps = steps
        self.verbose = verbose
        self.world = world = World(seed)
        self.rng = world.rng
        self.config = SimConfig.draw(self.rng)
        self.router = SimRouter(world)
        self.gateway = SimGateway(world, self.config.gateway_lifetime,
                                  proton=self.config.port_mode == "external")
        self.foreign: dict[int, NatRule] = {}
        self.admin: set[int] = set()  # rules an administrator wrote with our prefix
        self.trace: deque[str] = deque(maxlen=400)
        self.errors: list[str] = []
        self.recent: deque[tuple[IPv4Address, MapRequest]] = deque(maxlen=12)
        self.stats: Counter[str] = Counter()
        self.step_no = 0
        self.run_: Run | None = None
        self._seed_router()
        self._actions, self._weights = zip(*(
            (self.a_request, 30), (self.a_retransmit, 6), (self.a_tick, 12),
            (self.a_wake, 2), (self.a_router_weather, 1), (self.a_router_restart, 0.4),
            (self.a_router_down, 0.4), (self.a_route, 0.5), (self.a_admin_delete, 0.4),
            (self.a_admin_rule, 0.3), (self.a_release, 2), (self.a_land_late, 0.7),
            (self.a_gateway_weather, 1), (self.a_gateway_silence, 0.6),
            (self.a_gateway_restart, 0.3), (self.a_gateway_move, 0.6), (self.a_kill, 3),
            (self.a_healthy, 1.2), (self.a_quiesce, 0.25), (self.a_turns, 12),
        ), strict=True)
        cumulative, total = [], 0.0
        for weight in self._weights:
            total += weight
            cumulative.append(total)
        self._cumulative = cumulative

    @property
    def run(self) -> Run:
        assert self.run_ is not None
        return self.run_

    def note(self, text: str) -> None:
        self.trace.append(f"{self.step_no} t={self.world.clock():.1f} {text}")
        if self.verbose:
            print(self.trace[-1])

    # ------------------------------------------------------------- the world

    def _seed_router(self) -> None:
        """Foreign rules, and rules and upstream mappings left by an earlier run."""
        low, high = self.config.port_range
        router = self.router
        for rule in (NatRule("", "tcp", TUNNEL, str(low + 3), "192.168.88.5", "80", "web"),
                     NatRule("", "", "", f"{low + 8}-{low + 9}", "192.168.88.6", "", "games"),
                     NatRule("", "udp", UPLINK, str(low), "192.168.88.7", "53", "dns")):
            self.foreign[router.add_external(rule)] = rule
        ports = [p for p in range(low, high + 1) if p not in (low + 3, low + 8, low + 9)]
        self.rng.shuffle(ports)
        for port in ports[:self.rng.choice((0, 1, 3))]:
            client = self.rng.choice(CLIENTS)
            proto = self.rng.choice((Proto.TCP, Proto.UDP))
            internal = self.rng.choice(INTERNAL_PORTS[1:])
            key = MappingKey(client, proto, internal)
            if self.config.port_mode == "external":
                router_port = self.rng.randrange(*SimGateway.PROTON_PORTS)
                if any(r.dst_port == str(router_port) for r in router.rules.values()):
                    continue
            else:
                router_port = port
            router.add_external(NatRule("", proto.label, TUNNEL, str(router_port), str(client),
                                        str(internal), rule_comment(key, port)))
            self.gateway.mappings[(proto, port)] = (router_port, self.world.clock() + 60, 0)

    # ------------------------------------------------------------- running

    def execute(self) -> Counter[str]:
        """Run every step; raise SimFailure at the first violation."""
        with engine_patched(), quiet_engine_logs(self.errors, print if self.verbose else None):
            try:
                self._execute()
            except (Violation, AssertionError) as exc:
                raise SimFailure(self.seed, self.steps, self.step_no, exc,
                                 list(self.trace), self.describe()) from exc
            finally:
                if self.run_ is not None:
                    self.world.calm = True
                    self.world.release()
                    self.run_.kill_all()
        self.stats["steps"] = self.step_no
        for source, counts in (("router", self.router.faults), ("gateway", self.gateway.faults),
                               ("world", self.world.counts)):
            for name, count in counts.items():
                self.stats[f"{source} {name}"] += count
        return self.stats

    def _execute(self) -> None:
        runs = self.rng.choice((1, 1, 2, 3))
        ends = [*sorted(self.rng.sample(range(1, max(self.steps, runs)), runs - 1)), self.steps]
        for number, end in enumerate(ends, 1):
            self.run_ = Run(self, number)
            self.note(f"daemon run {number} starts ({self.config})")
            while self.step_no < end:
                self.step()
            last = end == self.steps
            crash = not last and self.rng.random() < 0.3
            self.shutdown(crash=crash)
            self.world.clock.advance(self.rng.choice((1.0, 30.0, 2000.0)))

    def step(self) -> None:
        self.step_no += 1
        self.run.tick()
        action = self.rng.choices(self._actions, cum_weights=self._cumulative)[0]
        action()
        turns = self.rng.choice((0, 1, 1, 2, 3, 5))
        for _ in range(turns):
            gevent.sleep(0)
        self.check()

    def check(self) -> None:
        if self.errors:
            raise Violation(self.errors[0])
        run = self.run
        check_state(run.table, self.router, run.exempt, self.admin)
        check_foreign(self.router, self.foreign)

    def check_outcome(self, client: IPv4Address, request: MapRequest, outcome: Outcome) -> None:
        self.stats[f"result {int(outcome.result)}"] += 1
        if outcome.result == Result.SUCCESS and request.lifetime and (
                outcome.external_port == 0 or outcome.lifetime <= 0):
            self.errors.append(f"{client} {request}: success with port "
                               f"{outcome.external_port}, lifetime {outcome.lifetime}")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        for _ in range(STUCK):
            if done():
                return
            gevent.sleep(0)
        stacks = []
        for greenlet in self.run.alive():
            frame = greenlet.gr_frame
            where = []
            while frame is not None:
                where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                frame = frame.f_back
            stacks.append(f"{getattr(greenlet, 'sim_name', 'pool worker')} at "
                          f"{' < '.join(where[:8])}")
        raise Violation(f"{what} did not finish within {STUCK} turns with no fault "
                        f"injected: stuck? running: {stacks}")

    # ------------------------------------------------------------- clients

    def a_request(self) -> None:
        rng = self.rng
        client = rng.choice(CLIENTS)
        proto = rng.choice((Proto.TCP, Proto.UDP))
        r = rng.random()
        if r < 0.03:
            request = MapRequest(proto, 0, 0, 0)  # delete all of this protocol
        else:
            internal = rng.choice(INTERNAL_PORTS)
            if internal == 0 and r < 0.5:
                internal = rng.choice(INTERNAL_PORTS[1:])
            lifetime = 0 if r < 0.13 else rng.choice(LIFETIMES)
            low, high = self.config.port_range
            suggested = rng.choice((0, internal, rng.randint(low, high), 1, 45003))
            request = MapRequest(proto, internal, suggested, lifetime)
        self.recent.append((client, request))
        self._submit(client, request)

    def a_retransmit(self) -> None:
        if self.recent:
            client, request = self.rng.choice(self.recent)
            self._submit(client, request, again=True)

    def _submit(self, client: IPv4Address, request: MapRequest, again: bool = False) -> None:
        run = self.run
        self.note(f"{'again ' if again else ''}{client} {request.proto.label} "
                  f"{request.internal_port} suggest {request.suggested_port} "
                  f"life {request.lifetime}")
        self.stats["requests"] += 1
        outcome = run.mapper.renew_now(client, request)
        if outcome is not None:
            self.stats["answered at once"] += 1
            self.check_outcome(client, request, outcome)
            return
        run.alive()
        if len(run.handlers) >= HANDLERS:
            self.stats["front full"] += 1
            return
        run.handlers.append(run.spawn("handler", run.handle, client, request))

    # ------------------------------------------------------------- time

    def a_tick(self) -> None:
        r = self.rng.random()
        seconds = (self.rng.uniform(0.05, 2) if r < 0.6 else self.rng.uniform(2, 30)
                   if r < 0.9 else self.rng.uniform(30, 400))
        self.world.clock.advance(seconds)
        self.note(f"time +{seconds:.1f}s")

    def a_wake(self) -> None:
        self.note("reconciliation wanted")
        self.run.wanted = True

    def a_turns(self) -> None:
        for _ in range(self.rng.randint(1, 20)):
            gevent.sleep(0)

    # ------------------------------------------------------------- router

    def a_router_weather(self) -> None:
        self.router.weather = Weather.draw(self.rng)
        self.note(f"router weather {self.router.weather}")

    def a_router_restart(self) -> None:
        renumber = self.rng.random() < 0.7
        self.note(f"router restarts{', ids renumbered' if renumber else ''}")
        self.stats["router restarts"] += 1
        self.router.restart(renumber=renumber)

    def a_router_down(self) -> None:
        self.router.down = not self.router.down
        self.note(f"router {'unreachable' if self.router.down else 'reachable again'}")
        if self.router.down:
            self.world.release()

    def a_route(self) -> None:
        route = self.rng.choice((TUNNEL, TUNNEL, TUNNEL, OTHER_TUNNEL, UPLINK, None))
        self.note(f"route toward the gateway now via {route}")
        self.router.route = route

    def a_admin_delete(self) -> None:
        prefixed = sorted(self.router.prefixed())
        if prefixed:
            rule_id = self.rng.choice(prefixed)
            self.note(f"an administrator removes rule {rule_id}")
            self.stats["admin removals"] += 1
            self.router._drop(rule_id)

    def a_admin_rule(self) -> None:
        rng = self.rng
        client = rng.choice(CLIENTS)
        port = rng.randint(*self.config.port_range)
        proto, to_port = "tcp", port
        if rng.random() < 0.3 or "copied-comments" in self.world.masked:
            comment = "double-natpmp-something else"
        else:
            key = MappingKey(client, rng.choice((Proto.TCP, Proto.UDP)),
                             rng.choice(INTERNAL_PORTS))
            comment = rule_comment(key, port)
            proto = key.proto.label
            to_port = key.internal_port or port
        # Written like doublenat writes them (another instance's, a restored backup): the
        # engine reads the mapping from the comment and trusts the rest to match it.
        rule = NatRule("", proto, TUNNEL, str(port), str(client), str(to_port), comment)
        uid = self.router.add_external(rule)
        self.note(f"an administrator adds a prefixed rule {comment!r}")
        self.run.exempt.add(uid)
        self.admin.add(uid)

    def a_release(self) -> None:
        if self.world.stalled:
            self.note(f"{self.world.stalled} stalled calls reach their deadline")
            self.world.release()

    def a_land_late(self) -> None:
        if self.router.late:
            self.note(f"{len(self.router.late)} late commands land")
            self.router.land_late()

    # ------------------------------------------------------------- gateway

    def a_gateway_weather(self) -> None:
        self.gateway.weather = Weather.draw(self.rng)
        self.note(f"gateway weather {self.gateway.weather}")

    def a_gateway_silence(self) -> None:
        self.gateway.silent = not self.gateway.silent
        self.note(f"gateway {'silent' if self.gateway.silent else 'answers again'}")

    def a_gateway_restart(self) -> None:
        new_address = self.rng.random() < 0.5
        self.note(f"gateway restarts{' with a new address' if new_address else ''}")
        self.stats["gateway restarts"] += 1
        self.gateway.restart(new_address)

    def a_gateway_move(self) -> None:
        self.gateway.move_next += self.rng.randint(1, 4)
        self.note("gateway will move ports at renewal")

    # ------------------------------------------------------------- kills

    def a_kill(self) -> None:
        alive = [g for g in self.run.alive() if getattr(g, "sim_name", "") != "pool spawner"]
        if alive:
            victim = self.rng.choice(alive)
            self.note(f"kill {getattr(victim, 'sim_name', 'pool worker')}")
            self.stats["kills"] += 1
            victim.kill(block=False)

    # ------------------------------------------------------------- checks

    @contextmanager
    def _calm(self) -> Iterator[None]:
        """No faults: the router reachable through the tunnel, the gateway answering."""
        world, router = self.world, self.router
        world.calm = True
        router.down = False
        if router.route not in (TUNNEL, OTHER_TUNNEL):
            router.route = TUNNEL
        self.gateway.silent = False
        world.release()
        try:
            yield
        finally:
            world.calm = False

    def _reconcile_healthy(self) -> None:
        run = self.run
        self._wait(lambda: not run.busy("reconcile"), "the running reconciliation")
        greenlet = run.start("reconcile", run.reconcile_pass)
        assert greenlet is not None
        self._wait(lambda: greenlet.dead, "a healthy reconciliation")
        if greenlet.value is not True:
            raise Violation(f"a reconciliation with a healthy router failed: {self.errors}")
        self.stats["healthy reconciliations"] += 1

    def a_healthy(self) -> None:
        """A reconciliation with the router healthy; then every live mapping that no work
        is touching has its rule."""
        self.note("healthy reconciliation")
        run = self.run
        with self._calm():
            self._wait(lambda: not run.busy("reconcile"), "the running reconciliation")
            # Only mappings that lived through the whole run are judged (one made while
            # it ran has its rule, maybe on an interface the run just left: it asks for
            # the next run), and only those no work is changing right now.
            mark = run.changes
            self._reconcile_healthy()
            self.check()
            skip = [k for k in run.table.leases
                    if run.created.get(k, 0) > mark or run.mapper._locks.busy(k)]
            assert run.table.router is not None
            check_leases_have_rules(run.table, self.router, run.table.router.interface, skip)

    def a_quiesce(self) -> None:
        """Let every piece of work finish, reconcile twice, flush: converged."""
        self.note("quiesce: all work finishes, two healthy reconciliations, a flush")
        run = self.run
        with self._calm():
            self.router.land_late()
            self._wait(lambda: not run.alive(), "work in flight")
            self._reconcile_healthy()
            self._wait(lambda: not run.alive(), "work after a reconciliation")
            self._reconcile_healthy()
            self._wait(lambda: not run.alive(), "work after a reconciliation")
            run.spawn("flush", run.mapper.flush)
            self._wait(lambda: not run.alive(), "a flush")
            self.check()
            assert run.table.router is not None
            check_converged(run.table, self.router, run.table.router.interface)
            self.stats["converged"] += 1

    # ------------------------------------------------------------- shutdown

    def shutdown(self, crash: bool) -> None:
        run, world = self.run, self.world
        if crash:
            self.note("the daemon crashes")
            self.stats["crashes"] += 1
            run.kill_all()
            self.router.land_late()
            self.check()
            return
        clean = self.rng.random() < 0.5
        cut = None if clean or self.rng.random() < 0.5 else self.rng.randint(0, 60)
        self.note(f"shutdown ({'healthy' if clean else 'with faults'}"
                  f"{f', cut short after {cut} turns' if cut is not None else ''})")
        self.stats["shutdowns"] += 1
        # Stop reading; in-flight handlers get some time, then are killed.
        for _ in range(self.rng.choice((0, 5, 50, 500))):
            if not run.alive() or not run.handlers:
                break
            gevent.sleep(0)
        for handler in list(run.handlers):
            handler.kill(block=False)
        # The reconcile loop and the upkeep loops stop (their pool workers do not).
        for slot in ("reconcile", "janitor", "remap", "probe"):
            greenlet = run.slots.get(slot)
            if greenlet is not None:
                greenlet.kill(block=False)
        gevent.sleep(0)
        if clean:
            world.calm = True
            self.router.down = False
            self.gateway.silent = False
            world.release()
        closing = run.spawn("close_all", run.mapper.close_all)
        turns = 0
        while not closing.dead:
            if cut is not None and turns >= cut:
                closing.kill(block=True)  # SHUTDOWN_TIMEOUT
                break
            gevent.sleep(0)
            turns += 1
            if turns % 40 == 0:
                world.release()  # stalled calls reach their deadline
            if turns > STUCK:
                raise Violation("close_all did not finish: stuck?")
        completed = isinstance(closing.value, int)  # not cut short, not failed
        if self.errors:
            raise Violation(self.errors[0])
        run.kill_all()  # the process exits
        self.router.land_late()
        given_up = (self.gateway.delete_lost if "given-up-deletes" in world.masked
                    else set())
        check_shutdown(run.table, self.router, self.gateway, run.exempt, run.number,
                       router_clean=clean and completed, gateway_clean=clean and completed,
                       given_up=given_up)
        left = run.table.describe_leftovers()
        self.stats["left at shutdown"] += len(left)
        world.calm = False

    def describe(self) -> str:
        """The table and the router, for a failure report."""
        if self.run_ is None:
            return ""
        table, router = self.run_.table, self.router
        lines = [f"router session {router.session}, route {router.route}, "
                 f"table view {table.router}"]
        lines += [f"  lease {k}: rule {v.rule.rule_id}@{v.rule.session} port {v.router_port}"
                  f"->{v.to_port} upstream {v.upstream_port} ext {v.external_port} "
                  f"if {v.interface}{' parked' if v.parked else ''}"
                  for k, v in table.leases.items()]
        lines += [f"  write {w}" for w in table.writes.values()]
        lines += [f"  candidate {k}: {c.rule}" for k, c in table.candidates.items()]
        lines += [f"  doomed {d}" for d in table.doomed.values()]
        lines += [f"  upstream end {e}" for e in table.upstream_ends]
        lines += [f"  router {i} (uid {router.uid[i]}): {r.protocol} {r.in_interface} "
                  f"{r.dst_port}->{r.to_addresses}:{r.to_ports} {r.comment!r}"
                  for i, r in router.rules.items()]
        return "\n".join(lines)

    # ------------------------------------------------------------- fingerprint

    def digest(self) -> str:
        """The end state, for replay checks: router rules, gateway mappings, counters."""
        text = repr((sorted((r.rule_id, r.comment, r.dst_port, r.to_addresses, r.to_ports)
                            for r in self.router.rules.values()),
                     sorted((p.label, port, v[0])
                            for (p, port), v in self.gateway.mappings.items()),
                     sorted(self.stats.items()), self.world.clock(), self.step_no,
                     sorted(self.router.calls.items()), list(self.trace)[-50:]))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_seed(seed: int, steps: int, verbose: bool = False,
             unmask: Iterable[str] = ()) -> Simulation:
    """One seed's simulation, run to its end (SimFailure on a violation)."""
    sim = Simulation(seed, steps, verbose=verbose)
    sim.world.masked -= set(unmask)
    sim.execute()
    return sim


__all__ = ["SimConfig", "SimFailure", "Simulation", "run_seed"]
