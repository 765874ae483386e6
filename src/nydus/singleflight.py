"""Fetch once while concurrent readers wait: the in-flight table of the chunk read path.

A reader that misses a chunk *claims* it (:meth:`FlightTable.claim`) and fetches it; a reader
that finds a claim waits on its :class:`Flight` instead of fetching again. The claimant sets
``value`` or ``error``, releases the claim and then settles the flight, which wakes every
waiter. Used by :class:`nydus.storage.fetcher.BlobFetcher` (chunks of one blob, before they
are cached) and :class:`nydus.fs.RafsFs` (decompressed chunks, before its in-memory LRU).
:class:`Once` is the same idea for one value: a process's shared worker or watcher, made by the
first caller while concurrent callers wait.

Threading contract: a :class:`FlightTable` is not locked; its owner calls it under the lock
that also guards its cache, so "ready or in flight" is one atomic check. :class:`Flight` is
thread-safe: set the result first, then :meth:`Flight.settle`; waiters read it after
:meth:`Flight.wait`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Flight", "FlightTable", "Once"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Flight(Generic[T]):
    """One fetch in flight: its result (``value`` or ``error``) once settled."""

    __slots__ = ("_done", "error", "value")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        """Wake the waiters (after ``value`` or ``error`` was set)."""
        self._done.set()

    def wait(self) -> None:
        self._done.wait()

    @property
    def settled(self) -> bool:
        return self._done.is_set()


class FlightTable(Generic[K, T]):
    """Flights by key (see the module docstring: call under the owner's lock)."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, Flight[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._flights

    def get(self, key: K) -> Flight[T] | None:
        return self._flights.get(key)

    def claim(self, key: K) -> Flight[T]:
        """A new flight for ``key``, which the caller must release and settle."""
        flight = self._flights[key] = Flight()
        return flight

    def release(self, key: K, flight: Flight[T]) -> None:
        """Drop ``flight``'s claim of ``key`` (no-op if another flight holds it now)."""
        if self._flights.get(key) is flight:
            del self._flights[key]


class Once(Generic[T]):
    """A value made on first :meth:`get`, once, however many threads ask at the same time."""

    __slots__ = ("_factory", "_lock", "_value")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        """The value, made now if nobody made it yet."""
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value

    def peek(self) -> T | None:
        """The value if it was made, without making it."""
        return self._value

    def after_fork_in_child(self) -> None:
        """A fresh lock in a fork child (a parent's thread that held it does not exist here)."""
        self._lock = threading.Lock()
