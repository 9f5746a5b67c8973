"""Which ports are taken: the local view that lets a creation cost one router write.

Two views, per protocol:
- router ports: dst-ports of rules on the VPN interface (doublenat's and anyone else's);
- upstream ports: internal ports doublenat holds at the gateway.

A port held by one client is never handed to another client, in either protocol (the
RFC's companion-port rule); the same client may hold it for both protocols.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class PortBook:
    def __init__(self, low: int = 1024, high: int = 65535) -> None:
        self.low, self.high = low, high
        self._router: dict[Proto, dict[int, IPv4Address]] = {p: {} for p in Proto}
        self._upstream: dict[Proto, dict[int, IPv4Address]] = {p: {} for p in Proto}
        self._foreign: dict[Proto, set[int]] = {p: set() for p in Proto}
        self._cursor = low

    # ---------------------------------------------------------------- queries

    def router_free(self, proto: Proto, port: int, client: IPv4Address) -> bool:
        if port in self._foreign[proto] or port in self._router[proto]:
            return False
        companion = self._router[_OTHER[proto]].get(port)
        return companion is None or companion == client

    def upstream_free(self, proto: Proto, port: int, client: IPv4Address) -> bool:
        if port in self._upstream[proto]:
            return False
        companion = self._upstream[_OTHER[proto]].get(port)
        return companion is None or companion == client

    def in_range(self, port: int) -> bool:
        return self.low <= port <= self.high

    def allocate(
        self,
        client: IPv4Address,
        proto: Proto,
        preferred: Iterable[int],
        *,
        router: bool,
        upstream: bool = True,
    ) -> int | None:
        """Pick and hold a port free in the asked views: a preferred one, else any.

        The caller holds the allocation lock; this never blocks.
        """

        def free(port: int) -> bool:
            return (not router or self.router_free(proto, port, client)) and (
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
            self._router[proto][chosen] = client
        if upstream:
            self._upstream[proto][chosen] = client
        return chosen

    def hold_router(self, proto: Proto, port: int, client: IPv4Address) -> None:
        self._router[proto][port] = client

    def hold_upstream(self, proto: Proto, port: int, client: IPv4Address) -> None:
        self._upstream[proto][port] = client

    def release_router(self, proto: Proto, port: int, client: IPv4Address) -> None:
        if self._router[proto].get(port) == client:
            del self._router[proto][port]

    def release_upstream(self, proto: Proto, port: int, client: IPv4Address) -> None:
        if self._upstream[proto].get(port) == client:
            del self._upstream[proto][port]

    # ------------------------------------------------------------ router view

    def load_foreign(self, rules: Iterable[NatRule], interface: str) -> list[NatRule]:
        """Replace the view of other owners' rules; returns the rules it could not read."""
        foreign: dict[Proto, set[int]] = {p: set() for p in Proto}
        unreadable = []
        for rule in rules:
            if rule.disabled or rule.in_interface not in ("", interface):
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
