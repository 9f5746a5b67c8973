"""`doublenat list` and `doublenat cleanup` against the emulated router (and a real lab)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from doublenat.cli import cli
from doublenat.engine.contracts import NatRule, NoSuchItem
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.lab.run import Lab, LabConfig
from doublenat.protocol.natpmp import MapReply, MapRequest, Proto, Result, pack_request, parse_reply
from doublenat.tools.commands import register
from doublenat.tools.rules import format_table, owned_rules
from tests.freeport import free_udp_port
from tests.tools.conftest import VPN_INTERFACE, Invoke

OWNED = [
    ("tcp", "192.168.88.20", "51413", "40001", "double-natpmp-tcp 192.168.88.20:51413 via 40001"),
    ("udp", "192.168.88.20", "51413", "40002", "double-natpmp-udp 192.168.88.20:51413 via 40002"),
    ("tcp", "192.168.88.31", "22000", "40003", "double-natpmp-tcp 192.168.88.31:22000 via 40003"),
]
GARBLED = ("udp", "192.168.88.40", "6881", "40004", "double-natpmp-udp 192.168.88.40 port 6881")
FOREIGN = [
    ("tcp", "192.168.88.10", "443", "443", "web server"),
    ("tcp", "192.168.88.11", "25", "25", ""),
    ("udp", "192.168.88.12", "1194", "1194", "doublenat-check leftover? no: someone's VPN"),
]


def seed(router: RouterOsEmulator, rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    ids = []
    for proto, client, to_port, dst_port, comment in rows:
        attrs = {"chain": "dstnat", "action": "dst-nat", "protocol": proto,
                 "in-interface": VPN_INTERFACE, "dst-port": dst_port,
                 "to-addresses": client, "to-ports": to_port}
        if comment:
            attrs["comment"] = comment
        ids.append(router.state.nat.add(attrs))
    return ids


@pytest.fixture
def seeded(router: RouterOsEmulator) -> dict[str, list[str]]:
    """A router holding doublenat's rules, one garbled one, and other people's rules."""
    foreign = seed(router, FOREIGN[:1])
    owned = seed(router, OWNED[:2])
    foreign += seed(router, FOREIGN[1:])
    owned += seed(router, [*OWNED[2:], GARBLED])
    router.state.nat.add(chain="srcnat", action="masquerade", out_interface=VPN_INTERFACE)
    return {"owned": owned, "foreign": foreign}


def comments(router: RouterOsEmulator) -> list[str]:
    return [row.get("comment", "") for row in router.state.nat.rows()]


# ---------------------------------------------------------------------- list


def test_list_table(invoke: Invoke, env: dict[str, str], seeded: dict[str, list[str]]) -> None:
    result = invoke(["list"], env)
    assert result.exit_code == 0, result.output
    out = result.stdout.splitlines()
    assert out[0].split() == ["RULE", "PROTO", "CLIENT", "INTERNAL", "ROUTER", "PORT",
                              "UPSTREAM", "INTERFACE", "COMMENT"]
    body = out[1:-1]
    assert len(body) == 4
    assert [line.split()[0] for line in body] == seeded["owned"]
    # Aligned: every column starts at the same offset on every line.
    for column in ("CLIENT", "ROUTER PORT", "COMMENT"):
        at = out[0].index(column)
        assert all(line[at - 1] == " " and line[at] != " " for line in body), column
    assert body[0].split()[:7] == [seeded["owned"][0], "tcp", "192.168.88.20", "51413",
                                   "40001", "40001", VPN_INTERFACE]
    assert body[3].endswith("[comment not understood]")
    assert body[3].split()[1:6] == ["udp", "192.168.88.40", "6881", "40004", "?"]
    assert all("web server" not in line and "someone's VPN" not in line for line in out)
    assert out[-1].startswith("4 doublenat rules on 127.0.0.1:")
    assert out[-1].endswith("(1 with a comment not understood)")


def test_list_json(invoke: Invoke, env: dict[str, str], seeded: dict[str, list[str]]) -> None:
    result = invoke(["list", "--json"], env)
    assert result.exit_code == 0, result.output
    rules = json.loads(result.stdout)
    assert [r["rule_id"] for r in rules] == seeded["owned"]
    assert rules[0] == {
        "rule_id": seeded["owned"][0], "client": "192.168.88.20", "protocol": "tcp",
        "internal_port": 51413, "router_port": 40001, "upstream_port": 40001,
        "interface": VPN_INTERFACE, "to_address": "192.168.88.20", "to_port": 51413,
        "disabled": False, "comment": OWNED[0][4], "readable": True,
    }
    assert [r["readable"] for r in rules] == [True, True, True, False]
    assert rules[3]["upstream_port"] is None and rules[3]["client"] == "192.168.88.40"


def test_list_empty(invoke: Invoke, env: dict[str, str], router: RouterOsEmulator) -> None:
    seed(router, FOREIGN)
    result = invoke(["list"], env)
    assert result.exit_code == 0
    assert result.stdout.startswith("no doublenat rules on 127.0.0.1:")
    assert json.loads(invoke(["list", "--json"], env).stdout) == []


def test_list_router_down(invoke: Invoke, env: dict[str, str], router: RouterOsEmulator) -> None:
    router.router_down()
    result = invoke(["list"], env)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("doublenat: cannot read the rules from 127.0.0.1:")


def test_list_bad_settings(invoke: Invoke, env: dict[str, str]) -> None:
    result = invoke(["list"], {**env, "MIKROTIK_API_ADDRESS": ""})
    assert result.exit_code == 2
    assert result.stderr.strip() == \
        "doublenat: error: MIKROTIK_API_ADDRESS: is required but not set"


@pytest.fixture
def lab() -> Iterator[Lab]:
    the_lab = Lab(LabConfig(listen=f"127.0.0.1:{free_udp_port()}")).start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


def request_mapping(lab: Lab, proto: Proto, port: int) -> MapReply:
    assert lab.daemon is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(3)
        client.connect(lab.daemon.address)
        client.send(pack_request(MapRequest(proto, port, port, 120)))
        reply = parse_reply(client.recv(64))
    assert isinstance(reply, MapReply) and reply.result == Result.SUCCESS
    return reply


def test_list_rules_of_a_running_daemon(invoke: Invoke, lab: Lab) -> None:
    replies = [request_mapping(lab, Proto.TCP, 51413), request_mapping(lab, Proto.UDP, 51413),
               request_mapping(lab, Proto.TCP, 8080)]
    made = lab.rules()
    assert len(made) == 3
    env = lab.environment()
    rules = json.loads(invoke(["list", "--json"], env).stdout)
    assert [r["rule_id"] for r in rules] == [row[".id"] for row in made]
    assert {(r["protocol"], r["client"], r["internal_port"]) for r in rules} == {
        ("tcp", "127.0.0.1", 51413), ("udp", "127.0.0.1", 51413), ("tcp", "127.0.0.1", 8080)}
    assert all(r["readable"] and r["interface"] == VPN_INTERFACE for r in rules)
    # Internal port mode: the gateway delivers to the router port it was asked for.
    assert sorted(r["router_port"] for r in rules) == sorted(int(row["dst-port"]) for row in made)
    assert {r["upstream_port"] for r in rules} >= {r["router_port"] for r in rules}
    assert len(replies) == 3
    table = invoke(["list"], env)
    assert table.exit_code == 0
    assert len(table.stdout.splitlines()) == 1 + 3 + 1


# ------------------------------------------------------------------- cleanup


def test_cleanup_dry_run(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator, seeded: dict[str, list[str]]
) -> None:
    before = router.state.nat.rows()
    result = invoke(["cleanup", "--dry-run"], env)
    assert result.exit_code == 0, result.output
    assert router.state.nat.rows() == before
    assert router.writes() == 0
    out = result.stdout.splitlines()
    assert [line.split()[2] for line in out[:-1]] == seeded["owned"]
    assert all(line.startswith("would remove ") for line in out[:-1])
    assert out[-1] == "dry run: 4 rules would be removed, nothing was changed"
    assert "re-creates the rules" in result.stderr


def test_cleanup_removes_owned_rules_only(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator, seeded: dict[str, list[str]]
) -> None:
    result = invoke(["cleanup"], env)
    assert result.exit_code == 0, result.output
    left = router.state.nat.rows()
    assert [row[".id"] for row in left if row["chain"] == "dstnat"] == seeded["foreign"]
    assert not any(c.startswith("double-natpmp-") for c in comments(router))
    assert len(left) == len(seeded["foreign"]) + 1  # and the srcnat rule
    out = result.stdout.splitlines()
    assert out[0] == (f"removed {seeded['owned'][0]} tcp 192.168.88.20:51413 router port 40001 "
                      f"('{OWNED[0][4]}')")
    assert len(out) == 5
    assert out[-1] == "removed 4 of 4 doublenat rules"
    again = invoke(["cleanup"], env)
    assert again.exit_code == 0
    assert again.stdout.startswith("no doublenat rules on")


def test_cleanup_reports_a_failed_removal(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator, seeded: dict[str, list[str]]
) -> None:
    victim = seeded["owned"][1]
    router.trap("not enough permissions (9)", "/ip/firewall/nat/remove", attrs={".id": victim})
    result = invoke(["cleanup"], env)
    assert result.exit_code == 1
    assert f"failed {victim} udp 192.168.88.20:51413" in result.stdout
    assert result.stdout.splitlines()[-1] == "removed 3 of 4 doublenat rules; 1 failed"
    assert [c for c in comments(router) if c.startswith("double-natpmp-")] == [OWNED[1][4]]


def test_cleanup_rule_already_gone(router: RouterOsEmulator) -> None:
    # A rule removed between listing and removal (by a running daemon) is not a failure.
    from doublenat.tools.rules import Outcome, cleanup

    class Gone:
        def remove_rule(self, ref: object) -> None:
            raise NoSuchItem("no such item (4)")

    rules = owned_rules([NatRule("*9", "tcp", VPN_INTERFACE, "40001", "192.168.88.20",
                                 "51413", OWNED[0][4])])
    removals = list(cleanup(Gone(), rules))  # type: ignore[arg-type]
    assert [r.outcome for r in removals] == [Outcome.GONE]
    assert removals[0].ok


# --------------------------------------------------------------------- misc


def test_owned_rules_and_table_pure() -> None:
    rules = owned_rules([
        NatRule("*1", "tcp", VPN_INTERFACE, "40001", "192.168.88.20", "51413", OWNED[0][4]),
        NatRule("*2", "tcp", VPN_INTERFACE, "443", "192.168.88.10", "443", "web server"),
        NatRule("*3", "udp", "", "", "", "", "double-natpmp-", disabled=True),
    ])
    assert [r.rule_id for r in rules] == ["*1", "*3"]
    assert not rules[1].readable and rules[1].client is None
    table = format_table(rules)
    assert table[2].split()[:7] == ["*3", "udp", "?", "?", "?", "?", "-"]
    assert table[2].endswith("[comment not understood]  [disabled]")


def test_register_is_idempotent() -> None:
    register(cli)
    first = dict(cli.commands)
    register(cli)
    assert cli.commands == first
    assert {"check", "list", "cleanup"} <= set(cli.commands)
    names = {p.name for p in cli.commands["list"].params}
    assert names == {p.name for p in cli.commands["serve"].params} | {"as_json"}
