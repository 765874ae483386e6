"""One blob's local cache files in ``work_dir``, in upstream's layout (nydus-reference.md §3.1).

* ``<blob_id>.blob.data``: sparse, sized to the blob's uncompressed size; each chunk is stored
  decompressed at its uncompressed offset. With ``cache.compressed`` the file is
  ``<blob_id>.blob.raw`` instead: the compressed bytes at their compressed offsets.
* ``<blob_id>.blob.data.chunk_map`` (or ``.blob.raw.chunk_map``): the readiness bitmap
  (:class:`~nydus.storage.chunkmap.ChunkMap`).

Write ordering, the crash-safety contract: :meth:`write` ``pwrite``s a chunk's bytes, and only
then may the caller :meth:`mark_ready` it. A process killed at any moment (SIGKILL included)
leaves at most chunks that are written but not marked; the kernel keeps written pages, so a
set bit always has its data behind it. This is not a power-loss guarantee: the bitmap page
could reach the disk before the data pages. Pass ``sync_data=True`` to ``fdatasync`` the data
file before each batch of bits is set (one sync per backend request, not per chunk) when that
matters more than latency. Off by default, like upstream.

Dirty pages (see :mod:`.writeback`): every 8 MiB written to a cache file, when its blob is
complete and when it is closed, writeback of the ranges written since is *started* (never
waited for, on the process's writeback thread), so a prefetched image does not leave a GiB of
dirty pages for the next sync of the file system (a container's overlayfs unmount) to write.
It changes nothing in the ordering above: data is still ``pwrite``n before its bit is set, and
only the kernel decides when either reaches the disk. Always on (``writeback=None`` turns it
off, for tests): the cache's bytes are never changed once written, so keeping them dirty buys
nothing.

Durable (:attr:`durable`): once a blob is complete, the same thread ``fdatasync``s the data file
and then the chunk map (data before bits: from then on a power loss leaves a set bit only with
its data on disk). That sync is the first after a prefetch's GiB of writes and the dearest
one (its disk cache flush waits for all of them to be stable); paid here, it is not paid by the
next process that syncs (a container runtime starting a container of the image).

A data file of the wrong size (truncated or replaced behind our back) is resized and its chunk
map discarded, so every chunk is fetched again rather than trusted.

Trust (see :mod:`.verified`): a ready bit says "this chunk's bytes were verified when they came
in", but the bytes may have changed since. ``<file>.verified`` and an in-memory bitmap say which
ready chunks *this process* may serve without hashing them again (:meth:`trusted`); a chunk that
is ready but not trusted is hashed by the fetcher on its first read (:meth:`mark_verified`).

Thread-safe: chunks occupy disjoint byte ranges, ``pread``/``pwrite`` need no lock, and the
chunk map does its own locking. Safe to share between processes (see chunkmap.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import Literal, Protocol

from ..errors import NydusError
from ..metadata import BlobInfo
from ..metadata.model import check_blob_id
from .chunkmap import ChunkMap
from .verified import RECORD_SUFFIX, CacheTrust
from .writeback import Writeback, WritebackFile, shared

__all__ = ["BlobCacheFile", "CachedChunk"]

log = logging.getLogger(__name__)


class CachedChunk(Protocol):
    """The placement of one chunk, as the cache file needs it."""

    @property
    def index(self) -> int: ...
    @property
    def compressed_offset(self) -> int: ...
    @property
    def compressed_size(self) -> int: ...
    @property
    def uncompressed_offset(self) -> int: ...
    @property
    def uncompressed_size(self) -> int: ...


class BlobCacheFile:
    """The data file and chunk map of one blob."""

    def __init__(
        self,
        work_dir: str,
        info: BlobInfo,
        *,
        compressed: bool = False,
        sync_data: bool = False,
        writeback: Writeback | Literal["shared"] | None = "shared",
    ) -> None:
        if info.chunk_count <= 0:
            raise NydusError(f"blob {info.blob_id}: no chunks to cache")
        self.info = info
        self.compressed = compressed
        self.sync_data = sync_data
        suffix = "blob.raw" if compressed else "blob.data"
        self.path = os.path.join(work_dir, f"{check_blob_id(info.blob_id)}.{suffix}")
        self.map_path = self.path + ".chunk_map"
        self.size = info.compressed_size if compressed else info.uncompressed_size
        if self.size <= 0:
            raise NydusError(f"blob {info.blob_id}: unknown size, cannot cache")
        os.makedirs(work_dir, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.record_path = self.path + RECORD_SUFFIX
        try:
            self._check_size()
            self.map = ChunkMap(self.map_path, info.chunk_count)
            self.trust = CacheTrust(self._fd, self.record_path, info.blob_id, info.chunk_count)
            if self.map.rebuilt:
                self.trust.discard_record()
            vouched = self.trust.adopt_record(self.map.bitmap())
        except BaseException:
            os.close(self._fd)
            raise
        wb = shared() if isinstance(writeback, str) else writeback
        self._writeback: WritebackFile | None = (
            None if wb is None else wb.file(self._fd, self._synced)
        )
        ready = self.map.count_ready()
        if ready and vouched < ready:
            log.info(
                "cache of blob %s: %d of %d ready chunks are hashed again on first read "
                "(no record of their verification matches the file)",
                info.blob_id,
                ready - vouched,
                ready,
            )

    def _check_size(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            st = os.fstat(self._fd)
            if st.st_size == self.size:
                return
            if st.st_size != 0:
                log.warning(
                    "cache file %s has size %d, expected %d: discarding its chunk map",
                    self.path,
                    st.st_size,
                    self.size,
                )
                for stale in (self.map_path, self.path + RECORD_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(stale)
                os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.size)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ placement

    def _where(self, c: CachedChunk) -> tuple[int, int]:
        if self.compressed:
            return c.compressed_offset, c.compressed_size
        return c.uncompressed_offset, c.uncompressed_size

    def fits(self, c: CachedChunk) -> bool:
        off, size = self._where(c)
        return off >= 0 and off + size <= self.size and 0 <= c.index < self.info.chunk_count

    # ------------------------------------------------------------------ data

    def read(self, c: CachedChunk) -> bytes:
        """The stored bytes of a chunk (decompressed, or raw when ``compressed``)."""
        off, size = self._where(c)
        out = os.pread(self._fd, size, off)
        if len(out) != size:
            raise NydusError(f"cache file {self.path}: short read at {off}")
        return out

    def read_range(self, offset: int, size: int) -> bytes:
        """Raw bytes of the data file (uncompressed address space when not ``compressed``)."""
        out = os.pread(self._fd, size, offset)
        return out + bytes(size - len(out))

    def write(self, c: CachedChunk, payload: bytes) -> bool:
        """Store a chunk's (verified) bytes; False (and a warning) if the file system refused
        them."""
        off, size = self._where(c)
        if len(payload) != size or not self.fits(c):
            return False

        def pwrite_all() -> bool:
            try:
                view = memoryview(payload)
                pos = off
                while view:
                    n = os.pwrite(self._fd, view, pos)
                    view, pos = view[n:], pos + n
            except OSError as e:
                log.warning("cannot write chunk %d to %s: %s", c.index, self.path, e)
                return False
            return True

        if not self.trust.write(pwrite_all):
            return False
        if self._writeback is not None:
            self._writeback.wrote(off, size)
        return True

    # ------------------------------------------------------------------ readiness

    def is_ready(self, index: int) -> bool:
        return self.map.is_ready(index)

    def mark_ready(self, indices: list[int]) -> None:
        """Set readiness bits of chunks whose data was verified and is already written."""
        if not indices:
            return
        if self.sync_data:
            os.fdatasync(self._fd)
        self.trust.mark(indices)
        self.map.set_ready(indices)
        if self._writeback is not None and self.map.all_ready:
            # the blob is complete: its last partial batch, then data and map to the disk
            self._writeback.flush(durable=True)

    @property
    def durable(self) -> bool:
        """Every chunk ready, and the data file then the chunk map ``fdatasync``'ed since the
        last chunk written through this object. A blob found complete (cached before, or
        completed by another process) is synced on the writeback thread when first asked."""
        wb = self._writeback
        if wb is None or not self.map.all_ready:
            return False
        if wb.durable:
            return True
        wb.flush(durable=True)  # nothing if already asked for the file as it is
        return False

    def _synced(self, seconds: float) -> None:
        """On the writeback thread, the data file just ``fdatasync``'ed: the map after it."""
        if self.map.sync():
            log.info("cache of blob %s durable (fdatasync %.3f s)", self.info.blob_id, seconds)

    def clear(self, index: int) -> None:
        self.trust.unmark(index)
        self.map.clear(index)

    def trusted(self, index: int) -> bool:
        """Ready, verified by this process (or by a matching record), and the file unchanged
        since: servable without hashing it again."""
        return (
            self.trust.check_unchanged()
            and self.trust.is_verified(index)
            and self.map.is_ready(index)
        )

    def all_trusted(self, indices: list[int]) -> bool:
        """:meth:`trusted` for many chunks with one look at the file."""
        if not self.trust.check_unchanged():
            return False
        t, m = self.trust, self.map
        return all(t.is_verified(i) and m.is_ready(i) for i in indices)

    def mark_verified(self, indices: list[int]) -> None:
        """Chunks read back from the file and found good."""
        self.trust.mark(indices)

    def hashed(self, index: int) -> bool:
        """Ready and hashed by this process (a record's word is not enough), file unchanged."""
        return (
            self.trust.check_unchanged()
            and self.trust.is_hashed(index)
            and self.map.is_ready(index)
        )

    def fully_verified(self) -> bool:
        """Every chunk ready and hashed by this process, the file unchanged since: the file may
        be handed to the kernel."""
        return (
            self.map.all_ready
            and self.trust.check_unchanged()
            and self.trust.hashed_count() == self.info.chunk_count
        )

    def save_record(self) -> bool:
        """Persist which ready chunks are verified (see :mod:`.verified`)."""
        try:
            return self.trust.save(self.map.bitmap())
        except OSError as e:
            log.warning("cannot write %s: %s", self.record_path, e)
            return False

    @property
    def all_ready(self) -> bool:
        return self.map.all_ready

    def ready_count(self) -> int:
        return self.map.count_ready()

    def close(self) -> None:
        if self._fd >= 0:
            if self._writeback is not None:
                self._writeback.flush()
            self.save_record()
            self.map.close()
            os.close(self._fd)
            self._fd = -1
