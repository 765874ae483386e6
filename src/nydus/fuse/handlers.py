"""Per-opcode request handlers of :class:`~nydus.fuse.session.FuseSession`: decode a request
body, call the :class:`~nydus.fuse.operations.Operations` method, encode the reply.

A mixin, so the session module keeps the life cycle and the loop and this one the wire
formats. Every handler returns the reply payload (bytes or a list of buffers), or ``None``
when it replied itself (LOOKUP and READDIRPLUS undo their lookup counts if the kernel refuses
the reply). Raising is the way to answer with an errno.

Threading contract: handlers run on the session's worker threads, several at once.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

from . import kernel
from .operations import DirEntry, Entry, FuseError, NodeId, OpenReply, Operations, RequestContext
from .protocol import (
    ACCESS_IN,
    FLUSH_IN,
    FOPEN_CACHE_DIR,
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FOPEN_NOFLUSH,
    FOPEN_NONSEEKABLE,
    FOPEN_PASSTHROUGH,
    FUSE_GETATTR_FH,
    GETATTR_IN,
    GETXATTR_IN,
    GETXATTR_OUT,
    LSEEK_IN,
    LSEEK_OUT,
    OPEN_IN,
    READ_IN,
    RELEASE_IN,
    InitFlags,
    dirent_size,
    direntplus_size,
    pack_attr,
    pack_attr_out,
    pack_dirent,
    pack_direntplus,
    pack_entry_out,
    pack_open_out,
    pack_statfs,
    split_cstring,
)

__all__ = ["RequestHandlers"]

log = logging.getLogger("nydus.fuse")

_NEG_ATTR = b"\0" * 88
_DOTS = (b".", b"..")


class _Ctx(RequestContext):
    __slots__ = ("fd", "lock")

    def __init__(
        self, fd: int, unique: int, opcode: int, nodeid: NodeId, uid: int, gid: int, pid: int
    ) -> None:
        super().__init__(unique, opcode, nodeid, uid, gid, pid, started=time.time())
        self.fd = fd
        self.lock = threading.Lock()


class RequestHandlers:
    """The ``_do_*`` methods; the session provides the attributes declared here."""

    ops: Operations
    flags: int
    _lock: threading.Lock
    _backing: dict[tuple[int, int], int]

    def _reply(self, ctx: _Ctx, payload: bytes | list[Any]) -> bool:
        raise NotImplementedError

    def _forget(self, items: list[tuple[int, int]]) -> None:
        raise NotImplementedError

    def _entry_bytes(self, e: Entry) -> bytes:
        if e.raw is not None:
            return e.raw
        attr = pack_attr(e.attr) if e.attr is not None else _NEG_ATTR
        return pack_entry_out(e.nodeid, e.generation, e.entry_timeout, e.attr_timeout, attr)

    def _do_lookup(self, ctx: _Ctx, body: memoryview) -> None:
        e = self.ops.lookup(ctx, ctx.nodeid, split_cstring(body))
        if not self._reply(ctx, self._entry_bytes(e)) and e.nodeid:
            self._forget([(e.nodeid, 1)])

    def _do_getattr(self, ctx: _Ctx, body: memoryview) -> bytes:
        flags, _d, fh = GETATTR_IN.unpack_from(body, 0) if len(body) >= 16 else (0, 0, 0)
        r = self.ops.getattr(ctx, ctx.nodeid, fh if flags & FUSE_GETATTR_FH else None)
        if r.raw is not None:
            return r.raw
        return pack_attr_out(r.timeout, pack_attr(r.attr))

    def _do_readlink(self, ctx: _Ctx, body: memoryview) -> bytes:
        return self.ops.readlink(ctx, ctx.nodeid)

    def _open_reply(self, ctx: _Ctx, r: OpenReply) -> bytes:
        flags = 0
        if r.keep_cache:
            flags |= FOPEN_KEEP_CACHE
        if r.direct_io:
            flags |= FOPEN_DIRECT_IO
        if r.cache_dir:
            flags |= FOPEN_CACHE_DIR
        if r.noflush:
            flags |= FOPEN_NOFLUSH
        if r.nonseekable:
            flags |= FOPEN_NONSEEKABLE
        backing_id = 0
        if r.backing_fd is not None and self.flags & InitFlags.PASSTHROUGH:
            backing_id = kernel.backing_open(ctx.fd, r.backing_fd)
            with self._lock:
                self._backing[(ctx.nodeid, r.fh)] = backing_id
            flags |= FOPEN_PASSTHROUGH
            # the kernel refuses (EIO) passthrough opens that also ask for page caching
            flags &= ~(FOPEN_DIRECT_IO | FOPEN_KEEP_CACHE)
        return pack_open_out(r.fh, flags, backing_id)

    def _do_open(self, ctx: _Ctx, body: memoryview) -> bytes:
        flags, _ = OPEN_IN.unpack_from(body, 0)
        return self._open_reply(ctx, self.ops.open(ctx, ctx.nodeid, flags))

    def _do_read(self, ctx: _Ctx, body: memoryview) -> Any:
        fh, offset, size = READ_IN.unpack_from(body, 0)[:3]
        data = self.ops.read(ctx, ctx.nodeid, fh, offset, size)
        if isinstance(data, (bytes, bytearray, memoryview)):
            return data
        return list(data)

    def _do_release(self, ctx: _Ctx, body: memoryview) -> bytes:
        fh = RELEASE_IN.unpack_from(body, 0)[0]
        with self._lock:
            backing_id = self._backing.pop((ctx.nodeid, fh), None)
        if backing_id is not None:
            try:
                kernel.backing_close(ctx.fd, backing_id)
            except OSError as e:
                log.warning("closing backing id %d: %s", backing_id, e)
        self.ops.release(ctx, ctx.nodeid, fh)
        return b""

    def _do_flush(self, ctx: _Ctx, body: memoryview) -> bytes:
        self.ops.flush(ctx, ctx.nodeid, FLUSH_IN.unpack_from(body, 0)[0])
        return b""

    def _do_fsync(self, ctx: _Ctx, body: memoryview) -> bytes:
        fh, fsync_flags = struct.unpack_from("<QI", body, 0)
        self.ops.fsync(ctx, ctx.nodeid, fh, bool(fsync_flags & 1))
        return b""

    def _do_statfs(self, ctx: _Ctx, body: memoryview) -> bytes:
        s = self.ops.statfs(ctx, ctx.nodeid)
        return pack_statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize
        )

    def _do_getxattr(self, ctx: _Ctx, body: memoryview) -> bytes:
        value = self.ops.getxattr(ctx, ctx.nodeid, split_cstring(body[GETXATTR_IN.size :]))
        return _xattr_reply(body, value)

    def _do_listxattr(self, ctx: _Ctx, body: memoryview) -> bytes:
        names = b"".join(n + b"\0" for n in self.ops.listxattr(ctx, ctx.nodeid))
        return _xattr_reply(body, names)

    def _do_opendir(self, ctx: _Ctx, body: memoryview) -> bytes:
        flags, _ = OPEN_IN.unpack_from(body, 0)
        return self._open_reply(ctx, self.ops.opendir(ctx, ctx.nodeid, flags))

    def _do_readdir(self, ctx: _Ctx, body: memoryview) -> list[bytes]:
        fh, offset, size = READ_IN.unpack_from(body, 0)[:3]
        out: list[bytes] = []
        used = 0
        it = iter(self.ops.readdir(ctx, ctx.nodeid, fh, offset, False))
        try:
            for d in it:
                n = dirent_size(len(d.name))
                if used + n > size:
                    break
                out.append(pack_dirent(d.ino, d.offset, d.dtype, d.name))
                used += n
        finally:
            _close(it)
        return out

    def _do_readdirplus(self, ctx: _Ctx, body: memoryview) -> None:
        fh, offset, size = READ_IN.unpack_from(body, 0)[:3]
        out: list[bytes] = []
        sent: list[tuple[int, int]] = []
        used = 0
        it = iter(self.ops.readdir(ctx, ctx.nodeid, fh, offset, True))
        try:
            for d in it:
                e = d.entry
                counted = e is not None and e.nodeid != 0 and d.name not in _DOTS
                n = direntplus_size(len(d.name))
                if used + n > size:
                    if counted and e is not None:
                        self._forget([(e.nodeid, 1)])
                    break
                if e is None:
                    e = Entry(0, None, 0.0, 0.0)
                out.append(pack_direntplus(self._entry_bytes(e), d.ino, d.offset, d.dtype, d.name))
                if counted:
                    sent.append((e.nodeid, 1))
                used += n
        except BaseException:
            if sent:
                self._forget(sent)
            raise
        finally:
            _close(it)
        if not self._reply(ctx, out) and sent:
            self._forget(sent)

    def _do_releasedir(self, ctx: _Ctx, body: memoryview) -> bytes:
        self.ops.releasedir(ctx, ctx.nodeid, RELEASE_IN.unpack_from(body, 0)[0])
        return b""

    def _do_access(self, ctx: _Ctx, body: memoryview) -> bytes:
        self.ops.access(ctx, ctx.nodeid, ACCESS_IN.unpack_from(body, 0)[0])
        return b""

    def _do_lseek(self, ctx: _Ctx, body: memoryview) -> bytes:
        fh, offset, whence, _ = LSEEK_IN.unpack_from(body, 0)
        return LSEEK_OUT.pack(self.ops.lseek(ctx, ctx.nodeid, fh, offset, whence))

    def _do_setattr(self, ctx: _Ctx, body: memoryview) -> bytes:
        r = self.ops.setattr(ctx, ctx.nodeid)
        return pack_attr_out(r.timeout, pack_attr(r.attr))

    def _do_setxattr(self, ctx: _Ctx, body: memoryview) -> bytes:
        raw = bytes(body)
        # fuse_setxattr_in is 8 bytes, or 16 with FUSE_SETXATTR_EXT; we never negotiate EXT.
        size = struct.unpack_from("<I", raw, 0)[0]
        rest = raw[8:]
        name = split_cstring(rest)
        value = rest[len(name) + 1 : len(name) + 1 + size]
        self.ops.setxattr(ctx, ctx.nodeid, name, value)
        return b""

    def _do_removexattr(self, ctx: _Ctx, body: memoryview) -> bytes:
        self.ops.removexattr(ctx, ctx.nodeid, split_cstring(body))
        return b""

    def _do_write(self, ctx: _Ctx, body: memoryview) -> bytes:
        fh, offset, size = struct.unpack_from("<QQI", body, 0)
        n = self.ops.write(ctx, ctx.nodeid, fh, offset, bytes(body[40 : 40 + size]))
        return struct.pack("<II", n, 0)

    def _do_modify(self, ctx: _Ctx, body: memoryview) -> bytes:
        self.ops.modify(ctx, ctx.opcode, ctx.nodeid)
        return b""


def _close(it: Iterable[DirEntry]) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _xattr_reply(body: memoryview, value: bytes) -> bytes:
    """GETXATTR/LISTXATTR answer: the size alone when asked with size 0, else the bytes
    (ERANGE if they do not fit)."""
    size, _ = GETXATTR_IN.unpack_from(body, 0)
    if size == 0:
        return GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FuseError(errno.ERANGE)
    return value
