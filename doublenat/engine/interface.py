"""Finding the VPN interface on the router: the reads, then engine.detect's rules.

Used by reconciliation (before every listing) and by `doublenat check`, so both say the
same thing about the same router.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from doublenat.engine import detect
from doublenat.engine.contracts import NotPermitted, Router, UnknownCommand
from doublenat.engine.state import InterfaceSource, RouterView

SETTING_NAME = "MIKROTIK_IN_INTERFACE"


@dataclass(frozen=True, slots=True)
class Detection:
    """What the router told: its version, the route toward the gateway, and the verdict."""

    version: str | None
    board: str | None
    source: InterfaceSource
    found: detect.Found | None  # the route's interface, usable or not
    problem: str | None  # why no rule may be created; None when `view` is usable
    uptime: str | None = None

    @property
    def view(self) -> RouterView | None:
        if self.problem is not None or self.found is None:
            return None
        return RouterView(self.found.interface, self.source, 0, self.version, self.board)


def version_tuple(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of `/system/resource`'s version ("7.16.2 (stable)", "7.18rc2")."""
    match = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def has_route_check(version: str | None) -> bool:
    """RouterOS 7.0-7.17 have no /ip/route/check; 6.x and 7.18+ have it (recorded
    /console/inspect trees: the emulator's NOTES.md). Unknown version: try it."""
    numbers = version_tuple(version)
    return numbers is None or not (7, 0) <= numbers < (7, 18)


def read_resource(router: Router) -> Mapping[str, str]:
    try:
        return router.resource()
    except (NotPermitted, UnknownCommand):
        return {}


def detect_interface(router: Router, gateway_ip: str, configured: str | None) -> Detection:
    """Ask the router; RouterError if it cannot be asked."""
    resource = read_resource(router)
    version, board = resource.get("version"), resource.get("board-name")
    uptime = resource.get("uptime")
    if configured:
        # Trusted as given (SPEC §4.1): the operator may know better than the routes.
        return Detection(version, board, "setting",
                         detect.Found(configured, f"{SETTING_NAME}={configured}"), None, uptime)
    rows = None
    if has_route_check(version):
        # A router that should have it but says it does not: ask the route table instead.
        with contextlib.suppress(UnknownCommand):
            rows = router.route_check(gateway_ip)
    source: InterfaceSource
    if rows is not None:
        found, source = detect.from_route_check(rows), "route check"
    else:
        found, source = detect.from_routes(router.routes(), gateway_ip), "route table"
    if found is None:
        problem = (f"the router has no active route toward VPN_GATEWAY {gateway_ip} "
                   f"({source}); route it through the VPN tunnel, or set {SETTING_NAME}")
        return Detection(version, board, source, None, problem, uptime)
    refusal = detect.tunnel_problem(found.interface, router.interfaces())
    if refusal is not None:
        problem = (f"VPN_GATEWAY {gateway_ip} is reached through {found.interface!r} "
                   f"({found.detail}): {refusal}. No rule is created or moved until it is "
                   f"reached through the tunnel (is the tunnel down?); set {SETTING_NAME} "
                   "to name an interface explicitly")
        return Detection(version, board, source, found, problem, uptime)
    return Detection(version, board, source, found, None, uptime)
