"""Picky real-client behaviour against the bed: a libtorrent-like and a gluetun-like probe
(tests/e2e/clients.py) in the LAN, asking the router's LAN address, with the mapped ports
then proved with packets from the internet.
"""

from __future__ import annotations

import pytest

from tests.e2e.bed import LAN_CLIENT, PUBLIC, ROUTER_LAN, Bed
from tests.e2e.test_double_nat import assert_arrived

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_libtorrent_like_client(bed: Bed) -> None:
    report = bed.client("libtorrent", "--gateway", ROUTER_LAN, "--bind", LAN_CLIENT,
                        "--port", "6890")
    assert report["ok"], report
    # PCP first; the fallback is the exact 8-byte NAT-PMP answer, version 0, result 1.
    assert len(report["fallback"]) == 16 and report["fallback"].startswith("00800001"), report
    assert report["ignored"] == [], "replies a strict client would drop"
    assert report["address"] == PUBLIC and report["address_result"] == 0
    for proto in ("tcp", "udp"):
        first, renewed = report["ports"][proto]
        assert first == renewed, f"{proto} renewal moved the port: {report}"
        assert_arrived(bed, proto, first, 6890)


def test_gluetun_like_client(bed: Bed) -> None:
    report = bed.client("gluetun", "--gateway", ROUTER_LAN, "--renewals", "3",
                        "--interval", "2")
    assert report["ok"], report
    assert report["ignored"] == [], "replies a strict client would drop"
    assert report["address"] == PUBLIC
    rounds = report["rounds"]
    assert len(rounds) == 4
    for proto in ("udp", "tcp"):
        ports = {r[proto]["port"] for r in rounds}
        assert len(ports) == 1, f"{proto} port changed across renewals: {rounds}"
        # 60 granted; renewals this close together are answered from doublenat's lease
        # with the time the upstream grant has left, never more than asked.
        assert rounds[0][proto]["lifetime"] == 60, rounds
        assert all(0 < r[proto]["lifetime"] <= 60 for r in rounds), rounds
        # Internal port 0: forwarded to the same port number on the client.
        port = ports.pop()
        assert_arrived(bed, proto, port, port)
