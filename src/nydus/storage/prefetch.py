"""Background prefetch: worker threads, request merging, a bandwidth limit, and priority for
user reads (nydus-reference.md §3.3).

:class:`Prefetcher` owns ``threads_count`` daemon threads that take batches of chunks from a
FIFO queue. A batch is a run of chunks of one blob, in blob order, spanning at most
``merging_size`` bytes, so each batch is (at most) one backend request. Before a request a
worker takes tokens from a :class:`TokenBucket` (``bandwidth_rate`` bytes/s, 0 = unlimited,
raised to at least one chunk as upstream does).

User reads jump the queue: they never wait for prefetch. They fetch their chunks directly on
the caller's thread, and while any user read is in progress (:class:`UserIoGate`) workers hold
back before starting their next request, so the link is free for the reader. Chunks a user
read already fetched are skipped by the worker (they are ready or in flight).

Thread-safe. :meth:`Prefetcher.close` stops the workers (queued work is dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from .fetcher import BlobFetcher, Chunk
from .metrics import BlobcacheMetrics

__all__ = ["Prefetcher", "TokenBucket", "UserIoGate", "batches"]

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


class UserIoGate:
    """Counts user reads in progress; prefetch workers wait for it to drain."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0

    def __enter__(self) -> UserIoGate:
        with self._cond:
            self._active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    @property
    def active(self) -> int:
        return self._active

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)


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
    def __init__(
        self,
        threads: int,
        merging_size: int,
        bandwidth_rate: int,
        metrics: BlobcacheMetrics,
        gate: UserIoGate,
        *,
        min_rate: int = 0,
        user_wait: float = 1.0,
    ) -> None:
        self.threads = max(threads, 1)
        self.merging_size = max(merging_size, 1)
        rate = max(bandwidth_rate, min_rate) if bandwidth_rate > 0 else 0
        self.bucket = TokenBucket(rate)
        self.metrics = metrics
        self.gate = gate
        self.user_wait = user_wait
        self._q: queue.Queue[tuple[BlobFetcher, list[Chunk], float] | None] = queue.Queue()
        self._pending = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._started = False
        self._start_lock = threading.Lock()

    def _start(self) -> None:
        with self._start_lock:
            if self._started:
                return
            self._started = True
            for i in range(self.threads):
                t = threading.Thread(target=self._work, name=f"nydus-prefetch-{i}", daemon=True)
                t.start()
                self._workers.append(t)
            self.metrics.prefetch_workers = self.threads
            self.metrics.prefetch_begin()

    def submit(self, fetcher: BlobFetcher, chunks: Sequence[Chunk]) -> int:
        """Queue chunks of one blob; returns the number of batches queued."""
        if self._stop.is_set() or fetcher.cache is None:
            return 0
        work = batches(chunks, self.merging_size)
        if not work:
            return 0
        self._start()
        now = time.monotonic()
        with self._cond:
            self._pending += len(work)
        for b in work:
            self._q.put((fetcher, b, now))
        self.metrics.add("prefetch_unmerged_chunks", sum(len(b) for b in work))
        return len(work)

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
                self._cond.notify_all()

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self._q.get()
            if item is None:
                return
            fetcher, batch, queued_at = item
            try:
                if self.gate.active:
                    self.gate.wait_idle(self.user_wait)
                if self._stop.is_set():
                    continue
                _n, nbytes = fetcher.prefetch(
                    batch, max_request=self.merging_size, before_fetch=self.bucket.acquire
                )
                if nbytes:
                    self.metrics.add("prefetch_requests_count")
                    self.metrics.add("prefetch_data_amount", nbytes)
                    self.metrics.add(
                        "prefetch_cumulative_time_millis",
                        int((time.monotonic() - queued_at) * 1000),
                    )
            except Exception as e:  # pragma: no cover - prefetch() already catches
                log.warning("prefetch worker: %s", e)
            finally:
                self._done_one()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued batch is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        self._stop.set()
        # drop queued work, then wake every worker
        try:
            while True:
                item = self._q.get_nowait()
                if item is not None:
                    with self._cond:
                        self._pending -= 1
        except queue.Empty:
            pass
        with self._cond:
            self._cond.notify_all()
        for _ in self._workers:
            self._q.put(None)
        for t in self._workers:
            t.join(timeout=5)
