"""File-system I/O statistics with upstream nydusd's names (nydus-reference.md §4).

:class:`FsIoStats` is what ``GET /api/v1/metrics`` (global), ``/metrics/files`` (per inode,
when ``iostats_files``; or the inodes read since the last query with ``latest=true``) and
``/metrics/pattern`` (access pattern, when ``access_pattern``) return. Counters are indexed by
:class:`StatsFop` in upstream's order, so ``fop_hits[4]`` is READ in both implementations.

Access pattern: upstream's entries (``ino``, ``file_path``, ``nr_read``, first access time) in
first-access order, plus ``ranges`` (``[[offset, length], ...]``, merged) and ``bytes_read``: what
of each file was read. FUSE RAFS mode records file reads directly (:meth:`FsIoStats.record` with
``offset``); kernel EROFS mode records blob-device reads (:meth:`FsIoStats.record_blob_read`),
which the export maps back to files through ``blob_resolver`` (the chunk → file reverse mapping,
:mod:`nydus.fs.chunkmap`).

Threading contract: every method is thread-safe (one lock; updates are a few integer adds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

__all__ = ["StatsFop", "FsIoStats", "size_bucket", "latency_bucket", "merge_ranges"]


class StatsFop(IntEnum):
    GETATTR = 0
    READLINK = 1
    OPEN = 2
    RELEASE = 3
    READ = 4
    STATFS = 5
    GETXATTR = 6
    LISTXATTR = 7
    OPENDIR = 8
    LOOKUP = 9
    READDIR = 10
    READDIRPLUS = 11
    ACCESS = 12
    FORGET = 13
    BATCH_FORGET = 14


FOP_COUNT = len(StatsFop)
BLOCK_BUCKETS = 8  # <1K, 1K, 4K, 16K, 64K, 128K, 512K, 1M+
LATENCY_BUCKETS = 8  # <=1ms, 20ms, 50ms, 100ms, 500ms, 1s, 2s, >2s


def size_bucket(size: int) -> int:
    for i, shift in enumerate((10, 12, 14, 16, 17, 19, 20)):
        if size >> shift == 0:
            return i
    return 7


def latency_bucket(micros: int) -> int:
    for i, limit in enumerate((1_000, 20_000, 50_000, 100_000, 500_000, 1_000_000, 2_000_000)):
        if micros <= limit:
            return i
    return 7


@dataclass(slots=True)
class _Counters:
    """What is counted for the whole file system and, with ``iostats_files``, for each file.

    Upstream's per-file names; :meth:`FsIoStats.export_global` renames the open counts
    (``nr_opens``, ``nr_max_opens``) and leaves ``total_fops`` out, as upstream does.
    """

    nr_open: int = 0
    nr_max_open: int = 0
    total_fops: int = 0
    data_read: int = 0
    block_count_read: list[int] = field(default_factory=lambda: [0] * BLOCK_BUCKETS)
    fop_hits: list[int] = field(default_factory=lambda: [0] * FOP_COUNT)
    fop_errors: list[int] = field(default_factory=lambda: [0] * FOP_COUNT)

    def account(self, fop: StatsFop, ok: bool, size: int) -> None:
        """One operation; the caller holds the owner's lock."""
        self.total_fops += 1
        if ok:
            self.fop_hits[fop] += 1
            if fop == StatsFop.READ:
                self.data_read += size
                self.block_count_read[size_bucket(size)] += 1
            elif fop == StatsFop.OPEN:
                self.nr_open += 1
                self.nr_max_open = max(self.nr_max_open, self.nr_open)
            elif fop == StatsFop.RELEASE:
                self.nr_open = max(0, self.nr_open - 1)
        else:
            self.fop_errors[fop] += 1


@dataclass
class _Pattern:
    ino: int
    file_path: str
    nr_read: int = 0
    first_access_time_secs: int = 0
    first_access_time_nanos: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) file ranges

    def add_range(self, lo: int, hi: int) -> None:
        r = self.ranges
        if r and r[-1][0] <= hi and lo <= r[-1][1]:
            r[-1] = (min(lo, r[-1][0]), max(hi, r[-1][1]))
            return
        r.append((lo, hi))
        if len(r) > _MAX_RANGES:
            self.ranges = merge_ranges(r)

    def merged(self) -> list[tuple[int, int]]:
        self.ranges = merge_ranges(self.ranges)
        return self.ranges


_MAX_RANGES = 256  # per file, before an in-place merge
_MAX_BLOB_READS = 1 << 20  # blob-device reads waiting for the export (beyond: coalesced)

# (blob index, offset, size) -> [(ino, path, file offset, length)]
BlobResolver = Callable[[int, int, int], list[tuple[int, str, int, int]]]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges with overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


class FsIoStats:
    """Global, per-file and access-pattern counters of one file system instance."""

    def __init__(
        self,
        fs_id: str,
        *,
        files_enabled: bool = False,
        access_pattern: bool = False,
        latest_read_files: bool = False,
        path_of: Callable[[int], str] | None = None,
        blob_resolver: BlobResolver | None = None,
    ) -> None:
        self.id = fs_id
        self.files_enabled = files_enabled
        self.access_pattern_enabled = access_pattern
        self.latest_read_files_enabled = latest_read_files
        self.measure_latency = True
        self._path_of = path_of or (lambda ino: "")
        self._lock = threading.Lock()
        self._global = _Counters()
        self.fop_cumulative_latency_total = [0] * FOP_COUNT
        self.read_latency_dist = [0] * LATENCY_BUCKETS
        self.last_fop_tp = 0
        self._files: dict[int, _Counters] = {}
        self._patterns: dict[int, _Pattern] = {}
        self._latest: set[int] = set()
        self.blob_resolver = blob_resolver
        # blob-device reads not yet mapped to files: (blob, offset, size, time ns)
        self._blob_reads: list[tuple[int, int, int, int]] = []

    def record(
        self, fop: StatsFop, ino: int, ok: bool, size: int = 0, micros: int = 0, offset: int = -1
    ) -> None:
        """Account one operation on ``ino``; ``size`` is bytes read (READ only), ``offset``
        where the read started (READ; for the access pattern's ranges)."""
        now = time.time_ns()
        with self._lock:
            self.last_fop_tp = now // 1_000_000_000
            self._global.account(fop, ok, size)
            if self.measure_latency and micros:
                self.fop_cumulative_latency_total[fop] += micros
                if fop == StatsFop.READ:
                    self.read_latency_dist[latency_bucket(micros)] += 1
            if self.files_enabled and ino:
                fs = self._files.get(ino)
                if fs is None:
                    fs = self._files[ino] = _Counters()
                fs.account(fop, ok, size)
            if fop == StatsFop.READ and ok:
                if self.access_pattern_enabled and ino:
                    p = self._patterns.get(ino)
                    if p is None:
                        p = self._patterns[ino] = _Pattern(ino, "")
                        p.first_access_time_secs, p.first_access_time_nanos = divmod(
                            now, 1_000_000_000
                        )
                    p.nr_read += 1
                    if offset >= 0 and size > 0:
                        p.add_range(offset, offset + size)
                if self.latest_read_files_enabled and ino:
                    self._latest.add(ino)

    def record_blob_read(self, blob_index: int, offset: int, size: int) -> None:
        """A blob-device read (kernel EROFS mode), for the access pattern: mapped to files
        when the pattern is exported."""
        if not self.access_pattern_enabled or size <= 0:
            return
        now = time.time_ns()
        with self._lock:
            reads = self._blob_reads
            if reads:
                b, o, n, t = reads[-1]
                if b == blob_index and o + n == offset:  # sequential: one entry
                    reads[-1] = (b, o, n + size, t)
                    return
            if len(reads) >= _MAX_BLOB_READS:
                return  # the pattern is a hint; a runaway workload does not grow it further
            reads.append((blob_index, offset, size, now))

    def _resolve_blob_reads(self) -> None:
        """Map the pending blob-device reads to files (outside the lock: building the reverse
        mapping walks the image) and merge them into the per-file patterns."""
        resolver = self.blob_resolver
        if resolver is None:
            return
        with self._lock:
            pending, self._blob_reads = self._blob_reads, []
        if not pending:
            return
        mapped = [(t, resolver(b, o, n)) for b, o, n, t in pending]
        with self._lock:
            for t, franges in mapped:
                touched: set[int] = set()
                for ino, path, foff, length in franges:
                    p = self._patterns.get(ino)
                    if p is None:
                        p = self._patterns[ino] = _Pattern(ino, path)
                        p.first_access_time_secs, p.first_access_time_nanos = divmod(
                            t, 1_000_000_000
                        )
                    if ino not in touched:
                        touched.add(ino)
                        p.nr_read += 1
                    p.add_range(foff, foff + length)

    # ------------------------------------------------------------------ export

    def export_global(self) -> dict[str, Any]:
        with self._lock:
            g = self._global
            return {
                "files_account_enabled": self.files_enabled,
                "access_pattern_enabled": self.access_pattern_enabled,
                "record_latest_read_files_enabled": self.latest_read_files_enabled,
                "measure_latency": self.measure_latency,
                "id": self.id,
                "data_read": g.data_read,
                "block_count_read": list(g.block_count_read),
                "fop_hits": list(g.fop_hits),
                "fop_errors": list(g.fop_errors),
                "fop_cumulative_latency_total": list(self.fop_cumulative_latency_total),
                "read_latency_dist": list(self.read_latency_dist),
                "nr_opens": g.nr_open,
                "nr_max_opens": g.nr_max_open,
                "last_fop_tp": self.last_fop_tp,
            }

    def export_files(self) -> dict[str, dict[str, Any]]:
        """Per-inode counters, keyed by inode number (as a string: JSON object keys)."""
        with self._lock:
            return {
                str(ino): {
                    "nr_open": s.nr_open,
                    "nr_max_open": s.nr_max_open,
                    "total_fops": s.total_fops,
                    "data_read": s.data_read,
                    "block_count_read": list(s.block_count_read),
                    "fop_hits": list(s.fop_hits),
                    "fop_errors": list(s.fop_errors),
                }
                for ino, s in sorted(self._files.items())
            }

    def export_latest_read_files(self) -> list[int]:
        """Inodes read since the previous call (then forgotten), sorted."""
        with self._lock:
            out = sorted(self._latest)
            self._latest.clear()
        return out

    def export_patterns(self) -> list[dict[str, Any]]:
        """Read files in first-access order: the input for a prefetch list."""
        self._resolve_blob_reads()
        with self._lock:
            items = sorted(
                self._patterns.values(),
                key=lambda p: (p.first_access_time_secs, p.first_access_time_nanos, p.ino),
            )
            snapshot = [
                (
                    p.ino,
                    p.file_path,
                    p.nr_read,
                    p.first_access_time_secs,
                    p.first_access_time_nanos,
                    list(p.merged()),
                )
                for p in items
            ]
        out = []
        for ino, path, nr, secs, nanos, ranges in snapshot:
            if not path:
                path = self._path_of(ino)
                with self._lock:
                    if ino in self._patterns:
                        self._patterns[ino].file_path = path
            out.append(
                {
                    "ino": ino,
                    "file_path": path,
                    "nr_read": nr,
                    "first_access_time_secs": secs,
                    "first_access_time_nanos": nanos,
                    "ranges": [[lo, hi - lo] for lo, hi in ranges],
                    "bytes_read": sum(hi - lo for lo, hi in ranges),
                }
            )
        return out
