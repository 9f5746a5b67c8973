"""The packaging tests' long preparations, run in the background while the rest of the suite
runs (tests/packaging/conftest.py starts this once pytest knows which tests it will run):

    deb            `make deb` twice: the tree's version, and the same tree as a newer version
                   (for the upgrade); into STATE/deb/old and STATE/deb/new
    olddeb         the first package (dh-virtualenv), built from its commit, for the test
                   of the upgrade from it
    chroot:R-A     the cached chroot of release R, architecture A (tests.packaging.chroots)
    suite:R        the unit and integration suites under release R's python3, in an amd64
                   instance of its chroot where the package was installed with apt

    python -m tests.packaging.prepare --state STATE [--deb] [--chroot R-A ...] [--suite R ...]

Each task writes STATE/<task>.log while it runs and STATE/<task>.json when it ends
({"ok": bool, "seconds": float, "error": str, ...}); `wait()` reads them for the tests. The
work runs in two lanes, so that qemu's single busy core does not hold up the rest: the
foreign-architecture chroots in one, everything else in the other (the deb first, then the
amd64 chroots, trixie first since the end-to-end bed needs it early, each release's suite
starting as soon as its chroot and the deb exist, then the first package). Builds run
under `nice`: they share the machine with tests that wait on timers.

Most of the suite waits on sockets and timers (about 30 s of CPU in 2.5 min), so running it
beside the host's suite costs little; each runs in its own network namespace, so their
ports never meet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.packaging import chroots
from tests.packaging.chroots import Instance, Spec

ROOT = Path(__file__).resolve().parents[2]
# The suites that run under each release's python3: everything but the end-to-end bed
# (host namespaces; tests/e2e runs the releases' natpmpc and miniupnpd itself), the
# packaging tests (they build and install the package), the README's `make lab` test
# (it builds a virtualenv from PyPI, which is what this run avoids), and the benchmark's
# tools (host-only: they compile bench/natpmp_load.c, and the chroots hold no compiler).
SUITE_ARGS = ("tests", "--ignore=tests/e2e", "--ignore=tests/packaging",
              "--ignore=tests/test_bench_tools.py",
              "--deselect=tests/integration/test_lab_command.py")
SUITE_TIMEOUT = 1800
DEB_TIMEOUT = 600
# A commit of main whose package is the first one (dh-virtualenv), which users run today.
VENV_PACKAGE_COMMIT = "ff38fd99b3183152a65d3f8eaf774c1fdcd50cff"


class TaskFailed(RuntimeError):
    pass


# ---------------------------------------------------------------------------- tests' side


def status_path(state: Path, task: str) -> Path:
    return state / f"{task.replace(':', '-')}.json"


def log_path(state: Path, task: str) -> Path:
    return state / f"{task.replace(':', '-')}.log"


def wait(state: Path, task: str, runner: subprocess.Popen[bytes] | None,
         timeout: float = 3600) -> dict[str, Any]:
    """The status of `task` once it has ended. Raises TaskFailed if it failed, if the
    background process died without finishing it, or after `timeout` seconds."""
    path = status_path(state, task)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if runner is not None and runner.poll() is not None and not path.exists():
            raise TaskFailed(f"the background preparation exited ({runner.returncode}) "
                             f"before {task} ended\n{tail(log_path(state, 'prepare'))}")
        if time.monotonic() > deadline:
            raise TaskFailed(f"{task} did not end within {timeout} s")
        time.sleep(0.5)
    status = dict(json.loads(path.read_text()))
    if not status["ok"]:
        raise TaskFailed(f"{task} failed: {status.get('error')}\n"
                         f"{tail(log_path(state, task), 60)}")
    return status


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({path}: {exc.strerror})"
    return f"--- last lines of {path}\n" + "\n".join(text[-lines:])


# ---------------------------------------------------------------------------- tasks


def build_debs(state: Path, log: Any) -> dict[str, Any]:
    """Both packages at once: the tree's version, and a newer one for the upgrade."""
    import doublenat

    old_version = doublenat.__version__
    new_version = old_version + (".debtest1" if "+" in old_version else "+debtest1")
    builds = {}
    for name, version in (("old", None), ("new", new_version)):
        out_dir, build_dir = state / "deb" / name, state / "deb" / f"{name}-build"
        cmd = ["nice", "-n", "10", "make", "-C", str(ROOT), "--no-print-directory", "deb",
               f"DEB_OUT={out_dir}", f"DEB_BUILDDIR={build_dir}"]
        if version:
            cmd.append(f"DEB_VERSION={version}")
        out = open(state / f"deb-{name}.log", "wb")  # noqa: SIM115 (closed below)
        builds[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), out)
    result: dict[str, Any] = {"versions": {"old": old_version, "new": new_version}}
    for name, (process, out) in builds.items():
        code = process.wait(timeout=DEB_TIMEOUT)
        out.close()
        log.write((state / f"deb-{name}.log").read_text(errors="replace"))
        if code != 0:
            raise TaskFailed(f"make deb ({name}) exited {code}")
        (deb,) = (state / "deb" / name).glob("doublenat_*.deb")
        result[name] = str(deb)
    return result


def build_old_deb(state: Path, log: Any) -> dict[str, Any]:
    """The first package, with its own build script, from a clean export of its commit."""
    source = state / "olddeb-src"
    source.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", VENV_PACKAGE_COMMIT],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise TaskFailed(f"git archive {VENV_PACKAGE_COMMIT} failed (a shallow clone?): "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    out = state / "olddeb"
    done = subprocess.run(["nice", "-n", "10", str(source / "packaging" / "build-deb"),
                           "--out", str(out),
                           "--builddir", str(state / "olddeb-build")], stdout=log,
                          stderr=subprocess.STDOUT, timeout=DEB_TIMEOUT, check=False)
    if done.returncode != 0:
        raise TaskFailed(f"the first package's build-deb exited {done.returncode}")
    (deb,) = out.glob("doublenat_*.deb")
    return {"deb": str(deb)}


def tree_files() -> list[str]:
    """The files of the checkout that a build or a copy takes: known to git (tracked, or
    untracked and not ignored) and present."""
    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached",
                              "--others", "--exclude-standard"], capture_output=True,
                             check=True).stdout.decode()
    return sorted({f for f in listing.split("\0") if f and (ROOT / f).is_file()})


def run_suite(state: Path, release: str, deb: Path, log: Any) -> dict[str, Any]:
    """The suites under the release's python3 and Debian's libraries, which the package's
    dependencies pull in; routeros-api is the package's private copy."""
    spec = Spec(release, chroots.host_arch())
    workdir = state / f"suite-{release}"
    with Instance(spec, workdir, own_network=True) as instance:
        instance.copy_in(deb, f"/root/{deb.name}")
        started = time.monotonic()
        installed = instance.run(["apt-get", "install", "-y", "-q", f"/root/{deb.name}"],
                                 env={"DEBIAN_FRONTEND": "noninteractive"}, check=False)
        log.write(installed.stdout + installed.stderr)
        if installed.returncode != 0:
            raise TaskFailed(f"apt-get install ./{deb.name} exited {installed.returncode}")
        install_seconds = round(time.monotonic() - started, 1)
        for name in tree_files():
            instance.copy_in(ROOT / name, f"/src/{name}")
        versions = instance.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
                                 "python3", "python3-gevent", "python3-click",
                                 "python3-pythonjsonlogger", "python3-prometheus-client",
                                 "python3-pytest", "python3-hypothesis"]).stdout
        log.write(versions)
        argv = ["python3", "-m", "pytest", "-p", "no:cacheprovider", "-q", "-r", "fEs",
                *SUITE_ARGS]
        script = f"cd /src && exec {shlex.join(argv)} > /root/suite.log 2>&1"
        # CI=true: a test that cannot run here fails instead of skipping.
        env = {"CI": "true", "PYTHONPATH": "/usr/share/doublenat",
               "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.monotonic()
        done = instance.run(["sh", "-c", script], env=env, timeout=SUITE_TIMEOUT, check=False)
        seconds = round(time.monotonic() - started, 1)
        output = instance.path("/root/suite.log").read_text(errors="replace")
        log.write(output)
        summary = output.strip().splitlines()[-1] if output.strip() else ""
        if done.returncode != 0:
            raise TaskFailed(f"pytest under {release}'s python3 exited {done.returncode}: "
                             f"{summary}")
        return {"summary": summary, "suite_seconds": seconds,
                "install_seconds": install_seconds,
                "versions": dict(line.split(" ", 1) for line in versions.splitlines())}


# ---------------------------------------------------------------------------- runner


class Runner:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.done: dict[str, threading.Event] = {}
        self.results: dict[str, dict[str, Any]] = {}

    def event(self, task: str) -> threading.Event:
        return self.done.setdefault(task, threading.Event())

    def run(self, task: str, body: Callable[[Any], dict[str, Any] | None]) -> bool:
        started = time.monotonic()
        status: dict[str, Any] = {"task": task, "ok": False}
        with open(log_path(self.state, task), "w") as log:
            try:
                status.update(body(log) or {})
                status["ok"] = True
            except Exception as exc:  # reported to the test that waits for it
                status["error"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
                log.write("\n" + traceback.format_exc())
        status["seconds"] = round(time.monotonic() - started, 1)
        self.results[task] = status
        partial = status_path(self.state, task).with_suffix(".part")
        partial.write_text(json.dumps(status, indent=1) + "\n")
        partial.rename(status_path(self.state, task))
        print(f"prepare: {task} {'done' if status['ok'] else 'FAILED'} in "
              f"{status['seconds']} s", flush=True)
        self.event(task).set()
        return bool(status["ok"])

    def ok(self, task: str) -> bool:
        self.event(task).wait()
        return bool(self.results[task]["ok"])

    def chroot(self, name: str) -> None:
        spec = Spec.parse(name)

        def body(log: Any) -> dict[str, Any]:
            chroots.ensure(spec, log)
            meta = chroots.metadata(spec) or {}
            return {"path": str(spec.path), "built_seconds": meta.get("build_seconds"),
                    "versions": meta.get("versions", {})}

        self.run(f"chroot:{name}", body)

    def suite(self, release: str) -> None:
        def body(log: Any) -> dict[str, Any]:
            if not self.ok("deb"):
                raise TaskFailed("the package did not build")
            native = f"{release}-{chroots.host_arch()}"
            if not self.ok(f"chroot:{native}"):
                raise TaskFailed(f"the {native} chroot was not built")
            deb = Path(self.results["deb"]["old"])
            return run_suite(self.state, release, deb, log)

        self.run(f"suite:{release}", body)


def plan(chroot_names: Sequence[str], suites: Sequence[str]) -> tuple[list[str], list[str]]:
    """(main lane, foreign lane) of chroot names, in build order."""
    wanted = set(chroot_names) | {f"{r}-{chroots.host_arch()}" for r in suites}
    native = [n for n in wanted if Spec.parse(n).arch == chroots.host_arch()]
    foreign = [n for n in wanted if n not in native]
    # Native: trixie first, the end-to-end bed early in the session waits for it. Foreign:
    # in the order of the install tests that wait for them.
    native.sort(key=lambda n: Spec.parse(n).release != "trixie")
    foreign.sort(key=lambda n: chroots.RELEASES.index(Spec.parse(n).release))
    return native, foreign


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.packaging.prepare")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--deb", action="store_true")
    parser.add_argument("--olddeb", action="store_true")
    parser.add_argument("--chroot", action="append", default=[], metavar="RELEASE-ARCH")
    parser.add_argument("--suite", action="append", default=[], metavar="RELEASE")
    args = parser.parse_args(argv)
    args.state.mkdir(parents=True, exist_ok=True)
    # Ended with the group by the test session (SIGTERM): let `finally` clauses run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    runner = Runner(args.state)
    native, foreign = plan(args.chroot, args.suite)
    deb = args.deb or bool(args.suite)

    def main_lane() -> None:
        if deb:
            runner.run("deb", lambda log: build_debs(args.state, log))
        suite_threads = []
        for name in native:
            runner.chroot(name)
            release = Spec.parse(name).release
            if release in args.suite:
                thread = threading.Thread(target=runner.suite, args=(release,), daemon=True)
                thread.start()
                suite_threads.append(thread)
        # Its test comes late in the session.
        if args.olddeb:
            runner.run("olddeb", lambda log: build_old_deb(args.state, log))
        for thread in suite_threads:
            thread.join()

    def foreign_lane() -> None:
        for name in foreign:
            runner.chroot(name)

    lanes = [threading.Thread(target=lane, daemon=True) for lane in (main_lane, foreign_lane)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()
    failed = [task for task, status in runner.results.items() if not status["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
