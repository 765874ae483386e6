"""The fetch scheduler: every backend request of a blob device goes through it, user reads first.

:class:`FetchScheduler` runs jobs on a fixed number of fetch *slots* (threads), one job at a
time each; a job is one backend request (a prefetch job may sleep in the bandwidth limiter
first, and verifies and caches what it fetched). Jobs come in two classes, each queued FIFO:

* **user**: a range request of an on-demand read (:meth:`FetchScheduler.run_user`), run on one
  of ``slots`` user slots, which prefetch never occupies: a user request goes out at once. A
  slot is a thread, or the reader's own thread: while a slot is free, a read's first request
  runs on the reader's thread (no hand-off to another thread and back).
* **prefetch**: a batch of chunks (:meth:`FetchScheduler.submit_prefetch`), run on one of
  ``prefetch_cap`` prefetch slots (at the lowest CPU priority where the OS allows, so its
  decompression and hashing yield the CPU to the reader; but a hinted batch, below, at the
  daemon's own: the workload will wait for those bytes, and with a busy CPU the lowest
  priority made the optimized image's prefetch blob arrive ~0.1 s later under a CPU hog).
  One is admitted only when no user job is queued or running, no user read is waiting for
  the backend (:meth:`FetchScheduler.user_demand`) or has in the last ``user_idle`` seconds, and the
  prefetch jobs running stay within ``prefetch_bytes`` (one always may run). So prefetch uses
  the link only while users do not, a user request shares it with at most ``prefetch_bytes``
  of prefetch already in flight, and the hold-off keeps prefetch off it between the closely
  spaced reads of a busy workload. A *hinted* job (:attr:`PrefetchJob.hinted`: the files of
  an image's prefetch table, which the workload is known to read) at the head of the queue
  does not wait for the users (only for ``prefetch_bytes``): holding it back while the
  workload waits for a chunk would only turn a prefetch the workload needs into its serial
  misses (the optimized image's W1 finished with half its prefetch blob not yet fetched).
  The byte cap still holds, so hinted batches arrive in queue order (the workload's order)
  rather than all at once at a fraction of the link each. The cap counts bytes on the wire: a
  job that calls :meth:`PrefetchJob.fetched` once its request's bytes have arrived gives its
  share back then, so the next job's request goes out while it decompresses, verifies and
  caches them (with ``prefetch_bytes`` of 2 batches and 4 slots, 2 requests on the wire and
  2 batches in that CPU work: the optimized image's prefetch blob came at ~52 MB/s over a
  125 MB/s link when the CPU work held the cap). A *readahead* job
  (:attr:`PrefetchJob.readahead`, :mod:`.readahead`: the chunks after a user read's miss, put
  at the head of the queue by :meth:`FetchScheduler.submit_front`) waits like any prefetch
  job while a user job runs or a user read waits for the backend, but not for the
  ``user_idle`` hold-off: it follows the reads that asked for it, and holding it back between
  a workload's closely spaced reads would make it arrive after the read that needs it (that
  hold-off is what made ``prefetch_all`` slower than no prefetch on the ml image).

A queued prefetch job can be *taken* out of the queue (:meth:`FetchScheduler.take`: the
prefetcher drops its queued batches so at close). :attr:`FetchScheduler.behind_prefetch` counts
the user jobs that started while prefetch requests were in flight (they share the link with
them), and the prefetch bytes then in flight.

Threading contract: thread-safe. One lock (a condition) guards the queues and counters; jobs
run outside it. Callers may hold their own locks when they call :meth:`take` (it never blocks
and calls no job), never when they call :meth:`run_user`. A prefetch job must not call
:meth:`run_user`. :meth:`close` fails the queued jobs of :meth:`run_user`, drops queued
prefetch jobs (calling their ``on_drop``), lets running jobs and those of :meth:`start_user`
finish and joins the slots.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from ..errors import NydusError

__all__ = ["FetchScheduler", "PrefetchJob"]

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFETCH_NICE = 19


class _UserJob(Generic[T]):
    __slots__ = ("done", "error", "fn", "on_drop", "value")

    def __init__(self, fn: Callable[[], T], on_drop: Callable[[], object] | None = None) -> None:
        self.fn = fn
        self.on_drop = on_drop
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
    """A queued prefetch batch: ``run`` on a slot, or ``on_drop`` if it never runs here.
    ``hinted``: chunks of files the image says the workload reads (its prefetch table, or
    ``--prefetch-files``), not a guess: such a job does not yield the link to user reads.
    ``readahead``: the chunks after a user read's miss (:mod:`.readahead`): such a job yields
    the link to user reads but skips the ``user_idle`` hold-off. ``run`` calls
    :meth:`fetched` as its request's bytes arrive (optional: otherwise they count as on the
    wire until ``run`` returns)."""

    __slots__ = ("_release", "hinted", "nbytes", "on_drop", "queued", "readahead", "run")

    def __init__(
        self,
        run: Callable[[], object],
        on_drop: Callable[[], object],
        nbytes: int = 0,
        *,
        hinted: bool = False,
        readahead: bool = False,
    ) -> None:
        self.run = run
        self.on_drop = on_drop
        self.nbytes = nbytes  # what its request will fetch (at most)
        self.hinted = hinted
        self.readahead = readahead
        self.queued = False
        # set by the scheduler while the job runs: gives back wire bytes of the byte cap
        self._release: Callable[[int], None] | None = None

    def fetched(self, nbytes: int) -> None:
        """``nbytes`` of the job's request have arrived: they no longer count as prefetch
        bytes on the wire (see :class:`FetchScheduler`). A no-op when not run by a slot."""
        release = self._release
        if release is not None and nbytes > 0:
            release(nbytes)


def _thread_nice(nice: int | None = None) -> int | None:
    """This thread's nice value (Linux keeps one per thread), after setting it to ``nice`` if
    given; None where the OS has no such call. Going back down from a higher value needs
    CAP_SYS_NICE (or RLIMIT_NICE): without it the thread stays where it is."""
    tid = threading.get_native_id()
    try:
        if nice is not None:
            with contextlib.suppress(PermissionError):
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        return os.getpriority(os.PRIO_PROCESS, tid)
    except (OSError, AttributeError):
        return None


class FetchScheduler:
    """Fetch slots shared by user reads and prefetch (module docstring)."""

    def __init__(
        self,
        slots: int = 8,
        prefetch_cap: int = 8,
        prefetch_bytes: int = 0,
        user_idle: float = 0.0,
    ) -> None:
        self.slots = max(slots, 1)
        self.prefetch_cap = max(prefetch_cap, 1)
        self.prefetch_bytes = prefetch_bytes  # 0: no byte cap
        self.user_idle = user_idle
        self._cond = threading.Condition()
        self._user: collections.deque[_UserJob[object]] = collections.deque()
        self._prefetch: collections.deque[PrefetchJob] = collections.deque()
        self._user_running = 0
        self._user_demand = 0
        self._user_seen = float("-inf")  # when a user job or user demand last ended
        self._prefetch_running = 0
        self._prefetch_bytes_running = 0
        self.behind_prefetch = [0, 0]  # user jobs started with prefetch in flight, its bytes
        self._closed = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ submitting

    def _start_locked(self, target: Callable[[], None], name: str, n: int) -> None:
        """Start the ``n`` slots of one class (on its first job)."""
        if any(t.name.startswith(name) for t in self._threads):
            return
        for i in range(n):
            t = threading.Thread(target=target, name=f"{name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def run_user(self, fns: Sequence[Callable[[], T]]) -> list[T]:
        """Run ``fns`` (backend requests of a user read) as user jobs; their results in order,
        or the first error raised. Blocks until all are done. While a user slot is free the
        first job runs on the calling thread (no hand-off), the others on the slots."""
        jobs = [_UserJob(fn) for fn in fns]
        with self._cond:
            if self._closed:
                raise NydusError("fetch scheduler is closed")
            inline = jobs[:1] if self._user_running + len(self._user) < self.slots else []
            self._user_running += len(inline)
            if inline:
                self._note_user_start_locked()
            if len(jobs) > len(inline):
                self._start_locked(self._user_slot, "nydus-fetch", self.slots)
                self._user.extend(jobs[len(inline) :])  # type: ignore[arg-type]
                self._cond.notify_all()
        for j in inline:
            try:
                j.run()
            finally:
                self._user_job_ended()
        for j in jobs:
            j.done.wait()
        for j in jobs:
            if j.error is not None:
                raise j.error
        return [j.value for j in jobs]  # type: ignore[misc]

    def start_user(self, fn: Callable[[], object], on_drop: Callable[[], object]) -> bool:
        """Queue ``fn`` as a user job on a slot thread and return at once (a request a read
        does not wait for; :meth:`close` still runs it). False if the scheduler is closed:
        ``on_drop`` is called instead."""
        with self._cond:
            if not self._closed:
                self._start_locked(self._user_slot, "nydus-fetch", self.slots)
                self._user.append(_UserJob(fn, on_drop))
                self._cond.notify_all()
                return True
        on_drop()
        return False

    def submit_prefetch(self, job: PrefetchJob) -> bool:
        """Queue ``job``; False (and ``on_drop`` called) when the scheduler is closed."""
        return self._submit(job, front=False)

    def submit_front(self, job: PrefetchJob) -> bool:
        """Queue ``job`` at the head of the prefetch queue (the next prefetch job admitted; a
        readahead window); False (and ``on_drop`` called) when the scheduler is closed."""
        return self._submit(job, front=True)

    def _submit(self, job: PrefetchJob, *, front: bool) -> bool:
        with self._cond:
            if not self._closed:
                self._start_locked(self._prefetch_slot, "nydus-prefetch", self.prefetch_cap)
                job.queued = True
                if front:
                    self._prefetch.appendleft(job)
                else:
                    self._prefetch.append(job)
                self._cond.notify_all()
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

    def user_slot_free(self) -> bool:
        """Whether a user job queued now would start at once."""
        with self._cond:
            return self._user_running + len(self._user) < self.slots

    @contextlib.contextmanager
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

    def _note_user_start_locked(self) -> None:
        if self._prefetch_running:
            self.behind_prefetch[0] += 1
            self.behind_prefetch[1] += self._prefetch_bytes_running

    def _user_job_ended(self) -> None:
        with self._cond:
            self._user_running -= 1
            if not self._user_running:
                self._user_seen = time.monotonic()
            self._cond.notify_all()

    def _user_slot(self) -> None:
        while True:
            with self._cond:
                # jobs run on callers' threads hold slots too; started jobs outlive close
                while (not self._closed or self._user) and (
                    not self._user or self._user_running >= self.slots
                ):
                    self._cond.wait()
                if not self._user:
                    return
                job = self._user.popleft()
                self._user_running += 1
                self._note_user_start_locked()
            try:
                job.run()
            finally:
                self._user_job_ended()

    def _next_prefetch_locked(self) -> PrefetchJob | None:
        while not self._closed:
            wait: float | None = None
            if self._prefetch_admissible_locked():
                head = self._prefetch[0]
                wait = self._user_seen + self.user_idle - time.monotonic()
                if wait <= 0 or head.hinted or head.readahead:
                    job = self._prefetch.popleft()
                    job.queued = False
                    self._prefetch_running += 1
                    self._prefetch_bytes_running += job.nbytes
                    return job
            self._cond.wait(wait)
        return None

    def _prefetch_admissible_locked(self) -> bool:
        if not self._prefetch:
            return False
        # a hinted job is wanted by the workload: it does not wait for the users
        if not self._prefetch[0].hinted and (self._user or self._user_running or self._user_demand):
            return False
        if self._prefetch_running == 0 or self._prefetch_bytes_running == 0:
            return True  # one request on the wire always may be (a batch above the cap)
        nbytes = self._prefetch[0].nbytes
        return not self.prefetch_bytes or (
            self._prefetch_bytes_running + nbytes <= self.prefetch_bytes
        )

    def _prefetch_slot(self) -> None:
        base = nice = _thread_nice()  # the daemon's own priority, which a slot starts with
        while True:
            with self._cond:
                job = self._next_prefetch_locked()
            if job is None:
                return
            if base is not None and nice is not None:
                # a batch the workload is known to read keeps the daemon's priority
                want = base if job.hinted else PREFETCH_NICE
                if want != nice:
                    nice = _thread_nice(want)
            on_wire = [job.nbytes]  # of this job's bytes, those still counted on the wire

            def release(nbytes: int, on_wire: list[int] = on_wire) -> None:
                with self._cond:
                    n = min(nbytes, on_wire[0])
                    if n > 0:
                        on_wire[0] -= n
                        self._prefetch_bytes_running -= n
                        self._cond.notify_all()

            job._release = release
            try:
                job.run()
            except Exception as e:  # prefetch is best effort; the slot lives on
                log.warning("prefetch job failed: %s", e)
            finally:
                job._release = None
                with self._cond:
                    self._prefetch_running -= 1
                    self._prefetch_bytes_running -= on_wire[0]
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
            failed = [u for u in self._user if u.on_drop is None]
            started = [u for u in self._user if u.on_drop is not None]
            self._user = collections.deque(started)
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
