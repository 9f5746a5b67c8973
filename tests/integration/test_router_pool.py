"""The RouterOS connection pool: the real routeros-api client against the emulator."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import gevent
import pytest

from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.contracts import (
    NoSuchItem,
    NotPermitted,
    RouterUnavailable,
    RuleRef,
    RuleSpec,
)
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.protocol.natpmp import Proto
from doublenat.settings import Endpoint

PASSWORD = "s3cret-Pa55"


@pytest.fixture
def router() -> Iterator[RouterOsEmulator]:
    # The emulator starts as a home router with the tunnel wg-proton (no route through it).
    emulator = RouterOsEmulator("127.0.0.1", 0, users={"doublenat": PASSWORD})
    emulator.start()
    yield emulator
    emulator.stop()


def client_for(router: RouterOsEmulator, password: str = PASSWORD, timeout: float = 1.0):  # type: ignore[no-untyped-def]
    host, port = router.address
    return RouterOsClient(Endpoint(host, port), "doublenat", password, timeout=timeout)


def spec(port: int, client: str = "192.168.88.20") -> RuleSpec:
    return RuleSpec(
        Proto.TCP, "wg-proton", port, IPv4Address(client), port, f"double-natpmp-test {port}"
    )


def test_four_connections_one_command_each_at_a_time(router: RouterOsEmulator) -> None:
    router.latency = 0.005
    client = client_for(router)
    jobs = [gevent.spawn(client.list_rules) for _ in range(40)]
    gevent.joinall(jobs, raise_error=True)
    assert router.counters.max_connections_open == 4
    assert router.counters.connections_accepted == 4
    assert router.counters.max_in_flight == 1
    assert router.counters.commands["/ip/firewall/nat/print"] == 40


def test_tcp_nodelay_is_set_on_every_connection(router: RouterOsEmulator) -> None:
    client = client_for(router)
    gevent.joinall([gevent.spawn(client.list_rules) for _ in range(8)], raise_error=True)
    sockets = [c.api_pool.socket.socket for c in client._queue.queue if c.api_pool]
    assert len(sockets) == 4
    assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


def test_a_trap_keeps_the_connection(router: RouterOsEmulator) -> None:
    client = client_for(router)
    client.list_rules()
    with pytest.raises(NoSuchItem):
        client.update_rule(RuleRef("*99", client.session), dst_port="1")
    with pytest.raises(NoSuchItem):
        client.remove_rule(RuleRef("*99", client.session))
    router.trap("not enough permissions (9)", "/ip/firewall/nat/add")
    with pytest.raises(NotPermitted, match="not enough permissions"):
        client.add_rule(spec(7000))
    client.list_rules()
    assert router.counters.connections_accepted == 1 and router.counters.disconnects == 0


def test_a_stalled_call_hits_the_deadline_and_frees_the_connection(
    router: RouterOsEmulator,
) -> None:
    client = client_for(router, timeout=0.5)
    client.list_rules()
    router.stall("/ip/firewall/nat/print", times=2)  # the retry on a fresh one stalls too
    started = time.monotonic()
    with pytest.raises(RouterUnavailable, match="no answer within"):
        client.list_rules()
    assert time.monotonic() - started < 2.0
    assert client.list_rules() == []  # fresh connections, no desync
    assert router.counters.disconnects >= 2


def test_a_dead_pooled_connection_costs_no_request(router: RouterOsEmulator) -> None:
    client = client_for(router)
    client.add_rule(spec(7000))
    router.drop_all_connections()  # the router restarted; rules survive
    assert [r.dst_port for r in client.list_rules()] == ["7000"]  # read retried once
    router.drop_all_connections()
    client.add_rule(spec(7001))  # write retried once, after a check by comment
    assert sorted(r.dst_port for r in client.list_rules()) == ["7000", "7001"]
    assert client.stats.retries == 2


@pytest.mark.parametrize("fault", ["execute_then_drop", "drop_before_reply", "drop_mid_reply"])
def test_a_write_broken_midway_is_never_duplicated(router: RouterOsEmulator, fault: str) -> None:
    client = client_for(router)
    client.list_rules()  # a pooled, reused connection
    getattr(router, fault)("/ip/firewall/nat/add")
    ref = client.add_rule(spec(7000))
    rules = router.state.nat.rows()
    assert len(rules) == 1 and rules[0][".id"] == ref.rule_id


def test_fatal_discards_the_connection(router: RouterOsEmulator) -> None:
    client = client_for(router)
    client.list_rules()
    router.fatal("session terminated on request", "/ip/firewall/nat/print")
    assert client.list_rules() == []  # retried on a fresh connection
    assert router.counters.connections_accepted == 2


def test_failed_login_never_shows_the_password_and_backs_off(router: RouterOsEmulator) -> None:
    wrong = "Wr0ng-Secret-xyz"
    client = client_for(router, password=wrong)
    with pytest.raises(RouterUnavailable) as failure:
        client.list_rules()
    text = str(failure.value)
    assert "invalid user name or password" in text
    assert wrong not in text and "=password=" not in text.replace("=password=***", "")
    assert client.retry_at() > time.monotonic()
    attempts = router.counters.logins_failed
    with pytest.raises(RouterUnavailable, match="next attempt"):
        client.list_rules()  # within the backoff: no new connection
    assert router.counters.logins_failed == attempts


def test_router_down_then_back(router: RouterOsEmulator) -> None:
    client = client_for(router, timeout=0.5)
    router.router_down()
    with pytest.raises(RouterUnavailable):
        client.list_rules()
    router.router_up()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            assert client.list_rules() == []
            break
        except RouterUnavailable:
            gevent.sleep(0.1)
    else:
        pytest.fail("the client never reconnected")


def test_route_check_and_identity(router: RouterOsEmulator) -> None:
    router.state.add_route("10.2.0.1/32", "wg-proton")
    router.state.add_route("10.9.9.9/32", blackhole=True)
    client = client_for(router)
    [found] = client.route_check("10.2.0.1")
    assert (found["status"], found["interface"]) == ("ok", "wg-proton")
    assert "interface" not in client.route_check("10.9.9.9")[0]
    assert client.identity() == "MikroTik"
    checks = router.sent("/ip/route/check")
    assert len(checks) == 2
    assert all("=once" in c.words or "=once=" in c.words for c in checks)


def test_reconnects_are_counted(router: RouterOsEmulator) -> None:
    client = client_for(router)
    client.list_rules()
    assert (client.stats.connects, client.stats.reconnects) == (1, 0)
    router.drop_all_connections()
    client.list_rules()
    assert (client.stats.connects, client.stats.reconnects) == (2, 1)
