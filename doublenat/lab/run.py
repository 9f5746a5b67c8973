"""The built-in lab: an emulated MikroTik and VPN gateway on loopback, and the real daemon.

`Lab.start()` returns only once the daemon has answered a NAT-PMP request and has loaded
the router's rules, so callers (the `lab` command, tests, benchmarks) never race startup.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from doublenat.daemon import Daemon
from doublenat.lab.gateway import GatewayEmulator
from doublenat.lab.routeros import CURRENT, RouterOsEmulator
from doublenat.protocol.natpmp import AddressRequest, pack_request, parse_reply
from doublenat.settings import Settings

log = logging.getLogger("doublenat.lab")

VPN_INTERFACE = "wg-proton"
LAN_INTERFACE = "bridge"


@dataclass
class LabConfig:
    listen: str = "127.0.0.1:5351"
    profile: str = "rfc"  # the gateway emulator's: "rfc" (miniupnpd-like) or "proton"
    port_mode: str | None = None  # default: internal for rfc, external for proton
    router_latency: float = 0.0  # seconds added to every RouterOS API command
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 0
    router_port: int = 0
    routeros: str = CURRENT  # the emulated router's version profile (6.49, 7.16, 7.21)
    public_address: str = "11.22.33.44"
    settings: Mapping[str, str] = field(default_factory=dict)  # any other setting


class LabNotReady(RuntimeError):
    pass


class Lab:
    def __init__(self, config: LabConfig | None = None, **overrides: Any) -> None:
        self.config = config or LabConfig(**overrides)
        self.password = secrets.token_hex(8)
        self.router = RouterOsEmulator(
            "127.0.0.1",
            self.config.router_port,
            users={"doublenat": self.password},
            latency=self.config.router_latency,
            profile=self.config.routeros,
        )
        self._set_up_router()
        self.gateway = GatewayEmulator(
            self.config.gateway_host,
            self.config.gateway_port,
            profile=self.config.profile,
            public_address=self.config.public_address,
        )
        self.daemon: Daemon | None = None
        self.settings: Settings | None = None
        self._emulators_started = False

    def _set_up_router(self) -> None:
        """A typical home router whose tunnel routes the VPN gateway (wg-proton on 7.x; 6.x
        has no WireGuard, so an OpenVPN client there)."""
        state = self.router.state
        self.vpn_interface = VPN_INTERFACE if state.profile.v7 else "ovpn-proton"
        state.setup_home_router(vpn_gateway=self.config.gateway_host,
                                vpn_interface=self.vpn_interface)
        self._router_set_up = self.router

    def environment(self) -> dict[str, str]:
        """The settings the lab's daemon runs with (password included: it is the lab's)."""
        gateway_host, gateway_port = self.gateway.address
        router_host, router_port = self.router.address
        mode = self.config.port_mode or ("external" if self.config.profile == "proton"
                                         else "internal")
        env = {
            "VPN_GATEWAY": f"{gateway_host}:{gateway_port}",
            "MIKROTIK_API_ADDRESS": f"{router_host}:{router_port}",
            "MIKROTIK_API_USER": "doublenat",
            "MIKROTIK_API_PASSWORD": self.password,
            "VPN_PORT_MODE": mode,
            "LISTEN_ADDR": self.config.listen,
            "ALLOWED_CLIENTS": "127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16",
            "RECONCILE_INTERVAL": "60",
            "ADOPT_GRACE": "120",
            "SHUTDOWN_TIMEOUT": "10",
        }
        env.update(self.config.settings)
        return env

    def start_emulators(self) -> None:
        if self._emulators_started:
            return
        self._emulators_started = True
        if self.router is not self._router_set_up:
            # A caller swapped in its own emulator (with TLS, say): give it the same setup.
            self._set_up_router()
        self.router.start()
        self.gateway.start()

    def start(self, timeout: float = 10.0, synced: bool = True) -> Lab:
        """Start everything; return once the daemon answers (and, if `synced`, once it
        has loaded the router's rules)."""
        self.start_emulators()
        self.settings = Settings.from_raw(dict(self.environment()))
        self.daemon = Daemon(self.settings)
        try:
            self.daemon.start()
            self.wait_ready(timeout, synced)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float, synced: bool = True) -> None:
        """Until the daemon answers opcode 0 and has synchronised with the router."""
        assert self.daemon is not None
        deadline = time.monotonic() + timeout
        host, port = self.daemon.address
        if host == "0.0.0.0":
            host = "127.0.0.1"
        # A lab whose allow-list shuts loopback out cannot be asked: trust the bind then.
        if self.daemon.responder.allowed(IPv4Address("127.0.0.1")):
            self._wait_answer((host, port), deadline)
        if synced:
            self._wait_synced(deadline)

    def _wait_answer(self, address: tuple[str, int], deadline: float) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            probe.settimeout(0.2)
            while time.monotonic() < deadline:
                probe.send(pack_request(AddressRequest()))
                try:
                    if parse_reply(probe.recv(64)) is not None:
                        return
                except OSError:
                    continue
        raise LabNotReady("doublenat did not answer on {}:{}".format(*address))

    def _wait_synced(self, deadline: float) -> None:
        assert self.daemon is not None
        left = max(0.0, deadline - time.monotonic())
        if not self.daemon.reconcile_loop.synced.wait(left):
            raise LabNotReady("doublenat did not synchronise with the emulated router")

    def stop(self) -> None:
        if self.daemon is not None and not self.daemon.stopped.is_set():
            self.daemon.stop()
        self.gateway.stop()
        self.router.stop()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------- inspection

    def rules(self) -> list[dict[str, str]]:
        """doublenat's rules on the emulated router, as the router holds them."""
        return [dict(r) for r in self.router.state.nat.rows()
                if str(r.get("comment", "")).startswith("double-natpmp-")]
