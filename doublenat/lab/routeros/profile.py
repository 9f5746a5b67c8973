"""RouterOS version profiles: the behaviours that changed between releases.

Each field names what it decides; NOTES.md beside this file gives the source of each value
(or says GUESS). `Profile.named()` returns one of the recorded profiles in `PROFILES`;
`Profile.for_version()` derives one for any version from the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

RouteStyle = Literal["v6", "v7"]


def version_tuple(version: str) -> tuple[int, ...]:
    numbers = re.findall(r"[0-9]+", version)
    if not numbers:
        raise ValueError(f"not a RouterOS version: {version!r}")
    return tuple(int(n) for n in numbers[:3])


# Interface types (the `type` column of /interface/print). WireGuard came with v7.
_V6_TYPES = frozenset(
    [
        "ether", "bridge", "vlan", "bonding", "loopback", "wlan", "lte",
        "pppoe-out", "pppoe-in", "ovpn-out", "ovpn-in", "l2tp-out", "l2tp-in",
        "sstp-out", "sstp-in", "pptp-out", "pptp-in",
        "gre-tunnel", "ipip-tunnel", "eoip-tunnel", "6to4-tunnel",
    ]
)
_V7_TYPES = _V6_TYPES | frozenset(["wg", "vxlan"])

# Properties accepted by /ip/firewall/nat add/set that differ between versions.
_NAT_V6_ONLY = frozenset(["any-port"])


@dataclass(frozen=True)
class Profile:
    version: str
    # The full text /system/resource prints as `version`.
    version_text: str
    # 7.18 added "!empty" before "!done" when a print has nothing to return.
    empty_sentence: bool
    # 6.43 added "/login =name= =password="; older routers answer it with a challenge.
    plaintext_login: bool
    # 6.45.1 removed the MD5 challenge-response login (the challenge is still handed out).
    challenge_login: bool
    # v7 names the offending attribute: "unknown parameter <name>".
    named_unknown_parameter: bool
    # /ip/route/check: in 6.x, gone in 7.0-7.17, back from 7.18.
    route_check: bool
    # How /ip/route/print rows look: v6 (gateway-status, routing-mark) or v7 (immediate-gw,
    # routing-table).
    route_style: RouteStyle
    # The trap for an id that does not exist.
    no_such_item: str
    # `type` values /interface may hold on this version.
    interface_types: frozenset[str]
    # NAT properties this version does not know (an add/set naming one is refused).
    nat_unknown: frozenset[str]
    build_time: str
    factory_software: str

    @property
    def v7(self) -> bool:
        return self.route_style == "v7"

    @classmethod
    def for_version(cls, version: str, **overrides: object) -> Profile:
        v = version_tuple(version)
        v7 = v >= (7,)
        numbers = ".".join(str(n) for n in v)
        profile = cls(
            version=version,
            version_text=f"{numbers} ({'stable' if v7 else 'long-term'})",
            empty_sentence=v >= (7, 18),
            plaintext_login=v >= (6, 43),
            challenge_login=v < (6, 45, 1),
            named_unknown_parameter=v7,
            route_check=not v7 or v >= (7, 18),
            route_style="v7" if v7 else "v6",
            no_such_item="no such item (4)",
            interface_types=_V7_TYPES if v7 else _V6_TYPES,
            nat_unknown=frozenset() if not v7 else _NAT_V6_ONLY,
            # v7 prints ISO dates, v6 the month-name form (GUESS for the exact stamps).
            build_time="2025-04-01 10:00:00" if v7 else "Aug/01/2023 08:44:22",
            factory_software="7.1" if v7 else "6.44",
        )
        return replace(profile, **overrides) if overrides else profile  # type: ignore[arg-type]

    @classmethod
    def named(cls, name: str) -> Profile:
        """One of the recorded profiles (`PROFILES`), or a derived one for another version."""
        if name in PROFILES:
            return PROFILES[name]
        return cls.for_version(name)


# The profiles the lab offers, each pinned to a release whose /console/inspect tree was
# recorded (tikoci/restraml docs/<version>/inspect.json); 6.42 keeps the pre-6.43 login.
PROFILES: dict[str, Profile] = {
    "6.42": Profile.for_version("6.42.12"),
    "6.49": Profile.for_version("6.49.10"),
    "7.16": Profile.for_version("7.16.2"),
    "7.18": Profile.for_version("7.18.2"),
    "7.21": Profile.for_version("7.21.4"),
}
# What `doublenat lab --routeros` offers (doublenat supports 6.43 and later).
LAB_VERSIONS = ("6.49", "7.16", "7.21")
CURRENT = "7.21"
