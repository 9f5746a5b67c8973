"""Fast checks of the packaging files (no root, no build): what the .deb test would only
find out after a minute of building."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from packaging.requirements import Requirement

import doublenat
from doublenat.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
DEBIAN = PACKAGING / "debian"
ENV_FILE = PACKAGING / "etc" / "doublenat.env"
PROGRAM_FILE = PACKAGING / "supervisor" / "doublenat.conf"
WRAPPER = PACKAGING / "bin" / "doublenat-supervised"
CLEAN_ENV = {"PATH": "/usr/bin:/bin"}


def sourced(env_file: Path) -> dict[str, str]:
    """The variables a `set -a; . file` gives a clean /bin/sh."""
    script = 'set -a; . "$1"; env -0'
    out = subprocess.run(["/bin/sh", "-c", script, "sh", str(env_file)], env=CLEAN_ENV,
                         capture_output=True, check=True).stdout
    pairs = (item.split(b"=", 1) for item in out.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def test_env_file_documents_every_setting_and_sets_no_secret() -> None:
    text = ENV_FILE.read_text()
    for var in SETTINGS:
        assert re.search(rf"^#?{var.env}=", text, re.M), f"{var.env} missing from the env file"
    values = sourced(ENV_FILE)
    assert values.get("MIKROTIK_API_PASSWORD", "") == ""
    assert values.get("MIKROTIK_API_PASSWORD_FILE", "") == ""
    # Only the two required settings are uncommented, empty, for the operator to fill.
    set_here = {k for k in values if k in {v.env for v in SETTINGS}}
    assert set_here == {"VPN_GATEWAY", "MIKROTIK_API_ADDRESS"}
    assert values["VPN_GATEWAY"] == values["MIKROTIK_API_ADDRESS"] == ""


def test_program_file() -> None:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(" ;",))
    parser.read(PROGRAM_FILE)
    program = parser["program:doublenat"]
    assert program["command"] == "/usr/sbin/doublenat-supervised"
    assert "PASSWORD" not in PROGRAM_FILE.read_text().replace("API password", "")
    assert "environment" not in program
    assert program["user"] == "doublenat"
    assert program["stopsignal"] == "TERM"
    shutdown_default = float(next(v.default for v in SETTINGS if v.env == "SHUTDOWN_TIMEOUT"))
    # The cleanup is bounded by SHUTDOWN_TIMEOUT; leave room for the drain and the exit.
    assert int(program["stopwaitsecs"]) >= shutdown_default + 10
    assert program["stopasgroup"] == program["killasgroup"] == "true"
    assert program["redirect_stderr"] == "true"
    assert program["stdout_logfile"].startswith("/var/log/doublenat/")
    assert program["stdout_logfile_maxbytes"] not in ("", "0")
    assert int(program["stdout_logfile_backups"]) > 0
    assert program["autorestart"] == "true"


def test_wrapper_passes_quoted_secret_through_environment(tmp_path: Path) -> None:
    secret = "s3cret $HOME \"double\" 'single' ;# `x`"
    env_file = tmp_path / "doublenat.env"
    env_file.write_text(ENV_FILE.read_text() +
                        f"VPN_GATEWAY=10.2.0.1\nMIKROTIK_API_PASSWORD={shlex.quote(secret)}\n")
    fake = tmp_path / "doublenat"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$*"\nprintf "%s" "$MIKROTIK_API_PASSWORD"'
                    ' > "$(dirname "$0")/seen"\n')
    fake.chmod(0o755)
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(WRAPPER.read_text()
                       .replace("/etc/doublenat/doublenat.env", str(env_file))
                       .replace("/usr/bin/doublenat", str(fake)))
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper)], env=CLEAN_ENV, capture_output=True, text=True,
                         check=True)
    assert out.stdout == "serve\n"
    assert (tmp_path / "seen").read_text() == secret
    out = subprocess.run([str(wrapper), "--version"], env=CLEAN_ENV, capture_output=True,
                         text=True, check=True)
    assert out.stdout == "--version\n"


def test_wrapper_reports_missing_env_file_as_json(tmp_path: Path) -> None:
    env_file = tmp_path / "missing.env"
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(WRAPPER.read_text().replace("/etc/doublenat/doublenat.env",
                                                   str(env_file)))
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper)], env=CLEAN_ENV, capture_output=True, text=True)
    assert out.returncode == 2
    line = json.loads(out.stderr)
    assert line["level"] == "ERROR" and str(env_file) in line["message"]


def test_wrapper_reports_bad_env_file_syntax_as_json(tmp_path: Path) -> None:
    env_file = tmp_path / "doublenat.env"
    env_file.write_text("VPN_GATEWAY='10.2.0.1\n")
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(WRAPPER.read_text().replace("/etc/doublenat/doublenat.env",
                                                   str(env_file)))
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper)], env=CLEAN_ENV, capture_output=True, text=True)
    assert out.returncode == 2
    line = json.loads(out.stderr)
    assert set(line) == {"timestamp", "level", "logger", "message"}


def test_maintainer_scripts_are_valid_sh_with_debhelper_marker() -> None:
    for name in ("postinst", "prerm", "postrm"):
        script = DEBIAN / f"doublenat.{name}"
        assert "#DEBHELPER#" in script.read_text(), name
        subprocess.run(["/bin/sh", "-n", str(script)], check=True)
    subprocess.run(["/bin/sh", "-n", str(WRAPPER)], check=True)
    assert os.access(WRAPPER, os.X_OK)
    assert os.access(DEBIAN / "rules", os.X_OK)
    assert os.access(PACKAGING / "build-deb", os.X_OK)


def test_install_file_sources_exist() -> None:
    for line in (DEBIAN / "doublenat.install").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert (ROOT / line.split()[0]).is_file(), line


def test_changelog_version_is_the_python_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"doublenat \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1).replace("~", "") == doublenat.__version__, (
        "add a packaging/debian/changelog entry for the new version")
    if shutil.which("dpkg-parsechangelog"):
        out = subprocess.run(["dpkg-parsechangelog", "-l", str(DEBIAN / "changelog"),
                              "-S", "Version"], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == match.group(1)


def test_control_relations() -> None:
    control = (DEBIAN / "control").read_text()
    binary = control.split("\nPackage: doublenat\n", 1)[1]
    assert re.search(r"^Recommends: supervisor$", binary, re.M)
    depends = re.search(r"^Depends:(.*?)^\S", binary, re.M | re.S)
    assert depends, binary
    for relation in ("adduser", "python3 (>= 3.11)", "python3 (<< 3.12)"):
        assert relation in depends.group(1)


def test_requirements_pin_every_dependency_within_setup_cfg() -> None:
    pins: dict[str, str] = {}
    for line in (PACKAGING / "requirements.txt").read_text().splitlines():
        line = line.strip().rstrip("\\").strip()
        if not line or line.startswith(("#", "-", "--")):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[req.name.lower().replace("_", "-")] = spec.version
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for line in cfg["options"]["install_requires"].strip().splitlines():
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in packaging/requirements.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {req}"
    # gevent's own dependencies are pinned too (hash-checking mode needs all of them).
    assert {"greenlet", "zope.event", "zope.interface"} <= set(pins)
