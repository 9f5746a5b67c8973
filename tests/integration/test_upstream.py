"""doublenat as a NAT-PMP client of the VPN gateway (the emulator, over real UDP)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import gevent
import pytest

from doublenat.adapters.upstream import NatPmpClient
from doublenat.engine.contracts import GatewayError
from doublenat.lab.gateway import GatewayEmulator, RequestKind
from doublenat.protocol.natpmp import Proto, Result
from doublenat.settings import Endpoint
from tests.lab_support import MakeLab
from tests.probe import probe


@pytest.fixture
def gateway() -> Iterator[GatewayEmulator]:
    emulator = GatewayEmulator("127.0.0.1", 0, profile="rfc")
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def client(gateway: GatewayEmulator) -> Iterator[NatPmpClient]:
    the_client = NatPmpClient(Endpoint(*gateway.address), budget=1.0)
    the_client.start()
    yield the_client
    the_client.close()


def test_maps_and_reads_the_address(client: NatPmpClient) -> None:
    answer = client.map(Proto.TCP, 40001, 40001, 60)
    assert (answer.result, answer.external_port, answer.lifetime) == (Result.SUCCESS, 40001, 60)
    address = client.public_address()
    assert address.address == IPv4Address("11.22.33.44")


def test_retransmits_on_the_rfc_schedule(gateway: GatewayEmulator, client: NatPmpClient) -> None:
    gateway.drop_first(2)
    started = time.monotonic()
    assert client.map(Proto.UDP, 40002, 0, 60).result == Result.SUCCESS
    elapsed = time.monotonic() - started
    assert client.retransmitted == 2
    assert 0.7 <= elapsed < 1.0  # answered on the third send, at 0.25 + 0.5 s


def test_gives_up_within_its_budget(gateway: GatewayEmulator, client: NatPmpClient) -> None:
    gateway.silence()
    started = time.monotonic()
    with pytest.raises(GatewayError, match="within 1 s"):
        client.map(Proto.UDP, 40003, 0, 60)
    assert time.monotonic() - started < 1.3
    assert client.timeouts == 1


@pytest.mark.parametrize(
    "mangle",
    [
        lambda data: data[:12],  # short
        lambda data: data + b"\x00",  # long
        lambda data: data[:8] + b"\x99\x99" + data[10:],  # someone else's internal port
        lambda data: b"\x01" + data[1:],  # not version 0
        lambda data: data[:1] + b"\x81" + data[2:],  # the wrong protocol's reply
    ],
    ids=["short", "long", "internal-port", "version", "opcode"],
)
def test_invalid_replies_are_ignored(
    gateway: GatewayEmulator, client: NatPmpClient, mangle: Callable[[bytes], bytes]
) -> None:
    gateway.mangle = mangle
    with pytest.raises(GatewayError):
        client.map(Proto.TCP, 40004, 0, 60)
    assert client.ignored >= 1


def test_concurrent_opcode_zero_requests_share_one_upstream_query(make_lab: MakeLab) -> None:
    lab = make_lab()
    lab.daemon.addresses.forget()
    lab.gateway.set_delay(0.2)
    lab.gateway.reset_counters()
    probes = [probe(lab.daemon.address, f"127.0.0.{i}") for i in range(1, 21)]
    clients = [p.__enter__() for p in probes]
    try:
        jobs = [gevent.spawn(c.address) for c in clients]
        gevent.joinall(jobs, raise_error=True)
        assert {j.value.address for j in jobs} == {IPv4Address("11.22.33.44")}
        assert lab.gateway.requests_by_kind[RequestKind.ADDRESS] == 1
        clients[0].address()  # and a recent answer is reused
        assert lab.gateway.requests_by_kind[RequestKind.ADDRESS] == 1
    finally:
        for p in probes:
            p.__exit__(None, None, None)


def test_gateway_silence_gives_result_three_for_opcode_zero(make_lab: MakeLab) -> None:
    lab = make_lab(settings={"UPSTREAM_TIMEOUT": "0.5"})
    lab.daemon.addresses.forget()
    lab.gateway.silence()
    with probe(lab.daemon.address) as client:
        reply = client.address()
    assert (reply.result, reply.address) == (Result.NETWORK_FAILURE, IPv4Address(0))


def test_a_gateway_restart_resets_doublenats_epoch(make_lab: MakeLab) -> None:
    lab = make_lab()
    time.sleep(3.2)
    with probe(lab.daemon.address) as client:
        before = client.tcp(6881, 6881)
        assert before.epoch >= 3
        lab.gateway.restart()  # the gateway forgot every mapping; its epoch starts again
        after = client.tcp(6882, 6882)  # the next upstream answer reveals it
        assert after.result == Result.SUCCESS and after.epoch < before.epoch
        time.sleep(8)  # past the fresh window: the renewal re-creates the lost mapping
        renewed = client.tcp(6881, 6881)
        assert renewed.result == Result.SUCCESS
    assert any(m.internal_port == 6881 for m in lab.gateway.mappings())


def test_a_public_address_change_resets_the_epoch(make_lab: MakeLab) -> None:
    lab = make_lab()
    time.sleep(3.2)
    with probe(lab.daemon.address) as client:
        before = client.address()
        lab.gateway.set_public_address(IPv4Address("11.22.33.55"))
        lab.daemon.addresses.forget()
        after = client.address()
    assert after.address == IPv4Address("11.22.33.55")
    assert after.epoch < before.epoch
    assert lab.daemon.upstream.generation == 1


def test_a_late_reply_to_a_timed_out_delete_is_not_the_next_requests_answer() -> None:
    """A delete that timed out may still be answered; that answer must not be taken for
    the reply to the next request on the same protocol and port (issue 12)."""
    from doublenat.protocol.natpmp import MapReply, MapRequest, pack_reply, parse_request

    server = gevent.socket.socket(gevent.socket.AF_INET, gevent.socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = NatPmpClient(Endpoint(*server.getsockname()), budget=0.6)
    client.start()
    late: list[tuple[bytes, tuple[str, int]]] = []

    def serve() -> None:
        while True:
            data, source = server.recvfrom(64)
            request = parse_request(data)
            assert isinstance(request, MapRequest)
            if request.lifetime == 0:
                late.append((data, source))  # never answered in time
                continue
            if late:  # answer the old delete first, then the request itself
                server.sendto(pack_reply(MapReply(Proto.TCP, 100, Result.SUCCESS, 40005, 0, 0)),
                              source)
                late.clear()
            server.sendto(pack_reply(MapReply(Proto.TCP, 100, Result.SUCCESS, 40005, 41005,
                                              60)), source)

    server_greenlet = gevent.spawn(serve)
    try:
        with pytest.raises(GatewayError):
            client.map(Proto.TCP, 40005, 0, 0)
        answer = client.map(Proto.TCP, 40005, 40005, 60)
        assert (answer.external_port, answer.lifetime) == (41005, 60)
        assert client.ignored >= 1
    finally:
        server_greenlet.kill()
        client.close()
        server.close()
