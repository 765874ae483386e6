"""FuseSession request handling without the kernel: a SOCK_SEQPACKET socketpair stands in for
/dev/fuse (one request per message, one reply per writev), driven by a tiny fake kernel."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from nydus.errors import FormatError, IntegrityError
from nydus.fuse import (
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
)
from nydus.fuse import protocol as p

OP = p.Opcode


def _attr(ino: int, mode: int = stat.S_IFREG | 0o644, size: int = 0) -> AttrFields:
    return AttrFields(ino, size, 0, 1, 2, 3, 4, 5, 6, mode, 1, 0, 0, 0)


class FakeOps(Operations):
    """A file system of one directory (1) with N files (2..N+1); records calls."""

    def __init__(self, n: int = 50) -> None:
        self.n = n
        self.forgotten: list[tuple[int, int]] = []
        self.lookups = 0
        self.released: list[int] = []
        self.read_gate = threading.Event()
        self.read_gate.set()
        self.destroyed = False
        self.lock = threading.Lock()

    def lookup(self, ctx: RequestContext, parent: int, name: bytes) -> Entry:
        if name == b"boom":
            raise RuntimeError("unexpected bug")
        if name == b"corrupt":
            raise FormatError("bad bootstrap")
        if name.startswith(b"f") and name[1:].isdigit() and int(name[1:]) < self.n:
            ino = int(name[1:]) + 2
            with self.lock:
                self.lookups += 1
            return Entry(ino, _attr(ino, size=100), 10.0, 10.0)
        return Entry(0, None, 10.0, 0.0)

    def forget(self, items):  # type: ignore[no-untyped-def]
        with self.lock:
            self.forgotten.extend(items)

    def getattr(self, ctx: RequestContext, nodeid: int, fh: int | None) -> AttrReply:
        if nodeid == 1:
            return AttrReply(_attr(1, stat.S_IFDIR | 0o755), 5.0)
        return AttrReply(_attr(nodeid, size=100), 5.0)

    def open(self, ctx: RequestContext, nodeid: int, flags: int) -> OpenReply:
        return OpenReply(fh=nodeid * 10, keep_cache=True)

    def read(self, ctx, nodeid, fh, offset, size):  # type: ignore[no-untyped-def]
        if nodeid == 99:
            raise IntegrityError("digest mismatch")
        self.read_gate.wait(10)
        data = bytes([nodeid % 256]) * 100
        return [data[offset : offset + size][:10], data[offset : offset + size][10:]]

    def release(self, ctx: RequestContext, nodeid: int, fh: int) -> None:
        self.released.append(fh)

    def opendir(self, ctx: RequestContext, nodeid: int, flags: int) -> OpenReply:
        return OpenReply(cache_dir=True, keep_cache=True)

    def readdir(self, ctx, nodeid, fh, offset, plus) -> Iterator[DirEntry]:  # type: ignore[no-untyped-def]
        rows = [(b".", 1), (b"..", 1)] + [(f"f{i}".encode(), i + 2) for i in range(self.n)]
        for i in range(offset, len(rows)):
            name, ino = rows[i]
            entry = None
            if plus:
                if name not in (b".", b".."):
                    with self.lock:
                        self.lookups += 1
                entry = Entry(ino, _attr(ino), 10.0, 10.0)
            yield DirEntry(name, ino, 8 if ino > 1 else 4, i + 1, entry)

    def getxattr(self, ctx: RequestContext, nodeid: int, name: bytes) -> bytes:
        if name == b"user.a":
            return b"value"
        raise FuseError(errno.ENODATA)

    def listxattr(self, ctx: RequestContext, nodeid: int) -> list[bytes]:
        return [b"user.a", b"user.b"]

    def destroy(self) -> None:
        self.destroyed = True


class FakeKernel:
    def __init__(self, ops: Operations, threads: int = 2) -> None:
        self.k, u = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.k.settimeout(10)
        self.session = FuseSession.from_fd(
            ops, u.detach(), "/fake", SessionOptions(threads=threads)
        )
        self.session.start()
        self.unique = 0
        self.lock = threading.Lock()

    def send(self, opcode: int, nodeid: int, body: bytes = b"", unique: int | None = None) -> int:
        with self.lock:
            if unique is None:
                self.unique += 2
                unique = self.unique
        hdr = p.IN_HEADER.pack(40 + len(body), opcode, unique, nodeid, 0, 0, 1234, 0, 0)
        self.k.send(hdr + body)
        return unique

    def recv(self) -> tuple[int, int, bytes]:
        msg = self.k.recv(1 << 21)
        ln, err, unique = p.OUT_HEADER.unpack_from(msg)
        assert ln == len(msg)
        return unique, err, msg[16:]

    def call(self, opcode: int, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
        u = self.send(opcode, nodeid, body)
        unique, err, payload = self.recv()
        assert unique == u
        return err, payload

    def init(self, flags: int = 0xFFFFFFFF, flags2: int = 0xFFFFFFFF) -> bytes:
        err, out = self.call(
            OP.INIT,
            0,
            struct.pack("<IIIII44x", 7, 45, 131072, flags | p.InitFlags.INIT_EXT, flags2),
        )
        assert err == 0
        return out

    def close(self) -> None:
        self.k.close()
        self.session.wait(10)
        self.session.stop()


@pytest.fixture
def fk() -> Iterator[tuple[FakeKernel, FakeOps]]:
    ops = FakeOps()
    k = FakeKernel(ops)
    k.init()
    yield k, ops
    k.close()


def _read_in(fh: int, off: int, size: int) -> bytes:
    return p.READ_IN.pack(fh, off, size, 0, 0, 0, 0)


def test_init_negotiates_what_both_sides_want() -> None:
    ops = FakeOps()
    k = FakeKernel(ops)
    try:
        out = k.init()
        major, minor, ra, flags, _maxbg, _ct, _mw, tg, max_pages, _ma, flags2, depth, _rt = (
            p.INIT_OUT.unpack(out)
        )
        assert (major, minor, ra, max_pages, tg) == (7, 45, 131072, 256, 1)
        full = flags | flags2 << 32
        for f in (
            "ASYNC_READ",
            "PARALLEL_DIROPS",
            "MAX_PAGES",
            "DO_READDIRPLUS",
            "CACHE_SYMLINKS",
            "INIT_EXT",
        ):
            assert full & getattr(p.InitFlags, f), f
        # always READDIRPLUS: "auto" falls back to READDIR + one LOOKUP per entry after the
        # first buffer of a directory, which halves the speed of a cold find+stat
        assert not full & p.InitFlags.READDIRPLUS_AUTO
        assert not full & p.InitFlags.NO_OPEN_SUPPORT  # only with SessionOptions(no_open=True)
        assert not full & p.InitFlags.PASSTHROUGH and depth == 0
        assert not full & p.InitFlags.WRITEBACK_CACHE
        assert k.session.wait_initialized(1)
    finally:
        k.close()


def test_init_only_asks_for_flags_the_kernel_offers() -> None:
    k = FakeKernel(FakeOps())
    try:
        out = k.init(flags=p.InitFlags.ASYNC_READ, flags2=0)
        flags = p.INIT_OUT.unpack(out)[3]
        assert flags == p.InitFlags.ASYNC_READ | p.InitFlags.INIT_EXT  # helper always sets EXT
    finally:
        k.close()


def test_init_refuses_old_protocol() -> None:
    k = FakeKernel(FakeOps())
    try:
        err, _ = k.call(OP.INIT, 0, struct.pack("<IIII", 7, 20, 0, 0))
        assert err == -errno.EPROTO
    finally:
        k.close()


def test_lookup_getattr_and_negative_entries(fk) -> None:  # type: ignore[no-untyped-def]
    k, _ops = fk
    err, out = k.call(OP.LOOKUP, 1, b"f3\0")
    assert err == 0 and len(out) == 128
    nodeid, _gen, ev, av, _, _ = p.ENTRY_OUT_HEAD.unpack_from(out)
    assert (nodeid, ev, av) == (5, 10, 10)
    assert p.ATTR.unpack_from(out, 40)[1] == 100  # size
    err, out = k.call(OP.LOOKUP, 1, b"missing\0")
    assert err == 0 and p.ENTRY_OUT_HEAD.unpack_from(out)[0] == 0  # cached negative entry
    err, out = k.call(OP.GETATTR, 1, p.GETATTR_IN.pack(0, 0, 0))
    assert err == 0 and len(out) == 104
    assert p.ATTR.unpack_from(out, 16)[9] == stat.S_IFDIR | 0o755


def test_errors_map_to_errnos_and_the_loop_survives(fk) -> None:  # type: ignore[no-untyped-def]
    k, _ops = fk
    assert k.call(OP.LOOKUP, 1, b"boom\0")[0] == -errno.EIO  # unexpected exception
    assert k.call(OP.LOOKUP, 1, b"corrupt\0")[0] == -errno.EIO  # NydusError family
    assert k.call(OP.READ, 99, _read_in(0, 0, 10))[0] == -errno.EIO  # IntegrityError
    assert k.call(OP.MKDIR, 1, b"\0" * 8 + b"x\0")[0] == -errno.EROFS
    assert k.call(OP.WRITE, 2, b"\0" * 40 + b"data")[0] == -errno.EROFS
    assert k.call(OP.SETXATTR, 2, struct.pack("<II", 1, 0) + b"user.x\0v")[0] == -errno.EROFS
    assert k.call(OP.GETLK, 2, b"\0" * 64)[0] == -errno.ENOSYS
    assert k.call(250, 2)[0] == -errno.ENOSYS  # unknown opcode
    assert k.call(OP.LOOKUP, 1, b"f1\0")[0] == 0  # still serving


def test_open_read_release(fk) -> None:  # type: ignore[no-untyped-def]
    k, ops = fk
    err, out = k.call(OP.OPEN, 4, p.OPEN_IN.pack(os.O_RDONLY, 0))
    fh, flags, backing = p.OPEN_OUT.unpack(out)
    assert err == 0 and fh == 40 and backing == 0
    assert flags & p.FOPEN_KEEP_CACHE and flags & p.FOPEN_NOFLUSH
    err, data = k.call(OP.READ, 4, _read_in(fh, 5, 50))
    assert err == 0 and data == b"\x04" * 50  # two buffers, one reply
    assert k.call(OP.RELEASE, 4, p.RELEASE_IN.pack(fh, 0, 0, 0)) == (0, b"")
    assert ops.released == [40]


def test_xattr_size_probe_and_erange(fk) -> None:  # type: ignore[no-untyped-def]
    k, _ = fk
    err, out = k.call(OP.GETXATTR, 2, p.GETXATTR_IN.pack(0, 0) + b"user.a\0")
    assert err == 0 and p.GETXATTR_OUT.unpack(out)[0] == 5
    assert k.call(OP.GETXATTR, 2, p.GETXATTR_IN.pack(64, 0) + b"user.a\0") == (0, b"value")
    assert k.call(OP.GETXATTR, 2, p.GETXATTR_IN.pack(2, 0) + b"user.a\0")[0] == -errno.ERANGE
    assert k.call(OP.GETXATTR, 2, p.GETXATTR_IN.pack(64, 0) + b"user.z\0")[0] == -errno.ENODATA
    err, out = k.call(OP.LISTXATTR, 2, p.GETXATTR_IN.pack(0, 0))
    assert p.GETXATTR_OUT.unpack(out)[0] == 14
    assert k.call(OP.LISTXATTR, 2, p.GETXATTR_IN.pack(100, 0)) == (0, b"user.a\0user.b\0")
    assert k.call(OP.LISTXATTR, 2, p.GETXATTR_IN.pack(3, 0))[0] == -errno.ERANGE


def _parse_dirents(buf: bytes, plus: bool) -> list[tuple[bytes, int, int]]:
    out, pos = [], 0
    while pos < len(buf):
        if plus:
            pos += 128
        ino, off, namelen, _typ = p.DIRENT_HEAD.unpack_from(buf, pos)
        out.append((buf[pos + 24 : pos + 24 + namelen], ino, off))
        pos += (24 + namelen + 7) & ~7
    return out


def test_readdir_pages_through_a_directory(fk) -> None:  # type: ignore[no-untyped-def]
    k, _ = fk
    names, off = [], 0
    while True:
        err, out = k.call(OP.READDIR, 1, _read_in(0, off, 200))
        assert err == 0
        ents = _parse_dirents(out, False)
        if not ents:
            break
        assert sum((24 + len(n) + 7) & ~7 for n, _, _ in ents) <= 200
        names += [n for n, _, _ in ents]
        off = ents[-1][2]
    assert names == [b".", b".."] + [f"f{i}".encode() for i in range(50)]


def test_readdirplus_forgets_the_entry_that_did_not_fit(fk) -> None:  # type: ignore[no-untyped-def]
    k, ops = fk
    _err, out = k.call(OP.READDIRPLUS, 1, _read_in(0, 0, 1024))
    ents = _parse_dirents(out, True)
    sent = [e for e in ents if e[0] not in (b".", b"..")]
    assert len(ents) == 1024 // 160 and len(sent) == len(ents) - 2
    # one more entry was produced (counted) but not sent: it must have been forgotten
    assert ops.lookups == len(sent) + 1
    assert ops.forgotten == [(len(ents), 1)]  # row i has inode i


def test_forget_and_batch_forget_get_no_reply(fk) -> None:  # type: ignore[no-untyped-def]
    k, ops = fk
    k.send(OP.FORGET, 7, p.FORGET_IN.pack(3))
    body = p.BATCH_FORGET_IN.pack(2, 0) + p.FORGET_ONE.pack(8, 1) + p.FORGET_ONE.pack(9, 2)
    k.send(OP.BATCH_FORGET, 0, body)
    assert k.call(OP.GETATTR, 1, p.GETATTR_IN.pack(0, 0, 0))[0] == 0  # next reply is this one
    deadline = time.time() + 5
    while len(ops.forgotten) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(ops.forgotten) == [(7, 3), (8, 1), (9, 2)]


def test_interrupt_replies_eintr_to_a_blocked_read(fk) -> None:  # type: ignore[no-untyped-def]
    k, ops = fk
    ops.read_gate.clear()
    u = k.send(OP.READ, 4, _read_in(40, 0, 10))
    deadline = time.time() + 5
    while u not in [r["unique"] for r in k.session.inflight()] and time.time() < deadline:
        time.sleep(0.01)
    assert next(r for r in k.session.inflight() if r["unique"] == u)["opcode"] == OP.READ
    k.send(OP.INTERRUPT, 0, p.INTERRUPT_IN.pack(u), unique=u | p.FUSE_INT_REQ_BIT)
    unique, err, _ = k.recv()
    assert (unique, err) == (u, -errno.EINTR)
    ops.read_gate.set()
    # the late result is dropped; the session keeps serving
    assert k.call(OP.GETATTR, 1, p.GETATTR_IN.pack(0, 0, 0))[0] == 0


def test_session_ends_when_the_device_closes_and_calls_destroy() -> None:
    ops = FakeOps()
    k = FakeKernel(ops, threads=3)
    k.init()
    k.k.close()
    assert k.session.wait(5)
    assert ops.destroyed
    k.session.stop()


def test_destroy_request_is_answered() -> None:
    ops = FakeOps()
    k = FakeKernel(ops)
    k.init()
    assert k.call(OP.DESTROY, 0) == (0, b"")
    assert ops.destroyed
    k.close()


def test_many_threads_many_requests() -> None:
    ops = FakeOps(200)
    k = FakeKernel(ops, threads=8)
    k.init()
    try:
        want = {}
        for i in range(200):
            want[k.send(OP.LOOKUP, 1, f"f{i}\0".encode())] = i + 2
        got = {}
        for _ in range(200):
            unique, err, out = k.recv()
            assert err == 0
            got[unique] = p.ENTRY_OUT_HEAD.unpack_from(out)[0]
        assert got == want
    finally:
        k.close()
