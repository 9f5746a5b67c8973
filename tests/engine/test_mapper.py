"""The mapping engine with an in-memory router and gateway and a fake clock."""

from __future__ import annotations

import gc
from ipaddress import IPv4Address

import gevent
import pytest

from doublenat.engine.model import MappingKey, parse_owned
from doublenat.protocol.natpmp import MapRequest, Proto, Result
from tests.engine.fakes import TIMEOUT, TRANSPORT, TRAP, FakeGateway, make_mapper

A = IPv4Address("192.168.88.20")
B = IPv4Address("192.168.88.21")


def tcp(internal: int, suggested: int = 0, lifetime: int = 3600) -> MapRequest:
    return MapRequest(Proto.TCP, internal, suggested, lifetime)


def udp(internal: int, suggested: int = 0, lifetime: int = 3600) -> MapRequest:
    return MapRequest(Proto.UDP, internal, suggested, lifetime)


def rules_match_leases(mapper, router) -> None:  # type: ignore[no-untyped-def]
    """The invariant: the router's doublenat rules are exactly the live mappings' rules."""
    mapper.table.check()
    owned = router.owned()
    assert set(owned) == {lease.rule.rule_id for lease in mapper.leases.values()}
    for lease in mapper.leases.values():
        rule = owned[lease.rule.rule_id]
        assert rule.dst_port == str(lease.router_port)
        assert rule.to_addresses == str(lease.key.client)
        assert rule.to_ports == str(lease.to_port)
        assert parse_owned(rule).key == lease.key  # type: ignore[union-attr]


# ------------------------------------------------------------------ creation


def test_create_costs_one_router_write_and_no_read() -> None:
    mapper, router, gateway, _ = make_mapper()
    outcome = mapper.handle(A, tcp(6881, 6881))
    assert outcome.result == Result.SUCCESS
    assert outcome.external_port == 6881 and outcome.lifetime == 60
    assert router.writes == 1 and router.reads == 0
    assert gateway.calls["create"] == 1
    [rule] = router.rules.values()
    assert (rule.protocol, rule.in_interface, rule.dst_port, rule.to_addresses, rule.to_ports) == (
        "tcp",
        "wg-proton",
        "6881",
        str(A),
        "6881",
    )
    assert rule.comment.startswith("double-natpmp-")
    rules_match_leases(mapper, router)


def test_port_choice_suggested_then_internal_then_any() -> None:
    mapper, router, _, _ = make_mapper()
    router.add_foreign("tcp", "wg-proton", "7000-7001")
    mapper.table.load_foreign(router.list_rules(), "wg-proton")
    assert mapper.handle(A, tcp(6000, 5000)).result == Result.SUCCESS  # suggested 5000 free
    assert mapper.handle(A, tcp(6001, 7000)).result == Result.SUCCESS  # 7000 foreign -> 6001
    assert mapper.handle(A, tcp(7001, 7000)).result == Result.SUCCESS  # both taken -> other
    ports = {(lease.key.internal_port, lease.router_port) for lease in mapper.leases.values()}
    assert (6000, 5000) in ports and (6001, 6001) in ports
    other = next(p for i, p in ports if i == 7001)
    assert other not in (7000, 7001, 5000, 6001)
    rules_match_leases(mapper, router)


def test_two_clients_never_share_a_router_port_in_either_protocol() -> None:
    mapper, router, _, _ = make_mapper()
    jobs = [gevent.spawn(mapper.handle, c, r(51413, 51413)) for c in (A, B) for r in (tcp, udp)]
    gevent.joinall(jobs, raise_error=True)
    assert all(j.value.result == Result.SUCCESS for j in jobs)
    by_port: dict[int, set[IPv4Address]] = {}
    for lease in mapper.leases.values():
        by_port.setdefault(lease.router_port, set()).add(lease.key.client)
    assert all(len(clients) == 1 for clients in by_port.values())
    # A client may hold one port for both protocols (companion port).
    assert any(
        len([lease for lease in mapper.leases.values() if lease.router_port == p]) == 2
        for p in by_port
    )
    rules_match_leases(mapper, router)


def test_router_failure_asks_nothing_upstream() -> None:
    mapper, router, gateway, _ = make_mapper()
    router.fail["add_rule"] = TRAP
    outcome = mapper.handle(A, tcp(6881))
    assert outcome.result == Result.NETWORK_FAILURE
    assert gateway.calls["create"] == 0
    assert not mapper.leases and not router.rules
    assert mapper.table.upstream_free(Proto.TCP, 6881, B)  # the port was released


def test_router_transport_failure_marks_the_write_uncertain() -> None:
    mapper, router, _, _ = make_mapper()
    router.fail["add_rule"] = TRANSPORT
    assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE
    unknown = [c for c, w in mapper.table.writes.items() if w.unknown]
    assert any(c.startswith("double-natpmp-tcp 192.168.88.20:6881") for c in unknown)


def test_upstream_failure_rolls_the_rule_back() -> None:
    mapper, router, gateway, _ = make_mapper()
    gateway.fail.append(TIMEOUT)
    outcome = mapper.handle(A, tcp(6881))
    assert outcome.result == Result.NETWORK_FAILURE
    assert router.calls["add_rule"] == 1 and router.calls["remove_rule"] == 1
    assert not router.rules and not mapper.leases
    # and the next try works from scratch
    assert mapper.handle(A, tcp(6881)).result == Result.SUCCESS
    rules_match_leases(mapper, router)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (Result.NOT_AUTHORIZED, Result.NOT_AUTHORIZED),
        (Result.OUT_OF_RESOURCES, Result.OUT_OF_RESOURCES),
        (Result.NETWORK_FAILURE, Result.NETWORK_FAILURE),
        (Result.UNSUPPORTED_OPCODE, Result.NETWORK_FAILURE),
    ],
)
def test_upstream_refusal_is_passed_on_and_rolled_back(upstream: Result, expected: Result) -> None:
    mapper, router, gateway, _ = make_mapper()
    gateway.fail.append(upstream)
    assert mapper.handle(A, tcp(6881)).result == expected
    assert not router.rules


def test_rollback_that_fails_leaves_garbage_for_reconciliation() -> None:
    mapper, router, gateway, _ = make_mapper()
    gateway.fail.append(TIMEOUT)
    router.fail["remove_rule"] = TRANSPORT
    assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE
    [rule_id] = router.rules
    assert rule_id in {d.rule.rule_id for d in mapper.table.doomed.values()}
    assert not mapper.table.router_free(Proto.TCP, 6881, B)  # still held: the rule is there
    mapper.flush()
    assert not router.rules and not mapper.table.doomed
    assert mapper.table.router_free(Proto.TCP, 6881, B)


def test_not_synchronised_router_gives_network_failure_without_calls() -> None:
    wanted = []
    mapper, router, gateway, _ = make_mapper(ready=False)
    mapper._router_wanted = lambda: wanted.append(1)
    assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE
    assert router.writes == 0 and sum(gateway.calls.values()) == 0
    assert wanted == [1]


def test_quota_counts_both_protocols() -> None:
    mapper, router, _, _ = make_mapper(max_mappings_per_client=3)
    assert mapper.handle(A, tcp(1001)).result == Result.SUCCESS
    assert mapper.handle(A, udp(1001)).result == Result.SUCCESS
    assert mapper.handle(A, tcp(1002)).result == Result.SUCCESS
    assert mapper.handle(A, udp(1003)).result == Result.OUT_OF_RESOURCES
    assert mapper.handle(B, udp(1003)).result == Result.SUCCESS
    # a renewal of an existing mapping is not a new one
    assert mapper.handle(A, tcp(1001)).result == Result.SUCCESS
    assert len(router.rules) == 4


def test_no_free_port_is_out_of_resources() -> None:
    mapper, router, _, _ = make_mapper(port_range=(40000, 40001))
    assert mapper.handle(A, tcp(1, 0)).result == Result.SUCCESS
    assert mapper.handle(A, tcp(2, 0)).result == Result.SUCCESS
    assert mapper.handle(A, tcp(3, 0)).result == Result.OUT_OF_RESOURCES
    assert router.calls["add_rule"] == 2


def test_lifetime_is_clamped_and_never_overflows() -> None:
    mapper, _, gateway, _ = make_mapper(max_lifetime=7200)
    gateway.max_lifetime = 2**32 - 1
    outcome = mapper.handle(A, tcp(6881, 0, 0xFFFFFFFF))
    assert outcome.result == Result.SUCCESS and outcome.lifetime == 7200


# --------------------------------------------------------- renewal and joining


def test_renewal_keeps_the_port_and_never_touches_the_router() -> None:
    mapper, router, gateway, clock = make_mapper()
    first = mapper.handle(A, tcp(6881, 6881, 60))
    clock.advance(30)
    again = mapper.handle(A, tcp(6881, 9999, 60))  # another suggestion: same mapping
    assert again.external_port == first.external_port
    assert router.writes == 1 and router.reads == 0
    assert gateway.calls["renew"] == 1


def test_a_retransmission_soon_after_is_answered_from_the_lease() -> None:
    mapper, router, gateway, clock = make_mapper()
    mapper.handle(A, tcp(6881, 6881, 60))
    clock.advance(0.25)
    outcome = mapper.handle(A, tcp(6881, 6881, 60))
    assert outcome.result == Result.SUCCESS and outcome.lifetime == 59
    assert gateway.calls["renew"] == 0 and router.writes == 1


def test_retransmissions_join_the_work_in_flight() -> None:
    mapper, router, gateway, _ = make_mapper()
    gateway.delay = 0.05
    jobs = [gevent.spawn(mapper.handle, A, tcp(6881, 6881)) for _ in range(5)]
    gevent.joinall(jobs, raise_error=True)
    assert {j.value for j in jobs} == {jobs[0].value}
    assert gateway.calls["create"] == 1 and router.calls["add_rule"] == 1


def test_renewal_during_an_upstream_outage_is_served_from_the_valid_lease() -> None:
    mapper, _, gateway, clock = make_mapper()
    first = mapper.handle(A, tcp(6881, 6881, 60))
    clock.advance(40)
    gateway.fail.append(TIMEOUT)
    outcome = mapper.handle(A, tcp(6881, 6881, 60))
    assert outcome.result == Result.SUCCESS
    assert outcome.external_port == first.external_port and outcome.lifetime == 20
    clock.advance(25)  # the upstream lease is over now
    gateway.fail.append(TIMEOUT)
    assert mapper.handle(A, tcp(6881, 6881, 60)).result == Result.NETWORK_FAILURE
    assert mapper.leases  # not forgotten: the client may still renew


def test_an_upstream_reset_makes_renewals_ask_the_gateway_again() -> None:
    mapper, _, gateway, clock = make_mapper()
    mapper.handle(A, tcp(6881, 6881, 60))
    clock.advance(1)
    mapper.upstream.saw_epoch(5000)  # the first reply already set the baseline at 5000
    clock.advance(1)
    mapper.upstream.saw_epoch(3)  # went backwards: the gateway lost everything
    gateway.mappings.clear()
    mapper.handle(A, tcp(6881, 6881, 60))
    assert gateway.calls["create"] == 2  # the gateway re-created it from our renewal


# -------------------------------------------------------------------- delete


def test_delete_is_idempotent() -> None:
    mapper, router, gateway, _ = make_mapper()
    mapper.handle(A, tcp(6881))
    assert mapper.handle(A, tcp(6881, 1234, 0)).result == Result.SUCCESS
    assert not router.rules and not mapper.leases and not gateway.mappings
    writes = router.writes
    assert mapper.handle(A, tcp(6881, 0, 0)).result == Result.SUCCESS
    assert router.writes == writes


def test_delete_all_only_touches_that_protocol() -> None:
    mapper, router, _, _ = make_mapper()
    for port in (7010, 7011):
        mapper.handle(A, tcp(port))
        mapper.handle(A, udp(port))
    mapper.handle(B, udp(7012))
    assert mapper.handle(A, udp(0, 0, 0)).result == Result.SUCCESS
    left = {(k.client, k.proto) for k in mapper.leases}
    assert left == {(A, Proto.TCP), (B, Proto.UDP)}
    rules_match_leases(mapper, router)


def test_internal_port_zero_forwards_the_granted_port_to_the_same_port() -> None:
    mapper, router, gateway, _ = make_mapper()
    gateway.proton = True
    outcome = mapper.handle(A, udp(0, 1, 60))
    assert outcome.result == Result.SUCCESS
    lease = mapper.leases[MappingKey(A, Proto.UDP, 0)]
    assert lease.to_port == outcome.external_port != 0
    rules_match_leases(mapper, router)


# --------------------------------------------------------------- port modes


def test_external_mode_rule_follows_the_granted_port() -> None:
    gateway = FakeGateway(proton=True)
    mapper, router, _, clock = make_mapper(gateway=gateway, port_mode="external")
    outcome = mapper.handle(A, tcp(6881, 0, 60))
    [rule] = router.rules.values()
    assert rule.dst_port == str(outcome.external_port) and rule.to_ports == "6881"
    assert router.writes == 1 and router.reads == 0
    # the gateway moves the port at a renewal: the rule follows
    lease = mapper.leases[MappingKey(A, Proto.TCP, 6881)]
    gateway.mappings[(Proto.TCP, lease.upstream_port)] = 50505
    clock.advance(40)
    assert mapper.handle(A, tcp(6881, 0, 60)).external_port == 50505
    assert router.calls["update_rule"] == 1
    assert next(iter(router.rules.values())).dst_port == "50505"
    assert mapper.table.router_free(Proto.TCP, outcome.external_port, B)
    rules_match_leases(mapper, router)


def test_external_mode_router_failure_rolls_back_upstream() -> None:
    gateway = FakeGateway(proton=True)
    mapper, router, _, _ = make_mapper(gateway=gateway, port_mode="external")
    router.fail["add_rule"] = TRAP
    assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE
    assert gateway.calls["delete"] == 1 and not gateway.mappings


# -------------------------------------------------------------------- expiry


def test_expiry_after_lifetime_and_grace() -> None:
    mapper, router, gateway, clock = make_mapper(expiry_grace=10)
    mapper.handle(A, tcp(6881, 0, 60))
    clock.advance(69)
    assert mapper.expire_due() == 0
    clock.advance(2)
    assert mapper.expire_due() == 1
    assert not router.rules and not mapper.leases and not gateway.mappings


def test_expiry_racing_a_renewal_keeps_the_renewed_mapping() -> None:
    mapper, router, gateway, clock = make_mapper(expiry_grace=0)
    mapper.handle(A, tcp(6881, 0, 60))
    clock.advance(59.9)
    gateway.delay = 0.05  # the renewal holds the key's lock while it waits
    renewal = gevent.spawn(mapper.handle, A, tcp(6881, 0, 60))
    gevent.sleep(0.01)
    clock.advance(0.2)  # the old deadline passes while the renewal is in flight
    expiry = gevent.spawn(mapper.expire_due)
    gevent.joinall([renewal, expiry], raise_error=True)
    assert renewal.value.result == Result.SUCCESS
    assert mapper.leases and router.rules  # the expiry saw the new deadline under the lock
    rules_match_leases(mapper, router)


def test_close_all_removes_everything() -> None:
    mapper, router, gateway, _ = make_mapper()
    for port in range(2000, 2030):
        mapper.handle(A, tcp(port))
    assert mapper.close_all() == 30
    assert not router.rules and not mapper.leases and not gateway.mappings


# ------------------------------------------------------------------ adoption


def test_adoption_keeps_the_rule_and_costs_no_router_write() -> None:
    mapper, router, gateway, clock = make_mapper()
    mapper.handle(A, tcp(6881, 6881, 60))
    [rule_id] = router.rules
    # a restart: a new engine on the same router and gateway
    fresh, _, _, _ = make_mapper(router=router, gateway=gateway, clock=clock)
    owned = parse_owned(router.rules[rule_id])
    assert owned is not None
    assert fresh.table.add_candidate(owned, owned.rule.ref, clock())
    writes = router.writes
    outcome = fresh.handle(A, tcp(6881, 6881, 60))
    assert outcome.result == Result.SUCCESS and outcome.external_port == 6881
    assert router.writes == writes and list(router.rules) == [rule_id]
    assert fresh.leases[owned.key].rule.rule_id == rule_id and not fresh.candidates
    rules_match_leases(fresh, router)


def test_unadopted_rules_are_removed_after_the_grace() -> None:
    mapper, router, gateway, clock = make_mapper(adopt_grace=100)
    mapper.handle(A, tcp(6881))
    fresh, _, _, _ = make_mapper(router=router, gateway=gateway, clock=clock, adopt_grace=100)
    [rule] = router.rules.values()
    owned = parse_owned(rule)
    assert owned is not None
    assert fresh.table.add_candidate(owned, owned.rule.ref, clock())
    clock.advance(99)
    assert fresh.expire_due() == 0 and router.rules
    clock.advance(2)
    assert fresh.expire_due() == 1 and not router.rules and not gateway.mappings


def test_both_protocols_of_one_mapping_share_the_ports() -> None:
    mapper, router, _, _ = make_mapper()
    udp_first = mapper.handle(A, udp(0, 1, 60))  # gluetun / Proton: UDP, then TCP
    tcp_then = mapper.handle(A, tcp(0, 1, 60))
    assert udp_first.external_port == tcp_then.external_port
    leases = list(mapper.leases.values())
    assert leases[0].upstream_port == leases[1].upstream_port
    # Proton's suggestion "1" is outside PORT_RANGE: it was not passed to the gateway
    assert udp_first.external_port >= 1024
    rules_match_leases(mapper, router)


def test_out_of_range_suggestions_are_not_passed_upstream() -> None:
    mapper, _, _, _ = make_mapper(port_range=(40000, 50000))
    outcome = mapper.handle(A, tcp(6881, 80, 60))
    assert outcome.external_port != 80 and 40000 <= outcome.external_port <= 50000


def test_repeated_refusals_warn_once_per_client_and_reason(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    caplog.set_level(logging.DEBUG, logger="doublenat.mapping")
    mapper, _, _, clock = make_mapper(max_mappings_per_client=1)
    mapper.handle(A, tcp(1000))
    for port in range(1001, 1021):
        assert mapper.handle(A, tcp(port)).result == Result.OUT_OF_RESOURCES
    refused = [r for r in caplog.records if getattr(r, "event", "") == "mapping.refused"]
    assert len(refused) == 20
    assert [r.levelno for r in refused].count(logging.WARNING) == 1
    clock.advance(11)
    mapper.handle(A, tcp(1030))
    assert caplog.records[-1].levelno == logging.WARNING
    mapper.handle(B, tcp(1031))  # another client is not silenced by the first
    assert mapper.handle(B, tcp(1032)).result == Result.OUT_OF_RESOURCES
    assert caplog.records[-1].levelno == logging.WARNING


def test_a_collision_the_router_reports_is_retried_on_another_port() -> None:
    from doublenat.engine.contracts import AlreadyExists

    mapper, router, gateway, _ = make_mapper()
    router.fail["add_rule"] = AlreadyExists("failure: already have such rule")
    outcome = mapper.handle(A, tcp(6881, 6881))
    assert outcome.result == Result.SUCCESS
    [rule] = router.rules.values()
    assert rule.dst_port != "6881" and router.calls["add_rule"] == 2
    assert not mapper.table.router_free(Proto.TCP, 6881, A)  # remembered as taken
    rules_match_leases(mapper, router)
    # a router that refuses every time costs two tries, not a scan of every port
    router.fail_always["add_rule"] = AlreadyExists("failure: already have such rule")
    assert mapper.handle(A, tcp(7000, 7000)).result == Result.OUT_OF_RESOURCES
    assert router.calls["add_rule"] == 4
    assert gateway.calls["create"] == 1


# ------------------------------------------------------------ upstream moves


def router_ports(router) -> dict[tuple[str, str], set[str]]:  # type: ignore[no-untyped-def]
    """(protocol, dst-port) of enabled doublenat rules -> the clients they forward to."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in router.owned().values():
        if not rule.disabled:
            out.setdefault((rule.protocol, rule.dst_port), set()).add(rule.to_addresses)
    return out


def test_external_mode_ports_swapped_by_a_new_gateway_are_both_served() -> None:
    """Suspected in issue 12, decided here: after a reconnect the gateway hands A the
    port B had and B the port A had. Each rule must move onto a port the other still
    holds; neither may wait for the other forever, and no port ever forwards to two
    clients. (Decided: it happens; before parking, both were refused on every retry.)"""
    mapper, router, gateway, _ = make_mapper(port_mode="external")
    gateway.proton = True
    a_port = mapper.handle(A, udp(5000, 0, 60)).external_port
    b_port = mapper.handle(B, udp(6000, 0, 60)).external_port
    a_key, b_key = MappingKey(A, Proto.UDP, 5000), MappingKey(B, Proto.UDP, 6000)
    a_up, b_up = mapper.leases[a_key].upstream_port, mapper.leases[b_key].upstream_port
    # A reconnect to another server: epoch back to 0, each gets the other's old port.
    gateway.epoch = 0
    gateway.mappings = {(Proto.UDP, a_up): b_port, (Proto.UDP, b_up): a_port}
    for _ in range(2):
        for key in (a_key, b_key):
            mapper.refresh(key, "upstream lost")
            assert all(len(clients) == 1 for clients in router_ports(router).values())
            mapper.table.check()
    assert router_ports(router) == {("udp", str(b_port)): {str(A)},
                                    ("udp", str(a_port)): {str(B)}}
    assert mapper.leases[a_key].external_port == b_port
    assert mapper.leases[b_key].external_port == a_port
    assert not any(lease.parked for lease in mapper.leases.values())
    rules_match_leases(mapper, router)


def test_work_in_a_pool_ends_with_its_caller() -> None:
    """A shutdown's cleanup cut short by its timeout must not leave its workers running
    on their own past the daemon's end."""
    from doublenat.engine.mapper import in_pool

    items = [f"in-pool item {i}" for i in range(8)]
    finished: list[str] = []

    def slow(item: str) -> None:
        gevent.sleep(10)
        finished.append(item)

    caller = gevent.spawn(in_pool, 4, slow, items)
    gevent.sleep(0.05)
    caller.kill(block=True)
    gevent.sleep(0.05)
    running = [g for g in gc.get_objects() if isinstance(g, gevent.Greenlet)
               and g.started and not g.dead and any(a in items for a in g.args)]
    assert running == [] and finished == []
