"""The upstream gateway emulator, driven over real UDP on 127.x loopback."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import gevent
import pytest

from doublenat.lab.dynamics import ProtonDynamics
from doublenat.lab.gateway import (
    GatewayEmulator,
    GatewayMapping,
    MappingEvent,
    Profile,
    RequestKind,
)
from doublenat.protocol.natpmp import (
    AddressReply,
    AddressRequest,
    MapReply,
    MapRequest,
    Proto,
    Reply,
    Result,
    pack_request,
    parse_reply,
)
from tests.engine.fakes import FakeClock
from tests.probe import Probe as BaseProbe

H = bytes.fromhex
PUBLIC = IPv4Address("11.22.33.44")
# Long enough for loopback under load, short enough to keep the suite fast.
SILENCE = 0.2
UDP, TCP = Proto.UDP, Proto.TCP


class Probe(BaseProbe):
    """The tests' NAT-PMP client, strict: every request asked here must be answered."""

    def ask(self, request: AddressRequest | MapRequest, timeout: float = 2.0) -> Reply:
        data = self.raw(pack_request(request), timeout)
        assert data is not None, f"no reply to {request}"
        reply = parse_reply(data)
        assert reply is not None, f"undecodable reply {data.hex()}"
        return reply

    def expect_silence(self, request: AddressRequest | MapRequest) -> None:
        assert self.raw(pack_request(request), timeout=SILENCE) is None


StartGateway = Callable[..., GatewayEmulator]
MakeProbe = Callable[..., Probe]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def start_gateway(clock: FakeClock) -> Iterator[StartGateway]:
    started: list[GatewayEmulator] = []

    def start(host: str = "127.0.0.1", port: int = 0, **kwargs: object) -> GatewayEmulator:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("janitor_interval", None)  # expiry is driven by the fake clock
        kwargs.setdefault("rng", random.Random(6886))
        gateway = GatewayEmulator(host, port, **kwargs)  # type: ignore[arg-type]
        gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def make_probe() -> Iterator[MakeProbe]:
    probes: list[Probe] = []

    def make(gateway: GatewayEmulator, source_ip: str = "127.0.0.1") -> Probe:
        probe = Probe(gateway.address, source_ip)
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.close()


@pytest.fixture
def rfc(start_gateway: StartGateway) -> GatewayEmulator:
    return start_gateway(profile="rfc")


@pytest.fixture
def proton(start_gateway: StartGateway) -> GatewayEmulator:
    return start_gateway(profile="proton")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[MappingEvent, GatewayMapping]] = []

    def __call__(self, event: MappingEvent, mapping: GatewayMapping) -> None:
        self.events.append((event, mapping))

    def kinds(self) -> list[tuple[MappingEvent, Proto, int, int]]:
        return [(e, m.proto, m.internal_port, m.external_port) for e, m in self.events]


# ------------------------------------------------------------------ lifecycle


def test_binds_a_random_port_before_start_returns(rfc: GatewayEmulator) -> None:
    host, port = rfc.address
    assert host == "127.0.0.1" and port > 0
    # Bound means the kernel already holds the port: a second bind must fail.
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(OSError):
        other.bind((host, port))
    other.close()


def test_address_needs_start() -> None:
    with pytest.raises(RuntimeError):
        _ = GatewayEmulator().address


def test_context_manager_stops(make_probe: MakeProbe) -> None:
    with GatewayEmulator(janitor_interval=None) as gateway:
        probe = make_probe(gateway)
        assert probe.address().result is Result.SUCCESS
    with pytest.raises(RuntimeError):
        _ = gateway.address


# ------------------------------------------------------------------- opcode 0


def test_address_reply_golden(
    rfc: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    probe = make_probe(rfc)
    assert probe.raw(H("0000")) == H("0080 0000 00000000 0b16212c")
    clock.advance(10.7)
    assert probe.raw(H("0000")) == H("0080 0000 0000000a 0b16212c")
    assert rfc.epoch == 10


def test_epoch_base_gives_a_large_shared_epoch(
    start_gateway: StartGateway, make_probe: MakeProbe
) -> None:
    gateway = start_gateway(profile="proton", epoch_base=3_984_812)
    assert make_probe(gateway).address() == AddressReply(3_984_812, Result.SUCCESS, PUBLIC)


def test_other_versions_opcodes_and_garbage(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    assert probe.raw(H("0201") + bytes(58)) == H("0080 0001 00000000")  # PCP MAP
    assert probe.raw(H("0100")) == H("0080 0001 00000000")
    unknown = H("0003 0000 0001 0002 00000003")
    assert probe.raw(unknown) == H("0083 0005") + unknown[4:]
    for garbage in (H("00"), H("0002 0000 1ae1 1ae1 0000"), H("0081 0000")):
        assert probe.raw(garbage, timeout=SILENCE) is None
    assert rfc.requests_by_kind[RequestKind.MALFORMED] == 3
    assert rfc.requests_by_kind[RequestKind.UNSUPPORTED_VERSION] == 2
    assert rfc.requests_by_kind[RequestKind.UNKNOWN_OPCODE] == 1


def test_sweep_of_versions_and_opcodes_gets_exact_sizes(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    # Each case is followed by a sentinel whose echo is unique: what arrives before the
    # echo is the case's whole answer, so silence needs no timeout.
    probe = make_probe(rfc)
    sentinel = H("007f 0000") + b"sentinel"
    echo = H("00ff 0005") + b"sentinel"
    for version in (0, 1, 2, 255):
        for opcode in range(256):
            data = bytes((version, opcode)) + H("0000 1ae1 1ae1 0000003c")
            if opcode >= 128:
                expected = []
            elif version != 0:
                expected = [8]
            elif opcode == 0:
                expected = [12]
            elif opcode in (1, 2):
                expected = [16]
            else:
                expected = [len(data)]
            probe.send(data)
            probe.send(sentinel)
            sizes = []
            while (reply := probe.receive()) != echo:
                assert reply is not None
                sizes.append(len(reply))
            assert sizes == expected, (version, opcode)


# ------------------------------------------------------------------ rfc profile


def test_rfc_create_renew_same_port(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    assert probe.map(TCP, 7008, 0, 3600) == MapReply(TCP, 0, Result.SUCCESS, 7008, 7008, 3600)
    assert probe.raw(pack_request(MapRequest(UDP, 7009, 9009, 3600))) == H(
        "0081 0000 00000000 1b61 2331 00000e10"
    )
    # A retransmission or renewal keeps the port, whatever it suggests now.
    assert probe.map(TCP, 7008, 9999, 600).external_port == 7008
    assert rfc.mappings() == [
        GatewayMapping("127.0.0.1", TCP, 7008, 7008, 600, 1600.0),
        GatewayMapping("127.0.0.1", UDP, 7009, 9009, 3600, 4600.0),
    ]
    assert rfc.requests_by_kind[RequestKind.CREATE] == 2
    assert rfc.requests_by_kind[RequestKind.RENEW] == 1


def test_rfc_busy_port_goes_to_the_next_free_one(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    alice, bob = make_probe(rfc, "127.0.0.1"), make_probe(rfc, "127.0.0.5")
    assert alice.map(TCP, 7000, 7000, 60).external_port == 7000
    assert alice.map(TCP, 7001, 7000, 60).external_port == 7001
    assert bob.map(TCP, 7000, 7000, 60).external_port == 7002
    # Alice's ports are hers in both protocols; bob's own TCP 7002 is free for his UDP.
    assert bob.map(UDP, 7000, 7000, 60).external_port == 7002
    assert alice.map(UDP, 7000, 7000, 60).external_port == 7000
    assert rfc.mapping("127.0.0.5", TCP, 7000) is not None


def test_rfc_port_search_wraps_around(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    alice, bob = make_probe(rfc, "127.0.0.1"), make_probe(rfc, "127.0.0.5")
    assert alice.map(TCP, 65535, 0, 60).external_port == 65535
    assert bob.map(TCP, 65535, 0, 60).external_port == 1


def test_rfc_delete_is_idempotent_and_ignores_the_port(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    recorder = Recorder()
    rfc.add_observer(recorder)
    probe = make_probe(rfc)
    probe.map(UDP, 7010, 0, 60)
    delete = pack_request(MapRequest(UDP, 7010, 1234, 0))
    first, second = probe.raw(delete), probe.raw(delete)
    assert first == second == H("0081 0000 00000000 1b62 0000 00000000")
    assert rfc.mappings() == []
    assert recorder.kinds() == [
        (MappingEvent.CREATED, UDP, 7010, 7010),
        (MappingEvent.DELETED, UDP, 7010, 7010),
    ]
    assert rfc.requests_by_kind[RequestKind.DELETE] == 2


def test_rfc_delete_all_keeps_other_protocol_and_clients(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    alice, bob = make_probe(rfc, "127.0.0.1"), make_probe(rfc, "127.0.0.5")
    alice.map(UDP, 7010, 0, 60)
    alice.map(UDP, 7011, 0, 60)
    alice.map(TCP, 7010, 0, 60)
    bob.map(UDP, 8010, 0, 60)
    assert alice.map(UDP, 0, 0, 0) == MapReply(UDP, 0, Result.SUCCESS, 0, 0, 0)
    left = {(m.source, m.proto, m.internal_port) for m in rfc.mappings()}
    assert left == {("127.0.0.1", TCP, 7010), ("127.0.0.5", UDP, 8010)}
    assert rfc.requests_by_kind[RequestKind.DELETE_ALL] == 1


def test_rfc_internal_port_zero_with_lifetime_is_refused(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    probe = make_probe(rfc)
    assert probe.raw(pack_request(MapRequest(UDP, 0, 1, 60))) == H(
        "0081 0002 00000000 0000 0000 00000000"
    )
    assert rfc.mappings() == []
    assert rfc.requests_by_kind[RequestKind.REFUSED] == 1


@pytest.mark.parametrize(
    ("profile", "requested", "granted"),
    [
        ("rfc", 30, 30),
        ("rfc", 7200, 7200),
        ("rfc", 0xFFFFFFFF, 7200),
        ("proton", 30, 30),
        ("proton", 3600, 60),
        ("proton", 0xFFFFFFFF, 60),
    ],
)
def test_lifetime_is_capped(
    start_gateway: StartGateway,
    make_probe: MakeProbe,
    profile: str,
    requested: int,
    granted: int,
) -> None:
    gateway = start_gateway(profile=profile)
    reply = make_probe(gateway).map(TCP, 6881, 6881, requested)
    assert reply.result is Result.SUCCESS and reply.lifetime == granted
    assert gateway.mappings()[0].lifetime == granted


def test_custom_max_lifetime(start_gateway: StartGateway, make_probe: MakeProbe) -> None:
    gateway = start_gateway(profile="rfc", max_lifetime=120)
    assert make_probe(gateway).map(TCP, 6881, 6881, 3600).lifetime == 120


def test_max_mappings_gives_out_of_resources(
    start_gateway: StartGateway, make_probe: MakeProbe
) -> None:
    gateway = start_gateway(profile="rfc", max_mappings=1)
    probe = make_probe(gateway)
    probe.map(TCP, 1000, 0, 60)
    assert probe.map(TCP, 1001, 0, 60) == MapReply(TCP, 0, Result.OUT_OF_RESOURCES, 1001, 0, 0)
    # Renewing what exists is still fine at the cap.
    assert probe.map(TCP, 1000, 0, 60).result is Result.SUCCESS


# --------------------------------------------------------------- proton profile


def test_proton_random_port_shared_by_udp_and_tcp(
    proton: GatewayEmulator, make_probe: MakeProbe
) -> None:
    probe = make_probe(proton)
    udp = probe.map(UDP, 6881, 6881, 3600)
    tcp = probe.map(TCP, 6881, 6881, 3600)
    assert udp.result is tcp.result is Result.SUCCESS
    assert 32768 <= udp.external_port <= 65535
    assert tcp.external_port == udp.external_port
    assert udp.internal_port == tcp.internal_port == 6881
    assert udp.lifetime == tcp.lifetime == 60
    # Another internal port gets its own random port; renewals keep theirs.
    other = probe.map(UDP, 6882, 6882, 60)
    assert other.external_port != udp.external_port
    assert probe.map(UDP, 6881, 1, 60).external_port == udp.external_port
    assert probe.map(TCP, 6882, 1, 60).external_port == other.external_port


def test_proton_ports_are_random(start_gateway: StartGateway, make_probe: MakeProbe) -> None:
    ports = set()
    for seed in range(5):
        gateway = start_gateway(profile="proton", rng=random.Random(seed))
        ports.add(make_probe(gateway).map(UDP, 6881, 6881, 60).external_port)
        gateway.stop()
    assert len(ports) == 5


def test_proton_port_range(start_gateway: StartGateway, make_probe: MakeProbe) -> None:
    gateway = start_gateway(profile="proton", port_range=(40000, 40002))
    probe = make_probe(gateway)
    ports = {probe.map(UDP, internal, 0, 60).external_port for internal in (1, 2, 3)}
    assert ports == {40000, 40001, 40002}
    assert probe.map(UDP, 4, 0, 60).result is Result.OUT_OF_RESOURCES
    # The companion still fits: it shares its UDP sibling's port.
    assert probe.map(TCP, 2, 0, 60).result is Result.SUCCESS


def test_proton_documented_loop_internal_port_zero(
    proton: GatewayEmulator, make_probe: MakeProbe
) -> None:
    # Proton's guide: natpmpc -a 1 0 udp 60, then the same for tcp, every 45 s.
    probe = make_probe(proton)
    udp = probe.map(UDP, 0, 1, 60)
    tcp = probe.map(TCP, 0, 1, 60)
    assert (udp.result, udp.internal_port, udp.lifetime) == (Result.SUCCESS, 0, 60)
    assert tcp.external_port == udp.external_port != 0
    assert tcp.internal_port == 0
    assert probe.map(UDP, 0, 1, 60).external_port == udp.external_port
    # Delete-all of UDP is still delete-all, and leaves TCP alone.
    assert probe.map(UDP, 0, 0, 0) == MapReply(UDP, 0, Result.SUCCESS, 0, 0, 0)
    assert [(m.proto, m.internal_port) for m in proton.mappings()] == [(TCP, 0)]


# ---------------------------------------------------------------------- expiry


def test_expiry_with_a_fake_clock(
    rfc: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    recorder = Recorder()
    rfc.add_observer(recorder)
    probe = make_probe(rfc)
    probe.map(TCP, 6881, 0, 60)
    clock.advance(59.5)
    assert len(rfc.mappings()) == 1
    clock.advance(0.5)
    assert rfc.mappings() == []
    assert recorder.kinds()[-1] == (MappingEvent.EXPIRED, TCP, 6881, 6881)
    # Asked again after expiry, it is a new mapping.
    probe.map(TCP, 6881, 0, 60)
    assert rfc.requests_by_kind[RequestKind.CREATE] == 2


def test_expiry_is_checked_lazily_on_requests(
    rfc: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    alice, bob = make_probe(rfc, "127.0.0.1"), make_probe(rfc, "127.0.0.5")
    alice.map(TCP, 7000, 0, 60)
    clock.advance(61)
    # The expired mapping no longer holds the port when bob asks for it.
    assert bob.map(TCP, 7000, 7000, 60).external_port == 7000


def test_renewal_extends_the_lifetime(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    probe = make_probe(proton)
    port = probe.map(UDP, 0, 1, 60).external_port
    for _ in range(5):
        clock.advance(45)
        assert probe.map(UDP, 0, 1, 60).external_port == port
    assert proton.mappings()[0].expires == clock.now + 60


def test_janitor_expires_without_requests(start_gateway: StartGateway, clock: FakeClock) -> None:
    gateway = start_gateway(profile="rfc", janitor_interval=0.01)
    recorder = Recorder()
    gateway.add_observer(recorder)
    probe = Probe(gateway.address)
    try:
        probe.map(UDP, 5000, 0, 10)
    finally:
        probe.close()
    clock.advance(10)
    deadline = time.monotonic() + 2
    while not recorder.events[1:] and time.monotonic() < deadline:
        gevent.sleep(0.01)
    assert recorder.kinds()[1] == (MappingEvent.EXPIRED, UDP, 5000, 5000)
    assert gateway.requests_by_kind[RequestKind.CREATE] == 1


# ---------------------------------------------------------------------- faults


def test_silent_address_only(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    rfc.silence(address=True, mapping=False)
    probe.expect_silence(AddressRequest())
    assert probe.map(TCP, 6881, 0, 60).result is Result.SUCCESS
    assert rfc.requests_by_kind[RequestKind.SILENCED] == 1


def test_silent_mapping_only(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    rfc.silence(address=False, mapping=True)
    probe.expect_silence(MapRequest(TCP, 6881, 0, 60))
    assert rfc.mappings() == []
    assert probe.address().result is Result.SUCCESS
    rfc.clear_faults()
    assert probe.map(TCP, 6881, 0, 60).result is Result.SUCCESS


def test_fail_result_grants_nothing(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    probe = make_probe(proton)
    kept = probe.map(UDP, 0, 1, 60)
    clock.advance(5)
    proton.fail_with(Result.NETWORK_FAILURE)
    # Error replies keep their exact sizes, the epoch, and the requested internal port.
    assert probe.raw(H("0000")) == H("0080 0003 00000005 00000000")
    assert probe.raw(pack_request(MapRequest(TCP, 6881, 6881, 60))) == H(
        "0082 0003 00000005 1ae1 0000 00000000"
    )
    assert probe.map(UDP, 0, 1, 60) == MapReply(UDP, 5, Result.NETWORK_FAILURE, 0, 0, 0)
    assert [m.external_port for m in proton.mappings()] == [kept.external_port]
    assert proton.requests_by_kind[RequestKind.FAILED] == 3
    proton.fail_result = None
    assert probe.map(UDP, 0, 1, 60).external_port == kept.external_port


def test_restart_resets_epoch_and_forgets_mappings(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    recorder = Recorder()
    proton.add_observer(recorder)
    probe = make_probe(proton)
    old = probe.map(TCP, 6881, 0, 60)
    clock.advance(30)
    assert probe.address().epoch == 30
    proton.restart()
    clock.advance(1)
    assert probe.address().epoch == 1
    assert proton.mappings() == []
    assert recorder.kinds()[-1] == (MappingEvent.DELETED, TCP, 6881, old.external_port)
    # A "renewal" after the reboot is a fresh create.
    assert probe.map(TCP, 6881, old.external_port, 60).result is Result.SUCCESS
    assert proton.requests_by_kind[RequestKind.CREATE] == 2


def test_public_address_change(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    probe.map(TCP, 6881, 0, 60)
    rfc.set_public_address("203.0.113.7")
    assert probe.address() == AddressReply(0, Result.SUCCESS, IPv4Address("203.0.113.7"))
    assert rfc.public_address == IPv4Address("203.0.113.7")
    assert len(rfc.mappings()) == 1  # an address change alone loses nothing


def test_drop_first_n_then_answer(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    rfc.drop_first(2)
    request = pack_request(MapRequest(TCP, 6881, 0, 60))
    assert probe.raw(request, timeout=SILENCE) is None
    assert probe.raw(request, timeout=SILENCE) is None
    assert probe.raw(request) == H("0082 0000 00000000 1ae1 1ae1 0000003c")
    assert rfc.drop_next == 0
    assert rfc.requests_by_kind[RequestKind.DROPPED] == 2
    assert rfc.requests_by_kind[RequestKind.CREATE] == 1


def test_reply_delay(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    rfc.set_delay(0.15)
    began = time.monotonic()
    assert probe.address().result is Result.SUCCESS
    assert time.monotonic() - began >= 0.15
    # Delayed replies do not block other requests: both arrive about one delay later.
    began = time.monotonic()
    probe.send(H("0000"))
    probe.send(H("0000"))
    assert probe.receive() is not None and probe.receive() is not None
    assert time.monotonic() - began < 0.28  # one after the other would take 0.30


def test_change_ports_moves_both_companions_at_renewal(
    proton: GatewayEmulator, make_probe: MakeProbe
) -> None:
    recorder = Recorder()
    proton.add_observer(recorder)
    probe = make_probe(proton)
    old = probe.map(UDP, 0, 1, 60).external_port
    probe.map(TCP, 0, 1, 60)
    proton.change_ports()
    new = probe.map(UDP, 0, 1, 60).external_port
    assert new != old
    assert probe.map(TCP, 0, 1, 60).external_port == new
    assert probe.map(UDP, 0, 1, 60).external_port == new  # only once
    assert [k for k in recorder.kinds() if k[0] is MappingEvent.CHANGED] == [
        (MappingEvent.CHANGED, UDP, 0, new),
        (MappingEvent.CHANGED, TCP, 0, new),
    ]


def test_change_ports_rfc(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    probe.map(TCP, 6881, 0, 60)
    rfc.change_ports()
    assert probe.map(TCP, 6881, 6881, 60).external_port == 6882


def test_mangle_hook_and_a_failing_hook(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    rfc.mangle = lambda data: data[:12]
    assert len(probe.raw(pack_request(MapRequest(TCP, 6881, 0, 60))) or b"") == 12
    assert rfc.transcript[-1].sent is not None and len(rfc.transcript[-1].sent) == 12

    def boom(data: bytes) -> bytes:
        raise ValueError("mangler bug")

    # An exception inside the handler is logged, never fatal to the server.
    rfc.mangle = boom
    probe.expect_silence(AddressRequest())
    rfc.mangle = None
    assert probe.address().result is Result.SUCCESS


# -------------------------------------------------------- counters and observers


def test_counters_transcript_and_reset(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    probe = make_probe(rfc)
    probe.address()
    probe.map(UDP, 5000, 0, 60)
    probe.map(UDP, 5000, 0, 60)
    probe.map(TCP, 5000, 0, 60)
    probe.map(TCP, 5000, 0, 0)
    assert dict(rfc.requests_by_opcode) == {0: 1, 1: 2, 2: 2}
    assert dict(rfc.requests_by_kind) == {
        RequestKind.ADDRESS: 1,
        RequestKind.CREATE: 2,
        RequestKind.RENEW: 1,
        RequestKind.DELETE: 1,
    }
    first = rfc.transcript[0]
    assert first.source == probe.sock.getsockname()
    assert first.request == AddressRequest()
    assert first.reply == AddressReply(0, Result.SUCCESS, PUBLIC)
    assert first.time == 1000.0
    assert [e.kind for e in rfc.transcript][1:] == ["create", "renew", "create", "delete"]
    rfc.reset_counters()
    assert not rfc.requests_by_opcode and not rfc.requests_by_kind and not rfc.transcript
    assert len(rfc.mappings()) == 1  # counters only


def test_observers_get_every_event_and_a_broken_one_is_harmless(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    def broken(event: MappingEvent, mapping: GatewayMapping) -> None:
        raise RuntimeError("observer bug")

    recorder = Recorder()
    rfc.add_observer(broken)
    rfc.add_observer(recorder)
    probe = make_probe(rfc)
    assert probe.map(TCP, 1, 0, 60).result is Result.SUCCESS
    probe.map(TCP, 1, 0, 60)  # a plain renewal is no event
    probe.map(TCP, 2, 0, 60)
    probe.map(TCP, 0, 0, 0)
    assert recorder.kinds() == [
        (MappingEvent.CREATED, TCP, 1, 1),
        (MappingEvent.CREATED, TCP, 2, 2),
        (MappingEvent.DELETED, TCP, 1, 1),
        (MappingEvent.DELETED, TCP, 2, 2),
    ]
    rfc.remove_observer(recorder)
    probe.map(TCP, 3, 0, 60)
    assert len(recorder.events) == 4


def test_observer_runs_before_the_reply(rfc: GatewayEmulator, make_probe: MakeProbe) -> None:
    # A mirror (e.g. nftables) must be in place by the time the client hears back.
    seen: list[int] = []
    rfc.add_observer(lambda event, mapping: seen.append(mapping.external_port))
    make_probe(rfc).map(UDP, 4000, 0, 60)
    assert seen == [4000]


def test_profile_values() -> None:
    assert GatewayEmulator(profile="proton").profile is Profile.PROTON
    with pytest.raises(ValueError):
        GatewayEmulator(profile="nope")
    with pytest.raises(ValueError):
        GatewayEmulator(port_range=(0, 10))


# ------------------------------------------------------------ a real client


NATPMPC = shutil.which("natpmpc") or "/usr/bin/natpmpc"


@pytest.fixture
def natpmpc() -> str:
    if not os.access(NATPMPC, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("natpmpc is required in CI (apt-get install natpmpc)")
        pytest.skip("natpmpc is not installed")
    return NATPMPC


def run_natpmpc(natpmpc: str, *args: str) -> subprocess.CompletedProcess[str]:
    # natpmpc always talks to port 5351 of the gateway given with -g.
    return subprocess.run(
        [natpmpc, "-g", "127.0.0.3", *args], capture_output=True, text=True, timeout=10
    )


def test_natpmpc_against_the_emulator(
    natpmpc: str, start_gateway: StartGateway, clock: FakeClock
) -> None:
    gateway = start_gateway("127.0.0.3", 5351, profile="rfc")
    clock.advance(42)
    done = run_natpmpc(natpmpc)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Public IP address : 11.22.33.44" in done.stdout
    assert re.search(r"^epoch = 42$", done.stdout, re.MULTILINE)

    done = run_natpmpc(natpmpc, "-a", "6881", "6881", "tcp", "60")
    assert done.returncode == 0, done.stdout + done.stderr
    # Debian's 20150609 spells it "liftime"; newer releases fixed the typo.
    assert re.search(
        r"Mapped public port 6881 protocol TCP to local port 6881 li(?:fe|f)time 60", done.stdout
    ), done.stdout
    [mapping] = gateway.mappings()
    assert (mapping.proto, mapping.internal_port, mapping.external_port) == (TCP, 6881, 6881)
    assert gateway.requests_by_opcode == {0: 2, 2: 1}


def test_natpmpc_proton_loop(natpmpc: str, start_gateway: StartGateway) -> None:
    gateway = start_gateway("127.0.0.3", 5351, profile="proton")
    ports = []
    for proto in ("udp", "tcp"):
        done = run_natpmpc(natpmpc, "-a", "1", "0", proto, "60")
        assert done.returncode == 0, done.stdout + done.stderr
        found = re.search(
            rf"Mapped public port (\d+) protocol {proto.upper()} to local port 0 li(?:fe|f)time 60",
            done.stdout,
        )
        assert found, done.stdout
        ports.append(int(found.group(1)))
    assert ports[0] == ports[1]
    assert {m.external_port for m in gateway.mappings()} == {ports[0]}


def test_natpmpc_rfc_refuses_internal_port_zero(natpmpc: str, start_gateway: StartGateway) -> None:
    start_gateway("127.0.0.3", 5351, profile="rfc")
    done = run_natpmpc(natpmpc, "-a", "1", "0", "udp", "60")
    assert done.returncode == 1
    assert "not authorized" in done.stdout + done.stderr


# ------------------------------------------------- a VPN that moves (issue 13)


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.001)


def assert_unanswered(gateway: GatewayEmulator, probe: Probe, request: MapRequest |
                      AddressRequest) -> None:
    """The gateway saw `request` and chose silence (no waiting out a timeout)."""
    before = gateway.requests_by_kind[RequestKind.SILENCED]
    probe.send(pack_request(request))
    wait_until(lambda: gateway.requests_by_kind[RequestKind.SILENCED] > before)
    assert probe.receive(timeout=0.01) is None


def test_short_leases_per_emulator_and_at_run_time(
    start_gateway: StartGateway, make_probe: MakeProbe, clock: FakeClock
) -> None:
    gateway = start_gateway(profile="proton", max_lifetime=2)
    probe = make_probe(gateway)
    first = probe.map(UDP, 0, 0, 60)
    assert first.lifetime == 2
    clock.advance(2)
    assert gateway.mappings() == []
    gateway.set_max_lifetime(30)
    assert probe.map(UDP, 0, 0, 60).lifetime == 30
    with pytest.raises(ValueError):
        gateway.set_max_lifetime(0)


def test_change_port_moves_one_mapping_to_a_chosen_port(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    recorder = Recorder()
    rfc.add_observer(recorder)
    probe = make_probe(rfc)
    probe.map(TCP, 7000, 0, 60)
    probe.map(TCP, 7001, 0, 60)
    rfc.change_port("127.0.0.1", TCP, 7000, to=40000)
    # Only the chosen mapping, only at its renewal, and only once.
    assert probe.map(TCP, 7001, 0, 60).external_port == 7001
    assert probe.map(TCP, 7000, 7000, 60).external_port == 40000
    assert probe.map(TCP, 7000, 7000, 60).external_port == 40000
    assert recorder.kinds()[-1] == (MappingEvent.CHANGED, TCP, 7000, 40000)
    assert rfc.moves == {("127.0.0.1", TCP, 7000): 1}
    assert rfc.renewals == {("127.0.0.1", TCP, 7000): 2, ("127.0.0.1", TCP, 7001): 1}
    with pytest.raises(KeyError):
        rfc.change_port("127.0.0.1", UDP, 7000)
    with pytest.raises(ValueError):
        rfc.change_port("127.0.0.1", TCP, 7000, to=70000)


def test_change_port_to_a_taken_port_takes_another(
    rfc: GatewayEmulator, make_probe: MakeProbe
) -> None:
    alice, bob = make_probe(rfc, "127.0.0.1"), make_probe(rfc, "127.0.0.5")
    alice.map(TCP, 7000, 0, 60)
    bob.map(TCP, 8000, 0, 60)
    rfc.change_port("127.0.0.1", TCP, 7000, to=8000)
    moved = alice.map(TCP, 7000, 0, 60).external_port
    assert moved not in (7000, 8000)


def test_proton_change_port_moves_the_companion_too_unless_told(
    proton: GatewayEmulator, make_probe: MakeProbe
) -> None:
    probe = make_probe(proton)
    old = probe.map(UDP, 0, 0, 60).external_port
    probe.map(TCP, 0, 0, 60)
    proton.change_port("127.0.0.1", UDP, 0)
    new = probe.map(UDP, 0, 0, 60).external_port
    assert new != old and probe.map(TCP, 0, 0, 60).external_port == new
    proton.change_port("127.0.0.1", TCP, 0, to=50000, companion=False)
    assert probe.map(TCP, 0, 0, 60).external_port == 50000
    assert probe.map(UDP, 0, 0, 60).external_port == new  # left where it was


@pytest.mark.parametrize("profile", ["rfc", "proton"])
def test_every_nth_renewal_moves(
    start_gateway: StartGateway, make_probe: MakeProbe, clock: FakeClock, profile: str
) -> None:
    gateway = start_gateway(profile=profile)
    gateway.move_every_renewals = 3
    probe = make_probe(gateway)
    ports = [probe.map(UDP, 6881, 6881, 60).external_port]
    tcp = [probe.map(TCP, 6881, 6881, 60).external_port]
    for _ in range(6):
        clock.advance(45)
        ports.append(probe.map(UDP, 6881, 6881, 60).external_port)
        tcp.append(probe.map(TCP, 6881, 6881, 60).external_port)
    # Create, then renewals 1..6: the 3rd and the 6th move.
    assert ports[0] == ports[1] == ports[2] != ports[3] == ports[4] == ports[5] != ports[6]
    assert gateway.renewals[("127.0.0.1", UDP, 6881)] == 6
    assert gateway.moves[("127.0.0.1", UDP, 6881)] == 2
    assert gateway.mapping("127.0.0.1", UDP, 6881).renewals == 6  # type: ignore[union-attr]
    if profile == "proton":
        assert tcp == ports  # the companion follows: one port for both protocols


def test_reconnect_loses_everything_at_once_and_shows_a_new_address(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    recorder = Recorder()
    seen_inside: list[tuple[IPv4Address, int, int]] = []

    def look(event: MappingEvent, mapping: GatewayMapping) -> None:
        # Observers are told once the change is whole: new address, epoch, empty table.
        seen_inside.append((proton.public_address, proton.epoch, len(proton._table)))

    proton.add_observer(recorder)
    probe = make_probe(proton)
    old = probe.map(UDP, 0, 0, 60).external_port
    probe.map(TCP, 0, 0, 60)
    probe.map(UDP, 5000, 0, 60)
    clock.advance(30)
    proton.add_observer(look)
    address = proton.reconnect("198.51.100.9")
    assert address == IPv4Address("198.51.100.9")
    assert seen_inside == [(address, 0, 0)] * 3
    assert [k[0] for k in recorder.kinds()[-3:]] == [MappingEvent.DELETED] * 3
    assert proton.mappings() == []
    clock.advance(2)
    assert probe.address() == AddressReply(2, Result.SUCCESS, address)
    reply = probe.map(UDP, 0, old, 60)
    assert reply.epoch == 2 and reply.external_port != 0
    assert proton.transcript[-1].kind is RequestKind.CREATE
    change = proton.history[-1]
    assert (change.kind, change.public_address, change.epoch, change.mappings) == (
        "reconnect", address, 0, 3)
    assert change.time == 1030.0


def test_reconnect_defaults_epoch_and_downtime(
    rfc: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    probe = make_probe(rfc)
    probe.map(TCP, 6881, 0, 60)
    first = rfc.reconnect()
    second = rfc.reconnect(epoch=4_000_000, downtime=5)
    assert len({PUBLIC, first, second}) == 3  # never an address served before
    assert rfc.silent
    assert_unanswered(rfc, probe, AddressRequest())
    clock.advance(5)
    assert not rfc.silent
    assert probe.address() == AddressReply(4_000_005, Result.SUCCESS, second)
    assert [c.kind for c in rfc.history] == ["initial", "reconnect", "reconnect"]
    assert rfc.history[-1].until == 1005.0


def test_silence_for_keeps_state_unlike_a_reconnect(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    probe = make_probe(proton)
    port = probe.map(UDP, 0, 0, 60).external_port
    clock.advance(10)
    assert proton.silence_for(20) == 1030.0
    assert proton.silent
    assert_unanswered(proton, probe, AddressRequest())
    assert_unanswered(proton, probe, MapRequest(UDP, 0, 0, 60))
    clock.advance(19.5)
    assert_unanswered(proton, probe, AddressRequest())
    clock.advance(0.5)
    # Back with everything intact: same address, the epoch kept counting, the same port.
    assert probe.address() == AddressReply(30, Result.SUCCESS, PUBLIC)
    assert probe.map(UDP, 0, 0, 60).external_port == port
    assert proton.transcript[-1].kind is RequestKind.RENEW
    assert [c.kind for c in proton.history] == ["initial", "silence"]


def test_leases_still_run_out_during_a_long_silence(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    recorder = Recorder()
    proton.add_observer(recorder)
    probe = make_probe(proton)
    probe.map(UDP, 0, 0, 60)
    proton.silence_for(120)
    clock.advance(120)
    assert probe.address().epoch == 120
    assert proton.mappings() == []
    assert recorder.kinds()[-1][0] is MappingEvent.EXPIRED
    proton.silence_for(10)
    proton.clear_faults()
    assert not proton.silent


def test_history_records_address_epoch_and_what_happened(
    rfc: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    make_probe(rfc).map(TCP, 1, 0, 60)
    clock.advance(7)
    rfc.set_public_address("198.51.100.1")
    clock.advance(1)
    rfc.change_ports()
    rfc.restart(epoch=3)
    clock.advance(2)
    rfc.silence_for(1)
    assert [(c.time, c.kind, str(c.public_address), c.epoch, c.mappings) for c in rfc.history] == [
        (1000.0, "initial", "11.22.33.44", 0, 0),
        (1007.0, "address", "198.51.100.1", 7, 0),
        (1008.0, "move", "198.51.100.1", 8, 1),
        (1008.0, "restart", "198.51.100.1", 3, 1),
        (1010.0, "silence", "198.51.100.1", 5, 0),
    ]


def test_delivery_port_follows_the_profile(
    rfc: GatewayEmulator, proton: GatewayEmulator
) -> None:
    mapping = GatewayMapping("10.2.0.2", TCP, 6881, 45000, 60, 0.0)
    assert (rfc.delivery, rfc.delivery_port(mapping)) == ("internal", 6881)
    assert (proton.delivery, proton.delivery_port(mapping)) == ("external", 45000)


def run_proton_loop(
    start_gateway: StartGateway,
    make_probe: MakeProbe,
    clock: FakeClock,
    dynamics: ProtonDynamics,
    rounds: int,
) -> tuple[GatewayEmulator, list[tuple[float, int, int, int, IPv4Address, str]]]:
    """Proton's documented loop (UDP then TCP, internal port 0, every 45 s) against a
    gateway playing `dynamics`; one line per round: time, UDP port, TCP port, epoch,
    address, what the gateway did with the UDP request."""
    gateway = start_gateway(profile="proton", dynamics=dynamics, rng=random.Random(13),
                            clock=clock)
    probe = make_probe(gateway)
    story = []
    for _ in range(rounds):
        address = probe.address()
        udp = probe.map(UDP, 0, 0, 60)
        kind = gateway.transcript[-1].kind
        tcp = probe.map(TCP, 0, 0, 60)
        story.append((clock.now, udp.external_port, tcp.external_port, udp.epoch,
                      address.address, str(kind)))
        clock.advance(45)
    return gateway, story


def test_ten_minutes_of_proton(
    start_gateway: StartGateway, make_probe: MakeProbe, clock: FakeClock
) -> None:
    dynamics = ProtonDynamics(move_every=100, reconnect_every=260, jitter=0.3, seed=11,
                              reconnect_epochs=(0, 500))
    start = clock.now
    gateway, story = run_proton_loop(start_gateway, make_probe, clock, dynamics, rounds=14)
    schedule = dynamics.timeline(start, story[-1][0], PUBLIC)
    assert {h.kind for h in schedule} == {"move", "reconnect"}, schedule
    previous_time, previous_port, address = start - 1, 0, PUBLIC
    for when, udp, tcp, epoch, seen, kind in story:
        assert udp == tcp  # one port for both protocols, always
        due = [h for h in schedule if previous_time < h.time <= when]
        reconnects = [h for h in due if h.kind == "reconnect"]
        if reconnects:
            last = reconnects[-1]
            address = last.address  # type: ignore[assignment]
            assert kind == "create"
            assert epoch == int(when - last.time) + last.epoch
        elif previous_port == 0:
            assert kind == "create"
        elif any(h.kind == "move" for h in due):
            assert kind == "renew" and udp != previous_port
        else:
            assert kind == "renew" and udp == previous_port
        assert seen == address
        previous_time, previous_port = when, udp
    assert [c.kind for c in gateway.history if c.kind != "initial"] == [h.kind for h in schedule]


def test_proton_dynamics_replay_exactly(
    start_gateway: StartGateway, make_probe: MakeProbe
) -> None:
    dynamics = ProtonDynamics(move_every=70, reconnect_every=200, jitter=0.5, seed=2,
                              reconnect_epochs=(0, 5_000_000))
    stories = []
    for _ in range(2):
        clock = FakeClock()
        gateway, story = run_proton_loop(start_gateway, make_probe, clock, dynamics, 14)
        stories.append(story)
        gateway.stop()
    assert stories[0] == stories[1]
    assert len({line[1] for line in stories[0]}) > 3  # the port did move around


def test_dynamics_can_be_switched_off(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    proton.set_dynamics(ProtonDynamics(reconnect_every=10))
    probe = make_probe(proton)
    clock.advance(10)
    assert probe.address().address != PUBLIC
    proton.set_dynamics(None)
    address = proton.public_address
    clock.advance(100)
    assert probe.address().address == address


def test_standalone_gateway_options(tmp_path: Path) -> None:
    # The separate-process emulator takes the short lease and the moving schedule too.
    process = subprocess.Popen(
        [sys.executable, "-m", "doublenat.lab.standalone", "--gateway", "127.0.0.1:0",
         "--profile", "proton", "--max-lifetime", "5", "--move-every", "0.02",
         "--dynamics-seed", "3"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, (tmp_path / "stderr").read_text()
        host, _, port = json.loads(line)["gateway"].rpartition(":")
        probe = Probe((host, int(port)))
        try:
            first = probe.map(UDP, 0, 0, 60)
            assert first.lifetime == 5
            deadline = time.monotonic() + 5
            while probe.map(UDP, 0, 0, 60).external_port == first.external_port:
                assert time.monotonic() < deadline, "the port never moved"
                gevent.sleep(0.005)
        finally:
            probe.close()
    finally:
        process.terminate()
        process.wait(5)


def test_a_move_with_a_new_address_keeps_the_mappings(
    proton: GatewayEmulator, make_probe: MakeProbe, clock: FakeClock
) -> None:
    proton.set_dynamics(ProtonDynamics(move_every=50, moves_change_address=True))
    probe = make_probe(proton)
    port = probe.map(UDP, 0, 0, 60).external_port
    clock.advance(50)
    moved = probe.map(UDP, 0, 0, 60)
    assert proton.transcript[-1].kind is RequestKind.RENEW
    assert moved.external_port != port and moved.epoch == 50  # no reboot
    assert probe.address().address not in (PUBLIC, None)
    assert [c.kind for c in proton.history] == ["initial", "address", "move"]
