"""The blob-device FUSE file system: one read-only file per blob, for kernel EROFS mounts.

In kernel EROFS mode (see :mod:`.erofs_mode`) the kernel mounts a RAFS v6 bootstrap itself and
reads chunk data from its extra devices (``device=`` options). Those devices are the files of
this small FUSE file system: a flat root directory with one regular file per blob, named by the
blob id and sized to the blob's *uncompressed* size (rounded up to 4 KiB, the EROFS block, and
zero-filled past the blob's end). A READ of ``[offset, offset + size)`` is
``BlobDevice.read_range(blob_index, offset, size)``: fetch, verify, decompress and cache the
chunks (with read amplification), exactly as FUSE RAFS mode reads file data.

Errors: a chunk that fails validation (or any storage error) is replied as the error's errno
(EIO for IntegrityError), which file-backed EROFS passes on to the reader as EIO; wrong bytes are
never returned. Files are opened with keep_cache, and the attributes never change, so data read
once stays in the page cache of the blob file.

Files are registered per image (:meth:`BlobDevFs.register`) and reference counted by name: two
images with the same blob share the file (same id, same bytes), served by the first device that
registered it until that image goes away. Each READ is also accounted (bytes served, pushed
pages included; latency; errors) in the file-system statistics of the image that registered the
file first, so an image's ``GET /api/v1/metrics`` counts ``data_read`` and READ ``fop_errors`` in
this mode too (bytes the daemon gave the kernel for the blob device: page and chunk granular, not
per file).

Readahead and pushes: kernel readahead on a blob file would read past the end of the file being
read, into chunks of other files, and the daemon would have to fetch those whole chunks: an
over-fetch FUSE RAFS mode does not have. So the blob fs has no readahead (the kernel asks for
exactly what EROFS reads), and instead a page-aligned READ is widened to the whole chunks it
touches (:meth:`StorageDevice.chunk_span`, at most ``PUSH_SPAN_MAX``), which the fetch
decompresses anyway; the rest of those chunks is pushed into the blob file's page cache
(FUSE_NOTIFY_STORE) by a thread of its own, so the next reads of that chunk never reach the
daemon. Fetching is thus exactly what FUSE RAFS mode does for the same reads (chunks read, plus
``amplify_io`` amplification into the blob cache), at readahead speed.

Threading contract: Operations methods run on the session's workers; ``register`` and
``unregister`` may run concurrently from the API thread (one lock guards the tables).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import NydusError
from ..fs.metrics import StatsFop
from ..fuse import (
    ROOT_ID,
    AttrFields,
    AttrReply,
    DirEntry,
    Entry,
    FuseError,
    FuseSession,
    OpenReply,
    Operations,
    RequestContext,
    SessionOptions,
    StatFs,
    kernel,
)

__all__ = ["BlobDevFs", "BlobFsServer", "BLOCK"]

log = logging.getLogger("nydus.daemon.blobdev")

BLOCK = 4096
PUSH_SPAN_MAX = 4 << 20  # a read is widened to whole chunks up to this span
_PUSH_AGAIN_AFTER = 1.0  # s: a span pushed this recently is not read whole again
_PUSH_QUEUE_BYTES = 64 << 20  # pushes waiting beyond this are dropped (they are only a hint)
_TIMEOUT = 86400.0 * 365
_DT_REG = stat.S_IFREG >> 12
_DT_DIR = stat.S_IFDIR >> 12


@dataclass
class _BlobFile:
    nodeid: int
    name: bytes
    device: Any  # nydus.storage.BlobDevice
    index: int
    blob_size: int  # uncompressed size
    size: int  # file size: blob_size rounded up to BLOCK
    refs: int = 1
    reads: int = 0
    bytes_read: int = 0
    errors: int = 0
    stats: Any = None  # the first registrant's FsIoStats (or None)


class BlobDevFs(Operations):
    """See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[bytes, _BlobFile] = {}
        self._by_node: dict[int, _BlobFile] = {}
        self._next = 2
        self._ns = time.time_ns()
        # pushes pages into a blob file's page cache: (nodeid, offset, data); set by the server
        self.push: Callable[[int, int, bytes], None] | None = None
        self._pushed: dict[tuple[int, int], float] = {}  # (nodeid, span start) -> when

    # ------------------------------------------------------------------ registry

    def register(self, blob_id: str, device: Any, index: int, stats: Any = None) -> str:
        """Publish blob ``index`` of ``device`` as the file ``blob_id``; returns the name.
        ``stats`` (an :class:`~nydus.fs.metrics.FsIoStats`) accounts the file's READs."""
        name = blob_id.encode()
        if not name or b"/" in name or name in (b".", b".."):
            raise FuseError(errno.EINVAL, f"bad blob id {blob_id!r}")
        size = int(device.blob_uncompressed_size(index))
        with self._lock:
            f = self._by_name.get(name)
            if f is not None:
                f.refs += 1
                return blob_id
            f = _BlobFile(self._next, name, device, index, size,
                          (size + BLOCK - 1) // BLOCK * BLOCK, stats=stats)
            self._next += 1
            self._by_name[name] = f
            self._by_node[f.nodeid] = f
        return blob_id

    def unregister(self, blob_id: str) -> None:
        with self._lock:
            f = self._by_name.get(blob_id.encode())
            if f is None:
                return
            f.refs -= 1
            if f.refs <= 0:
                del self._by_name[f.name]
                # the node stays resolvable for files the kernel still has open (EROFS
                # mounts detached lazily); it is dropped on FORGET
                f.device = None
                f.stats = None

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {f.name.decode(): {"reads": f.reads, "bytes_read": f.bytes_read,
                                      "errors": f.errors, "size": f.size}
                    for f in self._by_name.values()}

    # ------------------------------------------------------------------ helpers

    def _push_ready_after(self, f: _BlobFile, dev: Any, start: int) -> int:
        """Push the chunks after ``start`` that are already in the blob cache (fetched by this
        read's amplification, or before), up to ``amplify_io``: the next small files of the
        blob then need no READ, and nothing is fetched for them. Returns the bytes pushed."""
        key = (f.nodeid, start)
        now = time.monotonic()
        if not self._push_due(key, now, claim=False):
            return 0
        try:
            limit = min(PUSH_SPAN_MAX, int(dev.amplify_io), f.size - start)
            stop = dev.ready_extent(f.index, start, limit) if limit > 0 else start
        except (NydusError, AttributeError):
            return 0
        stop = min(f.size, -(-stop // BLOCK) * BLOCK)
        if stop <= start:
            return 0
        try:
            real = max(0, min(stop, f.blob_size) - start)
            extra = dev.read_range(f.index, start, real) if real else b""
        except NydusError as e:
            log.debug("blob %s: no push after %d: %s", f.name.decode(), start, e)
            return 0
        if len(extra) < stop - start:
            extra = bytes(extra) + bytes(stop - start - len(extra))
        self._push_due(key, now, claim=True)
        push = self.push
        if push is None:
            return 0
        push(f.nodeid, start, extra)
        return len(extra)

    def _widen(self, f: _BlobFile, dev: Any, offset: int, end: int) -> tuple[int, int, bool]:
        """``(lo, hi, whole)``: the whole chunks around a page-aligned request, whose other
        pages can be pushed into the page cache (see the module docstring), and True; or the
        request itself and False (not aligned, no pushes, too wide, or pushed a moment ago)."""
        if self.push is None or offset % BLOCK or end % BLOCK:
            return offset, end, False
        real_end = min(end, f.blob_size)
        if real_end <= offset:
            return offset, end, False
        try:
            lo, hi = dev.chunk_span(f.index, offset, real_end - offset)
        except NydusError:
            return offset, end, False
        lo = min(offset, max(0, lo // BLOCK * BLOCK))
        hi = max(end, min(f.size, -(-hi // BLOCK) * BLOCK))
        if hi - lo > PUSH_SPAN_MAX:
            return offset, end, False
        if not self._push_due((f.nodeid, lo), time.monotonic(), claim=True):
            return offset, end, False  # pushed a moment ago (maybe not landed yet)
        return lo, hi, True

    def _push_due(self, key: tuple[int, int], now: float, *, claim: bool) -> bool:
        """Whether a push starting at ``key`` (nodeid, offset) is due: not made in the last
        ``_PUSH_AGAIN_AFTER`` seconds. With ``claim``, a due push is recorded as made now."""
        with self._lock:
            last = self._pushed.get(key)
            if last is not None and now - last < _PUSH_AGAIN_AFTER:
                return False
            if claim:
                self._pushed[key] = now
                if len(self._pushed) > 8192:
                    self._pushed = {k: t for k, t in self._pushed.items()
                                    if now - t < _PUSH_AGAIN_AFTER}
        return True

    def _attr(self, nodeid: int) -> AttrFields:
        s, ns = divmod(self._ns, 1_000_000_000)
        if nodeid == ROOT_ID:
            with self._lock:
                n = len(self._by_name)
            return AttrFields(ino=ROOT_ID, size=4096, blocks=8, atime=s, mtime=s, ctime=s,
                              atime_ns=ns, mtime_ns=ns, ctime_ns=ns,
                              mode=stat.S_IFDIR | 0o555, nlink=2 + n, uid=0, gid=0, rdev=0)
        f = self._file(nodeid)
        return AttrFields(ino=nodeid, size=f.size, blocks=f.size // 512, atime=s, mtime=s,
                          ctime=s, atime_ns=ns, mtime_ns=ns, ctime_ns=ns,
                          mode=stat.S_IFREG | 0o444, nlink=1, uid=0, gid=0, rdev=0,
                          blksize=BLOCK)

    def _file(self, nodeid: int) -> _BlobFile:
        with self._lock:
            f = self._by_node.get(nodeid)
        if f is None:
            raise FuseError(errno.ESTALE)
        return f

    # ------------------------------------------------------------------ Operations

    def lookup(self, ctx: RequestContext, parent: int, name: bytes) -> Entry:
        if parent != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        with self._lock:
            f = self._by_name.get(name)
        if f is None:
            return Entry(0, None, 1.0, 0.0)  # short negative entry: blobs come and go
        return Entry(f.nodeid, self._attr(f.nodeid), _TIMEOUT, _TIMEOUT)

    def forget(self, items: Any) -> None:
        with self._lock:
            for nodeid, _n in items:
                f = self._by_node.get(nodeid)
                if f is not None and f.device is None:
                    del self._by_node[nodeid]

    def getattr(self, ctx: RequestContext, nodeid: int, fh: int | None) -> AttrReply:
        return AttrReply(self._attr(nodeid), _TIMEOUT)

    def access(self, ctx: RequestContext, nodeid: int, mask: int) -> None:
        if mask & os.W_OK:
            raise FuseError(errno.EROFS)

    def statfs(self, ctx: RequestContext, nodeid: int) -> StatFs:
        with self._lock:
            blocks = sum(f.size for f in self._by_name.values()) // BLOCK
            files = len(self._by_name) + 1
        return StatFs(blocks=blocks, files=files)

    def open(self, ctx: RequestContext, nodeid: int, flags: int) -> OpenReply:
        if nodeid == ROOT_ID:
            raise FuseError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseError(errno.EROFS)
        self._file(nodeid)
        return OpenReply(keep_cache=True, noflush=True)

    def read(self, ctx: RequestContext, nodeid: int, fh: int, offset: int,
             size: int) -> bytes:
        f = self._file(nodeid)
        dev = f.device
        if dev is None:
            raise FuseError(errno.EIO, f"blob {f.name.decode()} is no longer served")
        if offset >= f.size or size <= 0:
            return b""
        size = min(size, f.size - offset)
        end = offset + size
        lo, hi, whole = self._widen(f, dev, offset, end)
        stats = f.stats
        t0 = time.monotonic_ns()
        try:
            real = max(0, min(hi, f.blob_size) - lo)
            data = dev.read_range(f.index, lo, real) if real else b""
        except NydusError as e:
            f.errors += 1
            if stats is not None:
                stats.record(StatsFop.READ, 0, False)
            log.error("blob %s: read [%d, +%d): %s", f.name.decode(), lo, real, e)
            raise
        if len(data) < hi - lo:
            data = bytes(data) + bytes(hi - lo - len(data))
        served = hi - lo
        push = self.push
        if push is not None:
            if lo < offset:
                push(f.nodeid, lo, data[: offset - lo])
            if hi > end:
                push(f.nodeid, end, data[end - lo :])
            recording = stats is not None and stats.access_pattern_enabled  # every file's
            if whole and not recording:  # reads must reach the pattern: no push-ahead then
                served += self._push_ready_after(f, dev, hi)
        data = data[offset - lo : end - lo]
        # served: the request and the pages pushed with it (what FUSE RAFS mode counts is
        # what the kernel got from the daemon, readahead included: the same here)
        f.reads += 1
        f.bytes_read += served
        if stats is not None:
            stats.record(StatsFop.READ, 0, True, served, (time.monotonic_ns() - t0) // 1000)
            stats.record_blob_read(f.index, offset, size)  # access pattern (fs/chunkmap.py)
        return data

    def opendir(self, ctx: RequestContext, nodeid: int, flags: int) -> OpenReply:
        if nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        return OpenReply()

    def readdir(self, ctx: RequestContext, nodeid: int, fh: int, offset: int,
                plus: bool) -> Iterator[DirEntry]:
        if nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        with self._lock:
            rows = [(b".", ROOT_ID, _DT_DIR), (b"..", ROOT_ID, _DT_DIR)]
            rows += [(f.name, f.nodeid, _DT_REG) for f in
                     sorted(self._by_name.values(), key=lambda x: x.name)]
        for i in range(offset, len(rows)):
            name, node, dtype = rows[i]
            entry = None
            if plus and name not in (b".", b".."):
                entry = Entry(node, self._attr(node), _TIMEOUT, _TIMEOUT)
            yield DirEntry(name, node, dtype, i + 1, entry)

    def getxattr(self, ctx: RequestContext, nodeid: int, name: bytes) -> bytes:
        raise FuseError(errno.ENODATA)

    def listxattr(self, ctx: RequestContext, nodeid: int) -> list[bytes]:
        return []


class BlobFsServer:
    """A :class:`BlobDevFs` mounted on ``directory`` by its own FUSE session (created on
    first use by :meth:`start`)."""

    def __init__(self, directory: str, threads: int = 4) -> None:
        self.directory = os.path.abspath(directory)
        self.fs = BlobDevFs()
        self.threads = threads
        self.session: FuseSession | None = None
        self.readahead = -1  # KiB, as last set; -1: the kernel's default
        self._pq: deque[tuple[int, int, bytes]] = deque()
        self._pq_bytes = 0
        self._pq_cond = threading.Condition()
        self._pusher: threading.Thread | None = None
        self.pushed = 0  # pages pushed
        self.push_dropped = 0

    @property
    def running(self) -> bool:
        return self.session is not None

    def start(self) -> None:
        if self.session is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        s = FuseSession(self.fs, self.directory, SessionOptions(
            threads=self.threads, fsname="nydus-blobfs", subtype="nydus-blobfs",
            readdirplus="never"))
        s.mount()
        s.start()
        if not s.wait_initialized(10):
            s.stop()
            raise FuseError(errno.ETIMEDOUT, "blob fs: no FUSE INIT within 10 s")
        self.session = s
        self.readahead = -1
        # the kernel reads exactly what EROFS asks (no readahead on the blob files: it would
        # fetch chunks of other files); the rest of each chunk fetched is pushed instead
        self.set_readahead(0)
        self._pusher = threading.Thread(target=self._push_loop, args=(s,), daemon=True,
                                        name="blobfs-push")
        self._pusher.start()
        self.fs.push = self._queue_push
        log.info("blob device fs mounted at %s", self.directory)

    def _queue_push(self, nodeid: int, offset: int, data: bytes) -> None:
        with self._pq_cond:
            if self._pq_bytes + len(data) > _PUSH_QUEUE_BYTES:
                self.push_dropped += 1
                return
            self._pq.append((nodeid, offset, data))
            self._pq_bytes += len(data)
            self._pq_cond.notify()

    def _push_loop(self, s: FuseSession) -> None:
        # its own thread: a push waits for pages locked by READs in flight, which the
        # session's workers must stay free to answer
        while True:
            with self._pq_cond:
                while not self._pq and self.session is s:
                    self._pq_cond.wait()
                if self.session is not s:
                    self._pq.clear()
                    self._pq_bytes = 0
                    return
                nodeid, offset, data = self._pq.popleft()
                self._pq_bytes -= len(data)
            if s.notify_store(nodeid, offset, data):
                self.pushed += len(data) // BLOCK

    def set_readahead(self, nbytes: int) -> None:
        """The kernel's readahead on every blob file, in bytes (rounded up to 4 KiB; 0: none).
        Needs root (the mount's bdi knob in sysfs); logged, not raised, when it cannot."""
        kb = (max(0, nbytes) + BLOCK - 1) // BLOCK * (BLOCK // 1024)
        if self.session is None or kb == self.readahead:
            return
        if kernel.set_readahead_kb(self.directory, kb):
            self.readahead = kb
            log.info("blob fs readahead %d KiB", kb)
        else:
            log.warning("could not set the blob fs readahead to %d KiB", kb)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def stop(self) -> None:
        self.fs.push = None
        with self._pq_cond:
            s, self.session = self.session, None
            self._pq_cond.notify_all()
        if s is None:
            return
        try:
            s.unmount()
        except OSError as e:
            log.error("unmounting blob fs %s: %s", self.directory, e)
            s.stop()
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
