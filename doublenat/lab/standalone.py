"""The lab's emulators as a separate process, for tests that run doublenat elsewhere
(installed from the .deb under supervisord, or inside a network namespace).

    python -m doublenat.lab.standalone --router 127.0.0.1:18728 --password-file pw \
        --gateway 127.0.0.1:15351 --profile rfc --route 127.0.0.1=wg-proton

Once both listen it prints one JSON line with their addresses on stdout and keeps
running until SIGTERM or SIGINT.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json
import signal
import sys
from pathlib import Path

import click
import gevent
from gevent.event import Event

from doublenat import logs
from doublenat.lab.gateway import GatewayEmulator
from doublenat.lab.routeros import RouterOsEmulator


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


@click.command()
@click.option("--router", "router_at", default=None, metavar="IP:PORT",
              help="Run the RouterOS API emulator here.")
@click.option("--user", default="doublenat", show_default=True)
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The API user's password (default: empty).")
@click.option("--interface", "interfaces", multiple=True, default=("wg-proton", "bridge"),
              show_default=True, help="Interfaces the emulated router has.")
@click.option("--route", "routes", multiple=True, metavar="DEST=IFACE",
              help="Answer /ip/route/check for DEST (address or prefix) with IFACE.")
@click.option("--router-latency", type=float, default=0.0, metavar="SECONDS")
@click.option("--gateway", "gateway_at", default=None, metavar="IP:PORT",
              help="Run the NAT-PMP gateway emulator here.")
@click.option("--profile", type=click.Choice(["rfc", "proton"]), default="rfc",
              show_default=True)
@click.option("--public-address", default="11.22.33.44", show_default=True)
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json")
def main(router_at: str | None, user: str, password_file: Path | None,
         interfaces: tuple[str, ...], routes: tuple[str, ...], router_latency: float,
         gateway_at: str | None, profile: str, public_address: str, log_format: str) -> None:
    logs.configure("INFO", log_format)
    ready: dict[str, str] = {}
    router = gateway = None
    if router_at:
        password = password_file.read_text().strip() if password_file else ""
        host, port = _endpoint(router_at)
        router = RouterOsEmulator(host, port, users={user: password}, latency=router_latency)
        router.state.interfaces.update(interfaces)
        for route in routes:
            destination, _, interface = route.partition("=")
            router.state.routes.set(destination, interface=interface or None)
        router.start()
        ready["router"] = "{}:{}".format(*router.address)
    if gateway_at:
        host, port = _endpoint(gateway_at)
        gateway = GatewayEmulator(host, port, profile=profile, public_address=public_address)
        gateway.start()
        ready["gateway"] = "{}:{}".format(*gateway.address)
    print(json.dumps(ready), flush=True)
    stop = Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    stop.wait()
    if gateway is not None:
        gateway.stop()
    if router is not None:
        router.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
