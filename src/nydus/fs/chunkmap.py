"""The chunk → file reverse mapping: which file ranges a range of a blob holds.

In kernel EROFS mode the daemon only sees reads of blob devices (blob index, uncompressed
offset, size: :mod:`nydus.daemon.blobdev`), never which file the kernel was reading. To record a
container's access pattern in that mode (issue 17: the input of ``nydusify optimize``), the blob
ranges are mapped back to files here: every chunk of every regular file of a bootstrap is indexed
by ``(blob index, uncompressed offset)``, and :meth:`ChunkFileMap.files_in` returns the file
ranges a blob range overlaps. A chunk shared by several files (deduplicated) maps to each of
them; hardlinks share one node and are reported under their first path in walk order.

:class:`ChunkFileMap` is immutable once built and safe to share between threads. Building it
walks the whole tree (one ``chunks()`` call per regular file), so callers build it lazily, when
a pattern is exported, not on every read.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from ..metadata import Nid, RafsMetadata

__all__ = ["ChunkFileMap", "FileRange"]


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes at ``offset`` of the regular file ``nid`` (first path ``path``)."""

    nid: Nid
    path: str
    offset: int
    length: int


class ChunkFileMap:
    """See the module docstring."""

    def __init__(self, meta: RafsMetadata) -> None:
        self.paths: dict[Nid, str] = {}
        rows: dict[int, list[tuple[int, int, Nid, int]]] = {}
        for path, nid in meta.walk():
            if nid in self.paths:
                continue  # a hardlink: the first path names it
            if not meta.getattr(nid).is_reg:
                continue
            self.paths[nid] = path.decode(errors="surrogateescape")
            for c in meta.chunks(nid):
                rows.setdefault(c.blob_index, []).append(
                    (c.uncompressed_offset, c.uncompressed_size, nid, c.file_offset)
                )
        self._rows: dict[int, list[tuple[int, int, Nid, int]]] = {}
        self._starts: dict[int, list[int]] = {}
        self._longest: dict[int, int] = {}
        for blob, rs in rows.items():
            rs.sort()
            self._rows[blob] = rs
            self._starts[blob] = [r[0] for r in rs]
            self._longest[blob] = max(r[1] for r in rs)

    def chunk_count(self) -> int:
        return sum(len(r) for r in self._rows.values())

    def files_in(self, blob_index: int, offset: int, size: int) -> list[FileRange]:
        """File ranges that ``[offset, offset + size)`` of blob ``blob_index`` (uncompressed
        addresses, as the blob device presents the blob) overlaps, in blob order."""
        rows = self._rows.get(blob_index)
        if not rows or size <= 0:
            return []
        end = offset + size
        starts = self._starts[blob_index]
        i = bisect.bisect_left(starts, offset - self._longest[blob_index] + 1)
        out: list[FileRange] = []
        while i < len(rows) and rows[i][0] < end:
            cstart, csize, nid, foff = rows[i]
            i += 1
            lo, hi = max(offset, cstart), min(end, cstart + csize)
            if lo < hi:
                out.append(FileRange(nid, self.paths[nid], foff + lo - cstart, hi - lo))
        return out
