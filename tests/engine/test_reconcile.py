"""Reconciliation: the pure plan, and the runner against the in-memory router."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

import gevent
import pytest
from hypothesis import given
from hypothesis import strategies as st

from doublenat.engine.contracts import NatRule, RuleRef
from doublenat.engine.model import MappingKey, parse_owned, rule_comment
from doublenat.engine.reconcile import NoInterface, Reconciler, plan
from doublenat.protocol.natpmp import MapRequest, Proto, Result
from tests.engine.fakes import TIMEOUT, TRANSPORT, make_mapper
from tests.engine.test_mapper import rules_match_leases

A = IPv4Address("192.168.88.20")


def owned_rule(rule_id: str, internal: int, port: int, client: str = "192.168.88.20") -> NatRule:
    key = MappingKey(IPv4Address(client), Proto.TCP, internal)
    return NatRule(
        rule_id, "tcp", "wg-proton", str(port), client, str(internal), rule_comment(key, port)
    )


def foreign_rule(rule_id: str, port: str) -> NatRule:
    return NatRule(rule_id, "tcp", "wg-proton", port, "192.168.88.5", port, "web server")


# ------------------------------------------------------------------ the plan


def test_plan_sorts_every_kind_of_rule() -> None:
    mapper, router, gateway, clock = make_mapper()
    mapper.handle(A, MapRequest(Proto.TCP, 7000, 7000, 60))
    [live] = router.list_rules()
    pending = owned_rule("*P1", 9100, 9100)  # being created right now
    garbage = owned_rule("*G1", 9000, 9000)  # its mapping ended, removal failed
    table = mapper.table
    write = table.reserve(MappingKey(A, Proto.TCP, 9100), [9100], router_port=True)
    assert not isinstance(write, str) and write.comment == pending.comment
    gateway.fail.append(TIMEOUT)
    router.fail["remove_rule"] = TRANSPORT
    mapper.handle(A, MapRequest(Proto.TCP, 9000, 9000, 60))  # rule written, then rolled back
    [doomed] = table.doomed.values()
    garbage = replace(router.rules[doomed.rule.rule_id], session=router.session)
    gone = replace(doomed, rule=RuleRef("*GONE", router.session), comment="gone", token=99)
    rules = [
        live,
        foreign_rule("*F1", "80"),
        owned_rule("*E1", 6881, 6881),  # an earlier run's rule: adopt
        owned_rule("*D1", 7000, 7100),  # a second rule for a live mapping: duplicate
        NatRule("*X1", "tcp", "wg-proton", "1", "1.2.3.4", "1", "double-natpmp-garbled"),
        garbage,
        replace(pending, session=router.session),
        replace(live, rule_id="*D2"),  # same comment as the live rule: a duplicate
    ]
    result = plan(rules, table.leases, table.writes, table.candidates,
                  [doomed, gone], "wg-proton")
    assert [r.rule_id for r in result.foreign] == ["*F1"]
    assert [o.rule.rule_id for o in result.adopt] == ["*E1"]
    assert sorted(r.rule_id for r, _ in result.remove) == ["*D1", "*D2", "*X1"]
    assert [(d.token, ref.rule_id) for d, ref in result.doomed_listed] == [
        (doomed.token, garbage.rule_id)]
    assert result.doomed_gone == [gone]
    assert not result.restore and not result.retarget and not result.found
    del clock


def test_plan_reidentifies_renumbered_rules_by_comment() -> None:
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, MapRequest(Proto.TCP, 7000, 7000, 60))
    router.restart(renumber=True)
    [listed] = router.list_rules()
    result = plan([listed], mapper.table.leases, {}, {}, [], "wg-proton")
    key = MappingKey(A, Proto.TCP, 7000)
    assert result.found == {key: listed.ref} and not result.remove and not result.restore


@given(
    st.lists(
        st.tuples(st.integers(1, 200), st.integers(1024, 1100), st.booleans()),
        max_size=30,
        unique_by=lambda t: t[0],
    )
)
def test_plan_never_removes_a_rule_being_written(specs: list[tuple[int, int, bool]]) -> None:
    mapper, _, _, _ = make_mapper()
    rules = []
    for i, port, pending in specs:
        rule = owned_rule(f"*{i:X}", 5000 + i, port)
        if pending:
            owned = parse_owned(rule)
            assert owned is not None
            write = mapper.table.reserve(owned.key, [owned.upstream_port], router_port=True)
            if isinstance(write, str) or write.comment != rule.comment:
                continue  # the port is another pending write's: not this case
        rules.append(rule)
    result = plan(rules, {}, mapper.table.writes, {}, [], "wg-proton")
    removed = {r.rule_id for r, _ in result.remove}
    being_written = {r.rule_id for r in rules if r.comment in mapper.table.writes}
    assert not removed & being_written
    assert len(result.adopt) + len(removed) == len(rules) - len(being_written)


# ---------------------------------------------------------------- the runner


def run(mapper, router) -> object:  # type: ignore[no-untyped-def]
    return Reconciler(mapper, router, "10.2.0.1").run_once()


def test_first_run_adopts_instead_of_deleting() -> None:
    mapper, router, _, _ = make_mapper(ready=False)
    router.rules["*A1"] = owned_rule("*A1", 6881, 6881)
    router.add_foreign("tcp", "wg-proton", "8080")
    report = run(mapper, router)
    assert report.adopted == 1 and report.removed == 0
    assert mapper.table.router is not None and mapper.table.router.interface == "wg-proton"
    assert sorted(router.rules) == ["*1", "*A1"]
    assert not mapper.table.router_free(Proto.TCP, 8080, A)  # foreign port known
    assert not mapper.table.router_free(Proto.TCP, 6881, IPv4Address("192.168.88.99"))
    # the client renews: adopted with its rule, no write
    writes = router.writes
    assert mapper.handle(A, MapRequest(Proto.TCP, 6881, 6881, 60)).result == Result.SUCCESS
    assert (
        router.writes == writes
        and mapper.leases[MappingKey(A, Proto.TCP, 6881)].rule.rule_id == "*A1"
    )


def test_restores_a_live_mappings_vanished_rule() -> None:
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, MapRequest(Proto.TCP, 6881, 6881, 60))
    router.rules.clear()  # an administrator deleted it
    report = run(mapper, router)
    assert report.restored == 1
    rules_match_leases(mapper, router)


def test_removes_garbage_and_duplicates_keeps_live() -> None:
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, MapRequest(Proto.TCP, 6881, 6881, 60))
    router.rules["*99"] = owned_rule("*99", 6881, 6999)  # duplicate of the live mapping
    report = run(mapper, router)
    assert report.removed == 1 and "*99" not in router.rules
    rules_match_leases(mapper, router)


def test_follows_an_interface_change() -> None:
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, MapRequest(Proto.TCP, 6881, 6881, 60))
    router.route = "wg-new"
    router.interface_types["wg-new"] = "wg"
    report = run(mapper, router)
    assert report.retargeted == 1 and mapper.table.router.interface == "wg-new"
    assert {r.in_interface for r in router.rules.values()} == {"wg-new"}
    assert all(lease.interface == "wg-new" for lease in mapper.leases.values())


def test_no_route_refuses_new_rules_and_never_guesses() -> None:
    mapper, router, _, _ = make_mapper()
    router.route = None
    with pytest.raises(NoInterface):
        run(mapper, router)
    assert mapper.table.router is None
    assert mapper.handle(A, MapRequest(Proto.TCP, 6881, 0, 60)).result == Result.NETWORK_FAILURE
    assert not router.rules
    router.route = "wg-proton"
    run(mapper, router)
    assert mapper.handle(A, MapRequest(Proto.TCP, 6881, 0, 60)).result == Result.SUCCESS


def test_never_removes_a_rule_being_created() -> None:
    mapper, router, gateway, _ = make_mapper()
    gateway.delay = 0.05  # the rule exists, the creation waits for the gateway
    creation = gevent.spawn(mapper.handle, A, MapRequest(Proto.TCP, 6881, 6881, 60))
    gevent.sleep(0.01)
    assert router.rules and not mapper.leases
    report = run(mapper, router)
    creation.join()
    assert creation.value.result == Result.SUCCESS
    assert report.removed == 0
    rules_match_leases(mapper, router)


def test_removes_the_rule_of_a_write_that_failed_midway() -> None:
    mapper, router, _, _ = make_mapper()
    real_add = router.add_rule

    router.fail_after["add_rule"] = TRANSPORT  # applied on the router, the answer lost
    del real_add
    assert mapper.handle(A, MapRequest(Proto.TCP, 6881, 6881, 60)).result == Result.NETWORK_FAILURE
    assert len(router.rules) == 1
    report = run(mapper, router)
    assert report.removed == 1 and not router.rules


@pytest.mark.parametrize("slow", ["remove_rule", "list_rules"])
def test_a_mapping_ending_during_the_listing_is_not_adopted(slow: str) -> None:
    """The rule of a mapping being deleted may still be listed: it is not an earlier
    run's rule, and must not come back as one (found by the fuzzer)."""
    mapper, router, _, _ = make_mapper()
    mapper.handle(A, MapRequest(Proto.TCP, 6881, 6881, 60))
    router.delay[slow] = 0.05
    if slow == "remove_rule":  # the removal is still under way when the listing returns
        deletion = gevent.spawn(mapper.handle, A, MapRequest(Proto.TCP, 6881, 0, 0))
        gevent.sleep(0.01)
        report = run(mapper, router)
    else:  # the removal starts and ends while the listing is in flight
        listing = gevent.spawn(run, mapper, router)
        gevent.sleep(0.01)
        deletion = gevent.spawn(mapper.handle, A, MapRequest(Proto.TCP, 6881, 0, 0))
        report = listing.get()
    deletion.join()
    assert report.adopted == 0 and not mapper.candidates
    assert not router.rules and not mapper.leases
    # and the port is free for the next client
    assert mapper.table.router_free(Proto.TCP, 6881, IPv4Address("192.168.88.99"))
