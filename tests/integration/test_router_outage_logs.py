"""The warning throttle during a router outage (issue 11): one WARNING per client and
reason per period, whatever changing details (a countdown) the message carries."""

from __future__ import annotations

import logging
import time

from doublenat.protocol.natpmp import Result
from tests.lab_support import MakeLab
from tests.logcapture import captured_records
from tests.probe import probe


def test_one_warning_per_client_and_reason_during_a_router_outage(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.router.router_down()
    lab.router.drop_all_connections()
    with captured_records() as records, probe(lab.daemon.address) as client:
        deadline = time.monotonic() + 4
        port = 9000
        while time.monotonic() < deadline:
            assert client.tcp(port, port).result == Result.NETWORK_FAILURE
            port += 1
    warnings = [r for r in records if r.levelno >= logging.WARNING
                and getattr(r, "event", "") in ("mapping.failed", "upstream.failed")]
    quiet = [r for r in records if r.levelno < logging.WARNING
             and getattr(r, "event", "") == "mapping.failed"]
    assert quiet, "the repeats were logged at DEBUG"
    reasons = [(r.event, r.reason_code) for r in warnings]  # type: ignore[attr-defined]
    assert len(reasons) == len(set(reasons)), reasons  # no reason twice in the period
    assert len(warnings) <= 2, [r.reason for r in warnings]  # type: ignore[attr-defined]
