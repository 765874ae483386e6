"""The persistent chunk readiness bitmap, ``<blob_id>.blob.data.chunk_map``, in upstream's format.

Layout (nydus-reference.md §3.1, upstream ``PersistMap``): a 4096-byte header ``magic
0x424D4150, version 1, magic2 0x434D4150, all_ready (0x4D4D4150 once every chunk is
cached)``, little-endian, then ``ceil(chunk_count / 8)`` bitmap bytes; chunk *i* is bit
``1 << (7 - i % 8)`` of byte ``i // 8`` (MSB first). The file size must be exactly
``4096 + ceil(n / 8)``; a file with the wrong size or magic is replaced by a fresh one (every
chunk not ready), never trusted.

Sharing: the file is mmapped. Upstream nydusd sets bits with an atomic compare-and-swap;
Python has no atomic byte operations on an mmap, so each read-modify-write of bitmap bytes holds
a thread lock and an open-file-description (OFD) ``fcntl`` write lock on those bytes. Processes
of this implementation therefore never lose or resurrect each other's bits; against a
concurrent upstream nydusd the worst case is a lost *set* (that chunk is fetched again), never a
bit that says ready for data that is not there. Creation and repair run under ``flock`` on the
file and replace a bad file by ``rename``, so a reader never sees a half-written header.

Crash safety is the caller's ordering: chunk data is written (``pwrite``) before its bit is set,
so a process killed at any instant leaves at worst a written chunk whose bit is clear. Readers
(``is_ready``) take no lock: a single byte load cannot tear.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import time

from ..errors import NydusError

__all__ = ["ChunkMap", "HEADER_SIZE", "MAGIC", "MAGIC2", "MAGIC_ALL_READY"]

HEADER_SIZE = 4096
MAGIC = 0x424D_4150
MAGIC2 = 0x434D_4150
MAGIC_ALL_READY = 0x4D4D_4150
VERSION = 1

_HEAD = struct.Struct("<IIII")
_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux x86_64 / aarch64


def _header(all_ready: bool = False) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, MAGIC2, MAGIC_ALL_READY if all_ready else 0).ljust(
        HEADER_SIZE, b"\0"
    )


def _mask(i: int) -> int:
    return 1 << (7 - (i & 7))


class ChunkMap:
    """Readiness bits of one blob's chunks, shared between threads and processes."""

    def __init__(self, path: str, chunk_count: int) -> None:
        if chunk_count <= 0:
            raise NydusError(f"chunk map {path}: chunk count must be positive")
        self.path = path
        self.count = chunk_count
        self.size = HEADER_SIZE + (chunk_count + 7) // 8
        self.rebuilt = False  # True when an existing file was rejected and replaced
        self._lock = threading.Lock()
        self._fd = self._open()
        try:
            self._mm = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self._fd)
            raise
        self._all_ready = self._header_all_ready()
        # Bits known set (at open, plus those this object set): a cheap hint that tells
        # set_ready when a full count might find the map complete.
        self._known = self.count if self._all_ready else self.count_ready()
        self._last_count = time.monotonic()
        if not self._all_ready and self._known == self.count:
            self._mark_all_ready()

    # ------------------------------------------------------------------ open / repair

    def _open(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # The file may have been replaced while we waited for the lock.
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                if self._valid_or_init(fd):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return fd
                self._replace()
                self.rebuilt = True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # releases the flock; reopen the fresh file

    def _valid_or_init(self, fd: int) -> bool:
        """True if ``fd`` holds a valid map (initialising an empty or all-zero file)."""
        st = os.fstat(fd)
        if st.st_size == 0:
            os.ftruncate(fd, self.size)
            os.pwrite(fd, _header(), 0)
            return True
        if st.st_size != self.size:
            return False
        head = os.pread(fd, 16, 0)
        magic, version, magic2, _ = _HEAD.unpack(head)
        if magic == 0 and magic2 == 0:
            # Upstream's window between set_len and the header write: valid only if all zero.
            if any(os.pread(fd, self.size, 0)):
                return False
            os.pwrite(fd, _header(), 0)
            return True
        return bool(magic == MAGIC and version >= 1 and magic2 == MAGIC2)

    def _replace(self) -> None:
        tmp = f"{self.path}.tmp.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            os.pwrite(fd, _header(), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def _locked(self, first_byte: int, nbytes: int):  # type: ignore[no-untyped-def]
        with self._lock:
            arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, first_byte, nbytes, 0)
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, arg)
            try:
                yield
            finally:
                arg = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, first_byte, nbytes, 0)
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, arg)

    # ------------------------------------------------------------------ bits

    def _check(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise NydusError(f"chunk map {self.path}: index {i} out of range 0..{self.count}")

    def is_ready(self, i: int) -> bool:
        self._check(i)
        if self._all_ready:
            return True
        return bool(self._mm[HEADER_SIZE + (i >> 3)] & _mask(i))

    def set_ready(self, indices: list[int]) -> None:
        """Mark chunks ready. Call only after their data is in the data file."""
        if not indices:
            return
        for i in indices:
            self._check(i)
        lo = HEADER_SIZE + (min(indices) >> 3)
        hi = HEADER_SIZE + (max(indices) >> 3)
        new = 0
        with self._locked(lo, hi - lo + 1):
            for i in indices:
                pos = HEADER_SIZE + (i >> 3)
                old = self._mm[pos]
                if not old & _mask(i):
                    self._mm[pos] = old | _mask(i)
                    new += 1
        self._known += new
        if new and self._known >= self.count and self.count_ready() == self.count:
            self._mark_all_ready()

    def clear(self, i: int) -> None:
        """Mark one chunk not ready (its cached bytes were found to be bad)."""
        self._check(i)
        with self._locked(0, self.size):
            pos = HEADER_SIZE + (i >> 3)
            self._mm[pos] = self._mm[pos] & ~_mask(i) & 0xFF
            if self._header_all_ready():
                self._mm[12:16] = b"\0\0\0\0"
            self._all_ready = False
            self._known = max(self._known - 1, 0)

    def count_ready(self) -> int:
        if self._all_ready:
            return self.count
        bits = int.from_bytes(self._mm[HEADER_SIZE : self.size], "big")
        return (bits >> (8 * (self.size - HEADER_SIZE) - self.count)).bit_count()

    def ready_indices(self) -> list[int]:
        if self._all_ready:
            return list(range(self.count))
        bm = self._mm[HEADER_SIZE : self.size]
        return [i for i in range(self.count) if bm[i >> 3] & _mask(i)]

    def bitmap(self) -> bytes:
        """A copy of the readiness bitmap (every bit of a chunk set once all are ready)."""
        n = self.size - HEADER_SIZE
        if self._all_ready:
            full = (1 << self.count) - 1
            return (full << (8 * n - self.count)).to_bytes(n, "big")
        return bytes(self._mm[HEADER_SIZE : self.size])

    def _header_all_ready(self) -> bool:
        return bool(_HEAD.unpack_from(self._mm, 0)[3] == MAGIC_ALL_READY)

    def _mark_all_ready(self) -> None:
        with self._locked(0, HEADER_SIZE):
            if self.count_ready() == self.count:
                self._mm[12:16] = struct.pack("<I", MAGIC_ALL_READY)
                self._all_ready = True

    @property
    def all_ready(self) -> bool:
        """Every chunk ready; re-counts (at most once a second) to see other processes' bits."""
        if not self._all_ready and self._header_all_ready():
            self._all_ready = True
        if not self._all_ready and time.monotonic() - self._last_count > 1.0:
            self._last_count = time.monotonic()
            self._known = self.count_ready()
            if self._known == self.count:
                self._mark_all_ready()
        return self._all_ready

    def refresh(self) -> None:
        """Re-count now (another process may have completed the blob)."""
        self._last_count = 0.0
        _ = self.all_ready

    def flush(self) -> None:
        self._mm.flush()

    def sync(self) -> bool:
        """``fdatasync`` the map file (its mmapped bits included); False once closed. The lock
        is held only to ``dup`` the descriptor, never across the sync."""
        with self._lock:
            if self._fd < 0:
                return False
            fd = os.dup(self._fd)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._mm.close()
                os.close(self._fd)
                self._fd = -1
