"""The fuzzer's bounded runs, and the same oracle applied to single datagrams in-process.

The long run is a command (README, "Fuzzing"): `make fuzz`, i.e.
`.venv/bin/python -m tests.faults.fuzz --datagrams 1000000`.

What it proves:
- the oracle (`fuzz.expect`/`fuzz.check`) flags wrong replies, so a clean run means something;
- every version x opcode at lengths 2, 12 and 60 (196,608 datagrams), handed to the daemon's
  responder in-process, gets exactly the answer SPEC §3 prescribes, or none;
- hypothesis-chosen datagrams (arbitrary bytes up to 1500, every header with any tail, valid
  mapping requests with edge lifetimes and their mutations) do too;
- 20,000 random and mutated datagrams against `doublenat serve` (a subprocess, against the
  standalone emulators) get correct replies, renewals keep their port, no two live mappings
  share a port, memory stays flat, the log stays clean JSON, and SIGTERM leaves no rule;
- the same with reconciliation every second, racing with creates and deletes.
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from doublenat.engine.responder import Responder
from doublenat.lab.run import Lab, LabConfig
from tests.faults import fuzz

MAX_LIFETIME = 3600
CLIENT = IPv4Address("127.0.0.1")
SEED = int(os.environ.get("FUZZ_SEED", "6886"))


# ------------------------------------------------------------------------ the oracle


def _verdict(request: bytes, reply: bytes | None) -> list[str]:
    return fuzz.check(fuzz.expect(request), reply, max_lifetime=MAX_LIFETIME).problems


def test_oracle_accepts_the_prescribed_replies() -> None:
    epoch = struct.pack("!I", 7)
    assert _verdict(b"", None) == []
    assert _verdict(b"\x00\x81", None) == []
    assert _verdict(b"\x02\x01" + bytes(58), b"\x00\x80\x00\x01" + epoch) == []
    assert _verdict(b"\x00\x00", b"\x00\x80\x00\x00" + epoch + bytes((11, 22, 33, 44))) == []
    assert _verdict(b"\x00\x00", b"\x00\x80\x00\x03" + epoch + bytes(4)) == []
    request = struct.pack("!BBHHHI", 0, 2, 0, 7000, 0, 0xFFFFFFFF)
    assert _verdict(request, struct.pack("!BBHIHHI", 0, 130, 0, 7, 7000, 40001, 3600)) == []
    assert _verdict(request, struct.pack("!BBHIHHI", 0, 130, 4, 7, 7000, 0, 0)) == []
    assert _verdict(b"\x00\x07abc", b"\x00\x87\x00\x05" + epoch) == []
    assert _verdict(b"\x00\x07" + bytes(20), b"\x00\x87\x00\x05" + bytes(18)) == []


@pytest.mark.parametrize(("request_", "reply", "why"), [
    (b"\x00\x81" + bytes(10), b"\x00\x81" + bytes(14), "to be dropped"),
    (b"\x00\x00", None, "no reply"),
    (b"\x01\x00", b"\x00\x00\x00\x01" + bytes(4), "opcode 0"),  # the Go original's opcode
    (b"\x01\x00", b"\x00\x80\x00\x01" + bytes(8), "12 bytes"),
    (b"\x00\x00", b"\x00\x80\x00\x03" + bytes(4) + bytes((11, 22, 33, 44)), "address"),
    (b"\x00\x01" + struct.pack("!HHHI", 0, 7000, 0, 60),
     struct.pack("!BBHIHHI", 0, 129, 0, 0, 7001, 40000, 60), "not echoed"),
    (b"\x00\x01" + struct.pack("!HHHI", 0, 7000, 0, 60),
     struct.pack("!BBHIHHI", 0, 129, 3, 0, 7000, 40000, 60), "failure reply"),
    (b"\x00\x01" + struct.pack("!HHHI", 0, 7000, 0, 30),
     struct.pack("!BBHIHHI", 0, 129, 0, 0, 7000, 40000, 60), "lifetime 60"),
    (b"\x00\x01" + struct.pack("!HHHI", 0, 7000, 0, 0),
     struct.pack("!BBHIHHI", 0, 129, 0, 0, 7000, 40000, 0), "delete reply"),
    (b"\x00\x02" + struct.pack("!HHHI", 0, 7000, 0, 60),
     struct.pack("!BBHIHHI", 0, 130, 1, 0, 7000, 0, 0), "result 1"),
    (b"\x00\x09" + bytes(20), b"\x00\x89\x00\x05" + bytes(4), "bytes, expected 22"),
])
def test_oracle_flags_wrong_replies(request_: bytes, reply: bytes | None, why: str) -> None:
    problems = _verdict(request_, reply)
    assert any(why in p for p in problems), problems


# ---------------------------------------------------------------- in-process checks


@pytest.fixture(scope="module")
def responder() -> Iterator[Responder]:
    lab = Lab(LabConfig(listen="127.0.0.1:0", settings={
        "MAX_LIFETIME": str(MAX_LIFETIME), "CLIENT_RATE_LIMIT": "0", "EXPIRY_GRACE": "1"}))
    lab.start()
    assert lab.daemon is not None
    try:
        yield lab.daemon.responder
    finally:
        lab.stop()


def _answer_and_check(responder: Responder, data: bytes) -> list[str]:
    before = responder.epoch.seconds()
    reply = responder.answer(data, CLIENT)
    verdict = fuzz.check(fuzz.expect(data), reply, max_lifetime=MAX_LIFETIME)
    problems = list(verdict.problems)
    if verdict.epoch is not None and not before <= verdict.epoch <= before + 1:
        problems.append(f"epoch {verdict.epoch}, expected about {before}")
    return problems


def test_every_version_and_opcode_in_process(responder: Responder) -> None:
    started = time.monotonic()
    bad: list[str] = []
    count = 0
    for data in fuzz.exhaustive_datagrams(random.Random(SEED)):
        count += 1
        for problem in _answer_and_check(responder, data):
            bad.append(f"{data[:12].hex()} ({len(data)} bytes): {problem}")
    assert count == fuzz.EXHAUSTIVE_TOTAL == 196_608
    assert not bad, bad[:20]
    assert time.monotonic() - started < 30


_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


@_SETTINGS
@given(st.binary(max_size=fuzz.MAX_DATAGRAM))
@example(b"")
@example(b"\x00")
@example(b"\x00\x01" + bytes(9))
@example(b"\x00\x03" + bytes(1500 - 2))
@example(b"\x00\xff")
@example(b"\x02\x81" + bytes(58))
def test_any_datagram(responder: Responder, data: bytes) -> None:
    assert _answer_and_check(responder, data) == []


@_SETTINGS
@given(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=80))
def test_any_header_with_any_tail(responder: Responder, version: int, opcode: int,
                                  tail: bytes) -> None:
    assert _answer_and_check(responder, bytes((version, opcode)) + tail) == []


LIFETIMES = st.one_of(st.sampled_from([0, 1, 2, 60, 3600, 3601, 7200, 0x7FFFFFFF,
                                       0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]),
                      st.integers(0, 0xFFFFFFFF))
PORTS = st.one_of(st.sampled_from([0, 1, 1023, 1024, 7000, 65535]), st.integers(0, 65535))


@_SETTINGS
@given(st.sampled_from([1, 2]), st.integers(0, 0xFFFF), PORTS, PORTS, LIFETIMES,
       st.binary(max_size=40), st.integers(0, 2**32 - 1))
def test_mapping_requests_and_their_mutations(
    responder: Responder, opcode: int, reserved: int, internal: int, suggested: int,
    lifetime: int, tail: bytes, seed: int
) -> None:
    valid = struct.pack("!BBHHHI", 0, opcode, reserved, internal, suggested, lifetime) + tail
    assert _answer_and_check(responder, valid) == []
    mutated = fuzz.Generator(random.Random(seed), 0, exhaustive=False).mutate(valid)
    assert _answer_and_check(responder, mutated) == []


# ------------------------------------------------------------------ against serve


def _run(**overrides: object) -> fuzz.FuzzReport:
    config = fuzz.FuzzConfig(**{"seed": SEED, "rss_interval": 0.1, "rss_slack_mb": 16.0,
                                **overrides})  # type: ignore[arg-type]
    report = fuzz.run(config)
    print(report.summary())
    return report


def test_bounded_fuzz_against_serve() -> None:
    started = time.monotonic()
    report = _run(datagrams=20_000)
    assert report.ok, report.summary()
    assert report.sent == 20_000
    assert report.kinds["map/0"] > 1000 and report.kinds["map/4"] > 100
    assert report.kinds["version/1"] and report.kinds["echo/5"] and report.kinds["address/0"]
    assert report.renewals_checked > 100
    assert report.rules_after_stop == 0 and report.exit_status == 0
    assert time.monotonic() - started < 30


def test_bounded_fuzz_with_reconciliation_every_second() -> None:
    """Reconciliation lists the router's rules while creates and deletes go on: a rule
    whose mapping ends during the listing must not come back as "a rule of an earlier run"
    (SPEC §7: no reconciliation/creation race)."""
    report = _run(datagrams=30_000, reconcile_interval=1.0)
    assert report.ok, report.summary()
    assert report.log_events["reconcile.done"] >= 2
