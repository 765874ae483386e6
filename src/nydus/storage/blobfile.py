"""Read chunks and the blob meta trailer of a data blob through ``read_at``.

A :class:`BlobReader` takes a ``read_at(offset, size) -> bytes`` callable (a
local file, a backend range request, a cache) and the blob's
:class:`BlobInfo`; it knows nothing about inodes. Chunks are decompressed and,
unless told otherwise, verified against their digest: a mismatch (or a chunk
without a digest to check) raises IntegrityError and no bytes are returned.
Thread-safe if ``read_at`` is.

:class:`LocalBlobChunks` is a :class:`~nydus.fs.rafs.ChunkSource` over the blob files of a
directory without the storage stack (``nydus-image optimize``, tests). A chunk without
compression info in the bootstrap (v6 without the legacy chunk table) is located through the
blob's ci array, read once per blob. A missing or unreadable blob file fails only the reads
that need it, with :class:`~nydus.errors.BackendError`. Thread-safe (pread on shared fds,
lazy opening under a lock).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .. import codec
from ..errors import BackendError, FormatError, IntegrityError, NydusError
from ..format import blob_meta as bm
from ..format import rafs_v6 as v6
from ..metadata import BlobInfo, ChunkInfo
from ..metadata.model import check_blob_id
from .metacache import load_blob_meta
from .zran import ZranChunks

__all__ = ["BlobReader", "BlobTrailer", "LocalBlobChunks", "open_local_blob"]

ReadAt = Callable[[int, int], bytes]


@dataclass
class BlobTrailer:
    toc: list[bm.TocEntry]
    header: bm.CiHeader
    ci: Sequence[bm.CiEntry]
    digests: list[bytes]


class BlobReader:
    """Chunks and trailer of one blob; ``meta`` reads a zran blob's separate meta blob."""

    def __init__(
        self,
        read_at: ReadAt,
        info: BlobInfo,
        size: int | None = None,
        meta: BlobReader | None = None,
    ) -> None:
        self.read_at = read_at
        self.info = info
        self.size = info.compressed_size if size is None else size
        self.meta = meta or self
        self.compressor = codec.compressor_by_name(info.compressor)
        self.digester = codec.digester_by_name(info.digester)
        self._zran: ZranChunks | None = None

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
        if self.info.features & v6.BLOB_FEATURE_ZRAN:
            data = self._zran_chunks().read(c.index, lambda s, e: self._read(s, e - s, "zran"))
        elif c.compressed:
            raw = self._read(c.compressed_offset, c.compressed_size, f"chunk {c.index}")
            data = codec.decompress(self.compressor, raw, c.uncompressed_size)
        else:
            raw = self._read(c.compressed_offset, c.compressed_size, f"chunk {c.index}")
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

    def _zran_chunks(self) -> ZranChunks:
        if self._zran is None:
            m = self.meta
            meta = load_blob_meta(self.info, lambda s, e: m._read(s, e - s, "blob meta"), None)
            self._zran = ZranChunks(self.info.blob_id, meta.ci, meta.zran_table)
        return self._zran

    def trailer(self) -> BlobTrailer:
        """Parse ToC, ci header, ci array and digest array, checking their digests."""
        info, m = self.info, self.meta
        toc: list[bm.TocEntry] = []
        if info.features & v6.BLOB_FEATURE_HAS_TOC and info.toc_size:
            if info.toc_size < bm.TAR_BLOCK or info.toc_size > m.size:
                raise FormatError(f"blob {info.blob_id}: bad ToC size {info.toc_size}")
            tail = m._read(m.size - info.toc_size, info.toc_size, "ToC")
            if any(info.toc_digest) and hashlib.sha256(tail).digest() != info.toc_digest:
                raise IntegrityError(f"blob {info.blob_id}: ToC digest mismatch")
            name, size = bm.parse_tar_header(tail[-bm.TAR_BLOCK :])
            if name != bm.TOC_ENTRY_BLOB_TOC or size != len(tail) - bm.TAR_BLOCK:
                raise FormatError(f"blob {info.blob_id}: ToC tar header is wrong")
            toc = bm.unpack_toc(tail[: -bm.TAR_BLOCK])
        by_name = {e.name: e for e in toc}
        ci_off, ci_csize, ci_usize = (
            info.ci_offset,
            info.ci_compressed_size,
            info.ci_uncompressed_size,
        )
        ci_comp = codec.compressor_by_name(info.ci_compressor)
        ci_raw = m._read(ci_off, ci_csize, "chunk info array")
        ci_data = codec.decompress(ci_comp, ci_raw, ci_usize) if ci_comp.id else ci_raw
        meta = by_name.get(bm.TOC_ENTRY_BLOB_META)
        if meta and hashlib.sha256(ci_data).digest() != meta.digest:
            raise IntegrityError(f"blob {info.blob_id}: chunk info array digest mismatch")
        raw_header = m._read(ci_off + ci_csize, bm.CI_HEADER_SIZE, "ci header")
        hent = by_name.get(bm.TOC_ENTRY_BLOB_META_HEADER)
        if hent and hashlib.sha256(raw_header).digest() != hent.digest:
            raise IntegrityError(f"blob {info.blob_id}: ci header digest mismatch")
        header = bm.CiHeader.unpack(raw_header)
        expect = (info.chunk_count, ci_off, ci_csize, ci_usize, ci_comp.id)
        got = (
            header.ci_entries,
            header.ci_offset,
            header.ci_compressed_size,
            header.ci_uncompressed_size,
            header.ci_compressor,
        )
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
            raw = m._read(dent.compressed_offset, dent.compressed_size, "digest array")
            if hashlib.sha256(raw).digest() != dent.digest:
                raise IntegrityError(f"blob {info.blob_id}: digest array digest mismatch")
            digests = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        return BlobTrailer(toc, header, ci, digests)


def open_local_blob(path: str, info: BlobInfo) -> tuple[BlobReader, Callable[[], None]]:
    """A reader over a local blob file and a function that closes it; a zran blob's meta
    blob is the file named by its id beside it."""
    fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC)]

    def close() -> None:
        for fd in fds:
            os.close(fd)

    def reader(fd: int, meta: BlobReader | None = None) -> BlobReader:
        return BlobReader(lambda off, n: os.pread(fd, n, off), info, os.fstat(fd).st_size, meta)

    meta = None
    if info.meta_blob_id:
        try:
            mpath = os.path.join(os.path.dirname(path), check_blob_id(info.meta_blob_id))
            fds.append(os.open(mpath, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            close()
            raise
        meta = reader(fds[1])
    return reader(fds[0], meta), close


class LocalBlobChunks:
    """Chunks of ``blobs`` read from ``<blob_dir>/<blob_id>`` (or explicit ``paths``)."""

    def __init__(
        self,
        blob_dir: str,
        blobs: list[BlobInfo],
        *,
        verify: bool = True,
        paths: dict[str, str] | None = None,
    ) -> None:
        self.blob_dir = blob_dir
        self.blobs = blobs
        self.verify = verify
        self.paths = paths or {}
        self._lock = threading.Lock()
        self._readers: dict[int, tuple[BlobReader, Callable[[], None]]] = {}
        self._ci: dict[int, tuple[Sequence[bm.CiEntry], list[bytes]]] = {}
        self.read_count = 0
        self.read_amount = 0

    def _path(self, blob: BlobInfo) -> str:
        return self.paths.get(blob.blob_id) or os.path.join(
            self.blob_dir, check_blob_id(blob.blob_id)
        )

    def _reader(self, index: int) -> BlobReader:
        with self._lock:
            hit = self._readers.get(index)
            if hit is not None:
                return hit[0]
            if not 0 <= index < len(self.blobs):
                raise BackendError(f"chunk refers to blob {index}, image has {len(self.blobs)}")
            blob = self.blobs[index]
            path = self._path(blob)
            try:
                pair = open_local_blob(path, blob)
            except OSError as e:
                raise BackendError(f"blob {blob.blob_id}: cannot open {path}: {e.strerror}") from e
            self._readers[index] = pair
            return pair[0]

    def _complete(self, c: ChunkInfo, reader: BlobReader) -> ChunkInfo:
        if c.compressed_size >= 0:
            return c
        with self._lock:
            hit = self._ci.get(c.blob_index)
        if hit is None:
            tr = reader.trailer()
            # the digest array counts only if the bootstrap vouches for the ToC listing it
            hit = (tr.ci, tr.digests if any(reader.info.toc_digest) else [])
            with self._lock:
                self._ci[c.blob_index] = hit
        ci, digests = hit
        if not 0 <= c.index < len(ci):
            raise BackendError(f"chunk index {c.index} outside the blob's chunk-info array")
        e = ci[c.index]
        digest = c.digest or (digests[c.index] if c.index < len(digests) else b"")
        return replace(
            c,
            compressed_offset=e.compressed_offset,
            compressed_size=e.compressed_size,
            uncompressed_size=e.uncompressed_size,
            compressed=e.compressed,
            digest=digest,
        )

    def read_chunks(self, chunks: list[ChunkInfo]) -> list[bytes]:
        out = []
        for c in chunks:
            reader = self._reader(c.blob_index)
            try:
                data = reader.read_chunk(self._complete(c, reader), verify=self.verify)
            except NydusError:
                raise
            except OSError as e:
                raise BackendError(f"reading chunk {c.index}: {e.strerror}") from e
            self.read_count += 1
            self.read_amount += len(data)
            out.append(data)
        return out

    def close(self) -> None:
        with self._lock:
            readers = list(self._readers.values())
            self._readers.clear()
        for _r, close in readers:
            close()
