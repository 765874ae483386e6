"""The storage backend interface: read a byte range of a blob, learn a blob's size.

Every backend (localfs, registry, s3, oss, http-proxy, and in-memory fakes in tests) subclasses
:class:`BlobBackend` and implements ``_blob_size`` and ``_read``. The public ``read`` /
``read_ranges`` / ``blob_size`` wrap them with metrics and a length check, so a backend that
returns the wrong number of bytes is a :class:`BackendError`, never silent corruption.

Caches never see a backend object: :meth:`BlobBackend.fetcher` hands them an fsspec-style
``fetch(start, end) -> bytes`` callable bound to one blob (design.md).

Backends are thread-safe: many threads may call ``read`` at once.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import BackendError, NydusError
from .metrics import BackendMetrics

__all__ = ["BlobBackend", "Fetch", "MemoryBackend"]

Fetch = Callable[[int, int], bytes]
"""``fetch(start, end)``: the bytes ``[start, end)`` of one blob, exactly ``end - start``."""


class BlobBackend(ABC):
    """A store of blobs addressed by blob id (the hex sha256 of the blob)."""

    type: str = "?"
    max_parallel = 1  # concurrent range requests of one read_ranges call (network backends: 8)

    def __init__(self, id: str = "") -> None:
        self.metrics = BackendMetrics(id, self.type)
        self._sizes: dict[str, int] = {}
        self._sizes_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ implement these

    @abstractmethod
    def _blob_size(self, blob_id: str) -> int: ...

    @abstractmethod
    def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset``; may return fewer only at the end of the blob."""

    def _read_ranges(self, blob_id: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several ``(offset, size)`` ranges, ``max_parallel`` at once on a small thread pool."""
        if len(ranges) <= 1 or self.max_parallel <= 1:
            return [self._read(blob_id, off, size) for off, size in ranges]
        with self._sizes_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.max_parallel, thread_name_prefix=f"nydus-{self.type}"
                )
            pool = self._pool
        return list(pool.map(lambda r: self._read(blob_id, r[0], r[1]), ranges))

    def close(self) -> None:
        """Release connections and threads; subclasses call ``super().close()``."""
        with self._sizes_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------ public api

    def blob_size(self, blob_id: str) -> int:
        with self._sizes_lock:
            hit = self._sizes.get(blob_id)
        if hit is not None:
            return hit
        try:
            size = self._blob_size(blob_id)
        except NydusError:
            raise
        except OSError as e:
            raise BackendError(f"{self.type}: size of blob {blob_id}: {e}") from e
        with self._sizes_lock:
            self._sizes[blob_id] = size
        return size

    def read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` of the blob, or BackendError."""
        return self.read_ranges(blob_id, [(offset, size)])[0]

    def read_ranges(self, blob_id: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Exactly the requested bytes of each ``(offset, size)`` range, in order."""
        for off, size in ranges:
            if off < 0 or size < 0:
                raise BackendError(f"{self.type}: bad range [{off}, +{size}) of {blob_id}")
        begin = self.metrics.begin()
        try:
            out = self._read_ranges(blob_id, ranges)
            for (off, size), data in zip(ranges, out, strict=True):
                if len(data) != size:
                    raise BackendError(
                        f"{self.type}: blob {blob_id} range [{off}, +{size}) returned "
                        f"{len(data)} bytes"
                    )
        except NydusError:
            self._account(begin, ranges, True)
            raise
        except OSError as e:
            self._account(begin, ranges, True)
            raise BackendError(f"{self.type}: read of blob {blob_id} failed: {e}") from e
        self._account(begin, ranges, False)
        return out

    def _account(self, begin: float, ranges: Sequence[tuple[int, int]], error: bool) -> None:
        """One metrics record per range request (ranges of one call run concurrently and
        share the call's latency); a failed call is one error record."""
        if error:
            self.metrics.end(begin, sum(s for _, s in ranges), True)
            return
        for _, size in ranges:
            self.metrics.end(begin, size, False)

    def fetcher(self, blob_id: str) -> Fetch:
        """A ``fetch(start, end)`` callable for one blob."""

        def fetch(start: int, end: int) -> bytes:
            return self.read(blob_id, start, end - start)

        return fetch


class MemoryBackend(BlobBackend):
    """Blobs held in a dict: the in-process fake for tests. Counts requests and bytes."""

    type = "memory"

    def __init__(self, blobs: dict[str, bytes] | None = None, id: str = "") -> None:
        super().__init__(id)
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.requests: list[tuple[str, int, int]] = []
        self.hook: Callable[[str, int, int], None] | None = None
        self._lock = threading.Lock()

    @property
    def bytes_read(self) -> int:
        with self._lock:
            return sum(s for _, _, s in self.requests)

    def _blob_size(self, blob_id: str) -> int:
        try:
            return len(self.blobs[blob_id])
        except KeyError:
            raise BackendError(f"memory: no blob {blob_id}") from None

    def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        if self.hook is not None:
            self.hook(blob_id, offset, size)
        with self._lock:
            self.requests.append((blob_id, offset, size))
        try:
            blob = self.blobs[blob_id]
        except KeyError:
            raise BackendError(f"memory: no blob {blob_id}") from None
        return blob[offset : offset + size]
