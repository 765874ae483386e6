"""A blob's chunk-info (ci) array, ToC and chunk digest array, fetched once and cached on disk.

Upstream keeps these beside the cache data as ``<blob_id>.blob.meta`` (the decompressed ci
array padded to 4 KiB, then the 4096-byte ci header), ``<blob_id>.blob.toc`` and
``<blob_id>.blob.digest`` (nydus-reference.md §3.1). The ci array tells the fetcher where every
chunk of the blob lives, which drives read amplification and the EROFS blob-device view (reads
in the blob's uncompressed address space).

A cached meta file is accepted only if its size and header agree with the blob table entry in
the bootstrap (which is trusted); otherwise it is fetched again. Downloads are validated the
same way and, when the blob has a ToC, against the ToC's sha256 digests; the ToC itself is
checked against the blob table's ``toc_digest``. Files are written to a temporary name,
fsync'ed and renamed, so readers never see a partial file.

Functions are stateless; the returned objects are immutable and thread-safe.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import operator
import os
from array import array
from dataclasses import dataclass, field

from .. import codec
from ..atomicwrite import write_atomic
from ..errors import FormatError, IntegrityError, NydusError, UnsupportedError
from ..format import blob_meta as bm
from ..format import rafs_v6 as v6
from ..format import zran
from ..metadata import BlobInfo
from ..metadata.model import check_blob_id
from .backend import Fetch

__all__ = ["BlobMeta", "load_blob_meta", "load_toc", "load_digests", "meta_path", "has_ci"]

log = logging.getLogger(__name__)

_PAGE = 4096


def _align(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


def meta_path(work_dir: str, blob_id: str) -> str:
    return os.path.join(work_dir, f"{check_blob_id(blob_id)}.blob.meta")


def has_ci(info: BlobInfo) -> bool:
    """Whether the blob table says the blob carries a ci array (v6 native blobs do)."""
    return info.ci_compressed_size > 0 and info.ci_uncompressed_size > 0 and info.chunk_count > 0


@dataclass(frozen=True)
class BlobMeta:
    """The parsed ci array of one blob, with lookups by index and by uncompressed offset."""

    header: bm.CiHeader
    ci: bm.CiArray
    # chunk indexes sorted by uncompressed offset, and their offsets (for bisect)
    by_uoff: array[int] = field(default_factory=lambda: array("I"))
    uoffs: array[int] = field(default_factory=lambda: array("Q"))
    zran_table: zran.ZranTable | None = None  # the access points of a zran blob

    @classmethod
    def build(
        cls, header: bm.CiHeader, ci: bm.CiArray, table: zran.ZranTable | None = None
    ) -> BlobMeta:
        uoff = ci.uoff
        order = array("I", sorted(range(len(ci)), key=uoff.__getitem__))
        return cls(header, ci, order, array("Q", [uoff[i] for i in order]), table)

    def chunks_in(self, offset: int, size: int) -> list[int]:
        """Indexes of chunks overlapping uncompressed ``[offset, offset + size)``, in order."""
        end = offset + size
        pos = bisect.bisect_right(self.uoffs, offset) - 1
        pos = max(pos, 0)
        out: list[int] = []
        uoff, usize = self.ci.uoff, self.ci.usize
        while pos < len(self.by_uoff) and self.uoffs[pos] < end:
            i = self.by_uoff[pos]
            if uoff[i] + usize[i] > offset:
                out.append(i)
            pos += 1
        return out


def _atomic_write(path: str, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as e:  # a cache: the next open rebuilds it
        log.warning("cannot write %s: %s", path, e)


def _read_file(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _check_header(info: BlobInfo, h: bm.CiHeader) -> None:
    if (
        h.ci_entries != info.chunk_count
        or h.ci_offset != info.ci_offset
        or h.ci_compressed_size != info.ci_compressed_size
        or h.ci_uncompressed_size != info.ci_uncompressed_size
    ):
        raise FormatError(f"blob {info.blob_id}: ci header disagrees with the blob table")


def _parse_ci(info: BlobInfo, h: bm.CiHeader, data: bytes) -> BlobMeta:
    v2 = bool(h.features & v6.BLOB_FEATURE_CHUNK_INFO_V2)
    ci = bm.unpack_ci_array(data, h.ci_entries, v2)
    usize = info.uncompressed_size
    csize = info.compressed_size
    if usize:
        limit = _align(usize)
        for i, end in enumerate(map(operator.add, ci.uoff, ci.usize)):
            if end > limit:
                raise FormatError(f"blob {info.blob_id}: chunk {i} lies past the uncompressed size")
    if csize:
        inside = bm.CI_V2_FLAG_ZRAN | bm.CI_V2_FLAG_BATCH  # offsets in another space
        for i, end in enumerate(map(operator.add, ci.coff, ci.csize)):
            if end > csize and not ci.flags[i] & inside:
                raise FormatError(f"blob {info.blob_id}: chunk {i} lies past the blob end")
    table = zran.unpack_zran_meta(h, data, ci) if h.features & v6.BLOB_FEATURE_ZRAN else None
    return BlobMeta.build(h, ci, table)


def load_blob_meta(
    info: BlobInfo,
    fetch: Fetch,
    work_dir: str | None,
    *,
    verify_toc: bool = False,
    blob_size: int | None = None,
) -> BlobMeta:
    """The blob's ci array: from ``<work_dir>/<blob_id>.blob.meta`` or fetched and cached."""
    if not has_ci(info):
        raise UnsupportedError(f"blob {info.blob_id} has no chunk info array")
    if info.ci_compressed_size > 1 << 30 or info.ci_uncompressed_size > 1 << 30:
        raise FormatError(f"blob {info.blob_id}: chunk info array is implausibly large")
    usize = info.ci_uncompressed_size
    path = meta_path(work_dir, info.blob_id) if work_dir else None
    if path:
        cached = _read_file(path)
        if cached is not None:
            try:
                if len(cached) != _align(usize) + bm.CI_HEADER_SIZE:
                    raise FormatError("wrong size")
                h = bm.CiHeader.unpack(cached[_align(usize) :])
                _check_header(info, h)
                return _parse_ci(info, h, cached[:usize])
            except NydusError as e:
                log.warning("blob meta %s is invalid (%s); fetching it again", path, e)
    start = info.ci_offset
    raw = fetch(start, start + info.ci_compressed_size + bm.CI_HEADER_SIZE)
    h = bm.CiHeader.unpack(raw[info.ci_compressed_size :])
    _check_header(info, h)
    comp = codec.compressor_by_name(info.ci_compressor)
    ci_raw = raw[: info.ci_compressed_size]
    data = codec.decompress(comp, ci_raw, usize) if comp.id else ci_raw
    if len(data) != usize:
        raise IntegrityError(f"blob {info.blob_id}: chunk info array has the wrong size")
    if verify_toc:
        toc = load_toc(info, fetch, work_dir, blob_size)
        ent = next((e for e in toc if e.name == bm.TOC_ENTRY_BLOB_META), None)
        if ent is not None and hashlib.sha256(data).digest() != ent.digest:
            raise IntegrityError(f"blob {info.blob_id}: chunk info array digest mismatch")
    meta = _parse_ci(info, h, data)
    if path:
        _atomic_write(path, data.ljust(_align(usize), b"\0") + h.pack())
    return meta


def load_toc(
    info: BlobInfo, fetch: Fetch, work_dir: str | None, blob_size: int | None
) -> list[bm.TocEntry]:
    """The blob's ToC, verified against the blob table's ``toc_digest``; [] if none."""
    if not (info.features & v6.BLOB_FEATURE_HAS_TOC and info.toc_size):
        return []
    size = info.toc_size
    if size < bm.TAR_BLOCK or size > 1 << 20:
        raise FormatError(f"blob {info.blob_id}: bad ToC size {size}")
    path = os.path.join(work_dir, f"{info.blob_id}.blob.toc") if work_dir else None

    def ok(tail: bytes) -> bool:
        return not any(info.toc_digest) or hashlib.sha256(tail).digest() == info.toc_digest

    tail = _read_file(path) if path else None
    if tail is None or len(tail) != size or not ok(tail):
        end = blob_size if blob_size is not None else info.compressed_size
        if end < size:
            raise FormatError(f"blob {info.blob_id}: blob smaller than its ToC")
        tail = fetch(end - size, end)
        if not ok(tail):
            raise IntegrityError(f"blob {info.blob_id}: ToC digest mismatch")
        if path:
            _atomic_write(path, tail)
    name, tsize = bm.parse_tar_header(tail[-bm.TAR_BLOCK :])
    if name != bm.TOC_ENTRY_BLOB_TOC or tsize != len(tail) - bm.TAR_BLOCK:
        raise FormatError(f"blob {info.blob_id}: ToC tar header is wrong")
    return bm.unpack_toc(tail[: -bm.TAR_BLOCK])


def load_digests(
    info: BlobInfo, fetch: Fetch, work_dir: str | None, blob_size: int | None
) -> bm.DigestArray | None:
    """The per-chunk digest array (``blob.digest``), verified; None if the blob has none."""
    toc = load_toc(info, fetch, work_dir, blob_size)
    ent = next((e for e in toc if e.name == bm.TOC_ENTRY_BLOB_DIGEST), None)
    if ent is None:
        return None
    if ent.compressed_size != 32 * info.chunk_count or ent.uncompressed_size not in (
        0,
        ent.compressed_size,
    ):
        raise FormatError(f"blob {info.blob_id}: digest array has the wrong size")
    path = os.path.join(work_dir, f"{info.blob_id}.blob.digest") if work_dir else None
    raw = _read_file(path) if path else None
    if raw is None or hashlib.sha256(raw).digest() != ent.digest:
        raw = fetch(ent.compressed_offset, ent.compressed_offset + ent.compressed_size)
        if hashlib.sha256(raw).digest() != ent.digest:
            raise IntegrityError(f"blob {info.blob_id}: digest array digest mismatch")
        if path:
            _atomic_write(path, raw)
    return bm.DigestArray(bytes(raw))
