"""Command line: `doublenat serve`, `doublenat lab`, and the operator tools.

gevent must patch the standard library before anything imports ssl (routeros-api does
at import time), so the patch comes first, before every other import.
"""

from gevent import monkey

monkey.patch_all()

import sys

import click

from doublenat import __version__
from doublenat.options import fail, load_settings, settings_options
from doublenat.settings import SettingError


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
