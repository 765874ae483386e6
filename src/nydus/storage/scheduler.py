"""The fetch scheduler: every backend request of a blob device goes through it, user reads first.

:class:`FetchScheduler` owns a fixed number of fetch *slots* (threads); each slot runs one job
at a time, and a job is one backend request (a prefetch job may sleep in the bandwidth limiter
first). Jobs come in two classes, each queued in FIFO order:

* **user**: a range request of an on-demand read (:meth:`FetchScheduler.run_user`). A free
  slot always takes a queued user job before any prefetch job.
* **prefetch**: a batch of chunks (:meth:`FetchScheduler.submit_prefetch`). A slot admits one
  only when no user job is queued, no user read has waited for the backend
  (:meth:`FetchScheduler.user_demand`) in the last ``user_idle`` seconds, fewer than
  ``prefetch_cap`` prefetch jobs run and their bytes stay within ``prefetch_bytes`` (one job
  always may run). The caps keep the slot count above them, so a user request always finds a
  slot free at once, and bound the prefetch bytes a user request shares the link with; the
  hold-off keeps prefetch off the link between the closely spaced reads of a busy workload.

A queued prefetch job can be *taken* out of the queue (:meth:`FetchScheduler.take`): the blob
fetcher does so when a user read wants one of its chunks, and fetches the batch itself at user
priority (:class:`nydus.storage.fetcher.BlobFetcher` keeps which queued job holds which chunk;
its in-flight table makes sure no chunk is fetched twice).

Threading contract: thread-safe. One lock (a condition) guards the queues and counters; jobs
run outside it. Callers may hold their own locks when they call :meth:`take` (it never blocks
and calls no job), never when they call :meth:`run_user`. A prefetch job must not call
:meth:`run_user` (it runs on a slot and would wait for slots). :meth:`close` fails queued user
jobs, drops queued prefetch jobs (calling their ``on_drop``), lets running jobs finish and
joins the slots.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

from ..errors import NydusError

__all__ = ["FetchScheduler", "PrefetchJob"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class _UserJob(Generic[T]):
    __slots__ = ("done", "error", "fn", "value")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the waiting reader
            self.error = e
        finally:
            self.done.set()


class PrefetchJob:
    """A queued prefetch batch: ``run`` on a slot, or ``on_drop`` if it never runs here."""

    __slots__ = ("nbytes", "on_drop", "queued", "run")

    def __init__(
        self, run: Callable[[], object], on_drop: Callable[[], object], nbytes: int = 0
    ) -> None:
        self.run = run
        self.on_drop = on_drop
        self.nbytes = nbytes  # what its request will fetch (at most)
        self.queued = False


class FetchScheduler:
    """Fetch slots shared by user reads and prefetch (module docstring)."""

    def __init__(
        self,
        slots: int = 8,
        prefetch_cap: int = 8,
        prefetch_bytes: int = 0,
        user_idle: float = 0.0,
    ) -> None:
        self.prefetch_cap = max(prefetch_cap, 1)
        self.prefetch_bytes = prefetch_bytes  # 0: no byte cap
        self.user_idle = user_idle
        self.slots = max(slots, self.prefetch_cap + 1)
        self._prefetch_bytes_running = 0
        self._user_seen = float("-inf")  # when user demand last ended
        self._cond = threading.Condition()
        self._user: collections.deque[_UserJob[object]] = collections.deque()
        self._prefetch: collections.deque[PrefetchJob] = collections.deque()
        self._user_demand = 0
        self._prefetch_running = 0
        self._closed = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ submitting

    def _start_locked(self) -> None:
        if self._threads:
            return
        for i in range(self.slots):
            t = threading.Thread(target=self._slot, name=f"nydus-fetch-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def run_user(self, fns: Sequence[Callable[[], T]]) -> list[T]:
        """Run ``fns`` (backend requests of a user read) as user jobs; their results in order,
        or the first error raised. Blocks until all are done."""
        jobs = [_UserJob(fn) for fn in fns]
        with self._cond:
            if self._closed:
                raise NydusError("fetch scheduler is closed")
            self._start_locked()
            self._user.extend(jobs)  # type: ignore[arg-type]
            self._cond.notify(len(jobs))
        for j in jobs:
            j.done.wait()
        for j in jobs:
            if j.error is not None:
                raise j.error
        return [j.value for j in jobs]  # type: ignore[misc]

    def submit_prefetch(self, job: PrefetchJob) -> bool:
        """Queue ``job``; False (and ``on_drop`` called) when the scheduler is closed."""
        with self._cond:
            if not self._closed:
                self._start_locked()
                job.queued = True
                self._prefetch.append(job)
                self._cond.notify()
                return True
        job.on_drop()
        return False

    def take(self, job: PrefetchJob) -> bool:
        """Take ``job`` out of the prefetch queue if it is still there (the caller then does
        its work); False if a slot started it or it was dropped. Never blocks."""
        with self._cond:
            if not job.queued:
                return False
            job.queued = False
            self._prefetch.remove(job)
            return True

    @contextmanager
    def user_demand(self) -> Iterator[None]:
        """Around a user read that waits for the backend: no prefetch job starts meanwhile."""
        with self._cond:
            self._user_demand += 1
        try:
            yield
        finally:
            with self._cond:
                self._user_demand -= 1
                if self._user_demand == 0:
                    self._user_seen = time.monotonic()
                    self._cond.notify_all()

    @property
    def prefetch_queued(self) -> int:
        with self._cond:
            return len(self._prefetch)

    # ------------------------------------------------------------------ the slots

    def _next_locked(self) -> _UserJob[object] | PrefetchJob | None:
        while True:
            if self._closed:
                return None
            if self._user:
                return self._user.popleft()
            wait: float | None = None
            if self._prefetch and self._user_demand == 0 and self._prefetch_admissible_locked():
                wait = self._user_seen + self.user_idle - time.monotonic()
                if wait <= 0:
                    job = self._prefetch.popleft()
                    job.queued = False
                    self._prefetch_running += 1
                    self._prefetch_bytes_running += job.nbytes
                    return job
            self._cond.wait(wait)

    def _prefetch_admissible_locked(self) -> bool:
        if self._prefetch_running == 0:
            return True
        if self._prefetch_running >= self.prefetch_cap:
            return False
        nbytes = self._prefetch[0].nbytes
        return not self.prefetch_bytes or (
            self._prefetch_bytes_running + nbytes <= self.prefetch_bytes
        )

    def _slot(self) -> None:
        while True:
            with self._cond:
                job = self._next_locked()
            if job is None:
                return
            if isinstance(job, _UserJob):
                job.run()
                continue
            try:
                job.run()
            except Exception as e:  # prefetch is best effort; the slot lives on
                log.warning("prefetch job failed: %s", e)
            finally:
                with self._cond:
                    self._prefetch_running -= 1
                    self._prefetch_bytes_running -= job.nbytes
                    self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Fail queued user jobs, drop queued prefetch jobs, join the slots."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            dropped = list(self._prefetch)
            self._prefetch.clear()
            for job in dropped:
                job.queued = False
            failed = list(self._user)
            self._user.clear()
            self._cond.notify_all()
            threads = list(self._threads)
        for u in failed:
            u.error = NydusError("fetch scheduler is closed")
            u.done.set()
        for job in dropped:
            job.on_drop()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.0))
