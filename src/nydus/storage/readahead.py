"""Locality readahead: after a user read misses the blob cache, fetch what follows it next.

A workload that misses a chunk usually reads the chunks right after it soon (the files of a
package sit together in a layer, so in its blob). :class:`Readahead` listens to every read of
a device's fetchers (:attr:`.fetcher.BlobFetcher.on_read`); when a read missed (it went to the
backend), the next chunks of the same blob after the missed range that are neither in the
cache nor in flight are queued as one prefetch job at the *head* of the prefetch queue
(:meth:`.scheduler.FetchScheduler.submit_front`, through :meth:`.prefetch.Prefetcher.
submit_readahead`). So:

* the window is fetched on a prefetch slot, through the same verified path as any prefetch
  (every chunk hashed before it enters the cache), and counted as prefetch traffic, plus the
  ``readahead_*`` metrics (windows, requests, bytes, and hits: chunks of a window a user later
  read, and their compressed bytes: ``readahead_bytes`` less those is what readahead fetched
  that no user read, so far);
* it never delays a user read: the scheduler admits it only while no user job runs or waits
  and no user read waits for the backend, like any prefetch job; but it does not wait for the
  ``user_idle`` hold-off of speculative prefetch (it follows the reads that asked for it; held
  off, it arrived after the read that needed it, and ``prefetch_all`` was slower than lazy).

Windows: each blob has up to :data:`STREAMS` streams (least recently used dropped). A miss
that falls inside a stream's last window or just after it (within :data:`MIN_WINDOW` of its
end) is a sequential hit of that stream: its window doubles, up to ``size`` (the config's
``readahead_size``), and the next window starts where the last one ended (or after the miss,
if that is further). Any other miss (a jump) starts a stream at :data:`MIN_WINDOW`. Windows are
counted in compressed bytes, at least one chunk each. Measured on the 1.3 GB ml image of
bench/coldstart_ml.py: 128 KiB doubling to 1 MiB was the sweet spot; windows of 1-8 MiB from the
start made W1 much slower (9.45 s vs 5.04 s): they keep the link busy when the next miss comes.

At most :data:`QUEUED_MAX` windows wait in the queue per device: an older one still queued is
dropped when a new one comes (its stream has moved on, or been dropped).

Thread-safe: one lock guards the streams; it is taken before a fetcher's own lock, never after.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from .fetcher import BlobFetcher, Chunk
from .metrics import BlobcacheMetrics
from .prefetch import Prefetcher
from .scheduler import PrefetchJob
from .streams import Streams

__all__ = ["MIN_WINDOW", "QUEUED_MAX", "Readahead", "STREAMS"]

MIN_WINDOW = 128 << 10  # a stream's first window (compressed bytes)
STREAMS = 4  # streams remembered per blob
QUEUED_MAX = 2 * STREAMS  # windows waiting in the queue per device
_WINDOW_CHUNKS_MAX = 1 << 16  # chunk indices of windows remembered per blob (for hits)


@dataclass
class _BlobState:
    streams: Streams = field(default_factory=lambda: Streams(STREAMS))
    queued: dict[int, int] = field(default_factory=dict)  # window chunks not read yet: size


class Readahead:
    """Locality readahead of one device (module docstring). ``size``: the largest window."""

    def __init__(self, prefetcher: Prefetcher, size: int, metrics: BlobcacheMetrics) -> None:
        self.prefetcher = prefetcher
        self.size = max(size, 1)
        self.metrics = metrics
        self._lock = threading.Lock()
        self._blobs: dict[BlobFetcher, _BlobState] = {}
        self._queued: collections.deque[tuple[BlobFetcher, PrefetchJob]] = collections.deque()

    def windows(self, fetcher: BlobFetcher) -> list[int]:
        """The window sizes of the blob's streams, least recently used first (for tests)."""
        with self._lock:
            st = self._blobs.get(fetcher)
            return st.streams.windows() if st is not None else []

    def on_read(self, fetcher: BlobFetcher, seen: Sequence[int], missed: Sequence[Chunk]) -> None:
        """A read of ``fetcher``'s blob is done: ``seen`` (chunk indices) came from the cache
        or another's flight, ``missed`` went to the backend. Queues the next window."""
        if not missed:  # a read served without the backend: only a hit may need counting
            st0 = self._blobs.get(fetcher)  # (no lock: a stale look only misses a metric)
            if st0 is None or not st0.queued:
                return
        hits = hit_bytes = 0
        chunks: list[Chunk] = []
        if missed and fetcher.meta() is None:  # (loaded on first use, outside the lock)
            missed = ()  # no ci array (RAFS v5): no blob order to read ahead in
        with self._lock:
            st = self._blobs.get(fetcher)
            if st is None:
                if not missed:
                    return
                st = self._blobs[fetcher] = _BlobState()
            if st.queued:
                for i in seen:
                    size = st.queued.pop(i, None)
                    if size is not None:
                        hits += 1
                        hit_bytes += size
            if missed:
                chunks = self._next_window_locked(fetcher, st, missed)
        if hits:
            self.metrics.add("readahead_hits", hits)
            self.metrics.add("readahead_hit_bytes", hit_bytes)
        if chunks:
            job = self.prefetcher.submit_readahead(fetcher, chunks)
            if job is not None:
                self._track(fetcher, job)

    def _next_window_locked(
        self, fetcher: BlobFetcher, st: _BlobState, missed: Sequence[Chunk]
    ) -> list[Chunk]:
        for c in missed:
            st.queued.pop(c.index, None)  # fetched by the user, not by readahead
        first = min(c.compressed_offset for c in missed)
        last = max(missed, key=lambda c: c.end)
        pos = fetcher.order_position(last.index)
        if pos is None:
            return []
        stream = st.streams.follow(first, MIN_WINDOW)  # sequential: grow, go on after it
        window = min(stream.window * 2 if stream else MIN_WINDOW, self.size)
        after = max(pos + 1, stream.next_pos if stream else 0)
        chunks, next_pos, end = fetcher.window_after(after, window)
        st.streams.note(stream, first, max(end, last.end), max(next_pos, after), window)
        if len(st.queued) + len(chunks) > _WINDOW_CHUNKS_MAX:
            st.queued.clear()
        st.queued.update((c.index, c.compressed_size) for c in chunks)
        return chunks

    def _track(self, fetcher: BlobFetcher, job: PrefetchJob) -> None:
        """Keep at most QUEUED_MAX windows queued: drop the oldest still waiting."""
        drop: list[tuple[BlobFetcher, PrefetchJob]] = []
        with self._lock:
            self._queued.append((fetcher, job))
            while len(self._queued) > QUEUED_MAX:
                drop.append(self._queued.popleft())
        for f, j in drop:
            sched = f.scheduler
            if sched is not None and sched.take(j):
                j.on_drop()
