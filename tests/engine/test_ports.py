"""The port book: which foreign rules take a port on the VPN interface (SPEC §4.1), and
reservations held by one owner each."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from doublenat.engine.contracts import NatRule
from doublenat.engine.ports import PortBook, may_catch, parse_port_set
from doublenat.protocol.natpmp import Proto

A, B = IPv4Address("192.168.88.20"), IPv4Address("192.168.88.21")


def rule(in_interface: str = "", in_interface_list: str = "", port: str = "8080",
         disabled: bool = False) -> NatRule:
    return NatRule("*1", "tcp", in_interface, port, "192.168.88.5", port, "admin",
                   disabled=disabled, in_interface_list=in_interface_list)


@pytest.mark.parametrize(("in_interface", "in_list", "caught"), [
    ("wg-proton", "", True),  # the VPN interface itself
    ("", "", True),  # no in-interface: every interface
    ("all-ppp", "", True), ("all-ethernet", "", True), ("all-vlan", "", True),
    ("all-wireless", "", True),  # groups the tunnel may belong to
    ("!ether1", "", True),  # everything but another interface
    ("!wg-proton", "", False),  # everything but the tunnel
    ("ether1", "", False), ("bridge", "", False),  # plainly another interface
    ("", "WAN", True), ("ether1", "VPN", True),  # an interface list: members not read
])
def test_which_foreign_rules_may_catch_tunnel_traffic(
    in_interface: str, in_list: str, caught: bool
) -> None:
    assert may_catch(rule(in_interface, in_list), "wg-proton") is caught
    book = PortBook()
    book.load_foreign([rule(in_interface, in_list)], "wg-proton")
    assert book.router_free(Proto.TCP, 8080, A) is not caught
    assert book.router_free(Proto.UDP, 8080, A)  # a tcp rule takes only tcp


def test_disabled_rules_and_port_syntax() -> None:
    book = PortBook()
    unreadable = book.load_foreign([rule(port="1000-1002,1005"), rule(port="80", disabled=True),
                                    rule(port="!443"), rule(port="weird")], "wg-proton")
    assert [r.dst_port for r in unreadable] == ["weird"]
    assert [p for p in range(999, 1007) if not book.router_free(Proto.TCP, p, A)] == [
        1000, 1001, 1002, 1005]
    assert book.router_free(Proto.TCP, 80, A) and book.router_free(Proto.TCP, 443, A)
    assert parse_port_set("") == set() and parse_port_set("1-x") is None


def test_a_reservation_is_released_only_by_its_owner() -> None:
    book = PortBook(2000, 2010)
    port = book.allocate(A, Proto.TCP, [2005], "first", router=True)
    assert port == 2005
    book.release_router(Proto.TCP, 2005, "someone else")
    assert not book.router_free(Proto.TCP, 2005, B)
    book.hand_over(Proto.TCP, 2005, 2005, "first", "second")
    book.release_router(Proto.TCP, 2005, "first")
    assert not book.router_free(Proto.TCP, 2005, B)
    book.release_router(Proto.TCP, 2005, "second")
    book.release_upstream(Proto.TCP, 2005, "second")
    assert book.router_free(Proto.TCP, 2005, B) and book.upstream_free(Proto.TCP, 2005, B)
    # the companion rule: another client may not take the same port in the other protocol
    book.allocate(A, Proto.UDP, [2006], "udp", router=True)
    assert not book.router_free(Proto.TCP, 2006, B) and book.router_free(Proto.TCP, 2006, A)
