"""Backend and blob-cache metrics with upstream nydusd's names (nydus-reference.md §4).

:class:`BackendMetrics` counts backend read requests (count, errors, bytes, latency
histograms by request size); :class:`BlobcacheMetrics` counts cache reads, hits and prefetch
work. ``export()`` returns the JSON-ready dict that ``/api/v1/metrics/backend`` and
``/api/v1/metrics/blobcache`` serve. All methods are thread-safe (one small lock each).
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["BackendMetrics", "BlobcacheMetrics", "request_size_index", "latency_index"]

SIZE_BUCKETS = 8  # <1K, 1K~, 4K~, 16K~, 64K~, 128K~, 512K~, 1M~
LATENCY_BUCKETS = 8  # <=1ms, <=20ms, <=50ms, <=100ms, <=500ms, <=1s, <=2s, >2s

_SIZE_LIMITS = (0x400, 0x1000, 0x4000, 0x1_0000, 0x2_0000, 0x8_0000, 0x10_0000)
_LATENCY_LIMITS_MS = (1, 20, 50, 100, 500, 1000, 2000)


def request_size_index(size: int) -> int:
    """Upstream's size bucket: 0 for < 1 KiB ... 7 for >= 1 MiB."""
    for i, lim in enumerate(_SIZE_LIMITS):
        if size < lim:
            return i
    return SIZE_BUCKETS - 1


def latency_index(millis: int) -> int:
    for i, lim in enumerate(_LATENCY_LIMITS_MS):
        if millis <= lim:
            return i
    return LATENCY_BUCKETS - 1


class BackendMetrics:
    def __init__(self, id: str, backend_type: str) -> None:
        self.id = id
        self.backend_type = backend_type
        self._lock = threading.Lock()
        self.read_count = 0
        self.read_errors = 0
        self.read_amount_total = 0
        self.read_cumulative_latency_millis_total = 0
        self.read_cumulative_latency_millis_dist = [0] * SIZE_BUCKETS
        self.read_count_block_size_dist = [0] * SIZE_BUCKETS
        self.read_latency_sizes_dist = [[0] * LATENCY_BUCKETS for _ in range(SIZE_BUCKETS)]

    def begin(self) -> float:
        return time.monotonic()

    def end(self, begin: float, size: int, error: bool) -> None:
        """Record one request of ``size`` bytes that started at ``begin``."""
        millis = int((time.monotonic() - begin) * 1000)
        si, li = request_size_index(size), latency_index(millis)
        with self._lock:
            self.read_count += 1
            if error:
                self.read_errors += 1
            else:
                self.read_amount_total += size
            self.read_cumulative_latency_millis_total += millis
            self.read_cumulative_latency_millis_dist[si] += millis
            self.read_count_block_size_dist[si] += 1
            self.read_latency_sizes_dist[si][li] += 1

    def export(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id,
                "backend_type": self.backend_type,
                "read_count": self.read_count,
                "read_errors": self.read_errors,
                "read_amount_total": self.read_amount_total,
                "read_cumulative_latency_millis_total": self.read_cumulative_latency_millis_total,
                "read_cumulative_latency_millis_dist": list(
                    self.read_cumulative_latency_millis_dist
                ),
                "read_count_block_size_dist": list(self.read_count_block_size_dist),
                "read_latency_sizes_dist": [list(r) for r in self.read_latency_sizes_dist],
            }


class BlobcacheMetrics:
    """Counters of one device's blob caches. ``underlying_files`` lists the cache files."""

    _COUNTERS = (
        "partial_hits",
        "whole_hits",
        "total",
        "entries_count",
        "prefetch_data_amount",
        "prefetch_requests_count",
        "prefetch_unmerged_chunks",
        "prefetch_cumulative_time_millis",
        "prefetch_begin_time_secs",
        "prefetch_begin_time_millis",
        "prefetch_end_time_secs",
        "prefetch_end_time_millis",
        "buffered_backend_size",
        # an extension: where the time of fetching goes (microseconds, summed over threads)
        "readpath_user_fetches",  # user reads that went to the backend
        "readpath_user_fetch_micros",  # their wall time, from the plan to the last chunk
        "readpath_requests",  # backend requests of user reads
        "readpath_queue_micros",  # a request waiting for a fetch slot
        "readpath_backend_micros",  # a request on the wire (send to last byte)
        "readpath_decode_micros",  # decompressing fetched chunks (user and prefetch)
        "readpath_verify_micros",  # hashing them
        "readpath_cache_micros",  # writing them to the blob cache
        "readpath_ahead_requests",  # read-ahead windows of sequential reads
        "readpath_behind_prefetch",  # user requests started with prefetch requests in flight
        "readpath_behind_prefetch_bytes",  # the prefetch bytes then in flight (summed)
        # an extension: locality readahead after user misses (storage/readahead.py); its
        # requests and bytes are counted in prefetch_requests_count / prefetch_data_amount too
        "readahead_windows",  # windows queued (at the head of the prefetch queue)
        "readahead_requests",  # windows that sent a backend request
        "readahead_bytes",  # the compressed bytes they requested
        "readahead_hits",  # chunks of windows later read by a user (cache or its flight)
        "readahead_hit_bytes",  # their compressed bytes
    )

    def __init__(self, id: str, store_path: str) -> None:
        self.id = id
        self.store_path = store_path
        self._lock = threading.Lock()
        self.underlying_files: set[str] = set()
        self.prefetch_workers = 0
        self.data_all_ready = False
        self.data_all_durable = False  # an extension: ready, and synced to disk since
        self._c: dict[str, int] = dict.fromkeys(self._COUNTERS, 0)

    def add(self, name: str, value: int = 1) -> None:
        with self._lock:
            self._c[name] += value

    def set(self, name: str, value: int) -> None:
        with self._lock:
            self._c[name] = value

    def get(self, name: str) -> int:
        with self._lock:
            return self._c[name]

    def add_file(self, path: str) -> None:
        with self._lock:
            self.underlying_files.add(path)

    def prefetch_begin(self) -> None:
        now = time.time()
        with self._lock:
            if self._c["prefetch_begin_time_secs"] == 0:
                self._c["prefetch_begin_time_secs"] = int(now)
                self._c["prefetch_begin_time_millis"] = int(now * 1000) % 1000

    def prefetch_end(self) -> None:
        now = time.time()
        with self._lock:
            self._c["prefetch_end_time_secs"] = int(now)
            self._c["prefetch_end_time_millis"] = int(now * 1000) % 1000

    def export(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "id": self.id,
                "underlying_files": sorted(self.underlying_files),
                "store_path": self.store_path,
                "prefetch_workers": self.prefetch_workers,
                "data_all_ready": self.data_all_ready,
                "data_all_durable": self.data_all_durable,
            }
            out.update(self._c)
            return out
