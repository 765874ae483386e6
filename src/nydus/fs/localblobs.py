"""A minimal :class:`~nydus.fs.rafs.ChunkSource` over blob files in a local directory.

Used by tests (an in-process chunk source without the storage stack) and as the daemon's
fallback when ``nydus.storage.open_device`` is not available. It reads chunks with
:class:`nydus.storage.blobfile.BlobReader`: decompressed, and verified against their digest when
``verify``. A chunk without compression info in the bootstrap (v6 images without the legacy
chunk table) is located through the blob's chunk-info array, read once per blob, and verified
against the blob's digest array.

A blob file that is missing or unreadable fails only the reads that need it, with
:class:`nydus.errors.BackendError`.

Threading contract: thread-safe (pread on shared fds; lazy opening under a lock).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import replace

from ..errors import BackendError, NydusError
from ..format import blob_meta as bm
from ..metadata import BlobInfo, ChunkInfo
from ..metadata.model import check_blob_id
from ..storage.blobfile import BlobReader, open_local_blob

__all__ = ["LocalBlobChunks"]


class LocalBlobChunks:
    """Chunks of ``blobs`` read from ``<blob_dir>/<blob_id>`` (or explicit ``paths``)."""

    def __init__(self, blob_dir: str, blobs: list[BlobInfo], *, verify: bool = True,
                 paths: dict[str, str] | None = None) -> None:
        self.blob_dir = blob_dir
        self.blobs = blobs
        self.verify = verify
        self.paths = paths or {}
        self._lock = threading.Lock()
        self._readers: dict[int, tuple[BlobReader, Callable[[], None]]] = {}
        self._ci: dict[int, tuple[list[bm.CiEntry], list[bytes]]] = {}
        self.read_count = 0
        self.read_amount = 0

    def _path(self, blob: BlobInfo) -> str:
        return self.paths.get(blob.blob_id) or os.path.join(self.blob_dir,
                                                            check_blob_id(blob.blob_id))

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
                raise BackendError(f"blob {blob.blob_id}: cannot open {path}: {e.strerror}") \
                    from e
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
        return replace(c, compressed_offset=e.compressed_offset,
                       compressed_size=e.compressed_size,
                       uncompressed_size=e.uncompressed_size, compressed=e.compressed,
                       digest=digest)

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
