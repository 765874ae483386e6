"""File-system I/O statistics with upstream nydusd's names (nydus-reference.md §4).

:class:`FsIoStats` is what ``GET /api/v1/metrics`` (global), ``/metrics/files`` (per inode,
when ``iostats_files``; or the inodes read since the last query with ``latest=true``) and
``/metrics/pattern`` (access pattern, when ``access_pattern``) return. Counters are indexed by
:class:`StatsFop` in upstream's order, so ``fop_hits[4]`` is READ in both implementations.

Threading contract: every method is thread-safe (one lock; updates are a few integer adds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

__all__ = ["StatsFop", "FsIoStats", "size_bucket", "latency_bucket"]


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

    def record(self, fop: StatsFop, ino: int, ok: bool, size: int = 0, micros: int = 0) -> None:
        """Account one operation on ``ino``; ``size`` is bytes read (READ only)."""
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
                            now, 1_000_000_000)
                    p.nr_read += 1
                if self.latest_read_files_enabled and ino:
                    self._latest.add(ino)

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
                    "nr_open": s.nr_open, "nr_max_open": s.nr_max_open,
                    "total_fops": s.total_fops, "data_read": s.data_read,
                    "block_count_read": list(s.block_count_read),
                    "fop_hits": list(s.fop_hits), "fop_errors": list(s.fop_errors),
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
        with self._lock:
            items = sorted(
                self._patterns.values(),
                key=lambda p: (p.first_access_time_secs, p.first_access_time_nanos, p.ino),
            )
            snapshot = [
                (p.ino, p.file_path, p.nr_read, p.first_access_time_secs,
                 p.first_access_time_nanos)
                for p in items
            ]
        out = []
        for ino, path, nr, secs, nanos in snapshot:
            if not path:
                path = self._path_of(ino)
                with self._lock:
                    if ino in self._patterns:
                        self._patterns[ino].file_path = path
            out.append({
                "ino": ino, "file_path": path, "nr_read": nr,
                "first_access_time_secs": secs, "first_access_time_nanos": nanos,
            })
        return out
