"""The VPN gateway loses every mapping while doublenat holds some (issue 13): Debian's
miniupnpd restarted without its lease file. Packets from the internet reach the LAN
client again with no client request: doublenat notices at its probe, re-maps, and the
rules that must follow do."""

from __future__ import annotations

import time

import pytest

from tests.e2e.bed import TUNNEL_GATEWAY, Bed
from tests.e2e.test_double_nat import assert_arrived, mapped

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.mark.parametrize("bed", ["miniupnpd"], indirect=True)
def test_forwards_come_back_after_the_gateway_lost_them(bed: Bed) -> None:
    ports = {proto: mapped(bed, proto, 40060, 6885, lifetime=3600)[0] for proto in ("tcp",
                                                                                    "udp")}
    for proto, external in ports.items():
        assert_arrived(bed, proto, external, 6885)
    # A restart is told from the epoch going back by more than RFC 6886's 2 s of slack:
    # a gateway restarted within seconds of its start cannot be told apart (nor can a
    # real client tell). Real VPN servers have run for a while; let this one too.
    deadline = time.monotonic() + 10
    while bed.address(role="rtr", gateway=TUNNEL_GATEWAY).get("epoch", 0) < 6:
        assert time.monotonic() < deadline, "miniupnpd's epoch does not advance"
        time.sleep(0.5)
    bed.restart_miniupnpd(keep_leases=False)  # comes back empty (doublenat may re-map fast)
    # Both mappings back at the gateway, and the re-map's record written: it comes once
    # the last answer is in, a moment after miniupnpd's rules (CI saw the check between).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (
            len(bed.upstream_rules()) >= 2 and doublenat_log_has(bed, '"upstream.remapped"')):
        time.sleep(0.2)
    assert doublenat_log_has(bed, '"upstream.lost"') and doublenat_log_has(
        bed, '"upstream.remapped"')
    for proto, external in ports.items():  # miniupnpd honours the suggested old port
        assert_arrived(bed, proto, external, 6885)


def doublenat_log_has(bed: Bed, text: str) -> bool:
    assert bed.doublenat is not None
    return text in bed.doublenat.err.read_text(errors="replace")
