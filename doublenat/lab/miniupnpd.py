"""Debian's miniupnpd (2.3.1, nftables build) as a real NAT-PMP gateway in a network
namespace, for the end-to-end bed and the benchmark.

Debian's own nft_init.sh fails without iptables, so the table and chains miniupnpd
expects are loaded here; its WAN address must look public (2.3.1 refuses to forward
otherwise).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path


def ruleset(forward_accepts: Sequence[str] = ()) -> str:
    """The `inet filter` table miniupnpd 2.3.1 fills, with extra accepts in `forward`
    ahead of its own chain (e.g. established replies, what a real gateway lets out)."""
    extra = "".join(f"        {rule}\n" for rule in forward_accepts)
    return (
        "table inet filter {\n"
        "    chain forward {\n"
        "        type filter hook forward priority 0; policy drop;\n"
        f"{extra}"
        "        jump miniupnpd\n"
        "    }\n"
        "    chain miniupnpd {\n    }\n"
        "    chain prerouting {\n"
        "        type nat hook prerouting priority -100; policy accept;\n"
        "        jump prerouting_miniupnpd\n"
        "    }\n"
        "    chain postrouting {\n"
        "        type nat hook postrouting priority 100; policy accept;\n"
        "        jump postrouting_miniupnpd\n"
        "    }\n"
        "    chain prerouting_miniupnpd {\n    }\n"
        "    chain postrouting_miniupnpd {\n    }\n"
        "}\n"
    )


def config(wan: str, lan: str, clients: str, leases: Path,
           external_ports: str = "1024-65535") -> str:
    """A NAT-PMP-only miniupnpd.conf: `clients` (a CIDR) may map their ports 1024-65535
    to `external_ports`; everything else is denied."""
    return (
        f"ext_ifname={wan}\n"
        f"listening_ip={lan}\n"
        "enable_natpmp=yes\n"
        "enable_upnp=no\n"
        "secure_mode=yes\n"
        "system_uptime=no\n"
        f"lease_file={leases}\n"
        "clean_ruleset_interval=600\n"
        f"uuid={uuid.uuid4()}\n"
        f"allow {external_ports} {clients} 1024-65535\n"
        "deny 0-65535 0.0.0.0/0 0-65535\n"
    )
