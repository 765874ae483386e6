"""Reading zran chunks: bytes of an unmodified gzip layer, inflated from access points.

A zran chunk is fetched from its context's ``in_offset`` to the end of its own compressed
range (:meth:`ZranChunks.span`); the fetcher merges overlapping spans, so the chunks of one
context cost one request. :meth:`ZranChunks.decode` inflates each context of a fetched range
once, as far as its furthest wanted chunk, and cuts the chunks out. The fetcher then checks
every chunk against its digest (deflate itself has no checksum) and caches it decompressed
at its uncompressed offset (``<blob_id>.blob.data``, as upstream caches zran blobs).

Stateless apart from the immutable tables; thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import FormatError, IntegrityError, NydusError
from ..format import blob_meta as bm
from ..format import zran

__all__ = ["ZranChunks", "is_zran"]


class _Chunk(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def flags(self) -> int: ...


@dataclass(frozen=True)
class _One:
    index: int
    flags: int = bm.CI_V2_FLAG_ZRAN


def is_zran(c: _Chunk) -> bool:
    return bool(c.flags & bm.CI_V2_FLAG_ZRAN)


class ZranChunks:
    """The zran chunks of one blob (its ci array and zran table)."""

    def __init__(
        self, blob_id: str, ci: Sequence[bm.CiEntry], table: zran.ZranTable | None
    ) -> None:
        if table is None:
            raise FormatError(f"blob {blob_id} has zran chunks but no zran table")
        self.blob_id = blob_id
        self.ci = ci
        self.table = table

    def _where(self, index: int) -> tuple[bm.CiEntry, int, int]:
        if not 0 <= index < len(self.ci):
            raise FormatError(f"blob {self.blob_id}: no chunk info for zran chunk {index}")
        e = self.ci[index]
        return e, e.data >> 32, e.data & 0xFFFFFFFF

    def span(self, index: int) -> tuple[int, int]:
        """The ``[start, end)`` of the layer to fetch for chunk ``index``."""
        e, k, _off = self._where(index)
        start = self.table.contexts[k].in_offset
        return start, max(start, e.compressed_offset + e.compressed_size)

    def read(self, index: int, fetch: Callable[[int, int], bytes]) -> bytes:
        """Chunk ``index`` (not verified), with ``fetch(start, end)`` reading the layer."""
        start, end = self.span(index)
        got = self.decode([_One(index)], fetch(start, end), start)[index]
        if isinstance(got, NydusError):
            raise got
        return got

    def decode(
        self, chunks: Iterable[_Chunk], raw: bytes, raw_start: int
    ) -> dict[int, bytes | NydusError]:
        """Uncompressed bytes (or the error) of each zran chunk in ``chunks``, from the layer
        bytes ``raw`` fetched at ``raw_start``."""
        want: dict[int, list[tuple[int, int, int]]] = {}  # context -> (chunk, offset, size)
        for c in chunks:
            if is_zran(c):
                e, k, off = self._where(c.index)
                want.setdefault(k, []).append((c.index, off, e.uncompressed_size))
        out: dict[int, bytes | NydusError] = {}
        for k, items in want.items():
            ctx = self.table.contexts[k]
            lo = ctx.in_offset - raw_start
            need = max(off + size for _i, off, size in items)
            skip = min(off for _i, off, _s in items)  # output before the first chunk is dropped
            try:
                if lo < 0 or lo > len(raw):
                    raise IntegrityError("fetched range does not hold the access point")
                plain = zran.inflate_context(ctx, self.table.window(k), raw[lo:], need, skip)
            except NydusError as e:
                err = IntegrityError(f"blob {self.blob_id} zran context {k}: {e}")
                out.update((i, err) for i, _o, _s in items)
                continue
            out.update((i, plain[off - skip : off - skip + size]) for i, off, size in items)
        return out
