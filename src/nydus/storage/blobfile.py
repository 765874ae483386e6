"""Read chunks and the blob meta trailer of a data blob through ``read_at``.

A :class:`BlobReader` takes a ``read_at(offset, size) -> bytes`` callable (a
local file, a backend range request, a cache) and the blob's
:class:`BlobInfo`; it knows nothing about inodes. Chunks are decompressed and,
unless told otherwise, verified against their digest: a mismatch (or a chunk
without a digest to check) raises IntegrityError and no bytes are returned.
Thread-safe if ``read_at`` is.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from .. import codec
from ..errors import FormatError, IntegrityError
from ..format import blob_meta as bm
from ..format import rafs_v6 as v6
from ..metadata import BlobInfo, ChunkInfo

__all__ = ["BlobReader", "BlobTrailer", "open_local_blob"]

ReadAt = Callable[[int, int], bytes]


@dataclass
class BlobTrailer:
    toc: list[bm.TocEntry]
    header: bm.CiHeader
    ci: list[bm.CiEntry]
    digests: list[bytes]


class BlobReader:
    def __init__(self, read_at: ReadAt, info: BlobInfo, size: int | None = None) -> None:
        self.read_at = read_at
        self.info = info
        self.size = info.compressed_size if size is None else size
        self.compressor = codec.compressor_by_name(info.compressor)
        self.digester = codec.digester_by_name(info.digester)

    def _read(self, off: int, n: int, what: str) -> bytes:
        if off < 0 or n < 0 or off + n > self.size:
            raise FormatError(f"blob {self.info.blob_id}: {what} [{off}, +{n}) past end")
        data = self.read_at(off, n)
        if len(data) != n:
            raise FormatError(f"blob {self.info.blob_id}: short read of {what}")
        return data

    def read_chunk(self, c: ChunkInfo, verify: bool = True) -> bytes:
        if c.compressed_size < 0:
            raise FormatError("chunk has no compression info (bootstrap without chunk table)")
        raw = self._read(c.compressed_offset, c.compressed_size, f"chunk {c.index}")
        if c.compressed:
            data = codec.decompress(self.compressor, raw, c.uncompressed_size)
        else:
            if len(raw) != c.uncompressed_size:
                raise IntegrityError(f"chunk {c.index}: stored size != uncompressed size")
            data = raw
        if verify and not c.digest:
            raise IntegrityError(
                f"blob {self.info.blob_id} chunk {c.index}: no digest to verify it against"
            )
        if verify and self.digester.digest(data) != c.digest:
            raise IntegrityError(
                f"blob {self.info.blob_id} chunk {c.index}: {self.info.digester} digest mismatch"
            )
        return data

    def trailer(self) -> BlobTrailer:
        """Parse ToC, ci header, ci array and digest array, checking their digests."""
        info = self.info
        toc: list[bm.TocEntry] = []
        if info.features & v6.BLOB_FEATURE_HAS_TOC and info.toc_size:
            if info.toc_size < bm.TAR_BLOCK or info.toc_size > self.size:
                raise FormatError(f"blob {info.blob_id}: bad ToC size {info.toc_size}")
            tail = self._read(self.size - info.toc_size, info.toc_size, "ToC")
            if any(info.toc_digest) and hashlib.sha256(tail).digest() != info.toc_digest:
                raise IntegrityError(f"blob {info.blob_id}: ToC digest mismatch")
            name, size = bm.parse_tar_header(tail[-bm.TAR_BLOCK:])
            if name != bm.TOC_ENTRY_BLOB_TOC or size != len(tail) - bm.TAR_BLOCK:
                raise FormatError(f"blob {info.blob_id}: ToC tar header is wrong")
            toc = bm.unpack_toc(tail[:-bm.TAR_BLOCK])
        by_name = {e.name: e for e in toc}
        ci_off, ci_csize, ci_usize = info.ci_offset, info.ci_compressed_size, \
            info.ci_uncompressed_size
        ci_comp = codec.compressor_by_name(info.ci_compressor)
        ci_raw = self._read(ci_off, ci_csize, "chunk info array")
        ci_data = codec.decompress(ci_comp, ci_raw, ci_usize) if ci_comp.id else ci_raw
        meta = by_name.get(bm.TOC_ENTRY_BLOB_META)
        if meta and hashlib.sha256(ci_data).digest() != meta.digest:
            raise IntegrityError(f"blob {info.blob_id}: chunk info array digest mismatch")
        raw_header = self._read(ci_off + ci_csize, bm.CI_HEADER_SIZE, "ci header")
        hent = by_name.get(bm.TOC_ENTRY_BLOB_META_HEADER)
        if hent and hashlib.sha256(raw_header).digest() != hent.digest:
            raise IntegrityError(f"blob {info.blob_id}: ci header digest mismatch")
        header = bm.CiHeader.unpack(raw_header)
        expect = (info.chunk_count, ci_off, ci_csize, ci_usize, ci_comp.id)
        got = (header.ci_entries, header.ci_offset, header.ci_compressed_size,
               header.ci_uncompressed_size, header.ci_compressor)
        if got != expect:
            raise FormatError(f"blob {info.blob_id}: ci header disagrees with the blob table")
        if (header.features ^ info.features) & v6.BLOB_FEATURE_CHUNK_INFO_V2 and info.features:
            raise FormatError(f"blob {info.blob_id}: ci header and blob table disagree on ci v2")
        v2 = bool(header.features & v6.BLOB_FEATURE_CHUNK_INFO_V2)
        ci = bm.unpack_ci_array(ci_data, header.ci_entries, v2)
        digests: list[bytes] = []
        dent = by_name.get(bm.TOC_ENTRY_BLOB_DIGEST)
        if dent is not None:
            if dent.compressed_size != 32 * info.chunk_count:
                raise FormatError(f"blob {info.blob_id}: digest array has the wrong size")
            raw = self._read(dent.compressed_offset, dent.compressed_size, "digest array")
            if hashlib.sha256(raw).digest() != dent.digest:
                raise IntegrityError(f"blob {info.blob_id}: digest array digest mismatch")
            digests = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        return BlobTrailer(toc, header, ci, digests)


def open_local_blob(path: str, info: BlobInfo) -> tuple[BlobReader, Callable[[], None]]:
    """A reader over a local blob file and a function that closes it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    size = os.fstat(fd).st_size

    def read_at(off: int, n: int) -> bytes:
        return os.pread(fd, n, off)

    return BlobReader(read_at, info, size), lambda: os.close(fd)
