"""Debian's natpmpc against the lab: the client most scripts (and ProtonVPN's guide) use."""

from __future__ import annotations

import re
import subprocess
import time

from doublenat.protocol.natpmp import Proto
from tests.lab_support import MakeLab, assert_rules_match_mappings
from tests.needs import need_program

# natpmpc only talks to port 5351; this loopback address keeps clear of a running lab.
HOST = "127.0.0.5"


def natpmpc(*args: str) -> str:
    done = subprocess.run(
        ["natpmpc", "-g", HOST, *args], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_natpmpc_gets_the_public_address_and_maps(make_lab: MakeLab) -> None:
    need_program("natpmpc")
    lab = make_lab(listen=f"{HOST}:5351")
    out = natpmpc()
    assert "Public IP address : 11.22.33.44" in out
    out = natpmpc("-a", "6881", "6881", "tcp", "60")
    assert re.search(
        r"Mapped public port 6881 protocol TCP to local port 6881 lif?e?time 60", out
    ), out
    out = natpmpc("-a", "6881", "6881", "udp", "60")
    assert "protocol UDP to local port 6881" in out
    assert {(r["protocol"], r["dst-port"], r["to-ports"]) for r in lab.rules()} == {
        ("tcp", "6881", "6881"),
        ("udp", "6881", "6881"),
    }
    assert_rules_match_mappings(lab)
    natpmpc("-a", "0", "6881", "tcp", "0")
    assert [(r["protocol"]) for r in lab.rules()] == [Proto.UDP.label]
    assert_rules_match_mappings(lab)


def test_natpmpc_renews_through_a_short_gateway_blip(make_lab: MakeLab) -> None:
    """natpmpc asks opcode 0 before every mapping and exits on a failure there; with the
    address cache stale and the gateway silent for a few seconds, the renewal must still
    go through, answered from the valid lease (issue 13)."""
    need_program("natpmpc")
    lab = make_lab(listen=f"{HOST}:5351")
    natpmpc("-a", "6881", "6881", "tcp", "60")
    lab.daemon.addresses.ttl = 0.2  # the 10 s address cache, shortened for the test
    time.sleep(0.3)
    lab.gateway.silence_for(5)
    out = natpmpc("-a", "6881", "6881", "tcp", "60")
    assert "Public IP address : 11.22.33.44" in out
    assert re.search(r"Mapped public port 6881 protocol TCP to local port 6881", out), out
