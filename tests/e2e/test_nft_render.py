"""The router mirror's translation of RouterOS NAT rows to nft statements (no root needed)."""

from __future__ import annotations

import pytest

from doublenat.lab.nft import Unsupported, parse_interface_map, render_rule

IFACES = {"wg-proton": "tun", "bridge": "lan"}


def test_doublenats_rule() -> None:
    row = {".id": "*3", "chain": "dstnat", "action": "dst-nat", "protocol": "tcp",
           "in-interface": "wg-proton", "dst-port": "40001", "to-addresses": "192.168.88.20",
           "to-ports": "6881", "comment": "double-natpmp-tcp 192.168.88.20:6881 via 40001",
           "disabled": "false", "log": "false", "log-prefix": "", "bytes": "0"}
    assert render_rule(row, IFACES) == (
        "dstnat",
        'iifname "tun" meta l4proto tcp tcp dport 40001 dnat ip to 192.168.88.20:6881',
    )


def test_redirect_and_masquerade_of_the_readme() -> None:
    redirect = {"chain": "dstnat", "action": "dst-nat", "protocol": "udp",
                "in-interface": "bridge", "dst-address": "192.168.88.1", "dst-port": "5351",
                "to-addresses": "192.168.77.2", "to-ports": "5351"}
    assert render_rule(redirect, IFACES) == (
        "dstnat",
        'iifname "lan" ip daddr 192.168.88.1 meta l4proto udp udp dport 5351 '
        "dnat ip to 192.168.77.2:5351",
    )
    masquerade = {"chain": "srcnat", "action": "masquerade", "out-interface": "wg-proton"}
    assert render_rule(masquerade, IFACES) == ("srcnat", 'oifname "tun" masquerade')


def test_negation_lists_and_prefixes() -> None:
    row = {"chain": "dstnat", "action": "dst-nat", "protocol": "udp",
           "in-interface": "!bridge", "src-address": "!10.0.0.0/8", "dst-port": "80,443-444",
           "to-addresses": "192.168.88.20"}
    assert render_rule(row, IFACES) == (
        "dstnat",
        'iifname != "lan" ip saddr != 10.0.0.0/8 meta l4proto udp '
        "udp dport { 80, 443-444 } dnat ip to 192.168.88.20",
    )


@pytest.mark.parametrize("row", [
    {"chain": "dstnat", "action": "dst-nat", "in-interface": "ether1", "to-addresses": "1.2.3.4"},
    {"chain": "dstnat", "action": "dst-nat", "in-interface-list": "WAN", "to-addresses": "1.2.3.4"},
    {"chain": "dstnat", "action": "dst-nat", "to-ports": "80"},
    {"chain": "dstnat", "action": "dst-nat", "dst-port": "80", "to-addresses": "1.2.3.4"},
    {"chain": "dstnat", "action": "masquerade"},
    {"chain": "forward", "action": "accept"},
])
def test_what_cannot_be_mirrored_is_refused(row: dict[str, str]) -> None:
    with pytest.raises(Unsupported):
        render_rule(row, IFACES)


def test_interface_map() -> None:
    assert parse_interface_map("wg-proton=tun, bridge=lan") == IFACES
    with pytest.raises(ValueError):
        parse_interface_map("wg-proton")
    with pytest.raises(ValueError):
        parse_interface_map("wg-proton=a name with spaces")
