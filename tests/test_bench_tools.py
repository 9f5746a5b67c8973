"""The bench's compiled opcode-0 generator and its reference servers, on loopback.

Not the figures (`make bench` takes those), only that the tools measure what they say:
every request answered and counted, wrong replies counted as bad, the syscall counters'
outputs read correctly."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from bench import procs
from tests.needs import need_program


@pytest.fixture(scope="module")
def built() -> None:
    need_program("gcc")
    procs.natpmp_load()


@pytest.fixture
def c_echo(built: None) -> Iterator[procs.CEcho]:
    server = procs.CEcho("127.0.0.1:0", cpu=None)
    yield server
    server.stop()


def load(target: str, window: int, count: int) -> dict:
    return procs.c_loadgen("address", "--target", target, "--window", str(window),
                           "--count", str(count), "--timeout", "2", cpu=None)


@pytest.mark.parametrize("window", [1, 8, 64])
def test_every_request_is_answered_and_timed(c_echo: procs.CEcho, window: int) -> None:
    result = load(c_echo.address, window, 3000)
    assert result["generator"] == "c" and result["window"] == window
    assert (result["sent"], result["answered"], result["bad"], result["lost"]) == \
        (3000, 3000, 0, 0)
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"]
    assert result["rate"] > 0


def test_a_timed_run_measures_after_its_warmup(c_echo: procs.CEcho) -> None:
    result = procs.c_loadgen("address", "--target", c_echo.address, "--window", "4",
                             "--duration", "0.3", "--warmup", "0.1", cpu=None)
    assert result["bad"] == 0 and result["answered"] > 0
    assert result["sent"] > result["answered"]  # the warm-up's requests are not measured
    assert 0.2 < result["seconds"] <= 0.31


@pytest.mark.parametrize("reply", [
    bytes((0, 128, 0, 1, 0, 0, 0, 1, 11, 22, 33, 44)),  # result 1
    bytes((0, 129, 0, 0, 0, 0, 0, 1, 11, 22, 33, 44)),  # opcode 129
    bytes((1, 128, 0, 0, 0, 0, 0, 1, 11, 22, 33, 44)),  # version 1
    bytes((0, 128, 0, 0, 0, 0, 0, 1, 11, 22, 33)),  # 11 bytes
    b"\x00\x00",  # the request echoed back
])
def test_wrong_replies_count_as_bad(built: None, reply: bytes) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)

    def answer() -> None:
        for _ in range(200):
            try:
                _, source = sock.recvfrom(64)
            except OSError:
                return
            sock.sendto(reply, source)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = load(f"127.0.0.1:{sock.getsockname()[1]}", 1, 200)
    finally:
        thread.join(10)
        sock.close()
    assert (result["answered"], result["bad"]) == (0, 200)


@pytest.mark.parametrize("inline", [False, True])
def test_the_gevent_floor_answers_opcode_0(built: None, inline: bool) -> None:
    server = procs.GeventFloor("127.0.0.1:0", inline=inline, cpu=None)
    try:
        result = load(server.address, 16, 2000)
    finally:
        server.stop()
    assert (result["answered"], result["bad"]) == (2000, 0)


def test_the_stdlib_echo_answers_opcode_0_with_a_real_reply(built: None) -> None:
    server = procs.EchoServer("127.0.0.1:0", cpu=None)
    try:
        result = load(server.address, 4, 1000)
    finally:
        server.stop()
    assert (result["answered"], result["bad"]) == (1000, 0)


def test_perf_counts_are_read_with_the_rest_as_other() -> None:
    text = """# started on Wed Dec  2 18:54:17 2026

4100,,raw_syscalls:sys_enter,1104058,100.00,,
2000,,syscalls:sys_enter_recvfrom,1104058,100.00,,
2000,,syscalls:sys_enter_sendto,1104058,100.00,,
0,,syscalls:sys_enter_ioctl,1104058,100.00,,
<not supported>,,syscalls:sys_enter_ppoll,0,100.00,,
"""
    assert procs._parse_perf(text) == {"recvfrom": 2000, "sendto": 2000, "other": 100}


def test_strace_summaries_are_read() -> None:
    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 52.10    0.010000           5      2001         1 recvfrom
 47.90    0.009000           4      2000           sendto
  0.00    0.000000           0        16           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.019000           4      4017         1 total
"""
    assert procs._parse_strace(text) == {"recvfrom": 2001, "sendto": 2000, "epoll_wait": 16}


def test_syscalls_of_a_server_are_counted(c_echo: procs.CEcho, tmp_path) -> None:
    need_program("strace")
    tool = procs.syscall_counter()
    assert tool is not None
    answered: dict = {}
    counts = procs.count_syscalls(
        c_echo.pid, lambda: answered.update(load(c_echo.address, 1, 300)), tool, tmp_path)
    assert answered["answered"] == 300
    # one request in flight: one recvmmsg and one sendmmsg each
    assert counts.get("recvmmsg", 0) >= 300 and counts.get("sendmmsg", 0) >= 300


def test_mapping_requests_each_get_their_reply(c_echo: procs.CEcho) -> None:
    result = procs.c_loadgen("map", "--target", c_echo.address, "--sources",
                             "127.0.1.1-127.0.1.4", "--first", "1100", "--count", "5000",
                             "--window", "32", "--echo", cpu=None)
    assert (result["answered"], result["bad"], result["lost"]) == (5000, 0, 0)
    assert result["results"] == {"0": 5000}


class MappingServer:
    """Answers mapping requests itself: result 2 for odd internal ports, and (with
    `drop_first`) only the second time each port is asked; records who asked what."""

    def __init__(self, drop_first: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.drop_first = drop_first
        self.asked: dict[int, list[tuple[str, int]]] = {}
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while self.running:
            try:
                data, source = self.sock.recvfrom(64)
            except TimeoutError:
                continue
            port = int.from_bytes(data[4:6], "big")
            self.asked.setdefault(port, []).append((source[0], data[1]))
            if self.drop_first and len(self.asked[port]) == 1:
                continue
            code = 2 if port % 2 else 0
            reply = bytes((0, 128 + data[1])) + code.to_bytes(2, "big") + bytes(4) \
                + data[4:6] + data[6:8] + data[8:12]
            self.sock.sendto(reply, source)

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def test_mapping_replies_are_counted_by_result_code(built: None) -> None:
    server = MappingServer()
    try:
        result = procs.c_loadgen("map", "--target", server.address, "--sources",
                                 "127.0.1.1-127.0.1.3", "--first", "2000", "--count", "300",
                                 "--window", "8", "--proto", "tcp", cpu=None)
    finally:
        server.stop()
    assert result["results"] == {"0": 150, "2": 150} and result["bad"] == 0
    # job k asks for port first + k from source port % 3, with the protocol's opcode
    assert sorted(server.asked) == list(range(2000, 2300))
    for port, asks in server.asked.items():
        assert asks == [(f"127.0.1.{port % 3 + 1}", 2)]


def test_unanswered_mapping_requests_are_sent_again(built: None) -> None:
    server = MappingServer(drop_first=True)
    try:
        result = procs.c_loadgen("map", "--target", server.address, "--first", "3000",
                                 "--count", "10", "--window", "10", cpu=None)
    finally:
        server.stop()
    assert result["answered"] == 10 and result["retransmitted"] == 10
    assert result["p50_us"] >= 2e6  # from the first send
