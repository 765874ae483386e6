"""FuseSession against the real kernel with a fake file system: mount, cache flags, EROFS,
busy mount points, clean unmount, passthrough, and serving the connection from another
process after an fd handoff. Needs root (mount(2))."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

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
from nydus.fuse.fdpass import send_fds
from nydus.kernel_mount import umount

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)

DATA = bytes(range(256)) * 4096  # 1 MiB


def _attr(ino: int, mode: int, size: int) -> AttrFields:
    return AttrFields(
        ino, size, (size + 511) // 512, 0, 1_700_000_000, 0, 0, 7, 0, mode, 1, 0, 0, 0
    )


class Files(Operations):
    """/data (1 MiB), /link -> data, /sub/ (empty dir); counts READ requests."""

    def __init__(self, backing: str | None = None) -> None:
        self.reads = 0
        self.opens = 0
        self.backing = backing
        self._fd: int | None = None
        self.lock = threading.Lock()

    FILES: ClassVar[dict[bytes, tuple[int, int]]] = {
        b"data": (2, stat.S_IFREG | 0o644),
        b"link": (3, stat.S_IFLNK | 0o777),
        b"sub": (4, stat.S_IFDIR | 0o755),
    }

    def _a(self, ino: int) -> AttrFields:
        if ino == 1:
            return _attr(1, stat.S_IFDIR | 0o755, 0)
        for _n, (i, mode) in self.FILES.items():
            if i == ino:
                return _attr(i, mode, len(DATA) if i == 2 else 4)
        raise FuseError(errno.ENOENT)

    def lookup(self, ctx: RequestContext, parent: int, name: bytes) -> Entry:
        if parent == 1 and name in self.FILES:
            ino = self.FILES[name][0]
            return Entry(ino, self._a(ino), 3600, 3600)
        return Entry(0, None, 3600, 0)

    def getattr(self, ctx: RequestContext, nodeid: int, fh: int | None) -> AttrReply:
        return AttrReply(self._a(nodeid), 3600)

    def readlink(self, ctx: RequestContext, nodeid: int) -> bytes:
        return b"data"

    def open(self, ctx: RequestContext, nodeid: int, flags: int) -> OpenReply:
        with self.lock:
            self.opens += 1
        if self.backing:
            self._fd = os.open(self.backing, os.O_RDONLY)
            return OpenReply(fh=1, keep_cache=True, backing_fd=self._fd)
        return OpenReply(fh=1, keep_cache=True)

    def release(self, ctx: RequestContext, nodeid: int, fh: int) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, ctx, nodeid, fh, offset, size):  # type: ignore[no-untyped-def]
        with self.lock:
            self.reads += 1
        return memoryview(DATA)[offset : offset + size]

    def opendir(self, ctx: RequestContext, nodeid: int, flags: int) -> OpenReply:
        return OpenReply(keep_cache=True, cache_dir=True)

    def readdir(self, ctx, nodeid, fh, offset, plus):  # type: ignore[no-untyped-def]
        rows = [(b".", 1, 4), (b"..", 1, 4)]
        if nodeid == 1:
            rows += [(n, i, stat.S_IFMT(m) >> 12) for n, (i, m) in sorted(self.FILES.items())]
        for k in range(offset, len(rows)):
            name, ino, dt = rows[k]
            e = Entry(ino, self._a(ino), 3600, 3600) if plus else None
            yield DirEntry(name, ino, dt, k + 1, e)


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    if os.path.ismount(m):
        subprocess.run(["umount", "-l", str(m)], check=False)


def _serve(ops: Operations, mnt: Path, **kw: object) -> FuseSession:
    s = FuseSession(ops, str(mnt), SessionOptions(threads=2, **kw))  # type: ignore[arg-type]
    s.mount()
    s.start()
    assert s.wait_initialized(10)
    return s


def test_mount_read_cache_and_unmount(mnt: Path) -> None:
    ops = Files()
    s = _serve(ops, mnt)
    try:
        assert sorted(os.listdir(mnt)) == ["data", "link", "sub"]
        st = os.stat(mnt / "data")
        assert st.st_size == len(DATA) and st.st_mtime_ns == 1_700_000_000 * 10**9 + 7
        assert os.readlink(mnt / "link") == "data"
        assert (mnt / "data").read_bytes() == DATA
        reads = ops.reads
        assert reads >= 1
        assert (mnt / "data").read_bytes() == DATA  # keep_cache: served by the page cache
        assert ops.reads == reads
        with pytest.raises(OSError) as ei, open(mnt / "new", "w"):
            pass
        assert ei.value.errno == errno.EROFS
        assert "fuse.rafs" in Path("/proc/mounts").read_text()
    finally:
        s.unmount()
    assert not os.path.ismount(mnt)
    assert s.ended


def test_refuses_a_mount_point_in_use(mnt: Path) -> None:
    s = _serve(Files(), mnt)
    try:
        with pytest.raises(OSError) as ei:
            FuseSession(Files(), str(mnt)).mount()
        assert ei.value.errno == errno.EBUSY
    finally:
        s.unmount()


def test_external_umount_ends_the_session(mnt: Path) -> None:
    s = _serve(Files(), mnt)
    subprocess.run(["umount", str(mnt)], check=True)
    assert s.wait(10)
    s.stop()


def test_busy_unmount_falls_back_to_lazy(mnt: Path) -> None:
    s = _serve(Files(), mnt)
    f = open(mnt / "data", "rb")  # noqa: SIM115 - kept open on purpose
    try:
        s.unmount(timeout=1)
        assert not os.path.ismount(mnt)
    finally:
        f.close()


def test_passthrough_serves_reads_in_the_kernel(mnt: Path, tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.write_bytes(DATA)
    ops = Files(str(backing))
    s = _serve(ops, mnt, passthrough=True)
    try:
        from nydus.fuse.protocol import InitFlags

        if not s.flags & InitFlags.PASSTHROUGH:
            pytest.skip("kernel did not offer FUSE passthrough")
        assert (mnt / "data").read_bytes() == DATA
        assert ops.opens == 1 and ops.reads == 0
    finally:
        s.unmount()


_CHILD = textwrap.dedent("""
    import json, os, socket, sys
    sys.path.insert(0, sys.argv[2])
    from test_fuse_mount import Files
    from nydus.fuse import FuseSession, SessionState
    from nydus.fuse.fdpass import recv_fds
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    payload, fds = recv_fds(s, 10)
    sess = FuseSession.resume(Files(), fds[0], SessionState.from_dict(json.loads(payload)))
    sess.start()
    s.sendall(b"serving")
    sess.wait()
""")


def test_another_process_serves_the_handed_over_fd(mnt: Path, tmp_path: Path) -> None:
    s = _serve(Files(), mnt)
    sock_path = str(tmp_path / "sup.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sock_path)
    srv.listen(1)
    child = None
    try:
        assert (mnt / "link").is_symlink()
        state = s.export_state()
        fd = s.device_fd
        t0 = time.monotonic()
        s.stop(close=False)  # stop serving, keep the connection
        assert time.monotonic() - t0 < 3  # blocked workers are woken (STATFS nudges)
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, sock_path, str(Path(__file__).parent)]
        )
        conn, _ = srv.accept()
        import json

        send_fds(conn, json.dumps(state.to_dict()).encode(), [fd])
        os.close(fd)
        conn.settimeout(20)
        assert conn.recv(10) == b"serving"
        assert (mnt / "data").read_bytes() == DATA  # served by the child
        assert sorted(os.listdir(mnt)) == ["data", "link", "sub"]
    finally:
        umount(mnt, lazy=True)
        if child is not None:
            try:
                assert child.wait(20) == 0
            finally:
                if child.poll() is None:
                    child.kill()
        srv.close()
    deadline = time.time() + 5
    while os.path.ismount(mnt) and time.time() < deadline:
        time.sleep(0.05)
