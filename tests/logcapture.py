"""Attach a handler to doublenat's loggers, at DEBUG, for one test."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

H = TypeVar("H", bound=logging.Handler)


@contextmanager
def attached(handler: H) -> Iterator[H]:
    logger = logging.getLogger("doublenat")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def captured_records() -> Iterator[list[logging.LogRecord]]:
    """Every doublenat record emitted inside the block, as LogRecords (extras as attrs)."""
    with attached(_Records()) as handler:
        yield handler.records
