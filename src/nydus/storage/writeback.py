"""Early writeback of the blob cache's dirty pages, and a complete blob made durable (issue 17:
a second container's 2.6 s).

Chunks written to a cache file (:meth:`~nydus.storage.blobcache.BlobCacheFile.write`) sit in
the page cache as dirty pages until the kernel's flusher gets to them (``dirty_expire``, 30 s)
or until someone syncs the file system. With ``prefetch_all`` that is the whole image: well over
a GiB dirty when the prefetch ends. The blob cache usually lives on the file system that holds
containerd's state, and a container's exit unmounts its overlayfs rootfs, which syncs that file
system: the shim's ``umount2`` then writes our gigabyte while the next container of the image
waits for it. A cache's dirty pages are pure liability (the bytes are in the cache to be read
back, never to be changed), so they are handed to the disk as soon as there are enough of them.

:class:`Writeback` does that with ``sync_file_range(fd, off, len, SYNC_FILE_RANGE_WRITE)``:
*start* writeback of a range, do not wait for it. A :class:`WritebackFile` per cache file counts
the bytes written through it; every :data:`BATCH` bytes (and when its blob is complete, or the
file is closed) it passes the ranges written since the last time to the process's one worker
thread (which merges touching ranges) with a ``dup`` of the file's descriptor (the cache file
may be closed before the worker gets there; a descriptor closed even before the ``dup`` just
drops the batch). The kernel's own flusher writes whatever is dropped, so nothing here is
needed for correctness: errors are logged (once per errno, then at debug level) and never
reach a reader or a writer.

Durability (:meth:`WritebackFile.flush` with ``durable=True``, asked when a blob is complete):
after its last ranges the worker ``fdatasync``s the file, then calls the file's ``after_sync``
(the blob cache syncs its chunk map there: data before bits), and :attr:`WritebackFile.durable`
says so until the next write. Starting writeback is not enough for every later sync to be
cheap: on a disk with a volatile write cache, ``fdatasync`` ends with a cache flush, and the
first one after a prefetch's GiB of writes waits until all of them are stable (0.3-0.9 s on
the bench machine's virtio disk, up to 1.05 s in its stalls). Whoever syncs first pays it: a
container runtime's own ``fdatasync`` (containerd's metadata commits in ``ctr run``) if that is
when a container starts. The worker pays it when the blob
completes, on its own thread: never on a reader's or the prefetch's.

What it does not change: until a blob is durable, the order in which data and readiness bits
reach the disk is not guaranteed (blobcache.py's crash-safety contract is about processes, not
power loss), and pages being written back stay in the page cache, readable as before. Chunks
are written once each, so no write waits for a page under writeback.

Threading: :meth:`WritebackFile.wrote` and :meth:`WritebackFile.flush` are called on fetch and
prefetch threads and only append to a list, ``dup`` a descriptor and queue the file (a file
already waiting gets the batch's ranges added; more than :data:`QUEUE_LIMIT` files waiting
drops the batch); every ``sync_file_range`` and ``fdatasync`` runs on one daemon thread per
:class:`Writeback` (:func:`shared` is the process's), started on first use. Fork-safe: the child
of a ``fork`` gets fresh locks, an empty queue (the descriptors queued in the parent are closed
in the child) and starts its own thread when it needs one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from .. import libc as clib
from ..singleflight import Once

__all__ = [
    "BATCH",
    "QUEUE_LIMIT",
    "SYNC_FILE_RANGE_WRITE",
    "Writeback",
    "WritebackFile",
    "datasync",
    "merge_ranges",
    "shared",
    "start_writeback",
]

log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of dirty pages, do not wait
BATCH = 8 << 20  # bytes written to one cache file between two writeback requests
QUEUE_LIMIT = 64  # files waiting for the worker (each holds a descriptor) before drops

SyncRange = Callable[[int, int, int], None]
DataSync = Callable[[int], None]
AfterSync = Callable[[float], None]  # called with the fdatasync's seconds


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """``sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)``; OSError on failure."""
    if clib.libc().sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def datasync(fd: int) -> None:
    """``os.fdatasync(fd)``, looked up when called (a test may replace it)."""
    os.fdatasync(fd)


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges sorted, touching or overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_n, off + n - last_off))
        else:
            out.append((off, n))
    return out


class WritebackFile:
    """Bytes written to one cache file, handed to the :class:`Writeback` in batches.

    ``fd`` stays the caller's; it is ``dup``'ed when the file joins the worker's queue. While
    it waits there, later batches join its ranges (nothing is dropped when the disk is slower
    than the writes). ``after_sync`` runs on the worker after each successful ``fdatasync``
    of the file (OSError from it counts as a failed sync)."""

    def __init__(self, writeback: Writeback, fd: int, after_sync: AfterSync | None = None) -> None:
        self._wb = writeback
        self._fd = fd
        self._after_sync = after_sync
        self._ranges: list[tuple[int, int]] = []  # written, not handed over yet
        self._pending = 0
        self._queued: list[tuple[int, int]] = []  # handed over, the worker has not begun
        self._dup = -1  # the descriptor the queued ranges are written back through
        # Durability, by count of writes: a sync covers the writes made before it was asked.
        self._writes = 0
        self._sync_asked = -1  # the write count the last durability request was for
        self._sync_queued = -1  # a request handed over, the worker has not begun
        self._durable = -1  # the write count the last successful sync covered

    def wrote(self, offset: int, nbytes: int) -> None:
        """``nbytes`` were written at ``offset``; a full batch is queued for writeback."""
        if nbytes <= 0:
            return
        with self._wb._lock:
            self._writes += 1
            self._ranges.append((offset, nbytes))
            self._pending += nbytes
            if self._pending < self._wb.batch:
                return
            ranges = self._take_locked()
        self._wb.submit(self, ranges)

    def flush(self, durable: bool = False) -> None:
        """Queue whatever was written since the last batch (blob complete, file closing); with
        ``durable``, an ``fdatasync`` of the file after it (once per state of the file: asked
        again with no write since, it does nothing)."""
        with self._wb._lock:
            ranges = self._take_locked()
            sync = -1
            if durable and self._sync_asked != self._writes:
                sync = self._sync_asked = self._writes
        if ranges or sync >= 0:
            self._wb.submit(self, ranges, sync)

    @property
    def durable(self) -> bool:
        """The file was ``fdatasync``'ed (and ``after_sync`` ran) after its last write."""
        with self._wb._lock:
            return self._durable == self._writes

    def _take_locked(self) -> list[tuple[int, int]]:
        ranges, self._ranges, self._pending = self._ranges, [], 0
        return merge_ranges(ranges)


_instances: weakref.WeakSet[Writeback] = weakref.WeakSet()


class Writeback:
    r"""One worker thread starting writeback of the ranges of queued :class:`WritebackFile`\ s.

    ``sync`` and ``datasync`` are the seams (:func:`start_writeback` and :func:`datasync`
    otherwise): called on the worker thread as ``sync(fd, offset, nbytes)`` and
    ``datasync(fd)``, they may raise OSError."""

    def __init__(
        self,
        sync: SyncRange = start_writeback,
        *,
        datasync: DataSync = datasync,
        batch: int = BATCH,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.sync = sync
        self.datasync = datasync
        self.batch = batch
        self.queue_limit = queue_limit  # files waiting for the worker
        self.ranges_started = 0  # sync calls that succeeded
        self.bytes_started = 0
        self.dropped = 0  # batches not queued (closed descriptor, full queue)
        self.errors = 0  # sync and datasync calls that failed
        self.synced = 0  # files made durable (datasync and after_sync succeeded)
        self._logged: set[int] = set()
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[WritebackFile] = deque()
        self._current = -1  # the descriptor the worker is on
        self._thread: threading.Thread | None = None

    def _after_fork_in_child(self) -> None:
        fds = [self._current] if self._current >= 0 else []
        for f in self._queue:
            fds.append(f._dup)
            f._dup, f._queued = -1, []
            if f._sync_queued >= 0:  # asked in the parent: the child may ask again
                f._sync_queued = f._sync_asked = -1
        self._reset()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def file(self, fd: int, after_sync: AfterSync | None = None) -> WritebackFile:
        """The accounting of one cache file's writes (``fd`` stays the caller's)."""
        return WritebackFile(self, fd, after_sync)

    def submit(self, f: WritebackFile, ranges: list[tuple[int, int]], sync: int = -1) -> None:
        """Queue writeback of ``ranges`` of ``f``'s file, then (``sync`` >= 0: the write count
        it covers) its ``fdatasync``; never raises OSError."""
        if not ranges and sync < 0:
            return
        with self._lock:
            if f._dup >= 0:  # already waiting for the worker: one more batch for it
                f._queued += ranges
                f._sync_queued = max(f._sync_queued, sync)
                return
        try:
            dup = os.dup(f._fd)
        except OSError as e:  # closed before we got here: the kernel's flusher has it
            log.debug("writeback of fd %d dropped: %s", f._fd, e)
            self._drop(f, sync)
            return
        with self._lock:
            if f._dup >= 0:  # queued by another thread meanwhile
                f._queued += ranges
                f._sync_queued = max(f._sync_queued, sync)
            elif len(self._queue) < self.queue_limit:
                f._dup, f._queued, f._sync_queued = dup, ranges, sync
                self._queue.append(f)
                self._cond.notify()
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="nydus-writeback", daemon=True
                    )
                    self._thread.start()
                return
        self._drop(f, sync)
        os.close(dup)

    def _drop(self, f: WritebackFile, sync: int) -> None:
        with self._lock:
            self.dropped += 1
        self._forget(f, sync)

    def _forget(self, f: WritebackFile, sync: int) -> None:
        """A durability request not carried out: a later one may ask again."""
        with self._lock:
            if sync >= 0 and f._sync_asked == sync:
                f._sync_asked = -1

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued batch was handled (tests); False on timeout."""
        with self._lock:
            return self._cond.wait_for(lambda: not self._queue and self._current < 0, timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._cond.wait_for(lambda: bool(self._queue))
                f = self._queue.popleft()
                fd, ranges, sync = f._dup, merge_ranges(f._queued), f._sync_queued
                f._dup, f._queued, f._sync_queued = -1, [], -1
                self._current = fd
            try:
                if self._start(fd, ranges):
                    if sync >= 0:
                        self._make_durable(f, fd, sync)
                elif sync >= 0:
                    self._forget(f, sync)
            except Exception:  # a bug, not an I/O error: say so, keep the thread alive
                log.exception("writeback of cache file ranges failed")
            finally:
                with self._lock:
                    self._current = -1  # before the close: a fork child must not close a reuse
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    self._cond.notify_all()

    def _start(self, fd: int, ranges: list[tuple[int, int]]) -> bool:
        """Start writeback of ``ranges``; False when the descriptor is of no use for it."""
        for off, n in ranges:
            try:
                self.sync(fd, off, n)
            except OSError as e:
                self.errors += 1
                self._log_error(e)
                if e.errno in (errno.EBADF, errno.ENOSYS, errno.ESPIPE):
                    return e.errno != errno.EBADF
                continue
            self.ranges_started += 1
            self.bytes_started += n
        return True

    def _make_durable(self, f: WritebackFile, fd: int, sync: int) -> None:
        t = time.monotonic()
        try:
            self.datasync(fd)
            if f._after_sync is not None:
                f._after_sync(time.monotonic() - t)
        except OSError as e:
            self.errors += 1
            self._log_error(e, "cannot make a complete cache file durable (left to the kernel)")
            self._forget(f, sync)
            return
        with self._lock:
            f._durable = max(f._durable, sync)
            self.synced += 1

    def _log_error(
        self,
        e: OSError,
        what: str = "cannot start writeback of a cache file (left to the kernel)",
    ) -> None:
        code = e.errno or 0
        if code in self._logged or code == errno.EBADF:
            log.debug("writeback of a cache file: %s", e)
            return
        self._logged.add(code)
        log.warning("%s: %s", what, e)


_shared: Once[Writeback] = Once(Writeback)


def shared() -> Writeback:
    """The process's :class:`Writeback` (created on first use)."""
    return _shared.get()


def _after_fork_in_child() -> None:
    _shared.after_fork_in_child()
    for wb in list(_instances):
        wb._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
