"""Fixtures for lab tests: a started RouterOS emulator, real-client connections, a raw client."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import routeros_api

from doublenat.lab.routeros import RouterOsEmulator
from doublenat.lab.routeros.wire import SentenceReader, encode_sentence, to_bytes, to_text
from tests.pki import make_pki

USER = "admin"
PASSWORD = "s3cret"


@pytest.fixture
def emulator() -> Iterator[RouterOsEmulator]:
    emu = RouterOsEmulator(users={USER: PASSWORD}).start()
    try:
        yield emu
    finally:
        emu.stop()


Connect = Callable[..., tuple[routeros_api.RouterOsApiPool, routeros_api.api.RouterOsApi]]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """connect(emu, **pool_kwargs) -> (pool, api), logged in with TCP_NODELAY on the client."""
    pools: list[routeros_api.RouterOsApiPool] = []

    def _connect(
        emu: RouterOsEmulator,
        username: str = USER,
        password: str = PASSWORD,
        *,
        timeout: float = 5.0,
        address: tuple[str, int] | None = None,
        **kwargs: object,
    ) -> tuple[routeros_api.RouterOsApiPool, routeros_api.api.RouterOsApi]:
        host, port = address or emu.address
        kwargs.setdefault("plaintext_login", True)
        pool = routeros_api.RouterOsApiPool(host, username, password, port=port, **kwargs)
        pool.set_timeout(timeout)
        pools.append(pool)
        api = pool.get_api()
        # Without it the client's Nagle and our delayed ACK cost ~40 ms per command.
        pool.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return pool, api

    yield _connect
    for pool in pools:
        pool.disconnect()


class RawClient:
    """A bare API client speaking sentences, for checking exact reply words."""

    def __init__(self, address: tuple[str, int], timeout: float = 2.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = SentenceReader()
        self._ready: list[tuple[str, ...]] = []

    def send(self, *words: str) -> None:
        self.sock.sendall(encode_sentence(to_bytes(w) for w in words))

    def read(self) -> tuple[str, ...]:
        """The next sentence; raises EOFError when the server closed the connection."""
        while not self._ready:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self._ready += [tuple(to_text(w) for w in s) for s in self._reader.feed(data)]
        return self._ready.pop(0)

    def until_done(self, tag: str | None = None) -> list[tuple[str, ...]]:
        """Sentences up to and including the `!done` (for `tag`, when given)."""
        out = []
        while True:
            sentence = self.read()
            out.append(sentence)
            if sentence[0] == "!done" and (tag is None or f".tag={tag}" in sentence):
                return out

    def call(self, *words: str) -> list[tuple[str, ...]]:
        self.send(*words)
        return self.until_done()

    def login(self, user: str = USER, password: str = PASSWORD) -> None:
        assert self.call("/login", f"=name={user}", f"=password={password}") == [("!done",)]

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def _raw(emu: RouterOsEmulator, *, login: bool = True, timeout: float = 2.0) -> RawClient:
        client = RawClient(emu.address, timeout)
        clients.append(client)
        if login:
            client.login()
        return client

    yield _raw
    for client in clients:
        client.close()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""
    pki = make_pki(tmp_path_factory.mktemp("ca"), "test")
    return {"ca": pki.ca, "cert": pki.cert, "key": pki.key}


@pytest.fixture
def server_tls_context(test_ca: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(test_ca["cert"], test_ca["key"])
    return context
