"""`doublenat check` against the emulated router and gateway."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from doublenat.lab.gateway import GatewayEmulator
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.settings import RULE_PREFIX
from doublenat.tools import checks
from doublenat.tools.checks import CheckResult, Status
from tests.tools.conftest import PASSWORD, VPN_INTERFACE, Invoke


def lines(output: str) -> list[str]:
    """The check lines (the summary line last is left out)."""
    return [line for line in output.splitlines() if line[:1] in ("✓", "✗", "-")]


def line_of(output: str, title: str) -> str:
    found = [line for line in lines(output) if line[2:].startswith(title)]
    assert len(found) == 1, (title, output)
    return found[0]


def test_all_pass(invoke: Invoke, env: dict[str, str], router: RouterOsEmulator) -> None:
    result = invoke(["check"], env)
    assert result.exit_code == 0, result.output
    found = lines(result.stdout)
    assert len(found) == len(checks.ALL)
    assert all(line.startswith("✓ ") for line in found), result.output
    assert line_of(result.stdout, "router reachable") == \
        "✓ router reachable ({}:{})".format(*router.address)
    assert line_of(result.stdout, "VPN interface").startswith(
        f"✓ VPN interface is a tunnel ({VPN_INTERFACE}, a tunnel, found by route check")
    assert line_of(result.stdout, "RouterOS version").startswith("✓ RouterOS version (7.")
    assert "on CHR; the VPN interface is found from" in line_of(result.stdout, "RouterOS")
    assert "11.22.33.44" in line_of(result.stdout, "VPN gateway")
    assert result.stdout.rstrip().endswith("all checks passed")
    assert len(router.state.nat) == 0  # the write check left nothing behind


def test_json(invoke: Invoke, env: dict[str, str]) -> None:
    result = invoke(["check", "--json"], env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == [name for name, _ in checks.ALL]
    assert {c["status"] for c in report["checks"]} == {"pass"}
    assert report["settings"]["api_password"] == "<set>"
    assert PASSWORD not in result.output


def test_write_check_rule_is_disabled_unprefixed_and_removed(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    added: list[dict[str, str]] = []
    router.state.nat.add_observer(lambda kind, row: added.append(row) if kind == "add" else None)
    assert invoke(["check"], env).exit_code == 0
    assert len(added) == 1
    rule = added[0]
    assert rule["disabled"] == "true"
    assert rule["in-interface"] == VPN_INTERFACE
    assert rule["comment"].startswith("doublenat-check ")
    assert not rule["comment"].startswith(RULE_PREFIX)
    assert router.state.nat.rows() == []
    assert [e.command for e in router.sent("/ip/firewall/nat/remove")] == [
        "/ip/firewall/nat/remove"]


def test_wrong_password(invoke: Invoke, env: dict[str, str]) -> None:
    wrong = "Wr0ng-Pa55word-91"
    result = invoke(["check"], {**env, "MIKROTIK_API_PASSWORD": wrong})
    assert result.exit_code == 1
    login = line_of(result.stdout, "login ok")
    assert login.startswith("✗ login ok — invalid user name or password (6); hint: check "
                            "MIKROTIK_API_USER")
    for title in ("RouterOS version", "API user can read", "route toward", "VPN interface",
                  "API user can write"):
        assert line_of(result.stdout, title).endswith("skipped: no login")
    # The checks that do not need the router still run.
    assert line_of(result.stdout, "VPN gateway").startswith("✓")
    assert line_of(result.stdout, "listen address").startswith("✓")
    assert wrong not in result.output and PASSWORD not in result.output
    as_json = invoke(["check", "--json"], {**env, "MIKROTIK_API_PASSWORD": wrong})
    assert wrong not in as_json.output
    statuses = {c["name"]: c["status"] for c in json.loads(as_json.stdout)["checks"]}
    assert statuses["router-login"] == "fail" and statuses["nat-write"] == "skip"


def test_router_down(invoke: Invoke, env: dict[str, str], router: RouterOsEmulator) -> None:
    router.router_down()
    result = invoke(["check"], env)
    assert result.exit_code == 1
    reach = line_of(result.stdout, "router reachable")
    assert reach.startswith("✗ router reachable — cannot connect to")
    assert "Connection refused" in reach and "hint:" in reach
    assert line_of(result.stdout, "login ok").endswith("skipped: router not reachable")
    assert result.stdout.rstrip().endswith("1 check failed")


def test_gateway_silent(invoke: Invoke, env: dict[str, str], gateway: GatewayEmulator) -> None:
    gateway.silence()
    result = invoke(["check"], env)
    assert result.exit_code == 1
    line = line_of(result.stdout, "VPN gateway")
    assert line.startswith("✗") and "no valid answer" in line and "hint:" in line
    assert sum(1 for line in lines(result.stdout) if line.startswith("✗")) == 1


def test_gateway_refuses(invoke: Invoke, env: dict[str, str], gateway: GatewayEmulator) -> None:
    gateway.fail_with(2)
    line = line_of(invoke(["check"], env).stdout, "VPN gateway")
    assert line.startswith("✗") and "result 2 (NOT_AUTHORIZED)" in line


def test_gateway_private_address(
    invoke: Invoke, env: dict[str, str], gateway: GatewayEmulator
) -> None:
    gateway.set_public_address("100.64.1.2")
    line = line_of(invoke(["check"], env).stdout, "VPN gateway")
    assert line.startswith("✗") and "not a public address" in line


def test_no_route_toward_gateway(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator, gateway: GatewayEmulator
) -> None:
    router.state.routes.set_no_route(f"{gateway.address[0]}/32")
    result = invoke(["check"], env)
    assert result.exit_code == 1
    line = line_of(result.stdout, "route toward the VPN gateway")
    assert line.startswith("✗ route toward the VPN gateway — no active route toward "
                           "VPN_GATEWAY")
    assert "/ip route add dst-address=" in line
    assert line_of(result.stdout, "VPN interface").endswith("skipped: no route toward the "
                                                            "gateway")
    # The write check still runs (without an interface) and still passes.
    assert line_of(result.stdout, "API user can write").startswith("✓")
    assert len(router.state.nat) == 0


def test_configured_interface_missing(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    result = invoke(["check"], {**env, "MIKROTIK_IN_INTERFACE": "wg0"})
    assert result.exit_code == 1
    line = line_of(result.stdout, "VPN interface exists")
    assert line.startswith("✗ VPN interface exists — the router has no interface named 'wg0'")
    assert "MIKROTIK_IN_INTERFACE" in line
    assert line_of(result.stdout, "API user can write").startswith("✓")
    assert len(router.state.nat) == 0


def test_configured_interface_present(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    router.state.interfaces.add("wg1")
    result = invoke(["check"], {**env, "MIKROTIK_IN_INTERFACE": "wg1"})
    assert result.exit_code == 0, result.output
    line = line_of(result.stdout, "VPN interface exists")
    assert line.startswith("✓ VPN interface exists (wg1 (type wg), configured: trusted")
    assert line_of(result.stdout, "route toward").endswith("(not needed: "
                                                           "MIKROTIK_IN_INTERFACE is set)")
    assert router.sent("/ip/firewall/nat/add")[0].words.count("=in-interface=wg1") == 1


def test_permission_trap_on_add(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    router.trap("not enough permissions (9)", "/ip/firewall/nat/add")
    result = invoke(["check"], env)
    assert result.exit_code == 1
    line = line_of(result.stdout, "API user can write")
    assert line.startswith("✗ API user can write /ip/firewall/nat — the router refused to add "
                           "a rule: not enough permissions (9); hint:")
    assert "'write' policy" in line and "read,write,test,api" in line
    assert len(router.state.nat) == 0


def test_permission_trap_on_route_check(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    router.trap("not enough permissions (9)", "/ip/route/check")
    result = invoke(["check"], env)
    assert result.exit_code == 1
    line = line_of(result.stdout, "route toward the VPN gateway")
    assert line.startswith("✗") and "'read' policy" in line and "read,write,test,api" in line
    assert line_of(result.stdout, "VPN interface").startswith("- ")


def test_router_lost_midway(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    router.drop_before_reply("/ip/firewall/nat/print", times=None)
    result = invoke(["check"], env)
    assert result.exit_code == 1
    assert line_of(result.stdout, "login ok").startswith("✓")
    assert line_of(result.stdout, "API user can read").startswith("✗")
    for title in ("route toward", "VPN interface", "API user can write"):
        assert line_of(result.stdout, title).endswith("skipped: the router stopped answering")


def test_listen_address_in_use(invoke: Invoke, env: dict[str, str]) -> None:
    host, port = env["LISTEN_ADDR"].split(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind((host, int(port)))
        result = invoke(["check"], env)
    assert result.exit_code == 1
    line = line_of(result.stdout, "listen address can be bound")
    assert line.startswith(f"✗ listen address can be bound — {host}:{port}: Address already in use")


def test_invalid_settings_exit_2(invoke: Invoke, env: dict[str, str]) -> None:
    result = invoke(["check"], {**env, "MIKROTIK_API_TLS": "maybe"})
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "doublenat: error: MIKROTIK_API_TLS: expected true/false/yes/no/1/0, got 'maybe'"]
    as_json = invoke(["check", "--json"], {**env, "VPN_GATEWAY": ""})
    assert as_json.exit_code == 2
    report = json.loads(as_json.stdout)
    assert report["ok"] is False and report["checks"][0]["status"] == "fail"
    assert "VPN_GATEWAY" in report["checks"][0]["detail"]
    assert len(report["checks"]) == len(checks.ALL)


def test_result_lines() -> None:
    assert CheckResult("x", "login ok", Status.PASS, "as u").line() == "✓ login ok (as u)"
    assert CheckResult("x", "login ok", Status.FAIL, "bad", "fix it").line() == \
        "✗ login ok — bad; hint: fix it"
    assert CheckResult("x", "login ok", Status.SKIP, "no router").line() == \
        "- login ok — skipped: no router"
    assert checks.all_passed([CheckResult("x", "t", Status.SKIP)])


def tls_env(env: dict[str, str], tls_router: RouterOsEmulator, **extra: str) -> dict[str, str]:
    address = tls_router.tls_address
    assert address is not None
    tls_router.state.routes.set(env["VPN_GATEWAY"].split(":")[0] + "/32",
                                interface=VPN_INTERFACE)
    return {**env, "MIKROTIK_API_ADDRESS": "{}:{}".format(*address),
            "MIKROTIK_API_TLS": "true", **extra}


def test_tls_with_the_ca(
    invoke: Invoke, env: dict[str, str], tls_router: RouterOsEmulator,
    tls_files: dict[str, Path],
) -> None:
    result = invoke(["check"], tls_env(env, tls_router, MIKROTIK_API_TLS_CA=str(tls_files["ca"])))
    assert result.exit_code == 0, result.output
    assert line_of(result.stdout, "router reachable").endswith(" with TLS)")


def test_tls_certificate_rejected(
    invoke: Invoke, env: dict[str, str], tls_router: RouterOsEmulator
) -> None:
    result = invoke(["check"], tls_env(env, tls_router))
    assert result.exit_code == 1
    line = line_of(result.stdout, "router reachable")
    assert line.startswith("✗ router reachable — ") and "TLS certificate rejected" in line
    assert "MIKROTIK_API_TLS_CA" in line
    assert line_of(result.stdout, "login ok").endswith("skipped: router not reachable")


def test_tls_against_the_plain_port(
    invoke: Invoke, env: dict[str, str], router: RouterOsEmulator
) -> None:
    result = invoke(["check"], {**env, "MIKROTIK_API_TLS": "true", "ROUTER_TIMEOUT": "0.5"})
    assert result.exit_code == 1
    line = line_of(result.stdout, "router reachable")
    assert line.startswith("✗") and "TLS handshake failed" in line
