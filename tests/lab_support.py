"""Lab fixtures: the emulated router and gateway on loopback and the real daemon, one lab
per test; and the invariant every scenario ends with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.model import parse_owned
from doublenat.lab.run import Lab, LabConfig
from doublenat.settings import Endpoint

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
    mapper.table.check()
    rules = {r[".id"]: r for r in lab.rules()}
    live = {lease.rule.rule_id for lease in mapper.leases.values()}
    assert set(rules) == live, (rules, mapper.leases)
    for lease in mapper.leases.values():
        rule = rules[lease.rule.rule_id]
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


# ------------------------------------------------- emulators in their own process

STANDALONE_PASSWORD = "standalone-Secret-42"


@pytest.fixture
def emulators(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The lab's emulators as a separate process; yields their addresses and password."""
    password = tmp_path / "router-password"
    password.write_text(STANDALONE_PASSWORD + "\n")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "doublenat.lab.standalone",
            "--router",
            "127.0.0.1:0",
            "--password-file",
            str(password),
            "--gateway",
            "127.0.0.1:0",
            "--route",
            "127.0.0.1=wg-proton",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        yield {**json.loads(process.stdout.readline()), "password": STANDALONE_PASSWORD}
    finally:
        process.terminate()
        process.wait(5)


def serve(
    emulators: dict[str, str], log: Path, listen: str = "127.0.0.1:0", **settings: str
) -> subprocess.Popen[bytes]:
    """`doublenat serve` as a subprocess against the standalone emulators, stderr to `log`."""
    env = {
        **os.environ,
        "VPN_GATEWAY": emulators["gateway"],
        "MIKROTIK_API_ADDRESS": emulators["router"],
        "MIKROTIK_API_USER": "doublenat",
        "MIKROTIK_API_PASSWORD": emulators["password"],
        "LISTEN_ADDR": listen,
        "ALLOWED_CLIENTS": "127.0.0.0/8",
        **settings,
    }
    with log.open("a") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).with_name("doublenat")), "serve"], env=env, stderr=out
        )


def listening_port(log: Path, timeout: float = 10.0) -> int:
    """The port `serve` bound (LISTEN_ADDR port 0), from its daemon.started record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "daemon.started":
                return int(record["listen"].rsplit(":", 1)[1])
        time.sleep(0.05)
    raise AssertionError(f"doublenat did not start:\n{log.read_text()}")


def router_client(emulators: dict[str, str]) -> RouterOsClient:
    host, port = emulators["router"].rsplit(":", 1)
    return RouterOsClient(Endpoint(host, int(port)), "doublenat", emulators["password"])
