"""Background prefetch: batches, request merging and a bandwidth limit (nydus-reference.md §3.3).

:class:`Prefetcher` cuts the chunks to prefetch into batches: runs of chunks of one blob, in
blob order, spanning at most ``merging_size`` bytes, so each batch is (at most) one backend
request. Each batch is a prefetch job of the device's :class:`.scheduler.FetchScheduler`, which
runs at most ``threads_count`` of them at once, and none while a user read waits for the
backend; a read that wants a chunk of a queued batch takes the batch over (see
:mod:`.fetcher`). Before its request a batch takes tokens from a :class:`TokenBucket`
(``bandwidth_rate`` bytes/s, 0 = unlimited, raised to at least one chunk as upstream does).
Chunks ready or in flight when a batch runs are skipped. :meth:`Prefetcher.submit_readahead`
queues a readahead window (:mod:`.readahead`) the same way, at the head of the queue; its bytes
count as prefetch traffic and in the ``readahead_*`` metrics.

Thread-safe. :meth:`Prefetcher.close` drops the batches still queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ..libc import heap_trimmer
from .fetcher import BlobFetcher, Chunk
from .metrics import BlobcacheMetrics
from .scheduler import PrefetchJob

__all__ = ["Prefetcher", "TokenBucket", "batches"]

log = logging.getLogger(__name__)


class TokenBucket:
    """``rate`` bytes per second with a burst of one second; ``rate <= 0`` is unlimited."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = float(rate)
        self._tokens = float(rate)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, n: int) -> float:
        """Take ``n`` tokens, sleeping as needed; returns the seconds slept."""
        if self.rate <= 0 or n <= 0:
            return 0.0
        with self._lock:  # serialises waiters: first come, first served
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n  # may go negative: a request larger than the burst
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                time.sleep(wait)
                self._last = time.monotonic()
                self._tokens = 0.0
            return wait


def batches(chunks: Sequence[Chunk], merging_size: int) -> list[list[Chunk]]:
    """Sort by blob position, drop duplicates, and cut into runs of at most ``merging_size``
    bytes (a single larger chunk is its own batch)."""
    seen: set[int] = set()
    ordered: list[Chunk] = []
    for c in sorted(chunks, key=lambda c: c.compressed_offset):
        if c.index not in seen:
            seen.add(c.index)
            ordered.append(c)
    out: list[list[Chunk]] = []
    cur: list[Chunk] = []
    start = 0
    for c in ordered:
        if cur and c.end - start > merging_size:
            out.append(cur)
            cur = []
        if not cur:
            start = c.compressed_offset
        cur.append(c)
    if cur:
        out.append(cur)
    return out


class Prefetcher:
    """Cuts prefetch work into batches and queues them on the fetch scheduler."""

    def __init__(
        self,
        threads: int,
        merging_size: int,
        bandwidth_rate: int,
        metrics: BlobcacheMetrics,
        *,
        min_rate: int = 0,
    ) -> None:
        self.threads = max(threads, 1)
        self.merging_size = max(merging_size, 1)
        rate = max(bandwidth_rate, min_rate) if bandwidth_rate > 0 else 0
        self.bucket = TokenBucket(rate)
        self.metrics = metrics
        self._pending = 0
        self._started = False
        self._jobs: set[tuple[BlobFetcher, PrefetchJob]] = set()
        self._cond = threading.Condition()
        self._stop = threading.Event()

    def submit(self, fetcher: BlobFetcher, chunks: Sequence[Chunk], *, hinted: bool = False) -> int:
        """Queue chunks of one blob; returns the number of batches queued. ``hinted``: the
        chunks of files the workload is known to read (see :class:`.scheduler.PrefetchJob`)."""
        if self._stop.is_set() or fetcher.cache is None or fetcher.scheduler is None:
            return 0
        work = batches(chunks, self.merging_size)
        if not work:
            return 0
        now = time.monotonic()
        with self._cond:
            if not self._started:
                self._started = True
                self.metrics.prefetch_workers = self.threads
                self.metrics.prefetch_begin()
            self._pending += len(work)
        self.metrics.add("prefetch_unmerged_chunks", sum(len(b) for b in work))
        for b in work:
            self._queue(fetcher, b, now, hinted)
        return len(work)

    def submit_readahead(self, fetcher: BlobFetcher, chunks: Sequence[Chunk]) -> PrefetchJob | None:
        """Queue a readahead window (chunks of one blob in blob order) at the head of the
        prefetch queue as one job; the job, or None if nothing was queued."""
        if not chunks or self._stop.is_set() or fetcher.cache is None or fetcher.scheduler is None:
            return None
        with self._cond:
            self._pending += 1
        self.metrics.add("readahead_windows")
        return self._queue(fetcher, list(chunks), time.monotonic(), False, readahead=True)

    def _queue(
        self,
        fetcher: BlobFetcher,
        batch: list[Chunk],
        queued_at: float,
        hinted: bool,
        *,
        readahead: bool = False,
    ) -> PrefetchJob:
        def run() -> None:
            with self._cond:
                self._jobs.discard(key)
            try:
                if self._stop.is_set():
                    return
                _n, nbytes = fetcher.prefetch(
                    batch,
                    max_request=self.merging_size,
                    before_fetch=self.bucket.acquire,
                    fetched=job.fetched,
                )
                if nbytes:
                    self.metrics.add("prefetch_requests_count")
                    self.metrics.add("prefetch_data_amount", nbytes)
                    if readahead:
                        self.metrics.add("readahead_requests")
                        self.metrics.add("readahead_bytes", nbytes)
                    self.metrics.add(
                        "prefetch_cumulative_time_millis",
                        int((time.monotonic() - queued_at) * 1000),
                    )
            finally:
                self._done_one()

        def dropped() -> None:  # closed before it ran
            with self._cond:
                self._jobs.discard(key)
            self._done_one()

        nbytes = batch[-1].end - batch[0].compressed_offset
        job = PrefetchJob(run, dropped, nbytes, hinted=hinted, readahead=readahead)
        key = (fetcher, job)
        with self._cond:
            self._jobs.add(key)
        fetcher.queue_prefetch(job, front=readahead)
        return job

    def run_async(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` (which usually calls :meth:`submit`) on its own thread; :meth:`wait`
        covers it. Used so that resolving what to prefetch (which may fetch a blob's ci array)
        never blocks the caller."""
        if self._stop.is_set():
            return
        with self._cond:
            self._pending += 1

        def run() -> None:
            try:
                fn()
            except Exception as e:
                log.warning("prefetch submission failed: %s", e)
            finally:
                self._done_one()

        threading.Thread(target=run, name="nydus-prefetch-submit", daemon=True).start()

    def _done_one(self) -> None:
        with self._cond:
            self._pending -= 1
            if self._pending == 0:
                if self._started:
                    self.metrics.prefetch_end()
                    heap_trimmer().nudge()  # its chunk buffers are free now
                self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued batch is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Drop the batches still queued (a batch being fetched finishes)."""
        self._stop.set()
        with self._cond:
            jobs = list(self._jobs)
        for fetcher, job in jobs:
            sched = fetcher.scheduler
            if sched is not None and sched.take(job):
                job.on_drop()
