"""BlobDevFs without a kernel: names, sizes, reads through read_range, errors, refcounts."""

from __future__ import annotations

import errno
import stat

import pytest

from nydus.daemon.blobdev import BLOCK, BlobDevFs
from nydus.daemon.erofs_mode import EROFS, FUSEDEV, resolve_driver
from nydus.errors import IntegrityError
from nydus.fuse import ROOT_ID, FuseError, RequestContext

CTX = RequestContext(unique=1, opcode=0, nodeid=1, uid=0, gid=0, pid=1)


class FakeDevice:
    def __init__(self, data: bytes, bad: bool = False) -> None:
        self.data, self.bad, self.calls = data, bad, []  # type: ignore[var-annotated]

    def blob_uncompressed_size(self, i: int) -> int:
        return len(self.data)

    def read_range(self, i: int, offset: int, size: int) -> bytes:
        self.calls.append((i, offset, size))
        if self.bad:
            raise IntegrityError("chunk digest mismatch")
        return self.data[offset : offset + size]


def test_file_sized_to_blocks_and_zero_padded() -> None:
    fs = BlobDevFs()
    dev = FakeDevice(b"x" * 5000)
    fs.register("abc", dev, 0)
    e = fs.lookup(CTX, ROOT_ID, b"abc")
    assert e.attr is not None and e.attr.size == 2 * BLOCK
    assert stat.S_ISREG(e.attr.mode) and e.attr.mode & 0o222 == 0
    data = fs.read(CTX, e.nodeid, 0, 4096, 4096)
    assert data == b"x" * 904 + bytes(4096 - 904)
    assert dev.calls == [(0, 4096, 904)]
    assert fs.read(CTX, e.nodeid, 0, 8192, 4096) == b""
    assert fs.open(CTX, e.nodeid, 0).keep_cache
    assert [d.name for d in fs.readdir(CTX, ROOT_ID, 0, 0, False)] == [b".", b"..", b"abc"]


def test_validation_failure_is_an_error_never_bytes() -> None:
    fs = BlobDevFs()
    fs.register("bad", FakeDevice(b"y" * 8192, bad=True), 0)
    e = fs.lookup(CTX, ROOT_ID, b"bad")
    with pytest.raises(IntegrityError) as ei:
        fs.read(CTX, e.nodeid, 0, 0, 4096)
    assert ei.value.errno == errno.EIO
    assert fs.stats()["bad"]["errors"] == 1


def test_refcounted_names_and_writes_refused() -> None:
    fs = BlobDevFs()
    dev = FakeDevice(b"z" * 4096)
    fs.register("b", dev, 0)
    fs.register("b", dev, 0)
    fs.unregister("b")
    node = fs.lookup(CTX, ROOT_ID, b"b").nodeid
    assert node
    with pytest.raises(FuseError):
        fs.open(CTX, node, 1)  # O_WRONLY
    fs.unregister("b")
    assert fs.lookup(CTX, ROOT_ID, b"b").nodeid == 0
    with pytest.raises(FuseError) as ei:
        fs.read(CTX, node, 0, 0, 10)  # a lazily detached mount still reading
    assert ei.value.errno == errno.EIO


def test_resolve_driver() -> None:
    assert resolve_driver(None, FUSEDEV, 6)[0] == FUSEDEV
    assert resolve_driver("erofs", FUSEDEV, 6)[0] == EROFS
    assert resolve_driver(None, EROFS, 6)[0] == EROFS
    assert resolve_driver("erofs", FUSEDEV, 5) == (FUSEDEV, "RAFS v5 is not an EROFS image")
    assert resolve_driver("erofs", FUSEDEV, 6, upgrade=True)[0] == FUSEDEV
    with pytest.raises(ValueError):
        resolve_driver("nope", FUSEDEV, 6)
