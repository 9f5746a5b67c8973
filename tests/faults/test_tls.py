"""API-SSL against the emulator's TLS listener, with throwaway CAs made by openssl.

What it proves:
- with MIKROTIK_API_TLS_CA naming the CA that signed the router's certificate, doublenat
  talks to the router over TLS only (the emulator saw TLS sessions and no plain one) and a
  mapping's rule appears on the router, whether the router is named by IP or by name;
- a wrong certificate is refused by default: signed by another CA, self-signed with no CA
  configured (system store), or issued for another name. The adapter raises
  RouterUnavailable naming the certificate problem, a client's mapping gets result 3, and
  nothing is written on the router (no session ever logged in);
- TLS towards a plain API port fails quickly, with result 3, and no hang;
- MIKROTIK_API_TLS_VERIFY=false accepts the wrong certificate and works, and says so with
  a WARNING record, event `tls.unverified`.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.contracts import RouterUnavailable, RuleSpec
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.lab.run import LAN_INTERFACE, VPN_INTERFACE, Lab, LabConfig
from doublenat.protocol.natpmp import Proto, Result
from doublenat.settings import Endpoint
from tests.logcapture import attached
from tests.pki import Pki, make_pki
from tests.probe import probe


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "router")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "other")


@pytest.fixture(scope="module")
def misnamed_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "misnamed", san="DNS:router.example")


class TlsLab:
    """The lab with its router replaced by one that also listens for API-SSL."""

    def __init__(self, server: ssl.SSLContext) -> None:
        self.lab = Lab(LabConfig(listen="127.0.0.1:0"))
        self.lab.router = RouterOsEmulator(
            "127.0.0.1", 0, users={"doublenat": self.lab.password}, ssl_context=server)
        self.lab.router.state.interfaces.update({VPN_INTERFACE, LAN_INTERFACE})
        self.lab.start_emulators()
        tls_address = self.lab.router.tls_address
        assert tls_address is not None
        self.tls_port = tls_address[1]

    def start(self, settings: dict[str, str], synced: bool) -> Lab:
        defaults = {"EXPIRY_GRACE": "1", "CLIENT_RATE_LIMIT": "0", "ROUTER_TIMEOUT": "2",
                    "MIKROTIK_API_TLS": "true",
                    "MIKROTIK_API_ADDRESS": f"127.0.0.1:{self.tls_port}"}
        self.lab.config.settings = defaults | settings
        return self.lab.start(timeout=10, synced=synced)

    def stop(self) -> None:
        self.lab.stop()


@pytest.fixture
def tls_lab(pki: Pki) -> Iterator[TlsLab]:
    made = TlsLab(pki.server_context())
    yield made
    made.stop()


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, level: int | None = None) -> list[str]:
        return [str(getattr(r, "event", "")) for r in self.records
                if level is None or r.levelno == level]


@pytest.fixture
def records() -> Iterator[Records]:
    with attached(Records()) as handler:
        yield handler


def _map(lab: Lab, internal: int) -> tuple[Result, int]:
    with probe(lab.daemon.address) as p:  # type: ignore[union-attr]
        reply = p.tcp(internal, lifetime=120)
    return reply.result, reply.external_port


def _spec(internal: int) -> RuleSpec:
    return RuleSpec(Proto.TCP, VPN_INTERFACE, 40000 + internal, IPv4Address("192.168.1.9"),
                    internal, f"double-natpmp-tcp 192.168.1.9:{internal} via {40000 + internal}")


# ---------------------------------------------------------------------- accepted


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_api_ssl_with_the_routers_ca(tls_lab: TlsLab, pki: Pki, host: str) -> None:
    lab = tls_lab.start({"MIKROTIK_API_TLS_CA": str(pki.ca),
                         "MIKROTIK_API_ADDRESS": f"{host}:{tls_lab.tls_port}"}, synced=True)
    result, external = _map(lab, 7100)
    assert result == Result.SUCCESS and external
    rules = lab.rules()
    assert [(r["to-ports"], r["protocol"]) for r in rules] == [("7100", "tcp")]
    sessions = lab.router.connections()
    assert sessions and all(s.tls for s in sessions), sessions
    assert lab.router.recorder.counters.tls_handshake_failures == 0


def test_unverified_accepts_a_wrong_certificate_with_a_warning(
    tls_lab: TlsLab, other_pki: Pki, records: Records
) -> None:
    lab = tls_lab.start({"MIKROTIK_API_TLS_CA": str(other_pki.ca),
                         "MIKROTIK_API_TLS_VERIFY": "false"}, synced=True)
    result, _ = _map(lab, 7101)
    assert result == Result.SUCCESS
    assert [r["to-ports"] for r in lab.rules()] == ["7101"]
    warnings = [r for r in records.records if getattr(r, "event", None) == "tls.unverified"]
    assert warnings and all(r.levelno == logging.WARNING for r in warnings)
    assert "MIKROTIK_API_TLS_VERIFY" in warnings[0].getMessage()


def test_verified_connection_logs_no_unverified_warning(
    tls_lab: TlsLab, pki: Pki, records: Records
) -> None:
    tls_lab.start({"MIKROTIK_API_TLS_CA": str(pki.ca)}, synced=True)
    assert "tls.unverified" not in records.events()


# ---------------------------------------------------------------------- refused


@pytest.mark.parametrize("case", ["other CA", "system store", "other name"])
def test_a_wrong_certificate_is_refused_by_default(
    case: str, pki: Pki, other_pki: Pki, misnamed_pki: Pki, records: Records
) -> None:
    # The daemon trusts `trusted`; the router presents a certificate it must refuse.
    server, trusted = {
        "other CA": (pki, other_pki.ca),
        "system store": (pki, None),
        "other name": (misnamed_pki, misnamed_pki.ca),
    }[case]
    made = TlsLab(server.server_context())
    try:
        settings = {"MIKROTIK_API_TLS_CA": str(trusted)} if trusted else {}
        lab = made.start(settings, synced=False)
        # The adapter itself: a clear, certificate-naming error, at once.
        client = RouterOsClient(Endpoint("127.0.0.1", made.tls_port), "doublenat",
                                lab.password, tls=True, tls_ca=trusted, timeout=2)
        with pytest.raises(RouterUnavailable, match="certificate") as raised:
            client.add_rule(_spec(1))
        assert "TLS certificate rejected" in str(raised.value)
        client.close()
        # A client of the daemon: result 3, nothing on the router.
        result, external = _map(lab, 7102)
        assert (result, external) == (Result.NETWORK_FAILURE, 0)
        assert lab.rules() == []
        assert lab.router.state.nat.rows() == []
        counters = lab.router.recorder.counters
        assert counters.tls_handshake_failures >= 1
        assert all(s.user is None for s in lab.router.connections())  # nobody logged in
        assert "tls.unverified" not in records.events()
        assert not [r for r in records.records if r.levelno >= logging.ERROR
                    and not r.name.startswith("doublenat.lab")]
    finally:
        made.stop()


def test_tls_towards_a_plain_api_port_fails_fast(pki: Pki) -> None:
    lab = Lab(LabConfig(listen="127.0.0.1:0"))
    lab.start_emulators()
    try:
        host, port = lab.router.address
        lab.config.settings = {"MIKROTIK_API_TLS": "true", "MIKROTIK_API_TLS_CA": str(pki.ca),
                               "MIKROTIK_API_ADDRESS": f"{host}:{port}", "ROUTER_TIMEOUT": "2",
                               "CLIENT_RATE_LIMIT": "0"}
        lab.start(synced=False)
        client = RouterOsClient(Endpoint(host, port), "doublenat", lab.password, tls=True,
                                tls_ca=pki.ca, timeout=2)
        with pytest.raises(RouterUnavailable, match="cannot connect"):
            client.list_rules()
        client.close()
        result, _ = _map(lab, 7103)
        assert result == Result.NETWORK_FAILURE
        assert lab.rules() == []
    finally:
        lab.stop()
