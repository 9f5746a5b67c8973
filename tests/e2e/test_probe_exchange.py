"""The picky-client probe's own bookkeeping (tests/e2e/clients.py), on loopback: a second
answer to a request it had to resend is "late", not a reply a strict client would reject.
Found in CI: a mapping reply slower than the 250 ms retry left its twin to be read by the
next question, and the e2e test took that for a server fault.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from doublenat.protocol.natpmp import MapReply, MapRequest, Proto, Result, pack_reply, pack_request
from tests.e2e import clients
from tests.e2e.clients import Exchange, _map_accept


@pytest.fixture
def slow_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, list[float]]]:
    """A server answering every mapping request after the delay at the head of `delays`."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    monkeypatch.setattr(clients, "PORT", server.getsockname()[1])
    delays: list[float] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                _, source = server.recvfrom(64)
            except TimeoutError:
                continue
            delay = delays.pop(0) if delays else 0.0
            reply = pack_reply(MapReply(Proto.UDP, 7, Result.SUCCESS, 6890, 40000, 60))
            threading.Timer(delay, server.sendto, (reply, source)).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server, delays
    stop.set()
    thread.join()
    server.close()


def test_a_twin_answer_to_a_resent_request_is_late_not_rejected(slow_server) -> None:
    _, delays = slow_server
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    ex = Exchange(sock, "127.0.0.1", connected=False)
    delays.extend([0.3, 0.0])  # the first answer comes after the client's 0.2 s retry
    request = pack_request(MapRequest(Proto.UDP, 6890, 6890, 60))
    first = ex.ask(request, _map_accept(Proto.UDP, 6890, exact=True), [0.2, 0.4], "udp map")
    assert isinstance(first, MapReply) and ex.sent == 2
    # The next question (a TCP mapping) reads the twin first and must not blame the server.
    with pytest.raises(clients.ProbeError):
        ex.ask(request, _map_accept(Proto.TCP, 6890, exact=True), [0.5], "tcp map")
    assert ex.ignored == []
    assert ex.late and ex.late[0]["why"] == "another answer to a resent request"
    time.sleep(0.1)
    sock.close()


def test_an_unrelated_reply_is_still_rejected(slow_server) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    ex = Exchange(sock, "127.0.0.1", connected=False)
    request = pack_request(MapRequest(Proto.UDP, 6890, 6890, 60))
    with pytest.raises(clients.ProbeError):
        ex.ask(request, _map_accept(Proto.TCP, 6890, exact=True), [0.3], "tcp map")
    assert ex.late == [] and ex.ignored and ex.ignored[0]["why"] == "rejected"
    sock.close()
