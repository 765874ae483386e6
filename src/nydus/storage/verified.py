"""Which cached chunks are known good: the trust layer over a blob's cache file.

What is verified when (the threat model; README "What is verified when" says the same):

* **On the way in, always.** Every chunk fetched from a backend (user reads in both drivers,
  amplified and merged fetches, prefetch) is decompressed and hashed with the blob's digester
  (blake3 or sha256) over its *uncompressed* bytes, and compared with its digest from the
  bootstrap (or the blob's ``blob.digest`` array, itself checked against the bootstrap through
  the ToC digest). ``digest_validate`` does not switch this off: a corrupted blob in a registry
  is an EIO (after one refetch), never data. A chunk whose digest is nowhere to be found is not
  served. Only verified chunks get their ready bit in the chunk map.
* **In the cache, trusted once verified, while nothing changed.** A :class:`CacheTrust` keeps,
  per open cache file, a bitmap of chunks verified by this process (fetched and hashed, or
  read back and hashed) and the cache file's identity (device, inode, size, mtime, ctime) as it
  was when that bitmap was last known to be accurate. Any write to the file changes its ctime
  (which no ``touch`` can set back), so a byte flipped through the file system while a daemon
  runs is noticed at the next cache read or write of that process: its whole bitmap is dropped
  and every cached chunk is hashed again before it is served. A ready bit set by another process
  (another nydusd sharing the cache, maybe upstream's without validation) is not trusted until
  this process has hashed that chunk once.
* **Across restarts, by a record.** ``<cache file>.verified`` (ours; upstream's ``.chunk_map``
  stays as it is, and upstream ignores the extra file) holds the blob id, the cache file's
  identity and the verified bitmap, with a sha256 over it all. It is written when a process
  closes the cache file or has verified a whole blob, only if the file did not change behind
  its back. At open the record is believed only if the identity still matches; otherwise (no
  record, a crash, a change while no daemon ran) every ready chunk is hashed on its first read.
* **Before the kernel reads the file itself.** In EROFS mode a blob is switched to its local
  cache file only after every chunk of the file was hashed by this process (a background
  thread, off the read path: :meth:`nydus.storage.BlobDevice.verify_blob`), whatever the
  record says: that catches a bit flip on the disk itself too, which changes no ctime.
* **``digest_validate``** (or ``cache.validate``) keeps upstream's meaning: every read from the
  cache is hashed again, so even a change the identity cannot see is caught in FUSE RAFS mode.

Not covered, honestly: after the switch to native, the kernel reads the cache file with no
daemon in the path, so a change made to it later (root writing into the file, a disk bit flip)
is served until the next restart (dm-verity/fs-verity would be the tools for that, not
available for this cache here); with ``digest_validate`` off, a change that leaves the file's
identity intact (a flip on the disk under the file system, or a root user who forges a
matching record) is served in FUSE RAFS mode; and whoever can write the bootstrap decides what
is correct. This protects against corrupt registries and backends, broken or foreign writers of
the cache, crashes and careless edits; not against root on the host.

Threading: :class:`CacheTrust` methods are thread-safe (one lock; readers of the bitmap take
none: a byte load cannot tear). Record files are written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import NamedTuple

from ..atomicwrite import write_atomic

__all__ = ["CacheTrust", "FileIdentity", "load_record", "save_record", "RECORD_SUFFIX"]

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".verified"
_MAGIC = b"NYPYVRF1"
_HEAD = struct.Struct("<8sIIQQQqqH")


class FileIdentity(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of_fd(cls, fd: int) -> FileIdentity:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _bits_size(count: int) -> int:
    return (count + 7) // 8


def save_record(path: str, blob_id: str, ident: FileIdentity, bitmap: bytes) -> None:
    """Write the record atomically."""
    name = blob_id.encode()
    body = (
        _HEAD.pack(
            _MAGIC,
            len(bitmap) * 8,
            1,
            ident.dev,
            ident.ino,
            ident.size,
            ident.mtime_ns,
            ident.ctime_ns,
            len(name),
        )
        + name
        + bitmap
    )
    write_atomic(path, body + hashlib.sha256(body).digest(), 0o600)


def load_record(path: str, blob_id: str, count: int) -> tuple[FileIdentity, bytes] | None:
    """(identity, bitmap) of a well-formed record for this blob, or None."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEAD.size + 4096 + _bits_size(count) + 64)
    except OSError:
        return None
    if len(raw) < _HEAD.size + 32 or hashlib.sha256(raw[:-32]).digest() != raw[-32:]:
        return None
    magic, nbits, _version, dev, ino, size, mtime, ctime, nlen = _HEAD.unpack_from(raw)
    name = raw[_HEAD.size : _HEAD.size + nlen]
    bitmap = raw[_HEAD.size + nlen : -32]
    if (
        magic != _MAGIC
        or name != blob_id.encode()
        or nbits != _bits_size(count) * 8
        or len(bitmap) != _bits_size(count)
    ):
        return None
    return FileIdentity(dev, ino, size, mtime, ctime), bitmap


class CacheTrust:
    """The verified bitmap and baseline identity of one open cache file (module docstring).

    ``fd`` is the cache file's descriptor (owned by the caller); ``record_path`` the record.
    """

    def __init__(self, fd: int, record_path: str, blob_id: str, count: int) -> None:
        self._fd = fd
        self.record_path = record_path
        self.blob_id = blob_id
        self.count = count
        self._lock = threading.Lock()
        self._bits = bytearray(_bits_size(count))  # trusted: hashed here, or vouched by a record
        self._hashed = bytearray(_bits_size(count))  # hashed by this process
        self._baseline = FileIdentity.of_fd(fd)
        self.foreign_changes = 0  # times the file changed behind this process's back

    # ------------------------------------------------------------------ open / close

    def adopt_record(self, ready_bitmap: bytes) -> int:
        """Believe the record if it matches the file as it is; returns how many chunks it
        vouches for (0 without a matching record)."""
        rec = load_record(self.record_path, self.blob_id, self.count)
        if rec is None:
            return 0
        ident, bitmap = rec
        with self._lock:
            if ident != self._baseline:
                log.info(
                    "cache file of blob %s changed since it was last verified: its chunks "
                    "are hashed again on first read",
                    self.blob_id,
                )
                return 0
            self._bits = bytearray(a & b for a, b in zip(bitmap, ready_bitmap, strict=True))
            return int.from_bytes(self._bits, "big").bit_count()

    def save(self, ready_bitmap: bytes) -> bool:
        """Write the record (chunks both ready and verified) if the file is as this process
        last knew it; otherwise remove a stale record. Returns whether a record was written."""
        with self._lock:
            ident = FileIdentity.of_fd(self._fd)
            trusted = bytes(a & b for a, b in zip(self._bits, ready_bitmap, strict=True))
            if ident != self._baseline or not any(trusted):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.record_path)
                return False
            save_record(self.record_path, self.blob_id, ident, trusted)
            return True

    def discard_record(self) -> None:
        with self._lock:
            self._bits = bytearray(len(self._bits))
            self._hashed = bytearray(len(self._bits))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.record_path)

    # ------------------------------------------------------------------ changes

    def _drop_locked(self, ident: FileIdentity) -> None:
        self.foreign_changes += 1
        if any(self._bits):
            log.warning(
                "cache file of blob %s changed behind this process's back: every "
                "cached chunk is hashed again before it is served",
                self.blob_id,
            )
        self._bits = bytearray(len(self._bits))
        self._hashed = bytearray(len(self._bits))
        self._baseline = ident

    def check_unchanged(self) -> bool:
        """False (and every chunk untrusted from now on) if the file changed since this process
        last wrote or looked at it."""
        ident = FileIdentity.of_fd(self._fd)
        if ident == self._baseline:
            return True
        with self._lock:  # a write of ours may be in flight: look again under its lock
            ident = FileIdentity.of_fd(self._fd)
            if ident == self._baseline:
                return True
            self._drop_locked(ident)
            return False

    def write(self, do_write: Callable[[], bool]) -> bool:
        """Run ``do_write()`` (our own pwrite of verified chunk bytes) so that its change of
        the file is not taken for a foreign one; a foreign change just before is noticed."""
        with self._lock:
            ident = FileIdentity.of_fd(self._fd)
            if ident != self._baseline:
                self._drop_locked(ident)
            try:
                return bool(do_write())
            finally:
                self._baseline = FileIdentity.of_fd(self._fd)

    # ------------------------------------------------------------------ bits

    def is_verified(self, i: int) -> bool:
        """Trusted: hashed by this process, or vouched for by a matching record."""
        return bool(self._bits[i >> 3] & (1 << (7 - (i & 7))))

    def is_hashed(self, i: int) -> bool:
        """Hashed by this process (on its way in, or read back)."""
        return bool(self._hashed[i >> 3] & (1 << (7 - (i & 7))))

    def mark(self, indices: list[int]) -> None:
        """Chunks this process has just hashed and found good."""
        with self._lock:
            for i in indices:
                m = 1 << (7 - (i & 7))
                self._bits[i >> 3] |= m
                self._hashed[i >> 3] |= m

    def unmark(self, i: int) -> None:
        with self._lock:
            m = ~(1 << (7 - (i & 7))) & 0xFF
            self._bits[i >> 3] &= m
            self._hashed[i >> 3] &= m

    def trusted_count(self) -> int:
        bits = int.from_bytes(self._bits, "big")
        return (bits >> (8 * len(self._bits) - self.count)).bit_count()

    def hashed_count(self) -> int:
        bits = int.from_bytes(self._hashed, "big")
        return (bits >> (8 * len(self._hashed) - self.count)).bit_count()
