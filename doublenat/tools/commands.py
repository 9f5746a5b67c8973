"""The click commands `check`, `list`, `cleanup` and `status`; `register(group)` adds them.

They take exactly the options and environment variables of `serve` (the same decorator),
so an operator checks, lists and cleans up with the configuration the daemon runs with.
Exit statuses: 0 success, 1 a check or an operation failed, 2 invalid settings.
"""

from __future__ import annotations

import json
import sys

import click

from doublenat.adapters.routeros import RouterOsClient
from doublenat.engine.contracts import RouterError
from doublenat.options import fail, load_settings, settings_options
from doublenat.settings import SettingError, Settings
from doublenat.tools import checks
from doublenat.tools.rules import ListedRule, format_table, owned_rules
from doublenat.tools.rules import cleanup as remove_rules

FAILED = 1


def register(group: click.Group) -> None:
    """Add the tools to `group` (once: a second call changes nothing)."""
    for command in (check, list_rules, cleanup, status):
        if command.name not in group.commands:
            group.add_command(command)


def _settings(values: dict[str, str | None]) -> Settings:
    try:
        return load_settings(values)
    except SettingError as exc:
        fail(str(exc))
        raise AssertionError("unreachable") from None


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of lines.")
@settings_options
def check(as_json: bool, **values: str | None) -> None:
    """Check that `serve` would work with these settings, one line per check.

    Settings, router reachable, login, the API user's rights on /ip/firewall/nat and
    /ip/route/check, the VPN interface, the VPN gateway's NAT-PMP answer, and the listen
    address. Nothing is left on the router. Exit status 0 only if every check passes.
    """
    try:
        settings = load_settings(values)
    except SettingError as exc:
        if as_json:
            _print_json(checks.invalid_settings(str(exc)), None)
        fail(str(exc))
        return
    results = []
    for result in checks.run_checks(settings):
        results.append(result)
        if not as_json:
            click.echo(result.line())
    ok = checks.all_passed(results)
    if as_json:
        _print_json(results, settings)
    else:
        failures = sum(1 for r in results if r.failed)
        click.echo("all checks passed" if ok else
                   f"{failures} check{'s' if failures > 1 else ''} failed")
    sys.exit(0 if ok else FAILED)


def _print_json(results: list[checks.CheckResult], settings: Settings | None) -> None:
    click.echo(json.dumps({
        "ok": checks.all_passed(results),
        "checks": [r.as_dict() for r in results],
        "settings": settings.redacted() if settings is not None else None,
    }, indent=2, ensure_ascii=False))


def _read_owned(router: RouterOsClient, settings: Settings) -> list[ListedRule]:
    """doublenat's rules, read from the router; a failure ends the command (status 1)."""
    try:
        return owned_rules(router.list_rules())
    except RouterError as exc:
        click.echo(f"doublenat: cannot read the rules from {settings.api_address}: {exc}",
                   err=True)
        sys.exit(FAILED)


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of rules.")
@settings_options
def list_rules(as_json: bool, **values: str | None) -> None:
    """List the dst-nat rules doublenat owns, read from the router itself."""
    settings = _settings(values)
    router = RouterOsClient.from_settings(settings, size=1)
    try:
        rules = _read_owned(router, settings)
    finally:
        router.close()
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in rules], indent=2))
        return
    if not rules:
        click.echo(f"no doublenat rules on {settings.api_address}")
        return
    for line in format_table(rules):
        click.echo(line)
    unreadable = sum(1 for r in rules if not r.readable)
    summary = f"{len(rules)} doublenat rule{'s' if len(rules) != 1 else ''} on " \
              f"{settings.api_address}"
    if unreadable:
        summary += f" ({unreadable} with a comment not understood)"
    click.echo(summary)


@click.command("cleanup")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@settings_options
def cleanup(dry_run: bool, **values: str | None) -> None:
    """Remove every rule doublenat made on the router (after an uninstall or a crash).

    Removes every dst-nat rule whose comment starts with `double-natpmp-`, and nothing else.
    A doublenat that is still running puts back the rules of mappings its clients keep
    renewing: stop it first, unless it is gone already.
    """
    settings = _settings(values)
    router = RouterOsClient.from_settings(settings, size=1)
    try:
        rules = _read_owned(router, settings)
        if not rules:
            click.echo(f"no doublenat rules on {settings.api_address}; nothing to remove")
            return
        click.echo("note: a running doublenat re-creates the rules of mappings its clients "
                   "still renew; stop it first (fine after an uninstall or a crash)", err=True)
        results = []
        for removal in remove_rules(router, rules, dry_run=dry_run):
            results.append(removal)
            click.echo(removal.line())
    finally:
        router.close()
    failures = sum(1 for r in results if not r.ok)
    if dry_run:
        click.echo(f"dry run: {len(rules)} rule{'s' if len(rules) != 1 else ''} would be "
                   "removed, nothing was changed")
    else:
        click.echo(f"removed {len(results) - failures} of {len(rules)} doublenat rules"
                   + (f"; {failures} failed" if failures else ""))
    sys.exit(FAILED if failures else 0)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the /status JSON as it came.")
@settings_options
def status(as_json: bool, **values: str | None) -> None:
    """Show a running doublenat: router, gateway, health and every live mapping.

    Asks the daemon's /status at METRICS_ADDR (which must be set, for the daemon and
    here); of the other settings none is needed. Exit status 1 if nothing answers there.
    """
    import time

    from doublenat.observe.show import StatusUnavailable, fetch_status, format_status
    from doublenat.settings import BY_ENV

    spec = BY_ENV["METRICS_ADDR"]
    try:
        address = spec.parse(spec.env, (values.get(spec.param) or "").strip() or None, {})
    except SettingError as exc:
        fail(str(exc), exc.variable)
    if address is None:
        fail("METRICS_ADDR: is not set; doublenat status asks the daemon's /status there "
             "(set it as the daemon has it, e.g. METRICS_ADDR=127.0.0.1:9815)", "METRICS_ADDR")
    try:
        document = fetch_status(address)
    except StatusUnavailable as exc:
        click.echo(f"doublenat: {exc}", err=True)
        sys.exit(FAILED)
    if as_json:
        click.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        for line in format_status(document, time.time()):
            click.echo(line)
