"""The README is the operator's manual: keep it true to the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

from doublenat.cli import _register_extra_commands, cli
from doublenat.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def config_rows() -> dict[str, str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([A-Z_]+)` \| ([^|]+) \|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip().strip("`")
    return rows


def test_every_setting_is_documented_with_its_default() -> None:
    rows = config_rows()
    assert set(rows) == {var.env for var in SETTINGS}
    for var in SETTINGS:
        if var.default is not None:
            assert rows[var.env] == var.default, var.env


def test_every_make_target_in_the_readme_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z]+):", makefile, re.MULTILINE))
    mentioned = set(re.findall(r"^make ([a-z]+)", README, re.MULTILINE))
    assert mentioned and mentioned <= targets


def test_every_doublenat_command_in_the_readme_exists() -> None:
    _register_extra_commands()
    # in code: a shell prompt line, or inline code
    in_code = set(re.findall(r"(?:^\$ |`)doublenat ([a-z]+)", README, re.MULTILINE))
    assert in_code <= set(cli.commands)
    assert {"serve", "lab", "check", "list", "cleanup"} <= in_code


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
