"""Inbound traffic reaches a LAN client through both NATs: proved with packets.

Every test runs against Debian's miniupnpd (doublenat in `internal` mode: the gateway
delivers to the router port doublenat asked for) and against the lab's gateway emulator in
`proton` profile (`external` mode: it delivers to the port it granted), each with the
natpmpc and miniupnpd of bookworm and of trixie (tests/e2e/conftest.py). The client is
Debian's natpmpc in the LAN, asking the router's LAN address; the sender is a host on the
internet side of the gateway, sending to the gateway's public address.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.bed import INTERNET, LAN_CLIENT, PUBLIC, Bed

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def dnat_targets(rules: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(address, port) of every dnat statement in nft JSON rules."""
    targets = []
    for rule in rules:
        for expr in rule.get("expr", []):
            if "dnat" in expr:
                targets.append((expr["dnat"]["addr"], int(expr["dnat"].get("port", 0))))
    return targets


def mapped(bed: Bed, proto: str, suggested: int, internal: int, lifetime: int = 3600
           ) -> tuple[int, int]:
    """natpmpc -a; (external port, lifetime) after checking the reply."""
    result = bed.natpmpc("-a", str(suggested), str(internal), proto, str(lifetime))
    got_proto, external, got_internal, granted = result.mapped
    assert result.public_address == PUBLIC, result.output
    assert (got_proto, got_internal) == (proto, internal), result.output
    assert 1024 <= external <= 65535 and granted > 0, result.output
    return external, granted


def assert_arrived(bed: Bed, proto: str, external: int, internal: int) -> None:
    delivery = bed.deliver(proto, external, internal)
    assert delivery.arrived, f"nothing reached {LAN_CLIENT}:{internal}: {delivery}"
    arrival = delivery.arrivals[0]
    assert arrival["proto"] == proto and arrival["port"] == internal
    # No source NAT on the way in: the client sees the internet host itself.
    assert arrival["peer"].split(":")[0] == INTERNET, arrival
    # And the answer found its way back out through both NATs.
    assert delivery.sent["reply"] == "ack:" + arrival["data"], delivery.sent


def assert_not_arrived(bed: Bed, proto: str, external: int, internal: int) -> None:
    delivery = bed.deliver(proto, external, internal, expect=False)
    assert not delivery.arrived, f"still delivered after the mapping ended: {delivery}"
    assert delivery.sent["reply"] is None, delivery.sent


def test_natpmpc_gets_the_gateways_public_address(bed: Bed) -> None:
    result = bed.natpmpc()
    assert result.returncode == 0, result.output
    assert result.public_address == PUBLIC, result.output


def test_natpmpc_maps_tcp_and_udp(bed: Bed) -> None:
    tcp, tcp_lifetime = mapped(bed, "tcp", 40010, 6880)
    udp, udp_lifetime = mapped(bed, "udp", 40010, 6880)
    if bed.upstream == "miniupnpd":
        # An RFC gateway with the port free honours the suggestion all the way through.
        assert (tcp, udp) == (40010, 40010)
        assert (tcp_lifetime, udp_lifetime) == (3600, 3600)
    else:
        assert tcp_lifetime == udp_lifetime == 60  # the proton gateway caps at 60 s
    # One rule per mapping on the router, each toward the client's own port ...
    assert sorted(dnat_targets(bed.router_rules())) == [(LAN_CLIENT, 6880)] * 2
    # ... and one forward per mapping at the gateway, toward the router's tunnel address.
    forwards = dnat_targets(bed.upstream_rules())
    assert len(forwards) == 2 and {a for a, _ in forwards} == {"10.2.0.2"}, forwards
    if bed.upstream == "miniupnpd":
        assert len(bed.upstream_leases()) == 2


def test_tcp_connection_arrives_at_the_lan_client(bed: Bed) -> None:
    external, _ = mapped(bed, "tcp", 40020, 6881)
    assert_arrived(bed, "tcp", external, 6881)


def test_udp_datagram_arrives_at_the_lan_client(bed: Bed) -> None:
    external, _ = mapped(bed, "udp", 40030, 6882)
    assert_arrived(bed, "udp", external, 6882)


def test_delete_stops_delivery_and_leaves_no_rule(bed: Bed) -> None:
    ports = {proto: mapped(bed, proto, 40040, 6883)[0] for proto in ("tcp", "udp")}
    for proto, external in ports.items():
        assert_arrived(bed, proto, external, 6883)
    for proto, external in ports.items():
        result = bed.natpmpc("-a", str(external), "6883", proto, "0")
        assert result.returncode == 0, result.output
        assert result.mappings == [(proto, 0, 6883, 0)], result.output
    assert bed.leftovers() == {"router nft": [], "upstream nft": [], "upstream leases": []}
    for proto, external in ports.items():
        assert_not_arrived(bed, proto, external, 6883)
    # The router's own configuration is untouched.
    assert len(bed.static_router_rules()) == 2


def test_sigterm_removes_everything(bed: Bed) -> None:
    ports = {proto: mapped(bed, proto, 40050, 6884)[0] for proto in ("tcp", "udp")}
    # ProtonVPN's documented request too: internal port 0, forwarded to the same number.
    proton_style = bed.natpmpc("-a", "1", "0", "udp", "60").mapped
    assert proton_style[0] == "udp" and proton_style[1] != 0, proton_style
    assert len(bed.router_rules()) == 3
    try:
        status = bed.stop_doublenat()
        assert status == 0, "doublenat did not exit 0 on SIGTERM"
        assert '"left_behind": 0' in bed.doublenat.err.read_text()  # type: ignore[union-attr]
        assert bed.leftovers() == {"router nft": [], "upstream nft": [], "upstream leases": []}
        for proto, external in ports.items():
            assert_not_arrived(bed, proto, external, 6884)
        assert len(bed.static_router_rules()) == 2
    finally:
        bed.start_doublenat()  # for the tests that follow
