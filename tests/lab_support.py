"""Lab fixtures: the emulated router and gateway on loopback and the real daemon, one lab
per test; and the invariant every scenario ends with."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from doublenat.engine.model import parse_owned
from doublenat.lab.run import Lab, LabConfig

MakeLab = Callable[..., Lab]


@pytest.fixture
def make_lab() -> Iterator[MakeLab]:
    labs: list[Lab] = []

    def make(start: bool = True, **overrides: object) -> Lab:
        settings = {"EXPIRY_GRACE": "1", "CLIENT_RATE_LIMIT": "0"}
        settings.update(overrides.pop("settings", {}))  # type: ignore[arg-type]
        overrides.setdefault("listen", "127.0.0.1:0")
        lab = Lab(LabConfig(settings=settings, **overrides))  # type: ignore[arg-type]
        labs.append(lab)
        return lab.start() if start else lab

    yield make
    for lab in labs:
        lab.stop()


@pytest.fixture
def lab(make_lab: MakeLab) -> Lab:
    return make_lab()


def assert_rules_match_mappings(lab: Lab) -> None:
    """What the router holds is exactly what the daemon believes is live."""
    assert lab.daemon is not None
    mapper = lab.daemon.mapper
    rules = {r[".id"]: r for r in lab.rules()}
    assert set(rules) == {lease.rule_id for lease in mapper.leases.values()}, (rules, mapper.leases)
    for lease in mapper.leases.values():
        rule = rules[lease.rule_id]
        assert rule["dst-port"] == str(lease.router_port)
        assert rule["to-addresses"] == str(lease.key.client)
        assert rule["to-ports"] == str(lease.to_port)
        assert rule["in-interface"] == lease.interface
        assert rule["chain"] == "dstnat" and rule["action"] == "dst-nat"
    for rule in lab.rules():
        owned = parse_owned(_as_nat_rule(rule))
        assert owned is not None and owned.key in mapper.leases


def _as_nat_rule(row: dict[str, str]):  # type: ignore[no-untyped-def]
    from doublenat.engine.contracts import NatRule

    return NatRule(
        row[".id"],
        row.get("protocol", ""),
        row.get("in-interface", ""),
        row.get("dst-port", ""),
        row.get("to-addresses", ""),
        row.get("to-ports", ""),
        row.get("comment", ""),
    )
