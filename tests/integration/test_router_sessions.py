"""The router adapter's typed errors and router sessions (issue 11, issue 12)."""

from __future__ import annotations

import pytest

from doublenat.adapters.routeros import RouterOsClient, classify_trap, parse_duration
from doublenat.engine import ruleops
from doublenat.engine.contracts import (
    AlreadyExists,
    InvalidValue,
    NoSuchItem,
    NotPermitted,
    NotSent,
    RouterTrap,
    RuleSpec,
    StaleSession,
    UnknownCommand,
)
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.protocol.natpmp import Proto
from doublenat.settings import Endpoint

USER, PASSWORD = "doublenat", "s3ssion-Pw"


@pytest.mark.parametrize(("message", "kind"), [
    ("no such item (4)", NoSuchItem),
    ("no such item", NoSuchItem),
    ("no such command prefix", UnknownCommand),
    ("no such command or directory (check)", UnknownCommand),
    ("no such command", UnknownCommand),
    ("not enough permissions (9)", NotPermitted),
    ("input does not match any value of in-interface", InvalidValue),
    ("invalid value for argument dst-port", InvalidValue),
    ("failure: already have such rule", AlreadyExists),
    ("something else entirely", RouterTrap),
])
def test_trap_wordings_become_types(message: str, kind: type) -> None:
    assert classify_trap(message) is kind


@pytest.mark.parametrize(("text", "seconds"), [
    ("1w2d3h4m5s", 788645), ("59s", 59), ("3h", 10800), ("2d03:04:05", 183845),
    ("00:00:10", 10), ("1m500ms", 60.5), ("", None), ("soon", None), ("3x", None),
])
def test_uptime_forms(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


@pytest.fixture
def router() -> RouterOsEmulator:
    emulator = RouterOsEmulator(users={USER: PASSWORD})
    emulator.start()
    yield emulator  # type: ignore[misc]
    emulator.stop()


def client_for(router: RouterOsEmulator) -> RouterOsClient:
    return RouterOsClient(Endpoint(*router.address), USER, PASSWORD, timeout=2.0)


def spec(port: int) -> RuleSpec:
    from ipaddress import IPv4Address

    return RuleSpec(Proto.TCP, "wg-proton", port, IPv4Address("192.168.88.20"), port,
                    f"double-natpmp-tcp 192.168.88.20:{port} via {port}")


def test_a_restart_makes_old_ids_stale_until_confirmed_by_comment(
    router: RouterOsEmulator,
) -> None:
    router.state.resource["uptime"] = "1h"  # it has been up for a while
    client = client_for(router)
    try:
        ref = client.add_rule(spec(7000))
        assert ref.session == client.session == 1
        router.state.resource["uptime"] = "1h1s"
        router.drop_all_connections()
        assert client.list_rules()[0].session == 1  # reconnected, same boot: same session
        del router.state.resource["uptime"]
        router.state.reboot_clock()  # the router restarted: its uptime starts again
        router.drop_all_connections()
        listed = client.list_rules()
        assert listed[0].session == client.session == 2
        with pytest.raises(StaleSession):
            client.remove_rule(ref)  # never sent: the id is from another boot
        assert len(router.state.nat) == 1
        ruleops.remove(client, ref, spec(7000).comment)  # confirmed by comment, removed
        assert len(router.state.nat) == 0
    finally:
        client.close()


def test_a_router_that_cannot_be_reached_is_not_sent_anything(
    router: RouterOsEmulator,
) -> None:
    client = client_for(router)
    router.router_down()
    try:
        with pytest.raises(NotSent):
            client.add_rule(spec(7000))
    finally:
        client.close()
    assert router.writes() == 0
