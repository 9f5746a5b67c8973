"""Logging: one JSON object per line (or plain text for humans), secrets scrubbed.

Everything that could print a traceback on its own (gevent's hub, `sys.excepthook`,
warnings) is routed through `logging`, so a log shipper never sees a loose line.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any, TextIO

try:  # python-json-logger 3.1 and later (trixie has 3.3, PyPI 4.x)
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # 2.0 (bookworm's python3-pythonjsonlogger 2.0.1): the same class
    from pythonjsonlogger.jsonlogger import JsonFormatter  # type: ignore[no-redef]

from doublenat.redact import Redactor

ROOT = "doublenat"
# A %-style format string, not a list of names: 2.0 accepts only the string.
_FIELDS = "%(timestamp)s %(levelname)s %(name)s %(message)s"
_RENAMES = {"levelname": "level", "name": "logger", "exc_info": "exception"}

# Every finished line passes through it; `configure(secrets=...)` teaches it the password.
scrub = Redactor()


class _JsonFormatter(JsonFormatter):
    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        super().add_fields(log_record, record, message_dict)
        # python-json-logger 2.0 renames only the format's fields; the traceback arrives
        # as exc_info. Later versions have renamed it already.
        for old, new in _RENAMES.items():
            if old in log_record:
                log_record[new] = log_record.pop(old)

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _TextFormatter(logging.Formatter):
    converter = __import__("time").gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Extras join the first line, before any traceback that format() appends.
        line = super().formatMessage(record)
        extras = {
            k: v
            for k, v in record.__dict__.items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def make_formatter(fmt: str) -> logging.Formatter:
    if fmt == "text":
        return _TextFormatter("%(asctime)sZ %(levelname)s %(name)s: %(message)s")
    return _JsonFormatter(_FIELDS, rename_fields=_RENAMES, timestamp=True)


def configure(
    level: str = "INFO",
    fmt: str = "json",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Send every log record, warning and stray traceback to one stream in one format."""
    for secret in secrets:
        scrub.add(secret)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    # Both print loose tracebacks by default (a crashed thread, an error in __del__).
    threading.excepthook = _log_thread_uncaught
    sys.unraisablehook = _log_unraisable
    route_gevent_errors()


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger(ROOT).critical("uncaught exception", exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return  # threading's own default ignores it too
    logging.getLogger(ROOT).error(
        "uncaught exception in thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"thread_name": args.thread.name if args.thread else None},
    )


def _log_unraisable(args: Any) -> None:
    logging.getLogger(ROOT).error(
        args.err_msg or "exception ignored",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        extra={"object": repr(args.object)[:200]},
    )


def route_gevent_errors() -> None:
    """Make the hub log greenlet failures instead of printing tracebacks to stderr."""
    import gevent

    hub = gevent.get_hub()
    hub.print_exception = _hub_print_exception  # type: ignore[method-assign]


def _hub_print_exception(context: Any, kind: Any, value: Any, tb: Any) -> None:
    where = repr(context)
    if len(where) > 200:
        where = where[:200] + "..."  # the context may hold a whole datagram
    logging.getLogger(f"{ROOT}.greenlet").error(
        "unhandled error in greenlet", exc_info=(kind, value, tb), extra={"context": where}
    )
