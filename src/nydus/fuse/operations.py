"""The interface a file system implements to be served by :class:`nydus.fuse.FuseSession`.

:class:`Operations` speaks FUSE semantics (node ids, lookup counts, open handles, cache
timeouts) in plain Python values; the session owns the wire format. Every method may raise:

* :class:`FuseError` (or any ``OSError``) with an errno, replied as that errno;
* :class:`nydus.errors.NydusError`, replied as its ``errno`` attribute;
* anything else, logged with its traceback and replied as EIO.

The defaults refuse everything that would modify the file system with EROFS and answer
optional requests with ENOSYS (which tells the kernel not to send them again where the protocol
allows). Node id 1 is the root.

Threading contract: the session calls these methods from several worker threads at once, for
the same or different nodes, so implementations must be thread-safe. ``init`` runs before any
other call and ``destroy`` after the last.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NewType

from .protocol import AttrFields

__all__ = [
    "ROOT_ID",
    "NodeId",
    "FuseError",
    "RequestContext",
    "ConnInfo",
    "Entry",
    "AttrReply",
    "OpenReply",
    "StatFs",
    "DirEntry",
    "Operations",
    "Buffers",
]

#: A FUSE node id: what the kernel names an inode by (root :data:`ROOT_ID`). The file system
#: maps it to its own inode number (:data:`nydus.fs.Ino`); several images may share one space.
NodeId = NewType("NodeId", int)

ROOT_ID = NodeId(1)

Buffers = Sequence[bytes | bytearray | memoryview]


class FuseError(OSError):
    """An errno to reply with: ``raise FuseError(errno.ENOENT)``."""

    def __init__(self, err: int, message: str = "") -> None:
        super().__init__(err, message or os.strerror(err))


@dataclass
class RequestContext:
    """Who asked, and whether the kernel has since interrupted the request."""

    unique: int
    opcode: int
    nodeid: NodeId
    uid: int
    gid: int
    pid: int
    interrupted: bool = False
    replied: bool = False
    started: float = 0.0


@dataclass
class ConnInfo:
    """What INIT negotiated; ``want`` may be edited by ``Operations.init`` (flag bits)."""

    proto_major: int
    proto_minor: int
    kernel_flags: int
    max_readahead: int
    want: int
    max_write: int
    max_pages: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A LOOKUP/READDIRPLUS result. ``nodeid == 0`` is a negative entry (cached ENOENT)."""

    nodeid: int
    attr: AttrFields | None
    entry_timeout: float
    attr_timeout: float
    generation: int = 0
    raw: bytes | None = None  # the packed fuse_entry_out, when the caller caches it


@dataclass(frozen=True, slots=True)
class AttrReply:
    attr: AttrFields
    timeout: float
    raw: bytes | None = None  # the packed fuse_attr_out, when the caller caches it


@dataclass(frozen=True, slots=True)
class OpenReply:
    """Result of OPEN/OPENDIR.

    ``backing_fd``: with FUSE passthrough negotiated, a file descriptor the kernel should read
    directly (the session registers it with FUSE_DEV_IOC_BACKING_OPEN and closes the id on
    RELEASE; the caller keeps ownership of the fd).
    """

    fh: int = 0
    keep_cache: bool = False
    direct_io: bool = False
    cache_dir: bool = False
    noflush: bool = True
    nonseekable: bool = False
    backing_fd: int | None = None


@dataclass(frozen=True, slots=True)
class StatFs:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry; ``offset`` is the cookie that resumes *after* this entry."""

    name: bytes
    ino: int
    dtype: int  # DT_* (S_IFMT >> 12)
    offset: int
    entry: Entry | None = field(default=None, compare=False)  # READDIRPLUS only


def _erofs() -> FuseError:
    return FuseError(errno.EROFS)


def _enosys() -> FuseError:
    return FuseError(errno.ENOSYS)


class Operations:
    """Base class; override what the file system supports."""

    def init(self, conn: ConnInfo) -> None:
        """Called once with the INIT negotiation; may clear bits of ``conn.want``."""

    def destroy(self) -> None:
        """The session ends (DESTROY received, or the device closed)."""

    # -- names and attributes ---------------------------------------------------------------

    def lookup(self, ctx: RequestContext, parent: NodeId, name: bytes) -> Entry:
        """Resolve ``name`` in ``parent``; each non-negative reply adds one lookup."""
        raise FuseError(errno.ENOENT)

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        """Drop ``nlookup`` lookups from each ``(nodeid, nlookup)``. Never replied."""

    def getattr(self, ctx: RequestContext, nodeid: NodeId, fh: int | None) -> AttrReply:
        raise _enosys()

    def readlink(self, ctx: RequestContext, nodeid: NodeId) -> bytes:
        raise FuseError(errno.EINVAL)

    def access(self, ctx: RequestContext, nodeid: NodeId, mask: int) -> None:
        raise _enosys()

    def statfs(self, ctx: RequestContext, nodeid: NodeId) -> StatFs:
        return StatFs()

    # -- files ------------------------------------------------------------------------------

    def open(self, ctx: RequestContext, nodeid: NodeId, flags: int) -> OpenReply:
        raise _enosys()

    def read(
        self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, size: int
    ) -> bytes | Buffers:
        """At most ``size`` bytes at ``offset``; fewer only at end of file."""
        raise _enosys()

    def release(self, ctx: RequestContext, nodeid: NodeId, fh: int) -> None:
        """The last close of an open file. Errors are ignored by the kernel."""

    def flush(self, ctx: RequestContext, nodeid: NodeId, fh: int) -> None:
        raise _enosys()

    def fsync(self, ctx: RequestContext, nodeid: NodeId, fh: int, datasync: bool) -> None:
        raise _enosys()

    def lseek(self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, whence: int) -> int:
        raise _enosys()

    # -- directories ------------------------------------------------------------------------

    def opendir(self, ctx: RequestContext, nodeid: NodeId, flags: int) -> OpenReply:
        raise _enosys()

    def readdir(
        self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, plus: bool
    ) -> Iterable[DirEntry]:
        """Entries after cookie ``offset`` (0 = from the start), ``.`` and ``..`` included.

        With ``plus`` each entry carries an :class:`Entry` (counted as a lookup unless its
        name is ``.`` or ``..`` or its nodeid is 0). The session stops iterating when the
        reply buffer is full and calls :meth:`forget` for the one entry it could not send.
        """
        raise _enosys()

    def releasedir(self, ctx: RequestContext, nodeid: NodeId, fh: int) -> None:
        """The last close of an open directory."""

    # -- extended attributes ----------------------------------------------------------------

    def getxattr(self, ctx: RequestContext, nodeid: NodeId, name: bytes) -> bytes:
        raise _enosys()

    def listxattr(self, ctx: RequestContext, nodeid: NodeId) -> Sequence[bytes]:
        raise _enosys()

    # -- modifications: read-only by default ------------------------------------------------

    def setattr(self, ctx: RequestContext, nodeid: NodeId) -> AttrReply:
        raise _erofs()

    def setxattr(self, ctx: RequestContext, nodeid: NodeId, name: bytes, value: bytes) -> None:
        raise _erofs()

    def removexattr(self, ctx: RequestContext, nodeid: NodeId, name: bytes) -> None:
        raise _erofs()

    def write(self, ctx: RequestContext, nodeid: NodeId, fh: int, offset: int, data: bytes) -> int:
        raise _erofs()

    def modify(self, ctx: RequestContext, opcode: int, nodeid: NodeId) -> None:
        """MKNOD, MKDIR, SYMLINK, LINK, UNLINK, RMDIR, RENAME(2), CREATE, TMPFILE, FALLOCATE,
        COPY_FILE_RANGE: never succeed on this read-only interface."""
        raise _erofs()
