"""Which ports are taken: the local view that lets a creation cost one router write.

Two views, per protocol:
- router ports: dst-ports of rules on the VPN interface (doublenat's and anyone else's);
- upstream ports: internal ports doublenat holds at the gateway.

A port held by one client is never handed to another client, in either protocol (the
RFC's companion-port rule); the same client may hold it for both protocols.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterable
from ipaddress import IPv4Address

from doublenat.engine.contracts import NatRule
from doublenat.protocol.natpmp import Proto

_OTHER = {Proto.UDP: Proto.TCP, Proto.TCP: Proto.UDP}


def parse_port_set(text: str) -> set[int] | None:
    """RouterOS dst-port syntax ("80", "80,443", "1000-2000") as a set; None if unknown.

    A rule with no port, or a negated one ("!80"), conflicts with no choice of ours in
    particular (picking another port would not help), so it yields the empty set.
    """
    text = text.strip()
    if not text or text.startswith("!"):
        return set()
    ports: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            return None
        first, last = int(low), int(high) if sep else int(low)
        ports.update(range(max(first, 1), min(last, 65535) + 1))
    return ports


def may_catch(rule: NatRule, interface: str) -> bool:
    """Could this rule see packets arriving on `interface`? Then its ports are taken.

    Any match that is not plainly another interface counts: no in-interface at all, the
    interface itself, a group (`all-ppp`, `all-ethernet`, `all-vlan`, `all-wireless`: the
    tunnel may belong to one), a negation of another interface (`!ether1`), or an
    interface list (its members are not read).
    """
    if rule.in_interface_list:
        return True
    name = rule.in_interface
    if name.startswith("!"):
        return name[1:] != interface
    return name in ("", interface) or name.startswith("all-")


Owner = Hashable  # which record holds a reservation: a lease, a write, a rule to remove...


class PortBook:
    """Reservations of router and upstream ports, each held by one owner for one client.

    Only the owner that holds a reservation can release or hand it over, so one record
    ending can never free a port another record still needs.
    """

    def __init__(self, low: int = 1024, high: int = 65535) -> None:
        self.low, self.high = low, high
        self._router: dict[Proto, dict[int, tuple[IPv4Address, Owner]]] = {p: {} for p in Proto}
        self._upstream: dict[Proto, dict[int, tuple[IPv4Address, Owner]]] = {
            p: {} for p in Proto}
        self._foreign: dict[Proto, set[int]] = {p: set() for p in Proto}
        self._cursor = low

    # ---------------------------------------------------------------- queries

    def router_free(self, proto: Proto, port: int, client: IPv4Address) -> bool:
        if port in self._foreign[proto] or port in self._router[proto]:
            return False
        companion = self._router[_OTHER[proto]].get(port)
        return companion is None or companion[0] == client

    def upstream_free(self, proto: Proto, port: int, client: IPv4Address) -> bool:
        if port in self._upstream[proto]:
            return False
        companion = self._upstream[_OTHER[proto]].get(port)
        return companion is None or companion[0] == client

    def router_owner(self, proto: Proto, port: int) -> Owner | None:
        held = self._router[proto].get(port)
        return None if held is None else held[1]

    def in_range(self, port: int) -> bool:
        return self.low <= port <= self.high

    def reservations(self) -> int:
        return sum(len(v) for v in self._router.values()) + sum(
            len(v) for v in self._upstream.values())

    def router_held(self) -> dict[tuple[Proto, int], tuple[IPv4Address, Owner]]:
        return {(proto, port): held for proto, ports in self._router.items()
                for port, held in ports.items()}

    def upstream_held(self) -> dict[tuple[Proto, int], tuple[IPv4Address, Owner]]:
        return {(proto, port): held for proto, ports in self._upstream.items()
                for port, held in ports.items()}

    # ------------------------------------------------------------- reserving

    def allocate(
        self,
        client: IPv4Address,
        proto: Proto,
        preferred: Iterable[int],
        owner: Owner,
        *,
        router: bool,
        upstream: bool = True,
        avoid: Container[int] = (),
    ) -> int | None:
        """Pick and reserve a port free in the asked views (and not in `avoid`): a
        preferred one, else any."""

        def free(port: int) -> bool:
            return port not in avoid and (not router or self.router_free(proto, port, client)) and (
                not upstream or self.upstream_free(proto, port, client)
            )

        chosen = next((p for p in preferred if self.in_range(p) and free(p)), None)
        if chosen is None:
            # A cursor that keeps moving makes the search cost flat however full the book.
            span = self.high - self.low + 1
            for step in range(span):
                port = self.low + (self._cursor - self.low + step) % span
                if free(port):
                    chosen = port
                    self._cursor = port + 1 if port < self.high else self.low
                    break
        if chosen is None:
            return None
        if router:
            self._router[proto][chosen] = (client, owner)
        if upstream:
            self._upstream[proto][chosen] = (client, owner)
        return chosen

    def take_router(self, proto: Proto, port: int, client: IPv4Address, owner: Owner) -> bool:
        """Reserve this router port if it is free for `client` (or already `owner`'s)."""
        held = self._router[proto].get(port)
        if held is not None:
            return held == (client, owner)
        if not self.router_free(proto, port, client):
            return False
        self._router[proto][port] = (client, owner)
        return True

    def take_upstream(self, proto: Proto, port: int, client: IPv4Address, owner: Owner) -> bool:
        held = self._upstream[proto].get(port)
        if held is not None:
            return held == (client, owner)
        if not self.upstream_free(proto, port, client):
            return False
        self._upstream[proto][port] = (client, owner)
        return True

    def release_router(self, proto: Proto, port: int | None, owner: Owner) -> None:
        held = self._router[proto].get(port) if port is not None else None
        if held is not None and held[1] == owner:
            del self._router[proto][port]  # type: ignore[arg-type]

    def release_upstream(self, proto: Proto, port: int, owner: Owner) -> None:
        held = self._upstream[proto].get(port)
        if held is not None and held[1] == owner:
            del self._upstream[proto][port]

    def hand_over(self, proto: Proto, router_port: int | None, upstream_port: int | None,
                  old: Owner, new: Owner) -> None:
        """Pass `old`'s reservations of these ports to `new` (a write becoming a lease)."""
        for book, port in ((self._router, router_port), (self._upstream, upstream_port)):
            held = book[proto].get(port) if port is not None else None
            if held is not None and held[1] == old:
                book[proto][port] = (held[0], new)  # type: ignore[index]

    # ------------------------------------------------------------ router view

    def load_foreign(self, rules: Iterable[NatRule], interface: str) -> list[NatRule]:
        """Replace the view of other owners' rules; returns the rules it could not read."""
        foreign: dict[Proto, set[int]] = {p: set() for p in Proto}
        unreadable = []
        for rule in rules:
            if rule.disabled or not may_catch(rule, interface):
                continue
            ports = parse_port_set(rule.dst_port)
            if ports is None:
                unreadable.append(rule)
                continue
            for proto in Proto:
                if rule.protocol in ("", proto.label):
                    foreign[proto] |= ports
        self._foreign = foreign
        return unreadable

    def mark_foreign(self, proto: Proto, port: int) -> None:
        """The router refused a port we thought free: remember it until the next load."""
        self._foreign[proto].add(port)
