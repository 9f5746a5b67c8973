"""Per-mapping serialisation and joining of duplicate work, for greenlets."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from gevent.event import AsyncResult
from gevent.lock import BoundedSemaphore

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class KeyedLocks(Generic[K]):
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[K, tuple[BoundedSemaphore, list[int]]] = {}

    @contextmanager
    def hold(self, key: K) -> Iterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (BoundedSemaphore(1), [0])
        lock, users = entry
        users[0] += 1
        try:
            with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    @contextmanager
    def try_hold(self, key: K) -> Iterator[bool]:
        """Hold the key's lock if nobody does, without waiting; yields whether it did.
        For work on a second key while holding a first: waiting could deadlock."""
        if key in self._locks:
            yield False
            return
        with self.hold(key):
            yield True

    def __len__(self) -> int:
        return len(self._locks)

    def busy(self, key: K) -> bool:
        return key in self._locks


class Joiner(Generic[K, V]):
    """Runs one piece of work per key at a time; callers arriving meanwhile share its result.

    A client's retransmission joins the request already being worked on instead of
    queueing the same router and gateway work behind it.
    """

    def __init__(self) -> None:
        self._running: dict[K, AsyncResult] = {}

    def run(self, key: K, work: Callable[[], V]) -> V:
        running = self._running.get(key)
        if running is not None:
            return running.get()
        result = AsyncResult()
        self._running[key] = result
        try:
            value = work()
        except BaseException as exc:
            result.set_exception(exc)
            raise
        else:
            result.set(value)
            return value
        finally:
            del self._running[key]

    def joined(self, key: K) -> bool:
        return key in self._running

    def __len__(self) -> int:
        return len(self._running)
