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
registered it until that image goes away.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import NydusError
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
)

__all__ = ["BlobDevFs", "BlobFsServer", "BLOCK"]

log = logging.getLogger("nydus.daemon.blobdev")

BLOCK = 4096
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
    owners: list[Any] = field(default_factory=list)


class BlobDevFs(Operations):
    """See the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[bytes, _BlobFile] = {}
        self._by_node: dict[int, _BlobFile] = {}
        self._next = 2
        self._ns = time.time_ns()

    # ------------------------------------------------------------------ registry

    def register(self, blob_id: str, device: Any, index: int) -> str:
        """Publish blob ``index`` of ``device`` as the file ``blob_id``; returns the name."""
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
                          (size + BLOCK - 1) // BLOCK * BLOCK)
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

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {f.name.decode(): {"reads": f.reads, "bytes_read": f.bytes_read,
                                      "errors": f.errors, "size": f.size}
                    for f in self._by_name.values()}

    # ------------------------------------------------------------------ helpers

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
        real = max(0, min(size, f.blob_size - offset))
        try:
            data = dev.read_range(f.index, offset, real) if real else b""
        except NydusError as e:
            f.errors += 1
            log.error("blob %s: read [%d, +%d): %s", f.name.decode(), offset, real, e)
            raise
        if len(data) < size:
            data = bytes(data) + bytes(size - len(data))
        f.reads += 1
        f.bytes_read += size
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

    @property
    def running(self) -> bool:
        return self.session is not None

    def start(self) -> None:
        if self.session is not None:
            return
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        s = FuseSession(self.fs, self.directory, SessionOptions(
            threads=self.threads, fsname="nydus-blobfs", subtype="nydus-blobfs",
            readdirplus="never", readahead_kb=1024))
        s.mount()
        s.start()
        if not s.wait_initialized(10):
            s.stop()
            raise FuseError(errno.ETIMEDOUT, "blob fs: no FUSE INIT within 10 s")
        self.session = s
        log.info("blob device fs mounted at %s", self.directory)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def stop(self) -> None:
        s, self.session = self.session, None
        if s is None:
            return
        try:
            s.unmount()
        except OSError as e:
            log.error("unmounting blob fs %s: %s", self.directory, e)
            s.stop()
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
