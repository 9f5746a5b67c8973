"""The packaging tests' background preparations (tests/packaging/prepare.py).

Tests declare what they need with `@pytest.mark.prepare(TASK)`: "deb", "chroot:R-A" or
"suite:R". Once pytest has collected the session, one background process starts on all
of them, so building the package, the chroots (arm64 under qemu takes minutes) and running
the suites under each release's python3 overlap the rest of the suite instead of adding to
it. A test then waits for its task with `prepared.wait(TASK)`. If nothing started (not
root, tools missing) the tests say why through tests/needs.py.

Which installs run: DEB_MATRIX=all (the default, and CI's: bookworm and trixie, amd64 and
arm64), or a comma-separated choice such as DEB_MATRIX=trixie-amd64,trixie-arm64.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.needs import need, need_program, need_root
from tests.packaging import chroots, prepare

ROOT = Path(__file__).resolve().parents[2]
# The native architecture first: the arm64 chroots take longer to build (qemu), and the
# tests run in this order.
ALL = [(release, arch) for arch in chroots.ARCHES for release in chroots.RELEASES]


def install_matrix() -> list[tuple[str, str]]:
    wanted = os.environ.get("DEB_MATRIX", "all")
    if wanted == "all":
        return ALL
    chosen = [tuple(name.strip().split("-", 1)) for name in wanted.split(",") if name.strip()]
    unknown = [c for c in chosen if c not in ALL]
    if unknown:
        raise pytest.UsageError(f"DEB_MATRIX={wanted!r}: use all, or RELEASE-ARCH names "
                                f"from {['-'.join(c) for c in ALL]}")
    return [c for c in ALL if c in chosen]


STASH = pytest.StashKey["Prepared"]()


@dataclass
class Prepared:
    state: Path
    runner: subprocess.Popen[bytes] | None
    tasks: frozenset[str]

    def wait(self, task: str, timeout: float = 3600) -> dict[str, Any]:
        need(task in self.tasks and self.runner is not None,
             f"{task} was not prepared in the background (needs root, debootstrap, "
             "qemu-user-static: `make deps`)")
        try:
            return prepare.wait(self.state, task, self.runner, timeout)
        except prepare.TaskFailed as exc:
            pytest.fail(str(exc), pytrace=False)

    def stop(self) -> None:
        if self.runner is None or self.runner.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.runner.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.runner.wait(grace)
                return
            except subprocess.TimeoutExpired:
                continue


def _tools_present() -> bool:
    return all(shutil.which(t) for t in ("debootstrap", "unshare", "nsenter", "make",
                                         "dpkg-buildpackage"))


def pytest_collection_finish(session: pytest.Session) -> None:
    tasks = {str(arg) for item in session.items for mark in item.iter_markers("prepare")
             for arg in mark.args}
    if not tasks or session.config.option.collectonly:
        return
    tmp = session.config._tmp_path_factory.mktemp("prepare")  # type: ignore[attr-defined]
    runner = None
    if os.geteuid() == 0 and _tools_present():
        args = []
        for task in sorted(tasks):
            kind, _, value = task.partition(":")
            args += [f"--{kind}"] + ([value] if value else [])
        log = open(prepare.log_path(tmp, "prepare"), "wb")  # noqa: SIM115 (child keeps it)
        runner = subprocess.Popen([sys.executable, "-m", "tests.packaging.prepare",
                                   "--state", str(tmp), *args], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        log.close()
    session.config.stash[STASH] = Prepared(tmp, runner, frozenset(tasks))


def pytest_unconfigure(config: pytest.Config) -> None:
    prepared = config.stash.get(STASH, None)
    if prepared is not None:
        prepared.stop()


@pytest.fixture(scope="session")
def prepared(request: pytest.FixtureRequest) -> Prepared:
    found = request.config.stash.get(STASH, None)
    need(found is not None, "the background preparation did not run")
    assert found is not None
    return found


@pytest.fixture(scope="session")
def debs(prepared: Prepared) -> dict[str, Any]:
    """{"old": path, "new": path, "versions": {...}} of the two packages `make deb` built."""
    need_root()
    need_program("dpkg-buildpackage", "dh_python3", "pybuild", "make")
    return prepared.wait("deb", timeout=900)
