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
