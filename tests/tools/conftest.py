"""Fixtures for the operator tools: emulated router and gateway, the CLI, its environment."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

from doublenat.cli import cli
from doublenat.lab.gateway import GatewayEmulator
from doublenat.lab.routeros import RouterOsEmulator
from doublenat.settings import SETTINGS
from doublenat.tools.commands import register
from tests.clirunner import cli_runner
from tests.freeport import free_udp_port
from tests.pki import make_pki

USER = "doublenat"
PASSWORD = "Pw-0f-The-Router-7c1"  # distinctive, so a leak is found by a substring search
VPN_INTERFACE = "wg-proton"

register(cli)


@pytest.fixture
def router() -> Iterator[RouterOsEmulator]:
    emu = RouterOsEmulator("127.0.0.1", 0, users={USER: PASSWORD}).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def gateway() -> Iterator[GatewayEmulator]:
    gw = GatewayEmulator("127.0.0.1", 0, profile="rfc", janitor_interval=None)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def env(router: RouterOsEmulator, gateway: GatewayEmulator) -> dict[str, str]:
    """The settings `serve` would run with, pointing at the emulators; the router routes
    the gateway through the VPN interface, as a connected tunnel does."""
    gateway_host, gateway_port = gateway.address
    router_host, router_port = router.address
    router.state.routes.set(f"{gateway_host}/32", interface=VPN_INTERFACE, nexthop=gateway_host)
    return {
        "VPN_GATEWAY": f"{gateway_host}:{gateway_port}",
        "MIKROTIK_API_ADDRESS": f"{router_host}:{router_port}",
        "MIKROTIK_API_USER": USER,
        "MIKROTIK_API_PASSWORD": PASSWORD,
        "LISTEN_ADDR": f"127.0.0.1:{free_udp_port()}",
        "UPSTREAM_TIMEOUT": "0.4",
        "ROUTER_TIMEOUT": "2",
    }


Invoke = Callable[..., Result]


@pytest.fixture
def invoke() -> Invoke:
    """invoke(args, env) -> click Result; the environment is exactly `env` for our settings."""

    def _invoke(args: list[str], env: dict[str, str]) -> Result:
        # Unset every setting the test does not give, whatever the outer environment holds.
        full: dict[str, str | None] = {var.env: None for var in SETTINGS}
        full.update(env)
        return cli_runner().invoke(cli, args, env=full, catch_exceptions=False)

    return _invoke


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA and a certificate for 127.0.0.1 it signed."""
    pki = make_pki(tmp_path_factory.mktemp("tools-ca"), "tools")
    return {"ca": pki.ca, "cert": pki.cert, "key": pki.key}


@pytest.fixture
def tls_router(tls_files: dict[str, Path]) -> Iterator[RouterOsEmulator]:
    """An emulated router serving api-ssl with the test CA's certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files["cert"], tls_files["key"])
    emu = RouterOsEmulator("127.0.0.1", 0, users={USER: PASSWORD}, ssl_context=context).start()
    try:
        yield emu
    finally:
        emu.stop()
