"""The read-only RAFS file system: a bootstrap's tree (``nydus.metadata``) whose file data comes
from a chunk source (``nydus.storage``), addressed by inode numbers, independent of FUSE.

Inode numbers: the root is 1. RAFS v6 nodes map as ``nid + 2`` (hardlinks share a nid, so they
share an inode); v5 nodes use their on-disk inode number (hardlinks share it; the v5 root is
inode 1), remembered as the kernel learns them through LOOKUP/READDIR.

The image is immutable, so everything the kernel may cache it may cache forever: the
adapter hands out long entry/attr timeouts, ``keep_cache`` and ``cache_dir``. Reads assemble
whole chunks (a small in-memory LRU of decompressed chunks serves the 128 KiB..1 MiB kernel
reads that fall in one chunk), zeros for holes, and raise the storage error (mapped to EIO)
only for the read that needs a missing chunk.

Errors: NydusError families from the layers below; OSError with a POSIX errno for file-system
semantics (ENOTDIR, EROFS, ENODATA, ERANGE, ENOSYS for xattrs when disabled).

Threading contract: thread-safe; internal caches are guarded by one lock, reads run in
parallel, the chunk source must be thread-safe.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NewType, Protocol, TypeVar

from ..errors import BackendError, FormatError, NotFoundError, NydusError
from ..metadata import ChunkInfo, Inode, RafsMetadata
from ..metadata.model import FileKind, Nid
from ..singleflight import Flight, FlightTable
from .chunkmap import ChunkFileMap
from .metrics import FsIoStats, StatsFop

__all__ = [
    "ROOT_INO",
    "DEFAULT_TIMEOUT",
    "ChunkSource",
    "FsOptions",
    "Attr",
    "FsDirEntry",
    "FsStat",
    "RafsFs",
]

log = logging.getLogger("nydus.fs")

#: The inode number the file system reports (root :data:`ROOT_INO`), derived from a bootstrap
#: :data:`~nydus.metadata.model.Nid` (see the module docstring); a FUSE node id is a third
#: space (:data:`nydus.fuse.NodeId`).
Ino = NewType("Ino", int)

ROOT_INO = Ino(1)
DEFAULT_TIMEOUT = float(1 << 32)  # upstream's RAFS entry/attr timeout (seconds): "forever"
FLAG_EXPLICIT_UID_GID = 0x10  # same bit in v5 and v6 superblock flags
FLAG_HAS_XATTR = 0x20
_ZEROS = memoryview(bytes(1 << 20))
_O_WRITE = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
SEEK_DATA, SEEK_HOLE = 3, 4
_T = TypeVar("_T")


class ChunkSource(Protocol):
    """What the file system needs from storage (``nydus.storage.BlobDevice`` satisfies it)."""

    def read_chunks(self, chunks: list[ChunkInfo]) -> list[bytes]: ...


@dataclass
class FsOptions:
    """Per-instance behaviour, from the nydusd config (``rafs`` part of config v1)."""

    id: str = ""
    enable_xattr: bool = False
    iostats_files: bool = False
    access_pattern: bool = False
    latest_read_files: bool = False
    chunk_cache_bytes: int = 64 << 20
    attr_cache_entries: int = 1 << 17
    readahead_chunks: int = 4  # sequential readers: fetch this many chunks ahead (0: off)


@dataclass(frozen=True, slots=True)
class Attr(FileKind):
    """stat(2) attributes of one inode as the file system reports them."""

    ino: Ino
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    rdev: int
    mtime: int
    mtime_nsec: int
    blksize: int = 4096


@dataclass(frozen=True, slots=True)
class FsDirEntry:
    name: bytes
    ino: Ino
    dtype: int  # S_IFMT >> 12
    offset: int  # cookie of the next entry
    attr: Attr | None = None  # with plus=True (None for "." and "..")


@dataclass(frozen=True, slots=True)
class FsStat:
    blocks: int
    files: int
    bsize: int = 4096
    namelen: int = 255


@dataclass(frozen=True, slots=True)
class _File:
    size: int
    offsets: list[int]  # file offset of each chunk, ascending
    chunks: list[ChunkInfo]


class RafsFs:
    """One mounted RAFS image (see the module docstring)."""

    def __init__(
        self, meta: RafsMetadata, source: ChunkSource, options: FsOptions | None = None
    ) -> None:
        self.meta = meta
        self.source = source
        self.opts = options or FsOptions()
        self.version = meta.version
        self.xattr_enabled = self.opts.enable_xattr or bool(meta.flags & FLAG_HAS_XATTR)
        self._explicit_ids = bool(meta.flags & FLAG_EXPLICIT_UID_GID)
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._lock = threading.Lock()
        self._root_nid = meta.root_nid
        self._v5_nids: dict[Ino, Nid] = {ROOT_INO: meta.root_nid}
        self._attrs: dict[int, Attr] = {}
        self._files: OrderedDict[int, _File] = OrderedDict()
        self._dirs: OrderedDict[int, list[tuple[bytes, Nid, int]]] = OrderedDict()
        self._chunks: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._chunk_bytes = 0
        self._pending: FlightTable[tuple[int, int], bytes] = FlightTable()
        self._seq: dict[int, tuple[int, int]] = {}  # ino -> (end of last read, queued chunk)
        self._ra_pool: ThreadPoolExecutor | None = None
        self._names: dict[Ino, tuple[Ino, bytes]] = {}  # ino -> (parent ino, name)
        self._track_names = self.opts.access_pattern
        self._next_fh = 1
        self._open: dict[int, int] = {}  # fh -> ino
        self.stats = FsIoStats(
            self.opts.id,
            files_enabled=self.opts.iostats_files,
            access_pattern=self.opts.access_pattern,
            latest_read_files=self.opts.latest_read_files,
            path_of=self.path_of,
            blob_resolver=self.blob_range_files,
        )
        self._chunk_map: ChunkFileMap | None = None
        self._max_ino = self._compute_max_ino()
        self.getattr(ROOT_INO)  # validates the root

    # ------------------------------------------------------------------ inode numbers

    def _compute_max_ino(self) -> int:
        sb = getattr(self.meta, "sb", None)
        count = int(getattr(sb, "inos", 0) or getattr(sb, "inodes_count", 0) or 0)
        return count

    def ino_of(self, nid: Nid, inode: Inode | None = None) -> Ino:
        """Inode number the file system reports for metadata node ``nid``."""
        if nid == self._root_nid:
            return ROOT_INO
        if self.version == 5:
            ino = (inode or self.meta.getattr(nid)).ino
            if ino <= 0:
                raise FormatError(f"v5 node {nid} has inode number {ino}")
            if ino not in self._v5_nids:
                self._v5_nids[Ino(ino)] = nid
            return Ino(ino)
        return Ino(nid + 2)

    def nid_of(self, ino: Ino) -> Nid:
        if ino == ROOT_INO:
            return self._root_nid
        if self.version == 5:
            nid = self._v5_nids.get(ino)
            if nid is None:
                self._index_v5()
                nid = self._v5_nids.get(ino)
                if nid is None:
                    raise OSError(errno.ESTALE, f"unknown inode {ino}")
            return nid
        if ino < 2:
            raise OSError(errno.ESTALE, f"unknown inode {ino}")
        return Nid(ino - 2)

    def _index_v5(self) -> None:
        """Learn every v5 inode number (only needed if asked for one never looked up)."""
        for _path, nid in self.meta.walk():
            self.ino_of(nid)

    # ------------------------------------------------------------------ attributes

    def _attr_of(self, nid: Nid, ino: Ino) -> Attr:
        a = self._attrs.get(ino)  # dict reads are atomic; the image never changes
        if a is not None:
            return a
        i = self.meta.getattr(nid)
        uid, gid = (i.uid, i.gid) if self._explicit_ids else (self._euid, self._egid)
        a = Attr(ino, i.mode, i.nlink, uid, gid, i.size, i.blocks, i.rdev, i.mtime, i.mtime_nsec)
        attrs = self._attrs
        if len(attrs) >= self.opts.attr_cache_entries:
            with self._lock:
                attrs.clear()
        attrs[ino] = a
        return a

    def getattr(self, ino: Ino) -> Attr:
        return self._timed(StatsFop.GETATTR, ino, lambda: self._attr_of(self.nid_of(ino), ino))

    def lookup(self, parent: Ino, name: bytes) -> Attr:
        """Attributes of ``name`` in directory ``parent``; NotFoundError if absent."""

        def go() -> Attr:
            pnid = self.nid_of(parent)
            if not self._attr_of(pnid, parent).is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if name == b".":
                return self._attr_of(pnid, parent)
            if name == b"..":
                pino = self.parent_of(parent)
                return self._attr_of(self.nid_of(pino), pino)
            nid = self._find(pnid, parent, name)
            ino = self.ino_of(nid)
            a = self._attr_of(nid, ino)
            if a.is_dir or self._track_names:
                self._names[ino] = (parent, name)
            return a

        t0 = time.perf_counter_ns()
        try:
            a = go()
        except NotFoundError:
            self.stats.record(StatsFop.LOOKUP, parent, True)  # a negative entry is an answer
            raise
        except BaseException:
            self.stats.record(StatsFop.LOOKUP, parent, False)
            raise
        self.stats.record(
            StatsFop.LOOKUP, parent, True, micros=(time.perf_counter_ns() - t0) // 1000
        )
        return a

    def _find(self, pnid: Nid, pino: Ino, name: bytes) -> Nid:
        ents = self._dir_list(pnid, pino)
        i = bisect.bisect_left(ents, (name,))
        if i < len(ents) and ents[i][0] == name:
            return ents[i][1]
        raise NotFoundError(f"{name.decode(errors='replace')!r} not found")

    def parent_of(self, ino: Ino) -> Ino:
        if ino == ROOT_INO:
            return ROOT_INO
        rec = self._names.get(ino)
        return rec[0] if rec else ROOT_INO

    def path_of(self, ino: int) -> str:
        """Best-effort path of an inode seen through lookup (``""`` if unknown)."""
        ino = Ino(ino)
        parts: list[bytes] = []
        seen = 0
        while ino != ROOT_INO and seen < 4096:
            rec = self._names.get(ino)
            if rec is None:
                return ""
            ino, name = rec
            parts.append(name)
            seen += 1
        return "/" + b"/".join(reversed(parts)).decode(errors="surrogateescape")

    # ------------------------------------------------------------------ directories

    def _recent(self, cache: OrderedDict[int, _T], ino: Ino, make: Callable[[], _T]) -> _T:
        """``cache[ino]``, else ``make()`` remembered there (the 4096 most recently used)."""
        with self._lock:
            hit = cache.get(ino)
            if hit is not None:
                cache.move_to_end(ino)
                return hit
        value = make()
        with self._lock:
            cache[ino] = value
            if len(cache) > 4096:
                cache.popitem(last=False)
        return value

    def _dir_list(self, nid: Nid, ino: Ino) -> list[tuple[bytes, Nid, int]]:
        return self._recent(
            self._dirs, ino, lambda: [(e.name, e.nid, e.file_type) for e in self.meta.readdir(nid)]
        )

    def opendir(self, ino: Ino) -> None:
        def go() -> None:
            if not self._attr_of(self.nid_of(ino), ino).is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")

        self._timed(StatsFop.OPENDIR, ino, go)

    def readdir(self, ino: Ino, offset: int, plus: bool = False) -> Iterator[FsDirEntry]:
        """Entries after cookie ``offset``: ``.`` (cookie 1), ``..`` (2), then children."""
        t0 = time.perf_counter_ns()
        fop = StatsFop.READDIRPLUS if plus else StatsFop.READDIR
        try:
            nid = self.nid_of(ino)
            a = self._attr_of(nid, ino)
            if not a.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            ents = self._dir_list(nid, ino)
        except BaseException:
            self.stats.record(fop, ino, False)
            raise
        self.stats.record(fop, ino, True, micros=(time.perf_counter_ns() - t0) // 1000)
        return self._iter_dir(ino, a, ents, offset, plus)

    def _iter_dir(
        self, ino: Ino, a: Attr, ents: list[tuple[bytes, Nid, int]], offset: int, plus: bool
    ) -> Iterator[FsDirEntry]:
        if offset < 1:
            yield FsDirEntry(b".", ino, stat.S_IFDIR >> 12, 1)
        if offset < 2:
            yield FsDirEntry(b"..", self.parent_of(ino), stat.S_IFDIR >> 12, 2)
        v6, root_nid, names, track = (
            self.version == 6,
            self._root_nid,
            self._names,
            plus and self._track_names,
        )
        attr_of, ino_of = self._attr_of, self.ino_of
        for i in range(max(0, offset - 2), len(ents)):
            name, cnid, _ft = ents[i]
            cino = Ino(cnid + 2) if v6 and cnid != root_nid else ino_of(cnid)
            ca = attr_of(cnid, cino)
            fmt = ca.mode & 0o170000
            if fmt == 0o040000 or track:
                names[cino] = (ino, name)
            yield FsDirEntry(name, cino, fmt >> 12, i + 3, ca if plus else None)

    # ------------------------------------------------------------------ files

    def open(self, ino: Ino, flags: int) -> int:
        """A handle for reading ``ino``; EROFS for any write intent."""

        def go() -> int:
            if flags & _O_WRITE:
                raise OSError(errno.EROFS, "read-only file system")
            a = self._attr_of(self.nid_of(ino), ino)
            if a.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            with self._lock:
                fh = self._next_fh
                self._next_fh += 1
                self._open[fh] = ino
            return fh

        return self._timed(StatsFop.OPEN, ino, go)

    def release(self, ino: Ino, fh: int) -> None:
        with self._lock:
            self._open.pop(fh, None)
        self.stats.record(StatsFop.RELEASE, ino, True)

    def _file(self, ino: Ino) -> _File:
        def load() -> _File:
            nid = self.nid_of(ino)
            a = self._attr_of(nid, ino)
            if not stat.S_ISREG(a.mode):
                raise OSError(errno.EISDIR if a.is_dir else errno.EINVAL, "not a regular file")
            chunks = sorted(self.meta.chunks(nid), key=lambda c: c.file_offset)
            return _File(a.size, [c.file_offset for c in chunks], chunks)

        return self._recent(self._files, ino, load)

    def blob_range_files(
        self, blob_index: int, offset: int, size: int
    ) -> list[tuple[int, str, int, int]]:
        """``(ino, path, file offset, length)`` of the file ranges a blob range holds (the
        access pattern of kernel EROFS mode; the reverse mapping is built on first use)."""
        with self._lock:
            cmap = self._chunk_map
        if cmap is None:
            cmap = ChunkFileMap(self.meta)
            with self._lock:
                self._chunk_map = self._chunk_map or cmap
        return [
            (self.ino_of(r.nid), r.path, r.offset, r.length)
            for r in cmap.files_in(blob_index, offset, size)
        ]

    def drop_chunk_map(self) -> None:
        """Let the reverse mapping of :meth:`blob_range_files` go (14 MiB for 40k chunks),
        when no blob device reads are expected any more; a later call builds it again."""
        with self._lock:
            self._chunk_map = None

    def chunks_of(self, ino: Ino) -> list[ChunkInfo]:
        return list(self._file(ino).chunks)

    def read(self, ino: Ino, offset: int, size: int) -> list[bytes | memoryview]:
        """Up to ``size`` bytes at ``offset`` as a list of buffers (short only at EOF)."""
        t0 = time.perf_counter_ns()
        try:
            bufs, n = self._read(ino, offset, size)
        except BaseException:
            self.stats.record(StatsFop.READ, ino, False)
            raise
        self.stats.record(
            StatsFop.READ, ino, True, n, (time.perf_counter_ns() - t0) // 1000, offset
        )
        return bufs

    def _read(self, ino: Ino, offset: int, size: int) -> tuple[list[bytes | memoryview], int]:
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size")
        f = self._file(ino)
        end = min(offset + size, f.size)
        if offset >= end:
            return [], 0
        first = max(0, bisect.bisect_right(f.offsets, offset) - 1)
        last = bisect.bisect_left(f.offsets, end)
        wanted = [
            c
            for c in f.chunks[first:last]
            if c.file_offset < end and c.file_offset + c.uncompressed_size > offset
        ]
        if self.opts.readahead_chunks > 0 and last < len(f.chunks):
            self._maybe_readahead(ino, f, offset, end, last)
        datas = self._chunk_data(wanted)
        out: list[bytes | memoryview] = []
        pos = offset
        for c, data in zip(wanted, datas, strict=True):
            cstart = c.file_offset
            if cstart > pos:
                _zeros(out, cstart - pos)
                pos = cstart
            cend = min(cstart + len(data), end)
            if cend > pos:
                lo = pos - cstart
                hi = cend - cstart
                out.append(data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi])
                pos = cend
        if pos < end:
            _zeros(out, end - pos)
        return out, end - offset

    def _maybe_readahead(self, ino: Ino, f: _File, offset: int, end: int, nxt: int) -> None:
        """For a sequential reader, fetch the next chunks in the background (into the LRU;
        a foreground read of one of them waits for that fetch instead of repeating it)."""
        with self._lock:
            prev_end, queued = self._seq.get(ino, (-1, 0))
            sequential = offset == 0 or abs(offset - prev_end) <= (1 << 20)
            hi = min(len(f.chunks), nxt + self.opts.readahead_chunks)
            lo = max(nxt, queued)
            self._seq[ino] = (end, max(queued, hi) if sequential else queued)
            if len(self._seq) > 4096:
                self._seq.clear()
            if not sequential or lo >= hi:
                return
            ahead = [
                c
                for c in f.chunks[lo:hi]
                if (c.blob_index, c.index) not in self._chunks
                and (c.blob_index, c.index) not in self._pending
            ]
            if not ahead:
                return
            if self._ra_pool is None:
                self._ra_pool = ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="rafs-readahead"
                )
            pool = self._ra_pool
        pool.submit(self._readahead_job, ahead)

    def _readahead_job(self, chunks: list[ChunkInfo]) -> None:
        try:
            self._chunk_data(chunks)
        except Exception as e:  # the foreground read will fetch (and report) it again
            log.debug("readahead failed: %s", e)

    def _chunk_data(self, chunks: list[ChunkInfo]) -> list[bytes]:
        """Decompressed data of ``chunks``: from the LRU, from a fetch another thread has in
        flight (waited for, never fetched twice), or from the chunk source."""
        if not chunks:
            return []
        out: list[bytes | None] = [None] * len(chunks)
        mine: list[tuple[int, ChunkInfo, tuple[int, int], Flight[bytes]]] = []
        waits: list[tuple[int, Flight[bytes]]] = []
        with self._lock:
            for i, c in enumerate(chunks):
                key = (c.blob_index, c.index)
                d = self._chunks.get(key)
                if d is not None:
                    self._chunks.move_to_end(key)
                    out[i] = d
                    continue
                p = self._pending.get(key)
                if p is not None:
                    waits.append((i, p))
                    continue
                p = self._pending.claim(key)
                mine.append((i, c, key, p))
        if mine:
            self._fetch(mine, out)
        for i, p in waits:
            p.wait()
            if p.error is not None:
                raise BackendError(f"reading chunks: {p.error}")
            out[i] = p.value
        return [d for d in out if d is not None]

    def _fetch(
        self,
        mine: list[tuple[int, ChunkInfo, tuple[int, int], Flight[bytes]]],
        out: list[bytes | None],
    ) -> None:
        try:
            want = [c for _i, c, _k, _p in mine]
            try:
                got = self.source.read_chunks(want)
            except NydusError as e:
                if e.errno != errno.EIO:  # e.g. a blob file that is gone: still an I/O error
                    raise BackendError(f"reading chunks: {e}") from e
                raise
            if len(got) != len(want):
                raise FormatError("storage returned the wrong number of chunks")
            for c, d in zip(want, got, strict=True):
                if c.uncompressed_size >= 0 and len(d) != c.uncompressed_size:
                    raise FormatError(
                        f"chunk {c.index} of blob {c.blob_index}: {len(d)} bytes, "
                        f"expected {c.uncompressed_size}"
                    )
        except BaseException as e:
            with self._lock:
                for _i, _c, key, p in mine:
                    self._pending.release(key, p)
                    p.error = e
                    p.settle()
            raise
        self._remember({key: d for (_i, _c, key, _p), d in zip(mine, got, strict=True)})
        with self._lock:
            for (i, _c, key, p), d in zip(mine, got, strict=True):
                self._pending.release(key, p)
                p.value = d
                p.settle()
                out[i] = d

    def _remember(self, fetched: dict[tuple[int, int], bytes]) -> None:
        limit = self.opts.chunk_cache_bytes
        if limit <= 0:
            return
        with self._lock:
            for k, d in fetched.items():
                if k in self._chunks or len(d) > limit // 4:
                    continue
                self._chunks[k] = d
                self._chunk_bytes += len(d)
            while self._chunk_bytes > limit and self._chunks:
                _k, old = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(old)

    def lseek(self, ino: Ino, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE over the file's chunk map (holes are absent chunks)."""
        f = self._file(ino)
        if offset < 0 or offset >= f.size:
            raise OSError(errno.ENXIO, "offset beyond end of file")
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise OSError(errno.EINVAL, "only SEEK_DATA and SEEK_HOLE")
        ranges = [(c.file_offset, c.file_offset + c.uncompressed_size) for c in f.chunks]
        if whence == SEEK_DATA:
            for s, e in ranges:
                if e > offset:
                    return max(s, offset)
            raise OSError(errno.ENXIO, "no data after offset")
        pos = offset
        for s, e in ranges:
            if e <= pos:
                continue
            if s > pos:
                return pos
            pos = e
        return min(pos, f.size)

    # ------------------------------------------------------------------ the rest

    def readlink(self, ino: Ino) -> bytes:
        def go() -> bytes:
            nid = self.nid_of(ino)
            if not stat.S_ISLNK(self._attr_of(nid, ino).mode):
                raise OSError(errno.EINVAL, "not a symlink")
            return self.meta.readlink(nid)

        return self._timed(StatsFop.READLINK, ino, go)

    def getxattr(self, ino: Ino, name: bytes) -> bytes:
        def go() -> bytes:
            if not self.xattr_enabled:
                raise OSError(errno.ENOSYS, "xattrs disabled (enable_xattr)")
            xs = self.meta.xattrs(self.nid_of(ino))
            v = xs.get(name)
            if v is None:
                raise OSError(errno.ENODATA, "no such attribute")
            return v

        return self._timed(StatsFop.GETXATTR, ino, go)

    def listxattr(self, ino: Ino) -> list[bytes]:
        def go() -> list[bytes]:
            if not self.xattr_enabled:
                raise OSError(errno.ENOSYS, "xattrs disabled (enable_xattr)")
            return sorted(self.meta.xattrs(self.nid_of(ino)))

        return self._timed(StatsFop.LISTXATTR, ino, go)

    def statfs(self) -> FsStat:
        def go() -> FsStat:
            total = sum(b.uncompressed_size for b in self.meta.blobs)
            return FsStat(blocks=(total + 4095) // 4096, files=self._max_ino)

        return self._timed(StatsFop.STATFS, ROOT_INO, go)

    def access(self, ino: Ino, mask: int, uid: int, gid: int) -> None:
        """access(2) semantics; any write intent is EROFS."""

        def go() -> None:
            a = self._attr_of(self.nid_of(ino), ino)
            if mask & os.W_OK:
                raise OSError(errno.EROFS, "read-only file system")
            if mask == os.F_OK:
                return
            if uid == 0:
                if mask & os.X_OK and not a.is_dir and not a.mode & 0o111:
                    raise OSError(errno.EACCES, "permission denied")
                return
            if uid == a.uid:
                bits = (a.mode >> 6) & 7
            elif gid == a.gid:
                bits = (a.mode >> 3) & 7
            else:
                bits = a.mode & 7
            if mask & ~bits & 7:
                raise OSError(errno.EACCES, "permission denied")

        self._timed(StatsFop.ACCESS, ino, go)

    def resolve(self, path: str | bytes) -> Ino:
        """Inode number of an absolute path in the image (symlinks not followed)."""
        raw = path.encode() if isinstance(path, str) else path
        ino = ROOT_INO
        for part in raw.split(b"/"):
            if part in (b"", b"."):
                continue
            ino = self.lookup(ino, part).ino
        return ino

    def files_under(self, ino: Ino, limit: int = 1 << 22) -> list[Ino]:
        """Regular files at or below ``ino`` (pre-order), for prefetch lists."""
        out: list[Ino] = []
        stack = [ino]
        seen: set[Ino] = set()
        while stack and len(out) < limit:
            cur = stack.pop()
            a = self.getattr(cur)
            if stat.S_ISREG(a.mode):
                out.append(cur)
            elif a.is_dir and cur not in seen:
                seen.add(cur)
                kids = [e.ino for e in self.readdir(cur, 2)]
                stack.extend(reversed(kids))
        return out

    def prefetch_chunk_lists(
        self, paths: Sequence[str] | None
    ) -> tuple[list[list[ChunkInfo]], bool]:
        """Chunk lists of the files to prefetch and whether everything should be prefetched.

        ``paths``: explicit list (``--prefetch-files``; ``/`` means all); ``None`` uses the
        bootstrap's prefetch table. Paths that do not exist are skipped with a log line.
        """
        inos: list[Ino] = []
        if paths is not None:
            for p in paths:
                if p.strip() in ("/", ""):
                    return [], True
                try:
                    inos.append(self.resolve(p))
                except (OSError, NotFoundError, FormatError) as e:
                    log.info("prefetch: skipping %s: %s", p, e)
        else:
            for nid in self.meta.prefetch_nids():
                try:
                    ino = self.ino_of(nid)
                except (OSError, FormatError) as e:
                    log.info("prefetch table: skipping node %d: %s", nid, e)
                    continue
                if ino == ROOT_INO:
                    return [], True
                inos.append(ino)
        lists: list[list[ChunkInfo]] = []
        seen: set[int] = set()
        for ino in inos:
            for f in self.files_under(ino):
                if f not in seen:
                    seen.add(f)
                    chunks = self.chunks_of(f)
                    if chunks:
                        lists.append(chunks)
        return lists, False

    def close(self) -> None:
        pool, self._ra_pool = self._ra_pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._chunks.clear()
            self._chunk_bytes = 0
            self._files.clear()
        self.meta.close()

    # ------------------------------------------------------------------ helpers

    def _timed(self, fop: StatsFop, ino: Ino, fn: Callable[[], _T]) -> _T:
        t0 = time.perf_counter_ns()
        try:
            r = fn()
        except BaseException:
            self.stats.record(fop, ino, False)
            raise
        self.stats.record(fop, ino, True, micros=(time.perf_counter_ns() - t0) // 1000)
        return r


def _zeros(out: list[bytes | memoryview], n: int) -> None:
    while n > 0:
        k = min(n, len(_ZEROS))
        out.append(_ZEROS[:k])
        n -= k
