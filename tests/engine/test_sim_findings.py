"""Defects found by the seeded simulation (tests/sim), each reduced to a minimal case.

Every test names the seed of `python -m tests.sim.run` that first showed the defect.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from doublenat.engine.model import MappingKey
from doublenat.protocol.natpmp import MapRequest, Proto, Result
from tests.engine.fakes import TRAP, FakeGateway, make_mapper

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
