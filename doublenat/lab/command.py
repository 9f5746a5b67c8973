"""`doublenat lab`: try doublenat with no router and no VPN, from one command."""

from __future__ import annotations

import logging
import signal
import sys

import click
import gevent
from gevent.event import Event

from doublenat import logs
from doublenat.lab.routeros import CURRENT, LAB_VERSIONS
from doublenat.lab.run import Lab, LabConfig

log = logging.getLogger("doublenat.lab")


@click.command()
@click.option("--listen", default="127.0.0.1:5351", show_default=True, metavar="IP:PORT",
              help="Where the daemon answers NAT-PMP (natpmpc always asks port 5351).")
@click.option("--profile", type=click.Choice(["rfc", "proton"]), default="rfc",
              show_default=True, help="How the emulated VPN gateway behaves.")
@click.option("--port-mode", type=click.Choice(["internal", "external"]), default=None,
              help="VPN_PORT_MODE for the daemon [default: internal for rfc, "
                   "external for proton].")
@click.option("--router-latency", type=float, default=0.0, show_default=True,
              metavar="MS", help="Milliseconds the emulated router takes per API command.")
@click.option("--router-port", type=int, default=0, metavar="PORT",
              help="TCP port of the emulated RouterOS API [default: any free port].")
@click.option("--routeros", type=click.Choice(LAB_VERSIONS), default=CURRENT,
              show_default=True, metavar="VERSION",
              help="RouterOS version the emulated router behaves as "
                   f"({', '.join(LAB_VERSIONS)}).")
@click.option("--log-format", type=click.Choice(["json", "text"]), default="text",
              show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
def lab(listen: str, profile: str, port_mode: str | None, router_latency: float,
        router_port: int, routeros: str, log_format: str, log_level: str) -> None:
    """Run doublenat against an emulated MikroTik and VPN gateway on loopback.

    Runs until Ctrl-C, then shuts down the way `serve` does: every rule it made on the
    emulated router is removed before it exits.
    """
    the_lab = Lab(LabConfig(listen=listen, profile=profile, port_mode=port_mode,
                            router_latency=router_latency / 1000, router_port=router_port,
                            routeros=routeros))
    logs.configure(log_level.upper(), log_format, secrets=[the_lab.password])
    the_lab.router.state.nat.add_observer(_show_rule_change)
    try:
        the_lab.start()
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    assert the_lab.daemon is not None
    host, port = the_lab.daemon.address
    router_host, router_port_bound = the_lab.router.address
    gateway = "{}:{}".format(*the_lab.gateway.address)
    version = the_lab.router.profile.version_text
    click.echo(
        f"""
doublenat lab is running.
  doublenat (NAT-PMP)     {host}:{port}
  emulated MikroTik API   {router_host}:{router_port_bound}  (RouterOS {version}, """
        f"""VPN interface {the_lab.vpn_interface})
  emulated VPN gateway    {gateway}  (profile {profile}, public address """
        f"""{the_lab.config.public_address})

Try, from another terminal:
  natpmpc -g {host}                          # the gateway's public address
  natpmpc -g {host} -a 6881 6881 tcp 60      # map TCP 6881 for 60 s
  natpmpc -g {host} -a 0 6881 tcp 0          # delete it
Every rule doublenat writes on the emulated router is printed below.
Press Ctrl-C to stop (doublenat removes its rules on the way out).
""",
        err=True,
    )
    stop = Event()
    handlers = [gevent.signal_handler(s, stop.set) for s in (signal.SIGINT, signal.SIGTERM)]
    stop.wait()
    for handler in handlers:
        handler.cancel()
    the_lab.stop()
    left = the_lab.rules()
    click.echo(f"lab stopped; doublenat rules left on the emulated router: {len(left)}",
               err=True)
    sys.exit(0 if not left else 1)


def _show_rule_change(kind: str, row: dict[str, str]) -> None:
    log.info(
        "router %s rule %s: %s %s:%s -> %s:%s (%s)",
        kind, row.get(".id"), row.get("protocol"), row.get("in-interface"),
        row.get("dst-port"), row.get("to-addresses"), row.get("to-ports"), row.get("comment"),
        extra={"event": f"lab.rule_{kind}"},
    )
