"""`doublenat status` for a person: the /status document turned into lines."""

from __future__ import annotations

import socket

import pytest

from doublenat.observe.http import status_document
from doublenat.observe.show import StatusUnavailable, fetch_status, format_status, status_url
from doublenat.settings import Endpoint
from tests.observe.samples import snapshot

NOW = 1_700_000_000.0 + 2 * 3600 + 13 * 60


def test_the_summary_and_one_row_per_mapping() -> None:
    lines = format_status(status_document(snapshot(), "router synchronised; ...", True), NOW)
    text = "\n".join(lines)
    assert lines[0].startswith("doublenat 0.1.0, running for 2 h 13 min (since 2023-11-14")
    assert lines[0].endswith("epoch 1234 s")
    assert lines[1] == "health    ok: router synchronised; ..."
    assert lines[2] == ("router    synchronised; interface wg-proton (from route check); "
                        "RouterOS 7.16.2 on hEX")
    assert lines[3] == ("gateway   10.2.0.1:5351 up; public address 11.22.33.44; epoch 5000; "
                        "last answer 4 s ago")
    assert lines[4] == "mappings  3 (tcp 2, udp 1)"
    assert "31 answered (13 with an error result), 24 not answered" in lines[5]
    header = lines[7].split()
    assert header[:4] == ["PROTO", "CLIENT", "INTERNAL", "EXTERNAL"]
    rows = [line.split() for line in lines[8:]]
    assert len(rows) == 3
    assert rows[0] == ["tcp", "192.168.88.20", "6881", "41234", "41234", "52", "s", "60", "no",
                       "*1A"]
    assert rows[2][-2:] == ["yes", "*2"] and "23 h 53 min" in text


def test_unhealthy_and_disconnected_are_visible() -> None:
    s = snapshot(router={"connected": False, "synchronised": False, "version": None,
                         "problem": "cannot connect to 192.168.88.1:8728: refused"},
                 upstream={"up": False, "since_answer": None, "public_address": None},
                 mappings=(), mapping_counts=(("tcp", 0), ("udp", 0)))
    lines = format_status(status_document(s, "router unreachable: ...", False), NOW)
    assert lines[1] == "health    UNHEALTHY: router unreachable: ..."
    assert lines[2].startswith("router    not connected; interface wg-proton")
    assert lines[2].endswith("problem: cannot connect to 192.168.88.1:8728: refused")
    assert "DOWN; public address -; epoch 5000; never answered" in lines[3]
    assert lines[4] == "mappings  0 (tcp 0, udp 0)"
    assert len(lines) == 6  # no table without mappings


def test_a_daemon_on_every_address_is_asked_on_loopback() -> None:
    assert status_url(Endpoint("0.0.0.0", 9815)) == "http://127.0.0.1:9815/status"
    assert status_url(Endpoint("192.168.77.2", 9815)) == "http://192.168.77.2:9815/status"


def test_nothing_listening_is_a_clear_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(StatusUnavailable) as raised:
        fetch_status(Endpoint("127.0.0.1", port), timeout=2)
    message = str(raised.value)
    assert f"nothing answers at http://127.0.0.1:{port}/status" in message
    assert f"METRICS_ADDR=127.0.0.1:{port}" in message
