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
import sys
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
    for path in (DEBIAN / "rules", PACKAGING / "build-deb", PACKAGING / "fetch-sdist",
                 PACKAGING / "bin" / "doublenat"):
        assert os.access(path, os.X_OK), path


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


# setup.cfg's requirements and the Debian packages that provide them; None: carried as a
# private copy (packaging/vendor.txt), because Debian does not ship it.
DEBIAN_NAMES = {
    "gevent": "python3-gevent",
    "click": "python3-click",
    "python-json-logger": "python3-pythonjsonlogger",
    "prometheus-client": "python3-prometheus-client",
    "routeros-api": None,
}


def install_requires() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return [Requirement(line) for line in cfg["options"]["install_requires"].strip().splitlines()]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def binary_depends() -> dict[str, str]:
    """Depends of the binary package: {name: relation} ("" when unversioned)."""
    control = (DEBIAN / "control").read_text()
    binary = control.split("\nPackage: doublenat\n", 1)[1]
    depends = re.search(r"^Depends:(.*?)^\S", binary, re.M | re.S)
    assert depends, binary
    relations = {}
    for item in depends.group(1).replace("\n", " ").split(","):
        name, _, version = item.strip().partition(" ")
        if name:
            relations[name] = version.strip("()")
    return relations


def test_control_relations() -> None:
    control = (DEBIAN / "control").read_text()
    binary = control.split("\nPackage: doublenat\n", 1)[1]
    assert re.search(r"^Architecture: all$", binary, re.M)
    assert re.search(r"^Recommends: supervisor$", binary, re.M)
    depends = binary_depends()
    assert {"${python3:Depends}", "${misc:Depends}", "adduser"} <= set(depends)
    # Nothing tied to one python3 minor version: the same file serves 3.11 and 3.13.
    assert not [d for d in depends if d.startswith("python3.")]
    assert not [v for v in depends.values() if "<<" in v]
    assert re.search(r"^X-Python3-Version: >= 3\.11$", control, re.M)


def test_every_requirement_is_a_debian_dependency_or_a_private_copy() -> None:
    depends = binary_depends()
    vendored = vendor_pins()
    for req in install_requires():
        name = canonical(req.name)
        assert name in DEBIAN_NAMES, f"{name}: which Debian package provides it?"
        debian = DEBIAN_NAMES[name]
        if debian is None:
            assert name in vendored, f"{name} is neither a Debian dependency nor vendored"
            assert req.specifier.contains(vendored[name][0]), (name, vendored[name], req)
            continue
        # The same minimum as setup.cfg, so apt refuses what the code was never run on.
        (minimum,) = [s.version for s in req.specifier if s.operator == ">="]
        assert depends.get(debian) == f">= {minimum}", (debian, depends.get(debian), req)


def vendor_pins() -> dict[str, tuple[str, str]]:
    pins = {}
    for line in (PACKAGING / "vendor.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            match = re.match(r"^(\S+)==(\S+) --hash=sha256:([0-9a-f]{64})$", line)
            assert match, line
            pins[canonical(match.group(1))] = (match.group(2), match.group(3))
    return pins


def test_copyright_names_the_private_copy_and_its_licence() -> None:
    copyright_text = (DEBIAN / "copyright").read_text()
    for name, (version, sha) in vendor_pins().items():
        assert name in copyright_text and f"release {version}," in copyright_text
        assert sha in copyright_text, f"debian/copyright does not name {name}'s archive"
        assert f"Files: vendor/{name}/*" in copyright_text
    assert "Social WiFi" in copyright_text and "License: MIT" in copyright_text


def test_launcher_runs_the_cli_from_its_private_directory(tmp_path: Path) -> None:
    """packaging/bin/doublenat, with its directory pointed at this tree."""
    launcher = tmp_path / "doublenat"
    text = (PACKAGING / "bin" / "doublenat").read_text()
    assert 'sys.path.insert(0, "/usr/share/doublenat")' in text
    launcher.write_text(text.replace("/usr/share/doublenat", str(ROOT)))
    out = subprocess.run([sys.executable, str(launcher), "--version"], capture_output=True,
                         text=True, check=True, env={**CLEAN_ENV, "HOME": str(tmp_path)},
                         cwd=tmp_path)
    assert out.stdout.strip().endswith(doublenat.__version__), out.stdout
