"""Logging (issue #2 item 5): one JSON object per line, RFC 3339 UTC timestamps, extras as
fields, tracebacks as a field, secrets scrubbed, and every stray traceback routed in."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import gevent
import pytest

from doublenat import logs
from doublenat.redact import Redactor

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
FIRST_KEYS = ["timestamp", "level", "logger", "message"]


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    """`logs.configure` into a buffer, with every global it touches put back afterwards."""
    root = logging.getLogger()
    ours = logging.getLogger(logs.ROOT)
    saved = (list(root.handlers), root.level, ours.level, sys.excepthook,
             threading.excepthook, sys.unraisablehook, list(logs.scrub._secrets))
    hub = gevent.get_hub()
    hub_had_own = "print_exception" in vars(hub)
    hub_saved = vars(hub).get("print_exception")
    yield io.StringIO()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    ours.setLevel(saved[2])
    sys.excepthook, threading.excepthook, sys.unraisablehook = saved[3:6]
    logs.scrub._secrets[:] = saved[6]
    logging.captureWarnings(False)
    if hub_had_own:
        hub.print_exception = hub_saved
    else:
        vars(hub).pop("print_exception", None)


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def records(buffer: io.StringIO) -> list[dict[str, object]]:
    out = []
    for line in lines(buffer):
        record = json.loads(line)
        assert isinstance(record, dict)
        out.append(record)
    return out


log = logging.getLogger("doublenat.test")


# ---------------------------------------------------------------- JSON shape


def test_json_line_shape(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)
    log.info("mapping created", extra={"client": "192.168.88.10", "internal_port": 6881,
                                       "lifetime_s": 7200, "ok": True, "ratio": 0.5})
    [line] = lines(capture)
    record = json.loads(line)
    assert list(record)[:4] == FIRST_KEYS
    assert list(record)[4:] == ["client", "internal_port", "lifetime_s", "ok", "ratio"]
    assert record["level"] == "INFO"
    assert record["logger"] == "doublenat.test"
    assert record["message"] == "mapping created"
    # Typed, not stringified.
    assert record["internal_port"] == 6881 and record["ok"] is True and record["ratio"] == 0.5


def test_timestamp_is_rfc3339_utc(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)
    before = datetime.now().astimezone()
    log.info("tick")
    after = datetime.now().astimezone()
    stamp = str(records(capture)[0]["timestamp"])
    assert RFC3339.match(stamp), stamp
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert when.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= when <= after + timedelta(seconds=1)


def test_one_line_per_record_even_with_newlines(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)
    log.info("two\nlines", extra={"payload": "a\nb\r\nc"})
    [record] = records(capture)
    assert record["message"] == "two\nlines" and record["payload"] == "a\nb\r\nc"


def test_exception_is_one_field(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)
    try:
        {}["missing"]
    except KeyError:
        log.exception("lookup failed", extra={"event": "test.error"})
    [record] = records(capture)  # one line, whatever the traceback's length
    assert list(record)[:4] == FIRST_KEYS
    exception = record["exception"]
    assert isinstance(exception, str)
    assert exception.startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in exception and "\n" in exception
    assert record["event"] == "test.error"
    assert "exc_info" not in record


@pytest.mark.parametrize(("level", "shown", "hidden"), [
    ("DEBUG", ["DEBUG", "INFO"], []),
    ("INFO", ["INFO", "WARNING"], ["DEBUG"]),
    ("WARNING", ["WARNING", "ERROR"], ["INFO"]),
    ("ERROR", ["ERROR"], ["WARNING"]),
])
def test_level(capture: io.StringIO, level: str, shown: list[str], hidden: list[str]) -> None:
    logs.configure(level, "json", stream=capture)
    for name in ("DEBUG", "INFO", "WARNING", "ERROR"):
        log.log(getattr(logging, name), name)
    levels = [r["level"] for r in records(capture)]
    assert all(name in levels for name in shown), levels
    assert not any(name in levels for name in hidden), levels


def test_libraries_are_quiet_below_warning(capture: io.StringIO) -> None:
    logs.configure("DEBUG", "json", stream=capture)
    logging.getLogger("some.library").info("chatter")
    logging.getLogger("some.library").warning("worth saying")
    assert [r["message"] for r in records(capture)] == ["worth saying"]


def test_reconfigure_replaces_the_handler(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=io.StringIO())
    logs.configure("INFO", "json", stream=capture)
    log.info("once")
    assert len(lines(capture)) == 1


# ----------------------------------------------------------------- text


def test_text_is_one_human_line(capture: io.StringIO) -> None:
    logs.configure("INFO", "text", stream=capture)
    log.warning("router slow", extra={"router": "192.168.88.1:8728", "ms": 812})
    [line] = lines(capture)
    assert re.match(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3}Z WARNING doublenat\.test: "
                    r"router slow router=192\.168\.88\.1:8728 ms=812$", line), line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_text_timestamp_is_utc(capture: io.StringIO) -> None:
    logs.configure("INFO", "text", stream=capture)
    log.info("now")
    stamp = lines(capture)[0].split("Z ")[0]
    when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")
    assert abs(when - datetime.now(UTC).replace(tzinfo=None)) < timedelta(seconds=5)


def test_text_extras_stay_on_the_first_line(capture: io.StringIO) -> None:
    logs.configure("INFO", "text", stream=capture)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("failed", extra={"client": "10.0.0.2"})
    first, *rest = lines(capture)
    assert first.endswith("failed client=10.0.0.2")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ZeroDivisionError: division by zero"


# --------------------------------------------------------------- scrubbing

SECRET = 'se"cr\\et wörd'  # a quote, a backslash, a space and non-ASCII: escaped in JSON


def test_configured_secret_masked_everywhere(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture, secrets=[SECRET])
    log.info(f"message {SECRET}", extra={"field": SECRET, "nested": {"k": [SECRET]}})
    try:
        raise RuntimeError(f"login with {SECRET!r} or {SECRET.encode()!r} refused")
    except RuntimeError:
        log.exception("in a traceback")
    text = capture.getvalue()
    for form in (SECRET, json.dumps(SECRET)[1:-1], "wörd", "w\\u00f6rd", "w\\xc3\\xb6rd"):
        assert form not in text, form
    first, second = records(capture)  # masking keeps the lines valid JSON
    assert first["message"] == "message ***"
    assert first["field"] == "***"
    assert "***" in str(second["exception"])


def test_password_words_masked(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)
    log.error("Error executing command b'/login =name=admin =password=xyz'",
              extra={"sentence": ["/login", "=name=admin", "=password=hunter2"]})
    text = capture.getvalue()
    assert "xyz" not in text and "hunter2" not in text
    [record] = records(capture)
    assert record["message"] == "Error executing command b'/login =name=admin =password=***'"
    assert record["sentence"] == ["/login", "=name=admin", "=password=***"]


def test_password_word_with_a_known_secret_masked_whole(capture: io.StringIO) -> None:
    # The =password= pattern stops at a space; a known secret must still go entirely.
    logs.configure("INFO", "json", stream=capture, secrets=["open sesame"])
    log.error("/login =name=admin =password=open sesame")
    assert "sesame" not in capture.getvalue()


def test_text_format_is_scrubbed_too(capture: io.StringIO) -> None:
    logs.configure("INFO", "text", stream=capture, secrets=[SECRET])
    log.info("pw %s", SECRET, extra={"also": SECRET})
    log.info("=password=abc123")
    text = capture.getvalue()
    assert SECRET not in text and "abc123" not in text and "***" in text


def test_scrubber_unit() -> None:
    scrubber = Redactor()
    scrubber.add("")  # an empty password must not mask everything
    assert scrubber("nothing to hide") == "nothing to hide"
    scrubber.add("abc")
    scrubber.add("abcdef")  # longer first: no "***def" left behind
    assert scrubber("x abcdef y abc z") == "x *** y *** z"
    assert scrubber("=password=q w") == "=password=*** w"


# ------------------------------------------------- stray tracebacks, routed


def test_warnings_are_logged(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    [record] = records(capture)
    assert record["logger"] == "py.warnings" and "careful" in str(record["message"])


def test_greenlet_error_in_process(capture: io.StringIO) -> None:
    logs.configure("INFO", "json", stream=capture)

    def crash() -> None:
        raise ValueError("greenlet boom")

    gevent.spawn(crash).join()
    [record] = records(capture)
    assert record["level"] == "ERROR" and record["logger"] == "doublenat.greenlet"
    assert "ValueError: greenlet boom" in str(record["exception"])
    assert "crash" in str(record["context"])


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=20)


def only_json(stderr: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"loose line on stderr: {line!r}\n{stderr}")
        assert isinstance(record, dict) and list(record)[:4] == FIRST_KEYS
        out.append(record)
    return out


PRELUDE = """
    import sys, warnings
    import gevent
    from doublenat import logs
    logs.configure("INFO", "json", stream=sys.stderr)
"""


def test_greenlet_error_subprocess() -> None:
    done = run_python(PRELUDE + """
    def crash():
        raise ValueError("greenlet boom")
    gevent.spawn(crash).join()
    gevent.spawn_later(0.01, crash).join()
    warnings.warn("careful")
    print("survived")
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "survived\n"
    found = only_json(done.stderr)
    errors = [r for r in found if "ValueError: greenlet boom" in str(r.get("exception"))]
    assert len(errors) == 2, done.stderr
    assert any(r["logger"] == "py.warnings" and "careful" in str(r["message"]) for r in found)


def test_uncaught_exception_subprocess() -> None:
    done = run_python(PRELUDE + """
    raise RuntimeError("main boom")
    """)
    assert done.returncode == 1
    [record] = only_json(done.stderr)
    assert record["level"] == "CRITICAL"
    assert "RuntimeError: main boom" in str(record["exception"])


def test_thread_and_unraisable_errors_subprocess() -> None:
    done = run_python(PRELUDE + """
    import threading
    def crash():
        raise ValueError("thread boom")
    worker = threading.Thread(target=crash, name="worker")
    worker.start()
    worker.join()
    class Broken:
        def __del__(self):
            raise ValueError("del boom")
    Broken()
    """)
    assert done.returncode == 0, done.stderr
    found = only_json(done.stderr)
    assert any("thread boom" in str(r.get("exception")) and r.get("thread_name") == "worker"
               for r in found), done.stderr
    assert any("del boom" in str(r.get("exception")) for r in found), done.stderr


def test_secret_in_uncaught_exception_subprocess() -> None:
    done = run_python("""
    import sys
    from doublenat import logs
    logs.configure("INFO", "json", stream=sys.stderr, secrets=["t0p-s3cret"])
    raise PermissionError("login =password=t0p-s3cret refused")
    """)
    assert done.returncode == 1
    assert "t0p-s3cret" not in done.stderr
    [record] = only_json(done.stderr)
    assert "PermissionError" in str(record["exception"])
