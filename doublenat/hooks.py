"""HOOK_COMMAND: an operator's program run once per mapping event (SPEC §9).

The engine emits a `MappingChange` for every created, changed and deleted mapping;
`HookRunner.submit` queues it and returns at once, and worker greenlets run the hook.

Design choices:

- **No shell.** HOOK_COMMAND is the absolute path of one executable file, run with no
  arguments, no shell and no PATH lookup (doublenat.settings.parse_executable, the rule
  the settings check at startup; `check_hook_command` applies the same). A hook that needs
  arguments or a configuration file of its own is a two-line wrapper script.
- **Environment.** Only `PATH`, `LANG` (the daemon's own, or defaults) and the
  `DOUBLENAT_*` variables of the event: `DOUBLENAT_EVENT` (created/changed/deleted),
  `DOUBLENAT_PROTOCOL` (tcp/udp), `DOUBLENAT_CLIENT`, `DOUBLENAT_INTERNAL_PORT`,
  `DOUBLENAT_EXTERNAL_PORT`, `DOUBLENAT_PUBLIC_ADDRESS` (empty when not known yet),
  `DOUBLENAT_LIFETIME`, `DOUBLENAT_STATIC` (true/false), and
  `DOUBLENAT_PREVIOUS_EXTERNAL_PORT` for `changed` only. Never a setting, never the
  router password. stdin is /dev/null, the working directory `/`.
- **Order per mapping.** One queue per mapping (protocol, client, internal port): the next
  event of a mapping starts only after the hook for its previous event has ended. Different
  mappings run in parallel, at most `max_running` hooks at once (a fixed set of worker
  greenlets); a mapping whose queue still holds events goes to the back of the line after
  each run, so one busy mapping cannot starve the others.
- **Bounded.** At most `max_queued` events wait in all queues together; past that an event
  is dropped, counted (`dropped`) and logged (`hook.dropped`, at most one warning every
  few seconds), so a flood of mapping changes never grows memory.
- **Timeout.** A hook still running after `timeout` seconds is killed with SIGKILL, its
  whole process group with it (each hook starts its own session), so children it started
  die too. Children that left the group on purpose (setsid) are not chased; the runner
  stops reading their output soon after the hook itself has ended.
- **Output.** stdout and stderr share one pipe; the first `output_limit` bytes (4 KiB) are
  kept and logged, the rest is read and thrown away so the hook never blocks on a full
  pipe.
- **Logs.** `hook.started`, `hook.finished` (exit 0), `hook.failed` (non-zero exit, death
  by a signal, or a spawn error), `hook.killed` (timeout, or shutdown), each with the
  mapping's fields as in other mapping events (`client`, `protocol`, `internal_port`,
  `external_port`), the `change` it is about, and the exit status, output and seconds.
  A failing or hanging hook changes nothing else: no retry, no effect on the mapping.
- **Shutdown.** `close(timeout)` stops taking events, lets queued and running hooks finish
  within the bound (the `deleted` events of a shutdown are worth delivering), then kills
  what still runs and drops what still waits, both counted and logged.

Counters for the metrics code: `started`, `succeeded`, `failed` (non-zero exit, spawn
error, killed), `killed`, `dropped`; gauges `running` and `queued`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.os
from gevent import subprocess
from gevent.event import Event
from gevent.queue import Queue

from doublenat.engine.events import ChangeKind, MappingChange, change_fields
from doublenat.protocol.natpmp import Proto
from doublenat.settings import SettingError, parse_executable

log = logging.getLogger(__name__)

VARIABLE = "HOOK_COMMAND"
DEFAULT_TIMEOUT = 10.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
# After the hook has ended, how long its output may still trickle in (a background child
# holding the pipe open) before the runner stops reading.
OUTPUT_GRACE = 0.5
# At shutdown, how long killed hooks get to be reaped and logged.
KILL_GRACE = 1.0
DROP_WARN_EVERY = 5.0

HookKey = tuple[Proto, str, int]
Clock = Callable[[], float]


def check_hook_command(command: str | os.PathLike[str]) -> Path:
    """HOOK_COMMAND's program, checked now: an absolute path to an executable file.

    Raises SettingError naming HOOK_COMMAND otherwise (the settings' own rule, so the
    daemon and the runner never disagree on what a valid hook is).
    """
    text = os.fspath(command)
    if not text:
        raise SettingError(VARIABLE, "is empty")
    return parse_executable(VARIABLE, text)


def hook_environment(change: MappingChange, path: str, lang: str) -> dict[str, str]:
    """Everything the hook's environment holds for `change`, and nothing else."""
    env = {
        "PATH": path,
        "LANG": lang,
        "DOUBLENAT_EVENT": str(change.kind),
        "DOUBLENAT_PROTOCOL": change.proto.label,
        "DOUBLENAT_CLIENT": str(change.client),
        "DOUBLENAT_INTERNAL_PORT": str(change.internal_port),
        "DOUBLENAT_EXTERNAL_PORT": str(change.external_port),
        "DOUBLENAT_PUBLIC_ADDRESS": "" if change.public_address is None
        else str(change.public_address),
        "DOUBLENAT_LIFETIME": str(change.lifetime),
        "DOUBLENAT_STATIC": "true" if change.static else "false",
    }
    if change.kind is ChangeKind.CHANGED and change.previous_external_port is not None:
        env["DOUBLENAT_PREVIOUS_EXTERNAL_PORT"] = str(change.previous_external_port)
    return env


@dataclass(frozen=True, slots=True)
class _Outcome:
    status: int | None  # exit status; negative: killed by that signal; None: not started
    output: bytes
    truncated: bool
    seconds: float
    killed: bool
    reason: str = ""  # why it did not start, or why it was killed


class HookRunner:
    """Runs HOOK_COMMAND for each submitted MappingChange (see the module docstring)."""

    def __init__(
        self,
        command: str | os.PathLike[str],
        timeout: float = DEFAULT_TIMEOUT,
        *,
        max_running: int = 4,
        max_queued: int = 1000,
        output_limit: int = 4096,
        path: str | None = None,
        lang: str | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise SettingError("HOOK_TIMEOUT", f"must be positive, not {timeout}")
        if max_running < 1 or max_queued < 1 or output_limit < 0:
            raise ValueError("max_running and max_queued must be positive, output_limit "
                             "not negative")
        self.path = path or _hook_path()
        self.lang = lang or os.environ.get("LANG") or DEFAULT_LANG
        self.program = check_hook_command(command)
        self.timeout = timeout
        self.max_running = max_running
        self.max_queued = max_queued
        self.output_limit = output_limit
        self._clock = clock

        self.started = 0
        self.succeeded = 0
        self.failed = 0
        self.killed = 0
        self.dropped = 0

        self._pending: dict[HookKey, deque[MappingChange]] = {}
        self._scheduled: set[HookKey] = set()  # keys in the ready queue or running
        self._ready: Queue[HookKey] = Queue()
        self._procs: dict[HookKey, subprocess.Popen[bytes]] = {}
        self._queued = 0
        self._running = 0
        self._idle = Event()
        self._idle.set()
        self._workers: list[gevent.Greenlet] = []
        self._closing = False
        self._last_drop_warning = -DROP_WARN_EVERY
        self._drops_unreported = 0

    # ------------------------------------------------------------------ interface

    @property
    def queued(self) -> int:
        """Events waiting for their hook to start."""
        return self._queued

    @property
    def running(self) -> int:
        """Hooks running now."""
        return self._running

    def submit(self, change: MappingChange) -> None:
        """Queue `change` for the hook; never blocks, never raises."""
        try:
            if self._closing:
                self._drop(change, "shutting down")
                return
            if self._queued >= self.max_queued:
                self._drop(change, "queue full")
                return
            key: HookKey = (change.proto, str(change.client), change.internal_port)
            self._pending.setdefault(key, deque()).append(change)
            self._queued += 1
            self._idle.clear()
            if key not in self._scheduled:
                self._scheduled.add(key)
                self._ready.put(key)
            if len(self._workers) < self.max_running:
                self._workers.append(gevent.spawn(self._work))
        except Exception:
            log.exception("hook: could not queue an event", extra={"event": "hook.error"})

    def close(self, timeout: float) -> None:
        """Stop taking events; wait up to `timeout` seconds for queued and running hooks,
        then kill the ones still running and drop the ones still waiting. Returns within
        `timeout` plus KILL_GRACE."""
        self._closing = True
        if not self._idle.wait(timeout):
            self._drop_all_pending()
            for key, proc in list(self._procs.items()):
                self._kill_group(proc, key)
            # Killed groups end at once; reaping and logging them takes moments.
            self._idle.wait(KILL_GRACE)
        gevent.killall(self._workers, block=False)
        self._workers.clear()

    # -------------------------------------------------------------------- workers

    def _work(self) -> None:
        while True:
            key = self._ready.get()
            queue = self._pending.get(key)
            if not queue:  # dropped by close() meanwhile
                self._scheduled.discard(key)
                self._pending.pop(key, None)
                self._settle()
                continue
            change = queue.popleft()
            self._queued -= 1
            self._running += 1
            try:
                self._run(key, change)
            except Exception:
                log.exception("hook: runner failed",
                              extra=change_fields("hook.error", change))
            finally:
                self._running -= 1
                if queue:
                    self._ready.put(key)  # the next event of this mapping, behind others
                else:
                    self._pending.pop(key, None)
                    self._scheduled.discard(key)
                self._settle()

    def _settle(self) -> None:
        if self._queued == 0 and self._running == 0:
            self._idle.set()

    def _run(self, key: HookKey, change: MappingChange) -> None:
        fields = {**change_fields("hook", change), "command": str(self.program)}
        outcome = self._execute(key, change, fields)
        record = {
            **fields,
            "exit_status": outcome.status,
            "output": outcome.output.decode("utf-8", "replace"),
            "output_truncated": outcome.truncated,
            "seconds": round(outcome.seconds, 3),
        }
        if outcome.status is None:
            self.failed += 1
            log.warning("hook could not start", extra={**record, "event": "hook.failed",
                                                        "reason": outcome.reason})
        elif outcome.killed:
            self.killed += 1
            self.failed += 1
            log.warning("hook killed", extra={**record, "event": "hook.killed",
                                              "reason": outcome.reason,
                                              "timeout": self.timeout})
        elif outcome.status != 0:
            self.failed += 1
            reason = (f"killed by signal {-outcome.status}" if outcome.status < 0
                      else f"exit status {outcome.status}")
            log.warning("hook failed", extra={**record, "event": "hook.failed",
                                              "reason": reason})
        else:
            self.succeeded += 1
            log.info("hook finished", extra={**record, "event": "hook.finished"})

    def _execute(self, key: HookKey, change: MappingChange,
                 fields: dict[str, object]) -> _Outcome:
        began = self._clock()
        env = hook_environment(change, self.path, self.lang)
        try:
            read_end, write_end = os.pipe()
        except OSError as exc:
            return _Outcome(None, b"", False, 0.0, False, f"no pipe: {exc}")
        try:
            proc = subprocess.Popen(
                [str(self.program)], stdin=subprocess.DEVNULL, stdout=write_end,
                stderr=write_end, env=env, cwd="/", close_fds=True, start_new_session=True,
            )
        except OSError as exc:
            os.close(read_end)
            return _Outcome(None, b"", False, self._clock() - began, False,
                            f"{type(exc).__name__}: {exc.strerror or exc}")
        finally:
            os.close(write_end)
        self.started += 1
        self._procs[key] = proc
        log.info("hook started", extra={**fields, "event": "hook.started", "pid": proc.pid})
        kept = bytearray()
        truncated = False

        def drain() -> None:
            nonlocal truncated
            gevent.os.make_nonblocking(read_end)
            while chunk := gevent.os.nb_read(read_end, 65536):
                room = self.output_limit - len(kept)
                if len(chunk) > room:
                    truncated = True
                kept.extend(chunk[:max(room, 0)])

        reader = gevent.spawn(drain)
        killed, reason = False, ""
        try:
            try:
                status = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                killed, reason = True, f"still running after {self.timeout:g} s"
                self._kill_group(proc, key)
                status = proc.wait()
            if key not in self._procs:  # close() killed it
                killed, reason = True, reason or "shutdown"
            reader.join(timeout=OUTPUT_GRACE)
        finally:
            self._procs.pop(key, None)
            reader.kill()
            os.close(read_end)
        return _Outcome(status, bytes(kept), truncated, self._clock() - began, killed, reason)

    def _kill_group(self, proc: subprocess.Popen[bytes], key: HookKey) -> None:
        # The hook leads its own session and group (start_new_session), and is not yet
        # reaped here, so its pid still names that group and nobody else's.
        self._procs.pop(key, None)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------------- dropping

    def _drop(self, change: MappingChange, reason: str) -> None:
        self.dropped += 1
        self._drops_unreported += 1
        now = self._clock()
        level = logging.DEBUG
        if now - self._last_drop_warning >= DROP_WARN_EVERY:
            level = logging.WARNING
            self._last_drop_warning = now
        log.log(level, "hook event dropped", extra={
            **change_fields("hook.dropped", change), "reason": reason,
            "dropped": self._drops_unreported, "queued": self._queued})
        if level == logging.WARNING:
            self._drops_unreported = 0

    def _drop_all_pending(self) -> None:
        for queue in self._pending.values():
            while queue:
                self._queued -= 1
                self._drop(queue.popleft(), "shutdown timeout")
        self._settle()


def _hook_path() -> str:
    return os.environ.get("PATH") or DEFAULT_PATH
