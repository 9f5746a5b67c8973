"""click's CliRunner with stderr kept apart from stdout, on every click doublenat supports.

click 8.2 always captures the two apart; 8.1 (Debian's: 8.1.3 in bookworm, 8.1.8 in trixie)
mixes them unless told not to, with an argument 8.2 removed.
"""

from __future__ import annotations

from click.testing import CliRunner


def cli_runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:  # click 8.2 and later
        return CliRunner()
