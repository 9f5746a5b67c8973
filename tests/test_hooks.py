"""HOOK_COMMAND: real scripts run by the HookRunner, their environment, order, failures,
timeouts and shutdown, and the JSON records they leave in the log."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path

import gevent
import pytest

from doublenat import logs
from doublenat.engine.events import ChangeKind, MappingChange
from doublenat.hooks import HookRunner, check_hook_command, hook_environment
from doublenat.protocol.natpmp import Proto
from doublenat.settings import SettingError
from tests.logcapture import attached

SECRET = "hunter2-Router-Secret"
CLIENT = "192.168.88.20"


class JsonRecords(logging.Handler):
    """The hook runner's log records as the daemon writes them: JSON lines, parsed back."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logs.make_formatter("json"))
        self.records: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "doublenat.hooks":
            self.records.append(json.loads(self.format(record)))

    def events(self, name: str) -> list[dict[str, object]]:
        return [r for r in self.records if r.get("event") == name]


@pytest.fixture
def records() -> Iterator[JsonRecords]:
    with attached(JsonRecords()) as handler:
        yield handler


@pytest.fixture
def runners() -> Iterator[list[HookRunner]]:
    made: list[HookRunner] = []
    yield made
    for runner in made:
        runner.close(0)


MakeRunner = Callable[..., HookRunner]


@pytest.fixture
def make_runner(runners: list[HookRunner]) -> MakeRunner:
    def make(command: str, timeout: float = 10.0, **kwargs: object) -> HookRunner:
        runner = HookRunner(command, timeout, **kwargs)  # type: ignore[arg-type]
        runners.append(runner)
        return runner

    return make


def script(tmp_path: Path, body: str, name: str = "hook", shebang: str = "/bin/sh") -> str:
    path = tmp_path / name
    path.write_text(f"#!{shebang}\n{body}")
    path.chmod(0o755)
    return str(path)


def change(
    kind: ChangeKind | str = ChangeKind.CREATED,
    external: int = 40000,
    *,
    client: str = CLIENT,
    internal: int = 6881,
    proto: Proto = Proto.TCP,
    previous: int | None = None,
    static: bool = False,
    public: str | None = "198.51.100.7",
    lifetime: int = 60,
) -> MappingChange:
    return MappingChange(
        kind=ChangeKind(kind),
        proto=proto,
        client=IPv4Address(client),
        internal_port=internal,
        external_port=external,
        lifetime=lifetime,
        static=static,
        previous_external_port=previous,
        public_address=None if public is None else IPv4Address(public),
        reason="test",
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with gevent.Timeout(timeout, AssertionError("condition not reached")):
        while not predicate():
            gevent.sleep(0.005)


def idle(runner: HookRunner) -> bool:
    return runner.queued == 0 and runner.running == 0


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may linger where nobody reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# A hook that logs its event to `trail`, and waits for the file `gate` first when its
# event is the one named by `hold` (so a test decides when a hook may finish).
GATED = """\
echo "start $DOUBLENAT_CLIENT $DOUBLENAT_EVENT $DOUBLENAT_EXTERNAL_PORT" >> {trail}
if [ "$DOUBLENAT_EVENT" = "{hold}" ]; then
    while [ ! -e {gate} ]; do sleep 0.005; done
fi
echo "end $DOUBLENAT_CLIENT $DOUBLENAT_EVENT $DOUBLENAT_EXTERNAL_PORT" >> {trail}
"""


def gated(tmp_path: Path, hold: str = "created") -> tuple[str, Path, Path]:
    trail, gate = tmp_path / "trail", tmp_path / "gate"
    trail.touch()
    return script(tmp_path, GATED.format(trail=trail, gate=gate, hold=hold)), trail, gate


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ------------------------------------------------------------------ environment


def test_environment_holds_exactly_the_listed_variables_and_no_setting(
    tmp_path: Path, make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIKROTIK_API_PASSWORD", SECRET)
    monkeypatch.setenv("VPN_GATEWAY", "10.2.0.1")
    monkeypatch.setenv("HOOK_TIMEOUT", "10")
    dump = tmp_path / "env"
    hook = script(tmp_path, f"import json, os\n"
                            f"with open({str(dump)!r} + '.' + os.environ['DOUBLENAT_EVENT'],"
                            f" 'w') as f:\n    json.dump(dict(os.environ), f)\n",
                  shebang=sys.executable)
    runner = make_runner(hook, path="/usr/bin:/bin", lang="C.UTF-8")
    runner.submit(change(ChangeKind.CHANGED, 41000, previous=40000, static=True))
    runner.submit(change(ChangeKind.DELETED, 41000, public=None, lifetime=0,
                         proto=Proto.UDP))
    wait_until(lambda: idle(runner))
    changed = json.loads((tmp_path / "env.changed").read_text())
    assert changed == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "DOUBLENAT_EVENT": "changed",
        "DOUBLENAT_PROTOCOL": "tcp",
        "DOUBLENAT_CLIENT": CLIENT,
        "DOUBLENAT_INTERNAL_PORT": "6881",
        "DOUBLENAT_EXTERNAL_PORT": "41000",
        "DOUBLENAT_PREVIOUS_EXTERNAL_PORT": "40000",
        "DOUBLENAT_PUBLIC_ADDRESS": "198.51.100.7",
        "DOUBLENAT_LIFETIME": "60",
        "DOUBLENAT_STATIC": "true",
    }
    deleted = json.loads((tmp_path / "env.deleted").read_text())
    assert "DOUBLENAT_PREVIOUS_EXTERNAL_PORT" not in deleted
    assert (deleted["DOUBLENAT_PROTOCOL"], deleted["DOUBLENAT_PUBLIC_ADDRESS"],
            deleted["DOUBLENAT_LIFETIME"], deleted["DOUBLENAT_STATIC"]) == ("udp", "", "0",
                                                                            "false")
    everything = (tmp_path / "env.changed").read_text() + (tmp_path / "env.deleted").read_text()
    assert SECRET not in everything and "VPN_GATEWAY" not in everything


def test_path_and_lang_default_to_the_daemons_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/opt/x/bin:/usr/bin:/bin")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    runner = HookRunner("/bin/true")
    assert (runner.path, runner.lang) == ("/opt/x/bin:/usr/bin:/bin", "de_DE.UTF-8")
    env = hook_environment(change(), runner.path, runner.lang)
    assert env["PATH"] == "/opt/x/bin:/usr/bin:/bin" and env["LANG"] == "de_DE.UTF-8"


# ----------------------------------------------------------------------- order


def test_events_of_one_mapping_run_in_order_even_when_the_first_hook_is_slow(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    hook, trail, gate = gated(tmp_path, hold="created")
    runner = make_runner(hook)
    runner.submit(change(ChangeKind.CREATED, 40000))
    runner.submit(change(ChangeKind.CHANGED, 40001, previous=40000))
    runner.submit(change(ChangeKind.DELETED, 40001, lifetime=0))
    wait_until(lambda: lines(trail) == [f"start {CLIENT} created 40000"])
    # The first hook is held; the mapping's later events wait behind it.
    gevent.sleep(0.05)
    assert lines(trail) == [f"start {CLIENT} created 40000"]
    assert (runner.running, runner.queued) == (1, 2)
    gate.touch()
    wait_until(lambda: idle(runner))
    assert lines(trail) == [
        f"start {CLIENT} created 40000", f"end {CLIENT} created 40000",
        f"start {CLIENT} changed 40001", f"end {CLIENT} changed 40001",
        f"start {CLIENT} deleted 40001", f"end {CLIENT} deleted 40001",
    ]
    assert [r["change"] for r in records.events("hook.finished")] == [
        "created", "changed", "deleted"]
    assert (runner.started, runner.succeeded, runner.failed) == (3, 3, 0)


def test_different_mappings_run_in_parallel(
    tmp_path: Path, make_runner: MakeRunner
) -> None:
    hook, trail, gate = gated(tmp_path, hold="created")
    runner = make_runner(hook)
    runner.submit(change(ChangeKind.CREATED, 40000, client="192.168.88.20"))
    runner.submit(change(ChangeKind.CHANGED, 40100, client="192.168.88.21", previous=40099))
    runner.submit(change(ChangeKind.CHANGED, 40200, client="192.168.88.22", previous=40199))
    # Both other mappings' hooks finish while the first is still held.
    wait_until(lambda: runner.succeeded == 2)
    assert {"end 192.168.88.21 changed 40100", "end 192.168.88.22 changed 40200"} <= set(
        lines(trail))
    assert "end 192.168.88.20 created 40000" not in lines(trail)
    assert runner.running == 1
    gate.touch()
    wait_until(lambda: idle(runner))
    assert runner.succeeded == 3


def test_at_most_max_running_hooks_at_once(tmp_path: Path, make_runner: MakeRunner) -> None:
    hook, trail, gate = gated(tmp_path, hold="created")
    runner = make_runner(hook, max_running=2)
    for n in range(5):
        runner.submit(change(ChangeKind.CREATED, 40000 + n, client=f"192.168.88.{n + 1}"))
    wait_until(lambda: len(lines(trail)) == 2)
    gevent.sleep(0.05)
    assert len(lines(trail)) == 2 and (runner.running, runner.queued) == (2, 3)
    gate.touch()
    wait_until(lambda: idle(runner))
    assert runner.succeeded == 5


# -------------------------------------------------------------------- failures


def test_a_failing_hook_is_logged_with_its_status_and_output(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    hook = script(tmp_path, 'echo "no listener for $DOUBLENAT_EXTERNAL_PORT"\n'
                            'echo "details on stderr" >&2\nexit 3\n')
    runner = make_runner(hook)
    runner.submit(change(ChangeKind.CREATED, 40123))
    wait_until(lambda: idle(runner))
    [started] = records.events("hook.started")
    [failed] = records.events("hook.failed")
    assert started["level"] == "INFO" and isinstance(started["pid"], int)
    assert failed["level"] == "WARNING"
    assert {k: failed[k] for k in ("client", "protocol", "internal_port", "external_port",
                                   "change", "exit_status", "output", "output_truncated",
                                   "command", "reason")} == {
        "client": CLIENT, "protocol": "tcp", "internal_port": 6881, "external_port": 40123,
        "change": "created", "exit_status": 3,
        "output": "no listener for 40123\ndetails on stderr\n", "output_truncated": False,
        "command": hook, "reason": "exit status 3",
    }
    assert isinstance(failed["seconds"], float)
    assert not records.events("hook.finished")
    assert (runner.started, runner.failed, runner.succeeded, runner.killed) == (1, 1, 0, 0)


def test_a_hanging_hook_and_its_child_are_killed_after_the_timeout(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    pids = tmp_path / "pids"
    hook = script(tmp_path, f"sleep 600 &\necho $! >> {pids}\necho $$ >> {pids}\n"
                            "echo about to hang\nsleep 600\n")
    runner = make_runner(hook, timeout=0.3)
    runner.submit(change())
    wait_until(lambda: pids.exists() and len(lines(pids)) == 2)
    child, parent = (int(pid) for pid in lines(pids))
    wait_until(lambda: idle(runner))
    [killed] = records.events("hook.killed")
    assert killed["timeout"] == 0.3 and killed["exit_status"] == -9
    assert killed["output"] == "about to hang\n"
    assert "0.3 s" in str(killed["reason"])
    assert (runner.killed, runner.failed, runner.succeeded) == (1, 1, 0)
    wait_until(lambda: not alive(parent) and not alive(child))


def test_a_hook_that_vanished_after_the_startup_check_fails_to_start(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    hook = script(tmp_path, "exit 0\n")
    runner = make_runner(hook)
    os.unlink(hook)
    runner.submit(change())
    wait_until(lambda: idle(runner))
    [failed] = records.events("hook.failed")
    assert failed["exit_status"] is None and "FileNotFoundError" in str(failed["reason"])
    assert (runner.started, runner.failed) == (0, 1)


def test_output_is_bounded_and_a_chatty_hook_is_never_blocked(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    # 200 KiB, far beyond a pipe's buffer: the runner must keep reading to let it finish.
    hook = script(tmp_path, "head -c 204800 /dev/zero | tr '\\0' 'x'\n")
    runner = make_runner(hook)
    runner.submit(change())
    wait_until(lambda: idle(runner))
    [finished] = records.events("hook.finished")
    assert finished["output"] == "x" * 4096 and finished["output_truncated"] is True
    assert finished["exit_status"] == 0


# ------------------------------------------------------------ startup check


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: "", "is empty"),
        (lambda d: str(d / "missing"), "is not a file"),
        (lambda d: str(d), "is not a file"),
        (lambda d: "hooks/relative", "must be an absolute path"),
        (lambda d: "true", "must be an absolute path"),  # no PATH lookup
    ],
)
def test_bad_hook_commands_are_settings_errors_naming_hook_command(
    tmp_path: Path, make: Callable[[Path], str], problem: str
) -> None:
    with pytest.raises(SettingError) as caught:
        check_hook_command(make(tmp_path))
    assert caught.value.variable == "HOOK_COMMAND"
    assert str(caught.value).startswith("HOOK_COMMAND: ") and problem in str(caught.value)


def test_a_non_executable_hook_is_refused(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(stat.S_IRUSR | stat.S_IWUSR)
    if os.access(hook, os.X_OK):  # root may execute anything with an x bit only
        pytest.fail("test file unexpectedly executable")
    with pytest.raises(SettingError, match=r"HOOK_COMMAND: .* is not executable"):
        check_hook_command(str(hook))
    with pytest.raises(SettingError, match="HOOK_COMMAND"):
        HookRunner(hook)


def test_a_bad_timeout_is_refused() -> None:
    with pytest.raises(SettingError, match="HOOK_TIMEOUT"):
        HookRunner("/bin/true", 0)


def test_a_path_with_spaces_is_one_program_without_arguments(
    tmp_path: Path, make_runner: MakeRunner
) -> None:
    out = tmp_path / "args"
    where = tmp_path / "my hooks"
    where.mkdir()
    hook = script(where, f'printf "%s|" "$0" "$#" > {out}\n', name="port hook")
    assert check_hook_command(hook) == Path(hook)
    runner = make_runner(Path(hook))
    runner.submit(change())
    wait_until(lambda: idle(runner))
    assert out.read_text() == f"{hook}|0|"


# ------------------------------------------------------- never blocking, bounded


def test_submit_never_yields_even_while_hooks_run_and_past_the_queue_bound(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    hook, _, gate = gated(tmp_path, hold="created")
    runner = make_runner(hook, max_queued=50)
    runner.submit(change(ChangeKind.CREATED, 40000))
    wait_until(lambda: runner.running == 1)
    others_ran: list[int] = []
    gevent.spawn(others_ran.append, 1)  # runs only if submit() gives up the CPU
    for n in range(2000):
        runner.submit(change(ChangeKind.CREATED, 41000 + n, client=f"10.0.{n // 250}.{n % 250}"))
    assert not others_ran  # submit() never switched greenlets, so it cannot have waited
    assert (runner.queued, runner.dropped) == (50, 1950)
    # One warning for the burst, the rest at DEBUG: a flood does not flood the log.
    warnings = [r for r in records.events("hook.dropped") if r["level"] == "WARNING"]
    assert len(warnings) == 1 and warnings[0]["reason"] == "queue full"
    gate.touch()
    wait_until(lambda: idle(runner))
    assert runner.succeeded == 51


def test_close_lets_quick_hooks_finish(tmp_path: Path, make_runner: MakeRunner) -> None:
    hook = script(tmp_path, "exit 0\n")
    runner = make_runner(hook)
    for n in range(3):
        runner.submit(change(ChangeKind.DELETED, 40000 + n, internal=6881 + n, lifetime=0))
    with gevent.Timeout(10):
        runner.close(10)
    assert (runner.succeeded, runner.dropped) == (3, 0)
    runner.submit(change())  # after close: dropped, not run
    assert runner.dropped == 1 and runner.started == 3


def test_close_is_bounded_and_kills_what_still_runs(
    tmp_path: Path, make_runner: MakeRunner, records: JsonRecords
) -> None:
    pids = tmp_path / "pids"
    hook = script(tmp_path, f"echo $$ >> {pids}\nsleep 600\n")
    runner = make_runner(hook, timeout=600)
    runner.submit(change(ChangeKind.CREATED, 40000))
    runner.submit(change(ChangeKind.CHANGED, 40001, previous=40000))
    runner.submit(change(ChangeKind.DELETED, 40001, lifetime=0))
    wait_until(lambda: pids.exists() and lines(pids))
    with gevent.Timeout(10, AssertionError("close() did not return")):
        runner.close(0.2)
    [killed] = records.events("hook.killed")
    assert killed["reason"] == "shutdown" and killed["change"] == "created"
    assert (runner.killed, runner.failed, runner.dropped, runner.started) == (1, 1, 2, 1)
    assert {r["change"] for r in records.events("hook.dropped")} == {"changed", "deleted"}
    wait_until(lambda: not alive(int(lines(pids)[0])))
