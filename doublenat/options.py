"""The settings as click options, shared by `serve` and the operator tools.

Every option comes from the declarations in `doublenat.settings`; nothing here repeats a
variable, a default or a help text.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

from doublenat.settings import SETTINGS, Settings

USAGE_ERROR = 2


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every setting as an option that also reads its environment variable."""
    for spec in reversed(SETTINGS):
        help_text = spec.help + (f"  [default: {spec.default}]" if spec.default else "")
        func = click.option(
            spec.option,
            spec.param,
            envvar=spec.env,
            show_envvar=True,
            metavar=spec.metavar,
            help=help_text,
        )(func)
    return func


def load_settings(values: dict[str, str | None]) -> Settings:
    """Settings from the options' values (keyed by parameter name); may raise SettingError."""
    return Settings.from_raw({spec.env: values.get(spec.param) for spec in SETTINGS})


def fail(message: str, variable: str | None = None, as_json: bool = False) -> NoReturn:
    """One line naming the problem, exit 2. As a JSON record when it goes to a log file,
    so a log shipper never meets a plain line."""
    text = f"doublenat: error: {message}"
    if as_json:
        text = json.dumps({"timestamp": datetime.now(UTC).isoformat(), "level": "ERROR",
                           "logger": "doublenat", "message": text,
                           "event": "settings.invalid", "variable": variable})
    click.echo(text, err=True)
    sys.exit(USAGE_ERROR)
