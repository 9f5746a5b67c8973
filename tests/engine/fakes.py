"""In-memory stand-ins for the router, the gateway and the clock (unit tests only)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from ipaddress import IPv4Address

import gevent

from doublenat.engine.contracts import (
    AddressAnswer,
    GatewayError,
    MapAnswer,
    NatRule,
    NoSuchItem,
    RouterTrap,
    RouterUnavailable,
    RuleRef,
    RuleSpec,
    StaleSession,
)
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.mapper import Mapper
from doublenat.engine.model import parse_owned
from doublenat.engine.state import RouterView
from doublenat.protocol.natpmp import Proto, Result
from doublenat.settings import Settings


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRouter:
    """A dstnat table with call counters, programmable failures and restarts.

    Sessions as the adapter has them: `restart()` starts a new one (optionally giving every
    rule a new id); a command naming an id from another session is refused with
    StaleSession, nothing done.
    """

    def __init__(self, interface: str = "wg-proton") -> None:
        self.rules: dict[str, NatRule] = {}
        self.route: str | None = interface
        self.interface_types: dict[str, str] = {interface: "wg", "ether1": "ether",
                                                "bridge": "bridge", "pppoe-out1": "pppoe-out"}
        self.version = "7.21.1"
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, Exception] = {}  # method name -> exception to raise (once)
        self.fail_always: dict[str, Exception] = {}
        self.fail_after: dict[str, Exception] = {}  # raised after the command took effect
        self.delay: dict[str, float] = {}
        self.on_call: Callable[[str], None] | None = None
        self.session = 1
        self._ids = itertools.count(1)

    def _enter(self, name: str) -> None:
        self.calls[name] += 1
        if self.on_call is not None:
            self.on_call(name)
        if name in self.delay:
            gevent.sleep(self.delay[name])
        error = self.fail.pop(name, None) or self.fail_always.get(name)
        if error is not None:
            raise error

    def _after(self, name: str) -> None:
        error = self.fail_after.pop(name, None)
        if error is not None:
            raise error

    def _check(self, ref: RuleRef) -> None:
        if ref.session != self.session:
            raise StaleSession(f"id from session {ref.session}, now {self.session}")

    @property
    def writes(self) -> int:
        return sum(self.calls[n] for n in ("add_rule", "remove_rule", "update_rule"))

    @property
    def reads(self) -> int:
        return sum(self.calls[n] for n in ("list_rules", "find_rules", "route_check", "routes",
                                           "interfaces", "resource"))

    def _new_id(self) -> str:
        return f"*{next(self._ids):X}"

    def add_rule(self, spec: RuleSpec) -> RuleRef:
        self._enter("add_rule")
        rule_id = self._new_id()
        self.rules[rule_id] = NatRule(
            rule_id,
            spec.proto.label,
            spec.interface,
            str(spec.dst_port),
            str(spec.to_address),
            str(spec.to_port),
            spec.comment,
        )
        self._after("add_rule")
        return RuleRef(rule_id, self.session)

    def add_foreign(self, proto: str, interface: str, dst_port: str, comment: str = "",
                    to_address: str = "192.168.88.5") -> str:
        rule_id = self._new_id()
        self.rules[rule_id] = NatRule(
            rule_id, proto, interface, dst_port, to_address, dst_port, comment
        )
        return rule_id

    def remove_rule(self, ref: RuleRef) -> None:
        self._enter("remove_rule")
        self._check(ref)
        if self.rules.pop(ref.rule_id, None) is None:
            raise NoSuchItem("no such item (4)")
        self._after("remove_rule")

    def update_rule(self, ref: RuleRef, **changes: str) -> None:
        self._enter("update_rule")
        self._check(ref)
        if ref.rule_id not in self.rules:
            raise NoSuchItem("no such item (4)")
        names = {"dst_port": "dst_port", "to_ports": "to_ports", "in_interface": "in_interface",
                 "disabled": "disabled"}
        values: dict[str, object] = {names[k]: v for k, v in changes.items()}
        if "disabled" in values:
            values["disabled"] = values["disabled"] in ("yes", "true")
        rule = self.rules[ref.rule_id]
        self.rules[ref.rule_id] = replace(rule, **values)  # type: ignore[arg-type]
        self._after("update_rule")

    def _listed(self, rules: list[NatRule]) -> list[NatRule]:
        return [replace(r, session=self.session) for r in rules]

    def list_rules(self) -> list[NatRule]:
        snapshot = list(self.rules.values())  # what the router held when asked
        self._enter("list_rules")
        return self._listed(snapshot)

    def find_rules(self, comment: str) -> list[NatRule]:
        self._enter("find_rules")
        return self._listed([r for r in self.rules.values() if r.comment == comment])

    def route_check(self, destination: str) -> list[dict[str, str]]:
        self._enter("route_check")
        if self.route is None:
            return [{"status": "unreachable"}]
        return [{"status": "ok", "interface": self.route, "nexthop": destination}]

    def routes(self) -> list[dict[str, str]]:
        self._enter("routes")
        return [] if self.route is None else [{"dst-address": "0.0.0.0/0", "active": "true",
                                               "immediate-gw": f"10.2.0.1%{self.route}",
                                               "distance": "1", "routing-table": "main"}]

    def interfaces(self) -> list[dict[str, str]]:
        self._enter("interfaces")
        return [{"name": n, "type": t, "running": "true", "disabled": "false"}
                for n, t in self.interface_types.items()]

    def resource(self) -> dict[str, str]:
        self._enter("resource")
        return {"version": f"{self.version} (stable)", "board-name": "CHR", "uptime": "1h"}

    def restart(self, renumber: bool = True) -> None:
        """A reboot: a new session; with `renumber`, every rule gets a new id (order kept)."""
        self.session += 1
        if renumber:
            self.rules = {new: replace(rule, rule_id=new) for rule in list(self.rules.values())
                          for new in [self._new_id()]}

    def owned(self) -> dict[str, NatRule]:
        return {i: r for i, r in self.rules.items() if parse_owned(r) is not None}


class FakeGateway:
    """An RFC-ish NAT-PMP gateway: ports as suggested when free, lifetimes capped."""

    def __init__(self, max_lifetime: int = 60, proton: bool = False) -> None:
        self.max_lifetime = max_lifetime
        self.proton = proton
        self.mappings: dict[tuple[Proto, int], int] = {}
        self.calls: Counter[str] = Counter()
        self.epoch = 5000
        self.address = IPv4Address("11.22.33.44")
        self.fail: list[Exception | Result] = []  # consumed one per call
        self.fail_always: Exception | Result | None = None
        self.delay = 0.0
        self.next_port = 40000

    def _outcome(self) -> Exception | Result | None:
        if self.delay:
            gevent.sleep(self.delay)
        if self.fail:
            return self.fail.pop(0)
        return self.fail_always

    def public_address(self) -> AddressAnswer:
        self.calls["address"] += 1
        failure = self._outcome()
        if isinstance(failure, Exception):
            raise failure
        if isinstance(failure, Result):
            return AddressAnswer(failure, IPv4Address(0), self.epoch)
        return AddressAnswer(Result.SUCCESS, self.address, self.epoch)

    def map(
        self, proto: Proto, internal_port: int, suggested_port: int, lifetime: int
    ) -> MapAnswer:
        kind = (
            "delete"
            if lifetime == 0
            else ("renew" if (proto, internal_port) in self.mappings else "create")
        )
        self.calls[kind] += 1
        failure = self._outcome()
        if isinstance(failure, Exception):
            raise failure
        if isinstance(failure, Result):
            return MapAnswer(failure, 0, 0, self.epoch)
        key = (proto, internal_port)
        if lifetime == 0:
            self.mappings.pop(key, None)
            return MapAnswer(Result.SUCCESS, 0, 0, self.epoch)
        if key not in self.mappings:
            if self.proton:
                self.next_port += 7
                port = self.next_port
            else:
                taken = {v for (p, _), v in self.mappings.items() if p == proto}
                port = (
                    suggested_port
                    if suggested_port and suggested_port not in taken
                    else internal_port
                )
                while port in taken:
                    port += 1
            self.mappings[key] = port
        return MapAnswer(
            Result.SUCCESS, self.mappings[key], min(lifetime, self.max_lifetime), self.epoch
        )


def make_settings(**overrides: object) -> Settings:
    """Settings as a test wants them: required values filled in, any other overridden by
    field name (e.g. port_mode="external", max_mappings_per_client=2)."""
    base = Settings.from_raw({"VPN_GATEWAY": "10.2.0.1", "MIKROTIK_API_ADDRESS": "192.0.2.1",
                              "MIKROTIK_API_PASSWORD": "test"})
    return replace(base, **overrides)


def make_mapper(
    router: FakeRouter | None = None,
    gateway: FakeGateway | None = None,
    clock: FakeClock | None = None,
    ready: bool = True,
    **config: object,
) -> tuple[Mapper, FakeRouter, FakeGateway, FakeClock]:
    router = router or FakeRouter()
    gateway = gateway or FakeGateway()
    clock = clock or FakeClock()
    mapper = Mapper(router, gateway, UpstreamState(clock), make_settings(**config), clock=clock)
    if ready:
        mapper.table.synchronised(RouterView("wg-proton", "route check", router.session))
    return mapper, router, gateway, clock


TRANSPORT = RouterUnavailable("connection reset")
TRAP = RouterTrap("not enough permissions (9)")
TIMEOUT = GatewayError("no valid answer")
