"""Command line: `doublenat serve`, `doublenat lab`, and the operator tools.

gevent must patch the standard library before anything imports ssl (routeros-api does
at import time), so the patch comes first, before every other import.
"""

from gevent import monkey

monkey.patch_all()

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from doublenat import __version__
from doublenat.settings import SettingError, Settings

USAGE_ERROR = 2


@dataclass(frozen=True)
class Var:
    env: str
    help: str
    default: str | None = None
    metavar: str = "TEXT"

    @property
    def option(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def param(self) -> str:
        return self.env.lower()


# The settings contract (SPEC §2) plus doublenat's own tunables. Defaults live in
# doublenat.settings; they are repeated here only to be shown in --help.
SETTINGS: list[Var] = [
    Var("VPN_GATEWAY", "IPv4 of the VPN's NAT-PMP server, IP[:PORT] (port 5351). Required.",
        metavar="IP[:PORT]"),
    Var("MIKROTIK_API_ADDRESS", "RouterOS API endpoint host[:port] (8728, or 8729 with TLS). "
        "Required.", metavar="HOST[:PORT]"),
    Var("MIKROTIK_API_USER", "API user name.", "admin"),
    Var("MIKROTIK_API_PASSWORD", "API password. Prefer the environment or the _FILE setting: "
        "a command line is visible to every user in ps.", metavar="SECRET"),
    Var("MIKROTIK_API_PASSWORD_FILE", "Read the API password from this file.", metavar="PATH"),
    Var("MIKROTIK_API_TLS", "Use API-SSL: true/false/yes/no/1/0.", "false", "BOOL"),
    Var("MIKROTIK_API_TLS_CA", "CA file that signed the router's certificate "
        "(default: the system store).", metavar="PATH"),
    Var("MIKROTIK_API_TLS_VERIFY", "Verify the router's certificate; false accepts a "
        "self-signed one (logged as a warning).", "true", "BOOL"),
    Var("MIKROTIK_IN_INTERFACE", "Interface for the dst-nat rules. Unset: asked from the "
        "router with /ip/route/check toward VPN_GATEWAY; no guessing.", "auto", "NAME"),
    Var("VPN_PORT_MODE", "Port the VPN gateway delivers to: 'internal' (the port doublenat "
        "asked for; RFC gateways, miniupnpd) or 'external' (the granted port; ProtonVPN).",
        "internal", "internal|external"),
    Var("LISTEN_ADDR", "Where to answer NAT-PMP, [IP]:PORT.", "0.0.0.0:5351", "[IP]:PORT"),
    Var("ALLOWED_CLIENTS", "CIDR list of clients served; others get no reply.",
        "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16", "CIDR,..."),
    Var("MAX_MAPPINGS_PER_CLIENT", "Mappings per client, TCP and UDP together; beyond: "
        "result 4.", "64", "N"),
    Var("RECONCILE_INTERVAL", "Seconds between reconciliations with the router.", "600",
        "SECONDS"),
    Var("LOG_LEVEL", "DEBUG, INFO, WARN or ERROR.", "INFO", "LEVEL"),
    Var("LOG_FORMAT", "json (one object per line) or text.", "json", "json|text"),
    Var("MAX_LIFETIME", "Longest lifetime granted to a client, seconds.", "86400", "SECONDS"),
    Var("ROUTER_TIMEOUT", "Deadline of each RouterOS API call, seconds.", "5", "SECONDS"),
    Var("UPSTREAM_TIMEOUT", "Retransmission budget toward VPN_GATEWAY, seconds.", "3",
        "SECONDS"),
    Var("EXPIRY_GRACE", "Seconds a mapping outlives its lifetime before it is removed.", "10",
        "SECONDS"),
    Var("ADOPT_GRACE", "Seconds a rule of an earlier run waits for its client to renew.",
        "900", "SECONDS"),
    Var("PORT_RANGE", "Ports doublenat may use on the router and the gateway.", "1024-65535",
        "LOW-HIGH"),
    Var("CLIENT_RATE_LIMIT", "Requests per second per client (0: no limit).", "50", "RATE"),
    Var("CLIENT_RATE_BURST", "Burst allowed above CLIENT_RATE_LIMIT.", "100", "N"),
    Var("SHUTDOWN_TIMEOUT", "Seconds allowed for the cleanup at shutdown.", "30", "SECONDS"),
]


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every setting as an option that also reads its environment variable."""
    for var in reversed(SETTINGS):
        help_text = var.help + (f"  [default: {var.default}]" if var.default else "")
        func = click.option(
            var.option,
            var.param,
            envvar=var.env,
            show_envvar=True,
            metavar=var.metavar,
            help=help_text,
        )(func)
    return func


def load_settings(values: dict[str, str | None]) -> Settings:
    raw = {var.env: values.get(var.param) for var in SETTINGS}
    return Settings.from_raw(raw)


def fail(message: str, variable: str | None = None, as_json: bool = False) -> None:
    """One line naming the problem, exit 2. As a JSON record when it goes to a log file,
    so a log shipper never meets a plain line."""
    text = f"doublenat: error: {message}"
    if as_json:
        import json
        from datetime import UTC, datetime

        text = json.dumps({"timestamp": datetime.now(UTC).isoformat(), "level": "ERROR",
                           "logger": "doublenat", "message": text,
                           "event": "settings.invalid", "variable": variable})
    click.echo(text, err=True)
    sys.exit(USAGE_ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="doublenat")
def cli() -> None:
    """doublenat: a NAT-PMP gateway for a LAN behind a MikroTik router and a VPN.

    LAN clients ask doublenat for a port; doublenat adds a dst-nat rule on the router
    and a NAT-PMP mapping on the VPN gateway, and answers with the gateway's port.
    """


@cli.command()
@settings_options
def serve(**values: str | None) -> None:
    """Run the NAT-PMP server until SIGTERM or SIGINT."""
    from doublenat import logs

    try:
        settings = load_settings(values)
    except SettingError as exc:
        # JSON unless a human reads it (a terminal) or text logs were asked for.
        wants_text = (values.get("log_format") or "").strip().lower() == "text"
        fail(str(exc), exc.variable, as_json=not wants_text and not sys.stderr.isatty())
        return
    logs.configure(settings.log_level, settings.log_format, secrets=[settings.api_password])
    from doublenat.adapters.front import BindError
    from doublenat.daemon import Daemon

    try:
        status = Daemon(settings).run()
    except BindError as exc:
        import logging

        logging.getLogger("doublenat").error(str(exc.strerror), extra={"event": "daemon.bind"})
        sys.exit(1)
    sys.exit(status)


def _register_extra_commands() -> None:
    from doublenat.lab.command import lab
    from doublenat.tools.commands import register

    cli.add_command(lab)
    register(cli)


def main() -> None:
    _register_extra_commands()
    cli()


if __name__ == "__main__":
    main()
