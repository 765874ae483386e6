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
registered it until that image goes away. A file no image serves any more keeps its node until
the kernel forgets it (a lazily detached mount may still read it: EIO), and the kernel keeps the
name's entry: the same blob registered again (same blob table entry, so the same layout) takes
that node back, page cache and all; a blob whose entry differs gets a new node, and the kernel
is told to drop the old name (FUSE_NOTIFY_INVAL_ENTRY) so that opens look it up again.

Each READ is also accounted (bytes served, prefill READs included; latency; errors) in the
file-system statistics of the image that registered the file first, so an image's ``GET
/api/v1/metrics`` counts ``data_read`` and READ ``fop_errors`` in this mode too (bytes the daemon
gave the kernel for the blob device: page and chunk granular, not per file).

Readahead and prefill: kernel readahead on a blob file would read past the end of the file
being read, into chunks of other files, and the daemon would have to fetch those whole chunks:
an over-fetch FUSE RAFS mode does not have. So the blob fs has no readahead (the kernel asks for
exactly what EROFS reads), and instead a page-aligned READ is widened to the whole chunks it
touches (:meth:`StorageDevice.chunk_span`, at most ``PUSH_SPAN_MAX``), which the fetch
decompresses anyway, and, when the chunk after them is not in the cache, to the whole chunks
that follow within ``READ_AHEAD`` (256 KiB) of blob space (at most ``amplify_io``; none while the
access pattern is recorded): that is this mode's read amplification, in place of the fetcher's
(``read_range(amplify=False)``), which takes up to ``amplify_io`` (1 MiB) of *compressed* data
after every miss: on the ml image of bench/coldstart_ml.py that fetched 2.2x the chunks W1 reads
(1.2x with 256 KiB), in no less time (the kernel's readahead of the EROFS files already reads
ahead within a file). The widened bytes are kept for a moment in a small memo, and the daemon
asks the kernel to read the rest of those chunks into the blob file's page cache
(``posix_fadvise(POSIX_FADV_WILLNEED)`` on its own fd of the blob file, from a thread of its
own): the kernel sends READs for just the pages not cached yet, which the memo answers at once,
and the next reads of that chunk never reach the daemon. After a read ending at a chunk
boundary, the chunks after it that are already in the blob cache (up to ``amplify_io``) are
read into the memo and prefilled the same way. Fetching is thus exactly what FUSE RAFS mode
does for the same reads (chunks read, plus ``amplify_io`` amplification into the blob cache).

Why not FUSE_NOTIFY_STORE (what this module used to push those pages with): the kernel's
``fuse_notify_store`` takes the lock of every page (folio) it fills, in an uninterruptible wait
(``filemap_grab_folio``), and a page the kernel is reading from us stays locked from the moment
its READ is queued until our reply. So a push overlapping any READ not answered yet -- one a
worker is serving, or one still queued in the kernel that no worker has read (the daemon cannot
even see those) -- waits for that READ. While the daemon lives that is just a delay; when it is
killed, the workers die without answering, the pushing thread waits forever in the kernel, so
the process never finishes exiting, its /dev/fuse fds never close, the kernel never aborts the
connection, and every reader and ``umount -l`` of the blob fs hangs (7 of 30 SIGKILLs in a test
with 8 readers). Readahead asked with ``WILLNEED`` never waits for a page: pages present (cached,
or locked by a READ in flight) are skipped, missing ones are inserted and their READs queued
asynchronously; at worst it waits, killably, for a free background-request slot. So no thread
of the daemon ever waits for a READ of its own blob fs on the data path, and a killed daemon
exits at once (its connections aborted by the kernel; :mod:`nydus.deathwatch` covers what can
still pin a dying process: a system call into its own mount while a worker is killed serving
it, e.g. the first open of a blob file).

Threading contract: Operations methods run on the session's workers; ``register`` and
``unregister`` may run concurrently from the API thread (one lock guards the tables).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import deathwatch, fuse
from ..errors import NydusError
from ..fs.metrics import StatsFop
from ..fuse import ROOT_ID, FuseError, FuseSession, RequestContext, SessionOptions, kernel
from ..libc import heap_trimmer

__all__ = ["BlobDevFs", "BlobFsServer", "BLOCK"]

log = logging.getLogger("nydus.daemon.blobdev")

BLOCK = 4096
PUSH_SPAN_MAX = 4 << 20  # a read is widened to whole chunks up to this span
# a miss also reads the whole chunks that follow it in this much blob space (at most amplify_io)
READ_AHEAD = 256 << 10
_SPAN_AGAIN_AFTER = 1.0  # s: a span prefilled this recently is not read whole again
_MEMO_BYTES = 64 << 20  # widened spans kept for the prefill READs, at most this much
_MEMO_AGE = 5.0  # s: a span older than this is dropped (its READs came, or never will)
SEEN_GRAIN = 64 << 10  # READs are remembered per this much of blob space (see read_ranges)
_TRIM_AFTER = 8 << 20  # expired memo bytes that make the heap worth trimming
_PREFILL_JOBS = 4096  # prefill requests waiting beyond this are dropped (they are only a hint)
# one WILLNEED asks the kernel for at most max(bdi io_pages, file ra_pages) pages: 128 KiB
# by default (and the blob fs readahead is 0); a larger range is asked in steps of this
_PREFILL_STEP = 128 << 10
_TIMEOUT = 86400.0 * 365
_DT_REG = stat.S_IFREG >> 12
_DT_DIR = stat.S_IFDIR >> 12


class _SpanMemo:
    """Bytes of recently widened spans, by blob file: what the READs of a prefill (and any
    other READ inside a span) are answered from. Bounded in bytes and age; thread-safe."""

    def __init__(self, max_bytes: int = _MEMO_BYTES, max_age: float = _MEMO_AGE) -> None:
        self._lock = threading.Lock()
        self._spans: OrderedDict[tuple[int, int], tuple[int, bytes, float]] = OrderedDict()
        self._bytes = 0
        self.max_bytes, self.max_age = max_bytes, max_age

    def put(self, nodeid: int, start: int, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            old = self._spans.pop((nodeid, start), None)
            if old is not None:
                self._bytes -= len(old[1])
            self._spans[(nodeid, start)] = (start + len(data), data, now)
            self._bytes += len(data)
            while self._spans and (
                self._bytes > self.max_bytes
                or now - next(iter(self._spans.values()))[2] > self.max_age
            ):
                _, (_, gone, _) = self._spans.popitem(last=False)
                self._bytes -= len(gone)

    def get(self, nodeid: int, offset: int, end: int) -> bytes | None:
        """``[offset, end)`` of the file if one span holds all of it, else None."""
        now = time.monotonic()
        with self._lock:
            for (node, start), (stop, data, when) in reversed(self._spans.items()):
                if node == nodeid and start <= offset and end <= stop:
                    if now - when > self.max_age:
                        return None
                    return data[offset - start : end - start]
        return None

    def drop(self, nodeid: int) -> None:
        with self._lock:
            for key in [k for k in self._spans if k[0] == nodeid]:
                self._bytes -= len(self._spans.pop(key)[1])

    def expire(self, now: float | None = None) -> int:
        """Drop the spans older than ``max_age`` (put drops them too, but only when a READ
        comes: after the last one the memo would keep its bytes); the bytes dropped."""
        now = time.monotonic() if now is None else now
        gone = 0
        with self._lock:
            while self._spans and now - next(iter(self._spans.values()))[2] > self.max_age:
                _, (_, data, _) = self._spans.popitem(last=False)
                gone += len(data)
            self._bytes -= gone
        return gone

    @property
    def nbytes(self) -> int:
        return self._bytes


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
    seen: bytearray = field(default_factory=bytearray)  # a bit per SEEN_GRAIN READ
    layout: Any = None  # the blob table entry (index aside) it was registered with


def _layout(device: Any, index: int) -> Any:
    """What fixes the bytes of blob ``index``'s file: its blob table entry (the blob's index
    in its bootstrap aside); None (never taken for the same) if the device does not say."""
    blobs = getattr(device, "blobs", None)
    if not blobs or not 0 <= index < len(blobs):
        return None
    return dataclasses.replace(blobs[index], index=0)


def _mark(bits: bytearray, offset: int, end: int) -> None:
    # without a lock: two READs racing may lose a bit, which only makes a hint smaller
    for g in range(offset // SEEN_GRAIN, min(-(-end // SEEN_GRAIN), len(bits) * 8)):
        bits[g >> 3] |= 1 << (g & 7)


class BlobDevFs(fuse.Operations):
    """See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[bytes, _BlobFile] = {}
        self._by_node: dict[int, _BlobFile] = {}
        # files no image serves, by name, until FORGET: the kernel may still resolve the name
        self._released: dict[bytes, _BlobFile] = {}
        self._next = 2
        self._ns = time.time_ns()
        # asks for pages of a blob file to be read into its page cache: (nodeid, ranges,
        # ready_from): the ranges, and (ready_from >= 0) the chunks from there already in the
        # blob cache (see fill_ready_after); set by the server, called by READ handlers
        self.prefill: Callable[[int, list[tuple[int, int]], int], None] | None = None
        self.memo = _SpanMemo()
        self._spans: dict[tuple[int, int], float] = {}  # (nodeid, span start) -> when
        # told the node id of a file no image serves any more (the server closes its fd)
        self.on_release: Callable[[int], None] | None = None
        # asks the kernel to drop its entry of a root name (set by the server)
        self.invalidate: Callable[[bytes], object] | None = None

    # ------------------------------------------------------------------ registry

    def register(self, blob_id: str, device: Any, index: int, stats: Any = None) -> str:
        """Publish blob ``index`` of ``device`` as the file ``blob_id``; returns the name.
        ``stats`` (an :class:`~nydus.fs.metrics.FsIoStats`) accounts the file's READs."""
        name = blob_id.encode()
        if not name or b"/" in name or name in (b".", b".."):
            raise FuseError(errno.EINVAL, f"bad blob id {blob_id!r}")
        size = int(device.blob_uncompressed_size(index))
        layout = _layout(device, index)
        with self._lock:
            f = self._by_name.get(name)
            if f is not None:
                f.refs += 1
                return blob_id
            old = self._released.pop(name, None)
            if old is not None and layout is not None and old.layout == layout:
                # the same bytes: the kernel's node and its pages serve the new image (whose
                # EROFS instance has read nothing yet: see read_ranges)
                old.device, old.index, old.stats, old.refs = device, index, stats, 1
                old.seen = bytearray(len(old.seen))
                self._by_name[name] = old
                return blob_id
            f = _BlobFile(
                self._next,
                name,
                device,
                index,
                size,
                (size + BLOCK - 1) // BLOCK * BLOCK,
                stats=stats,
                seen=bytearray((size + SEEN_GRAIN * 8 - 1) // (SEEN_GRAIN * 8)),
                layout=layout,
            )
            self._next += 1
            self._by_name[name] = f
            self._by_node[f.nodeid] = f
        inval = self.invalidate
        if old is not None and inval is not None:
            inval(name)  # the kernel may hold the old node under this name: look it up again
        return blob_id

    def unregister(self, blob_id: str) -> None:
        with self._lock:
            f = self._by_name.get(blob_id.encode())
            if f is None:
                return
            f.refs -= 1
            if f.refs > 0:
                return
            del self._by_name[f.name]
            # the node stays resolvable for files the kernel still has open (EROFS
            # mounts detached lazily) and for the kernel's entry of the name (see register);
            # it is dropped on FORGET
            f.device = None
            f.stats = None
            self._released[f.name] = f
        self.memo.drop(f.nodeid)
        cb = self.on_release
        if cb is not None:
            cb(f.nodeid)

    def name_of(self, nodeid: int) -> str | None:
        """The name of a file some image serves (None if none does)."""
        with self._lock:
            f = self._by_node.get(nodeid)
            return f.name.decode() if f is not None and f.device is not None else None

    def read_ranges(self, blob_id: str) -> list[tuple[int, int]]:
        """The ranges ``[lo, hi)`` of blob ``blob_id`` the kernel has READ (prefill READs
        included), at ``SEEN_GRAIN`` granularity, merged, in order: the blob bytes whose file
        pages the EROFS instance reading this file holds in its page cache. The switch to
        native reads the same file ranges through the new instance before it replaces the old
        one (:meth:`.erofs_mode.ErofsManager.switch_native`)."""
        with self._lock:
            f = self._by_name.get(blob_id.encode())
            if f is None:
                return []
            bits, limit = bytes(f.seen), f.blob_size
        out: list[tuple[int, int]] = []
        for i, byte in enumerate(bits):
            if not byte:
                continue
            for b in range(8):
                if byte >> b & 1:
                    lo = (i * 8 + b) * SEEN_GRAIN
                    hi = min(lo + SEEN_GRAIN, limit)
                    if out and out[-1][1] == lo:
                        out[-1] = (out[-1][0], hi)
                    elif lo < hi:
                        out.append((lo, hi))
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {
                f.name.decode(): {
                    "reads": f.reads,
                    "bytes_read": f.bytes_read,
                    "errors": f.errors,
                    "size": f.size,
                }
                for f in self._by_name.values()
            }

    # ------------------------------------------------------------------ helpers

    def fill_ready_after(self, nodeid: int, start: int) -> tuple[int, int] | None:
        """The chunks after ``start`` that are already in the blob cache (fetched by the
        amplification of the read that ended there, or before), up to ``amplify_io``: read
        into the memo, and returned as the range to prefill (None: nothing). The next small
        files of the blob then need no READ, and nothing is fetched for them. Called by the
        server's prefill thread (never by a READ handler: it reads the cache)."""
        try:
            f = self._file(nodeid)
        except FuseError:
            return None
        dev = f.device
        if dev is None or not self._span_due((nodeid, start), time.monotonic(), claim=False):
            return None
        try:
            limit = min(PUSH_SPAN_MAX, int(dev.amplify_io), f.size - start)
            stop = dev.ready_extent(f.index, start, limit) if limit > 0 else start
        except (NydusError, AttributeError):
            return None
        stop = min(f.size, -(-stop // BLOCK) * BLOCK)
        if stop <= start:
            return None
        try:
            real = max(0, min(stop, f.blob_size) - start)
            extra = dev.read_range(f.index, start, real) if real else b""
        except NydusError as e:
            log.debug("blob %s: nothing prefilled after %d: %s", f.name.decode(), start, e)
            return None
        if len(extra) < stop - start:
            extra = bytes(extra) + bytes(stop - start - len(extra))
        self._span_due((nodeid, start), time.monotonic(), claim=True)
        self.memo.put(nodeid, start, extra)
        return start, stop

    def _widen(self, f: _BlobFile, dev: Any, offset: int, end: int) -> tuple[int, int, bool]:
        """``(lo, hi, whole)``: the whole chunks around a page-aligned request, whose other
        pages can be prefilled (see the module docstring), and True; or the request itself
        and False (not aligned, no prefill, too wide, or prefilled a moment ago)."""
        if self.prefill is None or offset % BLOCK or end % BLOCK:
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
        if not self._span_due((f.nodeid, lo), time.monotonic(), claim=True):
            return offset, end, False  # prefilled a moment ago (its READs may be on the way)
        return lo, self._ahead(f, dev, lo, hi), True

    def _ahead(self, f: _BlobFile, dev: Any, lo: int, hi: int) -> int:
        """``hi`` moved past the whole chunks that follow it within ``READ_AHEAD`` bytes (and
        ``amplify_io``, and ``PUSH_SPAN_MAX`` from ``lo``), if the chunk at ``hi`` is not in
        the cache (cached ones are prefilled by :meth:`fill_ready_after`, with no fetch)."""
        stats = f.stats
        budget = min(READ_AHEAD, int(dev.amplify_io), PUSH_SPAN_MAX - (hi - lo), f.blob_size - hi)
        budget = budget // BLOCK * BLOCK
        if budget <= 0 or (stats is not None and stats.access_pattern_enabled):
            return hi
        try:
            if dev.ready_extent(f.index, hi, BLOCK) > hi:
                return hi
            clo, chi = (int(x) for x in dev.chunk_span(f.index, hi + budget - 1, 1))
        except NydusError:
            return hi
        stop = chi if chi <= hi + budget else clo  # whole chunks only
        return max(hi, min(f.size, -(-stop // BLOCK) * BLOCK))

    def _span_due(self, key: tuple[int, int], now: float, *, claim: bool) -> bool:
        """Whether a span starting at ``key`` (nodeid, offset) is due: not widened or
        prefilled in the last ``_SPAN_AGAIN_AFTER`` seconds. With ``claim``, a due span is
        recorded as done now."""
        with self._lock:
            last = self._spans.get(key)
            if last is not None and now - last < _SPAN_AGAIN_AFTER:
                return False
            if claim:
                self._spans[key] = now
                if len(self._spans) > 8192:
                    self._spans = {
                        k: t for k, t in self._spans.items() if now - t < _SPAN_AGAIN_AFTER
                    }
        return True

    def _attr(self, nodeid: int) -> fuse.AttrFields:
        t = divmod(self._ns, 1_000_000_000)
        if nodeid == ROOT_ID:
            with self._lock:
                n = len(self._by_name)
            return fuse.AttrFields.read_only(ROOT_ID, stat.S_IFDIR | 0o555, 4096, 2 + n, t)
        f = self._file(nodeid)
        return fuse.AttrFields.read_only(nodeid, stat.S_IFREG | 0o444, f.size, 1, t, blksize=BLOCK)

    def _file(self, nodeid: int) -> _BlobFile:
        with self._lock:
            f = self._by_node.get(nodeid)
        if f is None:
            raise FuseError(errno.ESTALE)
        return f

    # ------------------------------------------------------------------ Operations

    def lookup(self, ctx: RequestContext, parent: int, name: bytes) -> fuse.Entry:
        if parent != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        with self._lock:
            f = self._by_name.get(name)
        if f is None:
            return fuse.Entry(0, None, 1.0, 0.0)  # short negative entry: blobs come and go
        return fuse.Entry(f.nodeid, self._attr(f.nodeid), _TIMEOUT, _TIMEOUT)

    def forget(self, items: Any) -> None:
        with self._lock:
            for nodeid, _n in items:
                f = self._by_node.get(nodeid)
                if f is not None and f.device is None:
                    del self._by_node[nodeid]
                    if self._released.get(f.name) is f:
                        del self._released[f.name]

    def getattr(self, ctx: RequestContext, nodeid: int, fh: int | None) -> fuse.AttrReply:
        return fuse.AttrReply(self._attr(nodeid), _TIMEOUT)

    def access(self, ctx: RequestContext, nodeid: int, mask: int) -> None:
        if mask & os.W_OK:
            raise FuseError(errno.EROFS)

    def statfs(self, ctx: RequestContext, nodeid: int) -> fuse.StatFs:
        with self._lock:
            blocks = sum(f.size for f in self._by_name.values()) // BLOCK
            files = len(self._by_name) + 1
        return fuse.StatFs(blocks=blocks, files=files)

    def open(self, ctx: RequestContext, nodeid: int, flags: int) -> fuse.OpenReply:
        if nodeid == ROOT_ID:
            raise FuseError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise FuseError(errno.EROFS)
        self._file(nodeid)
        return fuse.OpenReply(keep_cache=True, noflush=True)

    def read(self, ctx: RequestContext, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        f = self._file(nodeid)
        dev = f.device
        if dev is None:
            raise FuseError(errno.EIO, f"blob {f.name.decode()} is no longer served")
        if offset >= f.size or size <= 0:
            return b""
        size = min(size, f.size - offset)
        end = offset + size
        stats = f.stats
        # before the fetch: the chunk it caches may complete the blob, and the native switch
        # then warms what this mark says the kernel read (read_ranges)
        _mark(f.seen, offset, end)
        t0 = time.monotonic_ns()
        data = self.memo.get(nodeid, offset, end)  # a prefill READ, or one just as lucky
        if data is None:
            data = self._read_widened(f, dev, offset, end)
        # served: what the kernel got from the daemon (FUSE RAFS mode counts the same, its
        # readahead included; here the prefill READs count when they come)
        f.reads += 1
        f.bytes_read += size
        if stats is not None:
            stats.record(StatsFop.READ, 0, True, size, (time.monotonic_ns() - t0) // 1000)
            stats.record_blob_read(f.index, offset, size)  # access pattern (fs/chunkmap.py)
        return data

    def _read_widened(self, f: _BlobFile, dev: Any, offset: int, end: int) -> bytes:
        """Bytes ``[offset, end)`` read as the whole chunks around them; the rest of those
        chunks kept in the memo and handed to ``prefill`` (and, if the span ends at a chunk
        boundary, the cached chunks after it)."""
        lo, hi, whole = self._widen(f, dev, offset, end)
        try:
            real = max(0, min(hi, f.blob_size) - lo)
            data = dev.read_range(f.index, lo, real, amplify=not whole) if real else b""
        except NydusError as e:
            f.errors += 1
            stats = f.stats
            if stats is not None:
                stats.record(StatsFop.READ, 0, False)
            log.error("blob %s: read [%d, +%d): %s", f.name.decode(), lo, real, e)
            raise
        if len(data) < hi - lo:
            data = bytes(data) + bytes(hi - lo - len(data))
        prefill = self.prefill
        if prefill is not None and (lo < offset or hi > end or whole):
            ranges = [r for r in ((lo, offset), (end, hi)) if r[0] < r[1]]
            if ranges:
                self.memo.put(f.nodeid, lo, bytes(data))
            # after the reply or not, it does not matter: the kernel skips pages a READ
            # holds (these are outside this one anyway) and never waits for one
            # while the access pattern is recorded, nothing is filled ahead past this file's
            # chunks: each file's first read must reach the pattern (fs/chunkmap.py)
            recording = f.stats is not None and f.stats.access_pattern_enabled
            prefill(f.nodeid, ranges, hi if whole and not recording else -1)
        return bytes(data[offset - lo : end - lo])

    def opendir(self, ctx: RequestContext, nodeid: int, flags: int) -> fuse.OpenReply:
        if nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        return fuse.OpenReply()

    def readdir(
        self, ctx: RequestContext, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[fuse.DirEntry]:
        if nodeid != ROOT_ID:
            raise FuseError(errno.ENOTDIR)
        with self._lock:
            rows: list[tuple[bytes, int, int]] = [
                (b".", ROOT_ID, _DT_DIR),
                (b"..", ROOT_ID, _DT_DIR),
            ]
            rows += [
                (f.name, f.nodeid, _DT_REG)
                for f in sorted(self._by_name.values(), key=lambda x: x.name)
            ]
        for i in range(offset, len(rows)):
            name, node, dtype = rows[i]
            entry = None
            if plus and name not in (b".", b".."):
                entry = fuse.Entry(node, self._attr(node), _TIMEOUT, _TIMEOUT)
            yield fuse.DirEntry(name, node, dtype, i + 1, entry)

    def getxattr(self, ctx: RequestContext, nodeid: int, name: bytes) -> bytes:
        raise FuseError(errno.ENODATA)

    def listxattr(self, ctx: RequestContext, nodeid: int) -> list[bytes]:
        return []


class BlobFsServer:
    """A :class:`BlobDevFs` mounted on ``directory`` by its own FUSE session (created on
    first use by :meth:`start`), with the thread that prefills blob files' page caches and
    the daemon's own read-only fds of the blob files it uses for that (see the module
    docstring). The mount is guarded by the death watcher (:mod:`nydus.deathwatch`)."""

    def __init__(self, directory: str, threads: int = 4) -> None:
        self.directory = os.path.abspath(directory)
        self.fs = BlobDevFs()
        self.threads = threads
        self.session: FuseSession | None = None
        self.readahead = -1  # KiB, as last set; -1: the kernel's default
        self._jobs: deque[tuple[int, list[tuple[int, int]], int]] = deque()
        self._jobs_cond = threading.Condition()
        self._prefiller: threading.Thread | None = None
        self._fds: dict[int, int] = {}  # nodeid -> our fd of the blob file
        self._fd_lock = threading.Lock()
        self.prefilled = 0  # pages asked for (WILLNEED); those already cached send no READ
        self.prefill_dropped = 0

    @property
    def running(self) -> bool:
        return self.session is not None

    def start(self) -> None:
        if self.session is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        s = FuseSession(
            self.fs,
            self.directory,
            SessionOptions(
                threads=self.threads,
                fsname="nydus-blobfs",
                subtype="nydus-blobfs",
                readdirplus="never",
            ),
        )
        s.mount()
        s.start()
        if not s.wait_initialized(10):
            s.stop()
            raise FuseError(errno.ETIMEDOUT, "blob fs: no FUSE INIT within 10 s")
        self.session = s
        deathwatch.guard(self.directory)
        self.readahead = -1
        # the kernel reads exactly what EROFS asks (no readahead on the blob files: it would
        # fetch chunks of other files); the rest of each chunk fetched is prefilled instead
        self.set_readahead(0)
        self._prefiller = threading.Thread(
            target=self._prefill_loop, args=(s,), daemon=True, name="blobfs-prefill"
        )
        self._prefiller.start()
        self.fs.on_release = self._close_fd
        self.fs.invalidate = lambda name: s.notify_inval_entry(ROOT_ID, name)
        self.fs.prefill = self._queue_prefill
        log.info("blob device fs mounted at %s", self.directory)

    def _queue_prefill(self, nodeid: int, ranges: list[tuple[int, int]], ready_from: int) -> None:
        with self._jobs_cond:
            if len(self._jobs) >= _PREFILL_JOBS:
                self.prefill_dropped += 1
                return
            self._jobs.append((nodeid, ranges, ready_from))
            self._jobs_cond.notify()

    def _prefill_loop(self, s: FuseSession) -> None:
        # its own thread: reading the blob cache for the chunks after a read (fill_ready_after)
        # would delay the READ's reply; WILLNEED itself never waits for a READ
        while True:
            with self._jobs_cond:
                while not self._jobs and self.session is s:
                    # quiet for a while: the memo's old spans go
                    quiet = not self._jobs_cond.wait(_MEMO_AGE)
                    if quiet and self.fs.memo.expire() >= _TRIM_AFTER:
                        heap_trimmer().nudge()
                if self.session is not s:
                    self._jobs.clear()
                    return
                nodeid, ranges, ready_from = self._jobs.popleft()
            try:
                if ready_from >= 0:
                    more = self.fs.fill_ready_after(nodeid, ready_from)
                    if more is not None:
                        ranges = [*ranges, more]
                if ranges:
                    self._advise(s, nodeid, ranges)
            except Exception:  # a hint: never let it end the thread
                log.exception("blob fs: prefill of node %d failed", nodeid)

    def _advise(self, s: FuseSession, nodeid: int, ranges: list[tuple[int, int]]) -> None:
        """WILLNEED ``ranges`` of the blob file: the kernel queues READs for the pages not
        cached (answered from the memo) and skips the others, without waiting for any."""
        with self._fd_lock:
            if self.session is not s:
                return
            fd = self._fds.get(nodeid)
            if fd is None:
                name = self.fs.name_of(nodeid)
                if name is None:
                    return
                try:
                    # a LOOKUP (usually cached) and an OPEN answered by our own workers
                    fd = os.open(self.path(name), os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    log.debug("blob fs: cannot open %s to prefill it: %s", name, e)
                    return
                self._fds[nodeid] = fd
            for lo, hi in ranges:
                for off in range(lo, hi, _PREFILL_STEP):
                    try:
                        os.posix_fadvise(
                            fd, off, min(_PREFILL_STEP, hi - off), os.POSIX_FADV_WILLNEED
                        )
                    except OSError as e:  # ENOTCONN: the connection is going away
                        log.debug("blob fs: WILLNEED on node %d: %s", nodeid, e)
                        return
                self.prefilled += (hi - lo) // BLOCK

    def _close_fd(self, nodeid: int) -> None:
        with self._fd_lock:
            fd = self._fds.pop(nodeid, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

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
        self.fs.prefill = None
        self.fs.on_release = None
        self.fs.invalidate = None
        with self._jobs_cond:
            s, self.session = self.session, None
            self._jobs_cond.notify_all()
        if s is None:
            return
        t = self._prefiller
        if t is not None and t is not threading.current_thread():
            t.join(5)
        with self._fd_lock:  # our own opens would keep the mount busy
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        deathwatch.release(self.directory)
        try:
            s.unmount()
        except OSError as e:
            log.error("unmounting blob fs %s: %s", self.directory, e)
            s.stop()
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
