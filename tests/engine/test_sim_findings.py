"""Defects found by the seeded simulation (tests/sim), each reduced to a minimal case.

Every test names the seed of `python -m tests.sim.run` that first showed the defect.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from doublenat.engine.contracts import NatRule
from doublenat.engine.epoch import UpstreamState
from doublenat.engine.mapper import Mapper
from doublenat.engine.model import MappingKey, rule_comment
from doublenat.engine.reconcile import Reconciler, Report, plan
from doublenat.protocol.natpmp import MapRequest, Proto, Result
from tests.engine.fakes import (
    TIMEOUT,
    TRANSPORT,
    TRAP,
    FakeClock,
    FakeGateway,
    FakeRouter,
    make_mapper,
    make_settings,
)

A = IPv4Address("192.168.88.20")
B = IPv4Address("192.168.88.21")


def tcp(internal: int, suggested: int = 0, lifetime: int = 60) -> MapRequest:
    return MapRequest(Proto.TCP, internal, suggested, lifetime)


def test_a_rule_that_cannot_follow_a_moved_port_frees_the_port_it_reserved() -> None:
    """Seed 104: the router refuses the update that moves a rule to the port the gateway
    moved the mapping to. The renewal fails (result 3); the port reserved for the move
    is free again; nothing raises."""
    gateway = FakeGateway(proton=True)
    mapper, router, _, clock = make_mapper(gateway=gateway, port_mode="external")
    first = mapper.handle(A, tcp(6881))
    lease = mapper.leases[MappingKey(A, Proto.TCP, 6881)]
    gateway.mappings[(Proto.TCP, lease.upstream_port)] = 50505
    router.fail["update_rule"] = TRAP
    clock.advance(40)
    assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE
    assert mapper.table.router_free(Proto.TCP, 50505, B)
    assert mapper.leases[lease.key].router_port == first.external_port
    mapper.table.check()


def test_a_rule_doomed_while_a_listing_is_in_flight_is_not_taken_as_gone() -> None:
    """Seed 152: a creation writes its rule after the reconciler's listing was taken,
    then the gateway refuses and the rollback's removal fails: the rule is doomed while
    the listing is in flight. That listing does not show the rule, which is no sign it
    is gone: the record must stay (and its port stay reserved) until a removal or a
    later listing says so."""
    mapper, router, gateway, _ = make_mapper()

    def meanwhile(name: str) -> None:
        if name == "list_rules" and not router.rules.get("*1"):
            gateway.fail.append(TIMEOUT)
            router.fail["remove_rule"] = TRANSPORT
            assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE

    router.on_call = meanwhile
    Reconciler(mapper, router, "10.2.0.1").run_once()
    router.on_call = None
    [rule_id] = router.owned()
    assert [d.rule.rule_id for d in mapper.table.doomed.values()] == [rule_id]
    assert not mapper.table.router_free(Proto.TCP, 6881, B)
    mapper.table.check()


def test_a_new_mapping_never_takes_the_comment_of_a_rule_still_to_remove() -> None:
    """Seed 228: a mapping ends while the router is unreachable (its rule stays doomed,
    holding its router port), its upstream port is freed by the upstream delete, and the
    same client maps the same port again: the new rule got the doomed rule's comment.
    After a router restart the doomed rule is found by comment, and its removal took the
    live mapping's rule with it."""
    gateway = FakeGateway(proton=True)
    mapper, router, _, _ = make_mapper(gateway=gateway, port_mode="external")
    mapper.handle(A, tcp(6881))
    router.fail["remove_rule"] = TRANSPORT
    assert mapper.handle(A, tcp(6881, lifetime=0)).result == Result.SUCCESS
    [doomed] = mapper.table.doomed.values()
    assert mapper.handle(A, tcp(6881)).result == Result.SUCCESS
    lease = mapper.leases[MappingKey(A, Proto.TCP, 6881)]
    assert lease.comment != doomed.comment
    router.restart(renumber=True)
    mapper.flush()
    assert [r.comment for r in router.owned().values()] == [lease.comment]
    mapper.table.check()


def forwarding(router) -> dict[tuple[str, str], set[str]]:  # type: ignore[no-untyped-def]
    ports: dict[tuple[str, str], set[str]] = {}
    for rule in router.owned().values():
        ports.setdefault((rule.protocol, rule.dst_port), set()).add(rule.to_addresses)
    return ports


def test_a_restore_of_unknown_outcome_outlives_its_mapping_with_its_port() -> None:
    """Seed 209: reconciliation re-creates a live mapping's vanished rule, and the
    connection drops after the router wrote it. The mapping then ends: the restored rule
    exists, so its port must stay reserved until a listing settles the write (it went
    free, and another client got the port: two clients on one port), and the client
    mapping the same port again must not collide with the write's record (it raised)."""
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, tcp(6881, 6881))
    router.rules.clear()  # an administrator removed it
    router.fail_after["add_rule"] = TRANSPORT
    Reconciler(mapper, router, "10.2.0.1").run_once()
    assert mapper.handle(A, tcp(6881, lifetime=0)).result == Result.SUCCESS
    mapper.handle(B, tcp(6881, 6881))
    assert all(len(clients) == 1 for clients in forwarding(router).values())
    mapper.handle(A, tcp(6881, 6881))
    mapper.table.check()
    Reconciler(mapper, router, "10.2.0.1").run_once()  # settles the write: rule removed
    assert all(len(clients) == 1 for clients in forwarding(router).values())
    assert not mapper.table.writes
    mapper.table.check()


def test_a_restore_of_unknown_outcome_does_not_delay_the_next_one() -> None:
    """Seed 124: the re-creation of a live mapping's vanished rule fails with the
    connection (it may or may not have been written). The next reconciliation, with the
    router healthy, must leave the mapping with its rule: it waited for two more
    listings to settle the first write (a copy landing late is removed as a duplicate;
    the mapping holds the port either way)."""
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, tcp(6881, 6881))
    router.rules.clear()
    router.fail["add_rule"] = TRANSPORT
    reconciler = Reconciler(mapper, router, "10.2.0.1")
    reconciler.run_once()
    assert not router.owned()
    reconciler.run_once()
    [rule] = router.owned().values()
    assert mapper.leases[MappingKey(A, Proto.TCP, 6881)].rule.rule_id == rule.rule_id
    assert not mapper.table.writes
    mapper.table.check()


def test_a_renewal_answered_from_the_lease_never_says_lifetime_zero() -> None:
    """Seed 223: the gateway granted a one-second lease, and a renewal came 0.05 s later:
    answered from the lease, it said success with lifetime 0, which tells the client its
    mapping is gone (RFC 6886 3.3). With less than a second left the gateway is asked."""
    mapper, _, gateway, clock = make_mapper(gateway=FakeGateway(max_lifetime=1))
    assert mapper.handle(A, tcp(6881, 6881)).lifetime == 1
    clock.advance(0.05)
    assert mapper.renew_now(A, tcp(6881, 6881)) is None
    outcome = mapper.handle(A, tcp(6881, 6881))
    assert outcome.result == Result.SUCCESS and outcome.lifetime >= 1
    assert gateway.calls["renew"] == 1


def test_a_mapping_created_across_an_interface_change_asks_for_reconciliation() -> None:
    """Seed 147: a reconciliation finds the tunnel on a new interface and moves every
    rule while a creation is writing its rule on the old one. The new mapping's rule was
    left there until the next periodic run (RECONCILE_INTERVAL, 10 minutes by default),
    forwarding nothing; the engine now asks for a run at once."""
    router, gateway, clock = FakeRouter(), FakeGateway(), FakeClock()
    wanted: list[str] = []
    mapper = Mapper(router, gateway, UpstreamState(clock), make_settings(), clock=clock,
                    router_wanted=lambda: wanted.append("run"))
    reconciler = Reconciler(mapper, router, "10.2.0.1")
    reconciler.run_once()

    def tunnel_renamed(name: str) -> None:
        if name == "add_rule":
            router.interface_types["wg-new"] = "wg"
            router.route = "wg-new"
            reconciler.run_once()

    router.on_call = tunnel_renamed
    assert mapper.handle(A, tcp(6881, 6881)).result == Result.SUCCESS
    router.on_call = None
    assert wanted == ["run"]
    reconciler.run_once()
    assert [r.in_interface for r in router.owned().values()] == ["wg-new"]
    assert mapper.leases[MappingKey(A, Proto.TCP, 6881)].interface == "wg-new"


def test_a_parked_mappings_vanished_rule_is_not_restored_onto_the_port_it_gave_up() -> None:
    """Seed 1026: after a reconnect the gateway gave B's port to A, and B's rule was
    parked (disabled) so the port forwards to A only. The parked rule then vanished (an
    administrator, a router restart before it was saved), and reconciliation re-created
    it, enabled, on the port A now holds: two clients on one port. A parked mapping's
    rule comes back when its own re-map grants it a port."""
    mapper, router, gateway, _ = make_mapper(port_mode="external")
    gateway.proton = True
    a_port = mapper.handle(A, MapRequest(Proto.UDP, 5000, 0, 60)).external_port
    b_port = mapper.handle(B, MapRequest(Proto.UDP, 6000, 0, 60)).external_port
    a_key, b_key = MappingKey(A, Proto.UDP, 5000), MappingKey(B, Proto.UDP, 6000)
    a_up, b_up = mapper.leases[a_key].upstream_port, mapper.leases[b_key].upstream_port
    gateway.epoch = 0
    gateway.mappings = {(Proto.UDP, a_up): b_port, (Proto.UDP, b_up): a_port}
    mapper.refresh(a_key, "upstream lost")
    assert mapper.leases[b_key].parked
    parked_rule = mapper.leases[b_key].rule.rule_id
    del router.rules[parked_rule]
    Reconciler(mapper, router, "10.2.0.1").run_once()
    assert all(len(clients) == 1 for clients in forwarding(router).values())
    mapper.refresh(b_key, "upstream lost")  # B's own re-map: its rule comes back
    Reconciler(mapper, router, "10.2.0.1").run_once()
    assert forwarding(router) == {("udp", str(b_port)): {str(A)},
                                  ("udp", str(a_port)): {str(B)}}
    mapper.table.check()


def test_a_removal_during_a_listing_hides_no_rule_of_the_new_router_session() -> None:
    """Seed 1084: two removals failed, then the router restarted and gave the rules each
    other's old ids. While a listing was in flight the first rule was removed (found by
    comment); the listing then ignored the rule carrying the first rule's *old* id, which
    was the second rule: its record was dropped as gone, the rule left owned by nobody."""
    mapper, router, _, _ = make_mapper()
    for port in (6881, 6882):
        mapper.handle(A, tcp(port, port))
    router.fail_always["remove_rule"] = TRANSPORT
    for port in (6881, 6882):
        mapper.handle(A, tcp(port, lifetime=0))
    del router.fail_always["remove_rule"]
    first, second = sorted(mapper.table.doomed.values(), key=lambda d: d.rule.rule_id)
    rules = {r.comment: r for r in router.rules.values()}
    router.session += 1  # a restart that swapped the two ids
    router.rules = {first.rule.rule_id: replace(rules[second.comment],
                                                rule_id=first.rule.rule_id),
                    second.rule.rule_id: replace(rules[first.comment],
                                                 rule_id=second.rule.rule_id)}

    def meanwhile(name: str) -> None:
        if name == "list_rules":
            router.on_call = None
            assert mapper._remove(first)  # found by comment, removed

    router.on_call = meanwhile
    Reconciler(mapper, router, "10.2.0.1").run_once()
    assert not router.owned() and not mapper.table.doomed  # the second found and removed
    mapper.table.check()


def test_a_rule_found_for_a_mapping_is_not_given_to_the_one_that_replaced_it() -> None:
    """Seed 2003, first half: after a router restart a listing re-identifies mapping
    M's rule by comment; before the reconciler gets M's lock, M is deleted (its rule
    removed) and the client maps the same port again (a new rule). The re-identified id
    was then given to the new mapping: it pointed at a removed rule, and its real rule
    was owned by nobody (left behind when the mapping ended)."""
    mapper, router, _, _ = make_mapper()
    key = MappingKey(A, Proto.TCP, 6881)
    mapper.handle(A, tcp(6881, 6881))
    router.restart(renumber=True)
    reconciler = Reconciler(mapper, router, "10.2.0.1")
    table = mapper.table
    the_plan = plan(router.list_rules(), table.leases, table.writes, table.candidates,
                    list(table.doomed.values()), "wg-proton")
    assert key in the_plan.found
    # Meanwhile, while the reconciler waits for the mapping's lock:
    mapper.handle(A, tcp(6881, lifetime=0))
    mapper.handle(A, tcp(6881, 6881))
    renewed = mapper.leases[key]
    reconciler._apply(the_plan, [], table.router, Report())
    assert mapper.leases[key].rule == renewed.rule
    assert renewed.rule.rule_id in router.rules


def test_a_rule_removed_by_comment_during_a_listing_is_not_taken_for_a_live_one() -> None:
    """Seed 2003, second half: after a router restart a mapping is deleted while a
    listing is in flight; its rule, known by an old id, is found by comment and removed.
    The client maps the same port again at once (same comment). The listing, taken
    before, still shows the removed rule: it was taken for the new mapping's rule (the
    removal was recorded under the old id only), so the new mapping pointed at a removed
    rule and its real one was owned by nobody."""
    mapper, router, _, _ = make_mapper()
    key = MappingKey(A, Proto.TCP, 6881)
    mapper.handle(A, tcp(6881, 6881))
    router.restart(renumber=True)

    def meanwhile(name: str) -> None:
        if name == "list_rules":
            router.on_call = None
            mapper.handle(A, tcp(6881, lifetime=0))
            mapper.handle(A, tcp(6881, 6881))

    router.on_call = meanwhile
    Reconciler(mapper, router, "10.2.0.1").run_once()
    [rule_id] = router.owned()
    assert mapper.leases[key].rule.rule_id == rule_id
    mapper.table.check()


def test_an_adopted_parked_rule_of_an_earlier_run_is_enabled() -> None:
    """Seed 3019: doublenat stopped without its cleanup (a crash) while one mapping's
    rule was parked (disabled). The next run adopted that rule when the client renewed,
    as a mapping like any other, and never enabled it: the mapping forwarded nothing."""
    gateway = FakeGateway(proton=True)
    mapper, router, _, _ = make_mapper(gateway=gateway, port_mode="external", ready=False)
    key = MappingKey(A, Proto.TCP, 6881)
    comment = rule_comment(key, 6881)
    router.rules["*A1"] = NatRule("*A1", "tcp", "wg-proton", "40007", str(A), "6881", comment,
                                  disabled=True)
    Reconciler(mapper, router, "10.2.0.1").run_once()
    assert key in mapper.candidates
    outcome = mapper.handle(A, tcp(6881))
    assert outcome.result == Result.SUCCESS
    [rule] = router.owned().values()
    assert not rule.disabled and rule.dst_port == str(outcome.external_port)
    assert not mapper.leases[key].parked
    mapper.table.check()


class LostReplyGateway(FakeGateway):
    """Maps, then the reply is lost: the caller sees a timeout (once)."""

    lose_next = False

    def map(self, proto, internal_port, suggested_port, lifetime):  # type: ignore[no-untyped-def]
        answer = super().map(proto, internal_port, suggested_port, lifetime)
        if self.lose_next:
            self.lose_next = False
            raise TIMEOUT
        return answer


def test_a_mapping_request_the_gateway_did_not_answer_is_deleted_upstream() -> None:
    """Seed 1: the gateway mapped the port but its reply was lost; the creation failed
    and forgot the port, so nothing ever deleted the upstream mapping (left at shutdown,
    counted nowhere). An unanswered request may have been executed, like a router write
    of unknown outcome: its port waits in the pending upstream deletes."""
    for mode, internal in (("internal", 6881), ("internal", 0), ("external", 6881)):
        gateway = LostReplyGateway()
        mapper, router, _, _ = make_mapper(gateway=gateway, port_mode=mode)
        gateway.lose_next = True
        assert mapper.handle(A, tcp(internal, 6881)).result == Result.NETWORK_FAILURE
        assert gateway.mappings and not mapper.leases and not router.owned()
        mapper.flush()
        assert not gateway.mappings, mode
        mapper.table.check()


def test_upstream_deletes_that_fail_at_shutdown_are_in_the_report() -> None:
    """Seed 4: the gateway stopped answering before the shutdown: every upstream delete
    failed and was given up, and the report said nothing was left, while the gateway
    still held the mappings (until their leases ran out)."""
    mapper, router, gateway, _ = make_mapper()
    mapper.handle(A, tcp(6881, 6881))
    gateway.fail_always = TIMEOUT
    assert mapper.close_all() == 1
    assert not router.owned() and gateway.mappings
    assert mapper.table.describe_leftovers() == ["upstream mapping tcp 6881"]
    gateway.fail_always = None
    mapper.flush()  # a later flush (not at shutdown) sends it
    assert not gateway.mappings and not mapper.table.describe_leftovers()


def test_a_mapping_whose_restore_has_an_unknown_outcome_is_not_parked() -> None:
    """Seed 7011: B's rule vanished and its re-creation failed with the connection after
    the router wrote it (the new rule is there, enabled, under an id nobody knows). Then
    the gateway gave B's port to A: parking B disabled the rule B knew (gone already),
    the restored copy stayed enabled, and the port forwarded to both clients."""
    mapper, router, gateway, _ = make_mapper(port_mode="external")
    gateway.proton = True
    a_port = mapper.handle(A, MapRequest(Proto.UDP, 5000, 0, 60)).external_port
    b_port = mapper.handle(B, MapRequest(Proto.UDP, 6000, 0, 60)).external_port
    a_key, b_key = MappingKey(A, Proto.UDP, 5000), MappingKey(B, Proto.UDP, 6000)
    del router.rules[mapper.leases[b_key].rule.rule_id]
    router.fail_after["add_rule"] = TRANSPORT
    Reconciler(mapper, router, "10.2.0.1").run_once()
    assert any(w.restore and w.unknown for w in mapper.table.writes.values())
    a_up, b_up = mapper.leases[a_key].upstream_port, mapper.leases[b_key].upstream_port
    gateway.epoch = 0
    gateway.mappings = {(Proto.UDP, a_up): b_port, (Proto.UDP, b_up): a_port}
    mapper.refresh(a_key, "upstream lost")
    assert all(len(clients) == 1 for clients in forwarding(router).values())
    mapper.table.check()


@pytest.mark.parametrize("landed", [True, False], ids=["landed", "not-landed"])
def test_a_move_of_unknown_outcome_keeps_both_ports_until_a_listing_settles_it(
    landed: bool,
) -> None:
    """The update moving a rule to the gateway's new port is sent, and the connection
    breaks: the rule may be on either port. Both stay reserved (no other client gets
    the new port while the rule may forward it), and reconciliation accepts the move if
    it landed or lets the reservation go if it did not; then the next renewal moves it.
    (The simulation's known issue "update-outcome", before it was fixed.)"""
    gateway = FakeGateway(proton=True)
    mapper, router, _, clock = make_mapper(gateway=gateway, port_mode="external")
    first = mapper.handle(A, tcp(6881)).external_port
    key = MappingKey(A, Proto.TCP, 6881)
    upstream_port = mapper.leases[key].upstream_port
    gateway.mappings[(Proto.TCP, upstream_port)] = 50505
    if landed:
        router.fail_after["update_rule"] = TRANSPORT
    else:
        router.fail["update_rule"] = TRANSPORT
    clock.advance(40)
    assert mapper.handle(A, tcp(6881)).result == Result.NETWORK_FAILURE
    assert mapper.leases[key].moving_to == 50505
    assert not mapper.table.router_free(Proto.TCP, 50505, B)
    assert not mapper.table.router_free(Proto.TCP, first, B)
    mapper.table.check()
    report = Reconciler(mapper, router, "10.2.0.1").run_once()
    lease = mapper.leases[key]
    assert lease.moving_to is None and report.corrected == 1
    assert lease.router_port == (50505 if landed else first)
    assert [r.dst_port for r in router.rules.values()] == [str(lease.router_port)]
    mapper.table.check()
    assert mapper.handle(A, tcp(6881)).external_port == 50505  # follows now, if it had not
    assert [r.dst_port for r in router.rules.values()] == ["50505"]
    assert mapper.table.router_free(Proto.TCP, first, B)
    mapper.table.check()


def test_reconciliation_sets_an_edited_rule_right() -> None:
    """Someone changed a live mapping's rule (to-ports, disabled): set back as the mapping
    says, not left until a later move."""
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, tcp(6881, 6881))
    [rule_id] = router.rules
    router.rules[rule_id] = replace(router.rules[rule_id], to_ports="22", disabled=True)
    report = Reconciler(mapper, router, "10.2.0.1").run_once()
    assert report.corrected == 1
    rule = router.rules[rule_id]
    assert (rule.to_ports, rule.disabled) == ("6881", False)
