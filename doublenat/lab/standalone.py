"""The lab's emulators as a separate process, for tests that run doublenat elsewhere
(installed from the .deb under supervisord, or inside a network namespace).

    python -m doublenat.lab.standalone --router 127.0.0.1:18728 --password-file pw \
        --gateway 127.0.0.1:15351 --profile rfc --route 127.0.0.1=wg-proton

The emulated router starts as a typical home router (ether1 uplink with a DHCP default
route, bridge 192.168.88.1/24, the tunnel wg-proton 10.2.0.2/32); `--interface` adds
interfaces, `--route` adds static routes, `--down` takes an interface's link down,
`--routeros` picks the version profile.

Once both listen it prints one JSON line with their addresses on stdout and keeps
running until SIGTERM or SIGINT.

Inside a network namespace the emulators can also move packets (doublenat.lab.nft):

    --nat-rule 'chain=srcnat action=masquerade out-interface=wg-proton'  (seeds a rule)
    --nft-router wg-proton=tun,bridge=lan   the router's NAT table applied to nftables
    --nft-gateway wan                       the gateway's mappings forwarded from `wan`
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import json
import logging
import random
import shlex
import signal
import sys
from pathlib import Path

import click
import gevent
from gevent.event import Event

from doublenat import logs
from doublenat.lab.dynamics import ProtonDynamics
from doublenat.lab.gateway import GatewayEmulator
from doublenat.lab.nft import (
    DEFAULT_TABLE,
    GatewayNatMirror,
    NftError,
    RouterNatMirror,
    parse_interface_map,
)
from doublenat.lab.routeros import (
    CURRENT,
    PROFILES,
    RouterError,
    RouterOsEmulator,
    RoutingError,
)
from doublenat.lab.routeros.state import type_from_name


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


@click.command()
@click.option("--router", "router_at", default=None, metavar="IP:PORT",
              help="Run the RouterOS API emulator here.")
@click.option("--user", default="doublenat", show_default=True)
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The API user's password (default: empty).")
@click.option("--routeros", type=click.Choice(sorted(PROFILES)), default=CURRENT,
              show_default=True, help="RouterOS version profile of the emulated router.")
@click.option("--interface", "interfaces", multiple=True, default=("wg-proton", "bridge"),
              show_default=True, metavar="NAME[:TYPE]",
              help="Interfaces the emulated router has besides its defaults (TYPE as "
                   "/interface prints it, e.g. wg; guessed from NAME when left out).")
@click.option("--route", "routes", multiple=True, metavar="DEST=GATEWAY",
              help="A static route in main: DEST an address or prefix, GATEWAY an "
                   "interface name, an address, or ADDRESS%IFACE.")
@click.option("--down", "down", multiple=True, metavar="NAME",
              help="Take this interface's link down (running=false).")
@click.option("--router-latency", type=float, default=0.0, metavar="SECONDS")
@click.option("--gateway", "gateway_at", default=None, metavar="IP:PORT",
              help="Run the NAT-PMP gateway emulator here.")
@click.option("--profile", type=click.Choice(["rfc", "proton"]), default="rfc",
              show_default=True)
@click.option("--public-address", default="11.22.33.44", show_default=True)
@click.option("--max-lifetime", type=click.IntRange(1, 2**32 - 1), default=None,
              metavar="SECONDS", help="Cap on granted lifetimes (default: the profile's).")
@click.option("--move-every", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="The gateway moves every mapping's port this often "
                                      "(at its next renewal).")
@click.option("--reconnect-every", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="SECONDS", help="A VPN reconnect this often: epoch reset, mappings "
                                      "lost, new public address.")
@click.option("--dynamics-seed", type=int, default=None,
              help="Seed of the --move-every/--reconnect-every schedule and of the gateway's "
                   "port choice (default: schedule seed 0, random ports).")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json")
@click.option("--nat-rule", "nat_rules", multiple=True, metavar="'PROP=VALUE ...'",
              help="Seed the router's /ip/firewall/nat with this rule (RouterOS words, "
                   "shell-quoted values allowed), in order.")
@click.option("--nft-router", "nft_router", default=None, metavar="NAME=LINK,...",
              help="Apply the router's NAT table to nftables in this namespace, mapping "
                   "RouterOS interface names to real links.")
@click.option("--nft-gateway", "nft_gateway", default=None, metavar="LINK",
              help="Forward the gateway's mappings from LINK with nftables (DNAT to the "
                   "mapping's source).")
@click.option("--nft-deliver", type=click.Choice(["auto", "external", "internal"]),
              default="auto", show_default=True,
              help="Port the gateway mirror delivers to (auto: external for proton).")
@click.option("--nft-table", default=DEFAULT_TABLE, show_default=True,
              help="nftables table (ip family) of the router mirror; the gateway mirror's "
                   "is this name plus _gw.")
def main(router_at: str | None, user: str, password_file: Path | None, routeros: str,
         interfaces: tuple[str, ...], routes: tuple[str, ...], down: tuple[str, ...],
         router_latency: float,
         gateway_at: str | None, profile: str, public_address: str, max_lifetime: int | None,
         move_every: float | None, reconnect_every: float | None, dynamics_seed: int | None,
         log_format: str,
         nat_rules: tuple[str, ...], nft_router: str | None, nft_gateway: str | None,
         nft_deliver: str, nft_table: str) -> None:
    logs.configure("INFO", log_format)
    ready: dict[str, str] = {}
    router = gateway = None
    mirrors: list[RouterNatMirror | GatewayNatMirror] = []
    if (nat_rules or nft_router) and not router_at:
        raise click.UsageError("--nat-rule and --nft-router need --router")
    if nft_gateway and not gateway_at:
        raise click.UsageError("--nft-gateway needs --gateway")
    try:
        iface_map = parse_interface_map(nft_router) if nft_router else None
        seeds = [_rule_words(text) for text in nat_rules]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if router_at:
        password = password_file.read_text().strip() if password_file else ""
        host, port = _endpoint(router_at)
        router = RouterOsEmulator(host, port, users={user: password}, latency=router_latency,
                                  profile=routeros)
        try:
            _configure(router, interfaces, routes, down)
        except (RoutingError, ValueError) as exc:
            raise click.BadParameter(str(exc)) from None
        if iface_map is not None:
            mirror = RouterNatMirror(router.state.nat, iface_map, table=nft_table)
            mirrors.append(mirror.start())
            ready["nft_router"] = nft_table
        for words in seeds:
            try:
                router.state.nat.add(words)
            except RouterError as exc:
                raise click.BadParameter(f"--nat-rule {words}: {exc.message}") from None
        router.start()
        ready["router"] = "{}:{}".format(*router.address)
    if gateway_at:
        host, port = _endpoint(gateway_at)
        dynamics = None
        if move_every is not None or reconnect_every is not None:
            dynamics = ProtonDynamics(move_every=move_every, reconnect_every=reconnect_every,
                                      seed=dynamics_seed or 0)
        gateway = GatewayEmulator(host, port, profile=profile, public_address=public_address,
                                  max_lifetime=max_lifetime, dynamics=dynamics,
                                  rng=None if dynamics_seed is None
                                  else random.Random(dynamics_seed))
        if nft_gateway:
            deliver = None if nft_deliver == "auto" else nft_deliver
            table = f"{nft_table}_gw"
            mirrors.append(GatewayNatMirror(gateway, nft_gateway, deliver=deliver,
                                            table=table).start())
            ready["nft_gateway"] = table
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
    for mirror in mirrors:
        try:
            mirror.close()
        except NftError:
            logging.getLogger("doublenat.lab.nft").exception("could not remove the nft table")
    sys.exit(0)


def _configure(router: RouterOsEmulator, interfaces: tuple[str, ...],
               routes: tuple[str, ...], down: tuple[str, ...]) -> None:
    state = router.state
    for spec in interfaces:
        name, _, kind = spec.partition(":")
        if name not in state.interfaces:
            state.add_interface(name, kind or type_from_name(name, state.profile.interface_types))
    for route in routes:
        destination, _, gateway = route.partition("=")
        if not gateway:
            raise ValueError(f"--route {route!r} is not DEST=GATEWAY")
        state.add_route(destination, gateway, distance=1)
    for name in down:
        state.set_running(name, False)


def _rule_words(text: str) -> dict[str, str]:
    """`chain=dstnat action=dst-nat comment="a b"` → a property dict."""
    words: dict[str, str] = {}
    for word in shlex.split(text):
        name, sep, value = word.partition("=")
        if not sep or not name:
            raise ValueError(f"--nat-rule word {word!r} is not PROP=VALUE")
        words[name] = value
    return words


if __name__ == "__main__":
    main()
