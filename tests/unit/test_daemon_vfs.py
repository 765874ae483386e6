"""RafsVfs (the RAFS FUSE adapter) without the kernel: node ids, the pseudo root of a shared
daemon, lookup counting and deferred close of detached images, errno mapping."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from corpus import TreeInfo
from nydus.daemon.vfs import PSEUDO_SLOT, SLOT_SHIFT, RafsVfs
from nydus.fs import FsOptions, RafsFs
from nydus.fuse import FuseError, RequestContext
from nydus.metadata import open_bootstrap
from nydus.storage.blobfile import LocalBlobChunks

CTX = RequestContext(1, 0, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def image(sample_tree: TreeInfo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import NydusImage

    out = tmp_path_factory.mktemp("vfsimg")
    blobs = out / "blobs"
    blobs.mkdir()
    NydusImage(cwd=out)(
        "create", "--bootstrap", out / "boot", "--blob-dir", blobs, sample_tree.root
    )
    return out / "boot", blobs


class Closing(RafsFs):
    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


def _fs(image: tuple[Path, Path], **kw: Any) -> Closing:
    meta = open_bootstrap(image[0])
    return Closing(meta, LocalBlobChunks(str(image[1]), meta.blobs), FsOptions(**kw))


def test_single_image_at_root_uses_fs_inode_numbers(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    fs = _fs(image)
    assert v.attach("/", fs) == 0
    e = v.lookup(CTX, 1, b"sizes")
    assert e.nodeid == fs.resolve("/sizes") and e.attr is not None and e.attr.ino == e.nodeid
    assert e.entry_timeout > 1e9 and e.attr_timeout > 1e9  # immutable: cache forever
    f = v.lookup(CTX, e.nodeid, b"size-4097")
    fh = v.open(CTX, f.nodeid, os.O_RDONLY)
    assert fh.keep_cache and fh.noflush
    data = b"".join(v.read(CTX, f.nodeid, fh.fh, 0, 10000))
    assert len(data) == 4097
    neg = v.lookup(CTX, 1, b"missing")
    assert neg.nodeid == 0 and neg.entry_timeout > 0  # cached negative entry
    d = v.opendir(CTX, 1, 0)
    assert d.cache_dir and d.keep_cache
    names = [x.name for x in v.readdir(CTX, 1, 0, 0, False)]
    assert names[:2] == [b".", b".."] and b"sizes" in names
    with pytest.raises(FuseError) as ei:
        v.attach("/sub", _fs(image))
    assert ei.value.errno == errno.EBUSY


def test_shared_daemon_pseudo_tree_and_slots(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    notes: list[tuple[int, bytes]] = []
    v.notify_entry = lambda parent, name: notes.append((parent, name))
    a, b = _fs(image), _fs(image)
    assert v.attach("/a", a) == 1
    assert v.attach("/x/y/", b) == 2
    assert notes == [(1, b"a"), (v.lookup(CTX, 1, b"x").nodeid, b"y")]
    root = [(d.name, d.ino) for d in v.readdir(CTX, 1, 0, 0, False)]
    assert [n for n, _ in root] == [b".", b"..", b"a", b"x"]
    ea = v.lookup(CTX, 1, b"a")
    assert ea.nodeid == (1 << SLOT_SHIFT) | 1
    ex = v.lookup(CTX, 1, b"x")
    assert ex.nodeid >> SLOT_SHIFT == PSEUDO_SLOT
    assert ex.attr is not None and stat.S_ISDIR(ex.attr.mode)
    ey = v.lookup(CTX, ex.nodeid, b"y")
    assert ey.nodeid == (2 << SLOT_SHIFT) | 1
    inner = v.lookup(CTX, ea.nodeid, b"sizes")
    assert inner.nodeid >> SLOT_SHIFT == 1 and inner.attr is not None
    assert inner.attr.ino == inner.nodeid  # st_ino unique across images
    assert v.getattr(CTX, inner.nodeid, None).attr.ino == inner.nodeid
    with pytest.raises(FuseError):
        v.lookup(CTX, 1, b"zzz")
    # ".." of a sub-mount root is the pseudo directory above it
    dots = {d.name: d.ino for d in v.readdir(CTX, ey.nodeid, 0, 0, False)}
    assert dots[b".."] == ex.nodeid
    plus = list(v.readdir(CTX, 1, 0, 0, True))
    assert {d.name: d.entry.nodeid for d in plus if d.entry}[b"a"] == ea.nodeid
    with pytest.raises(FuseError) as ei:
        v.attach("/a", _fs(image))
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(FuseError) as ei:
        v.attach("/a/deeper", _fs(image))
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(FuseError) as ei:
        v.attach("/", _fs(image))
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(FuseError):
        v.attach("relative", _fs(image))
    with pytest.raises(FuseError):
        v.attach("/../etc", _fs(image))
    assert sorted(v.mounts()) == ["/a", "/x/y"]


def test_detach_closes_when_the_kernel_forgets(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    notes: list[tuple[int, bytes]] = []
    v.notify_entry = lambda parent, name: notes.append((parent, name))
    a, b = _fs(image), _fs(image)
    v.attach("/a", a)
    v.attach("/n/b", b)
    ea = v.lookup(CTX, 1, b"a")
    es = v.lookup(CTX, ea.nodeid, b"sizes")
    plus = [d for d in v.readdir(CTX, es.nodeid, 0, 0, True) if d.name not in (b".", b"..")]
    notes.clear()
    v.detach("/a")
    assert notes == [(1, b"a")]
    assert not a.closed  # the kernel still holds inodes of it
    assert v.getattr(CTX, es.nodeid, None).attr.ino == es.nodeid  # open files keep working
    with pytest.raises(FuseError):
        v.lookup(CTX, 1, b"a")
    v.forget([(ea.nodeid, 1), (es.nodeid, 1)])
    assert not a.closed
    v.forget([(d.entry.nodeid, 1) for d in plus if d.entry])
    assert a.closed
    with pytest.raises(FuseError) as ei:
        v.getattr(CTX, es.nodeid, None)
    assert ei.value.errno == errno.ESTALE
    # detaching the only image under /n prunes the empty pseudo directory
    en = v.lookup(CTX, 1, b"n").nodeid
    notes.clear()
    v.detach("/n/b")
    assert notes == [(en, b"b"), (1, b"n")]
    assert b.closed  # never looked up: closed at once
    assert [d.name for d in v.readdir(CTX, 1, 0, 0, False)] == [b".", b".."]
    v.close_all()


def test_remount_replaces_the_image(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    a, b = _fs(image), _fs(image)
    v.attach("/a", a)
    v.replace("/a", b)
    assert a.closed and v.mounts()["/a"].fs is b
    v.close_all()
    assert b.closed


def test_xattr_errors_and_pseudo_dirs(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    fs = _fs(image)
    fs.xattr_enabled = False
    v.attach("/a", fs)
    ea = v.lookup(CTX, 1, b"a")
    with pytest.raises(OSError) as ei:
        v.getxattr(CTX, ea.nodeid, b"user.x")
    assert ei.value.errno == errno.EOPNOTSUPP  # never ENOSYS: that disables xattrs globally
    with pytest.raises(OSError) as ei:
        v.getxattr(CTX, 1, b"user.x")
    assert ei.value.errno == errno.ENODATA
    assert v.listxattr(CTX, 1) == []
    with pytest.raises(OSError) as ei:
        v.open(CTX, 1, os.O_RDONLY)
    assert ei.value.errno == errno.EISDIR
    with pytest.raises(OSError) as ei:
        v.access(CTX, 1, os.W_OK)
    assert ei.value.errno == errno.EROFS
    assert v.statfs(CTX, 1).files >= 1
    assert v.statfs(CTX, ea.nodeid).blocks > 0


def test_layout_export_and_import(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    v.attach("/p/one", _fs(image))
    v.attach("/two", _fs(image))
    ids = {n: v.lookup(CTX, 1, n).nodeid for n in (b"p", b"two")}
    one = v.lookup(CTX, ids[b"p"], b"one").nodeid
    layout = v.export_layout()
    w = RafsVfs()
    w.import_layout(layout, {p: (_fs(image), None) for p in ("/p/one", "/two")})
    assert {n: w.lookup(CTX, 1, n).nodeid for n in (b"p", b"two")} == ids
    assert w.lookup(CTX, ids[b"p"], b"one").nodeid == one
    v.close_all()
    w.close_all()


def test_zero_message_open(image: tuple[Path, Path]) -> None:
    v = RafsVfs(zero_message_open=True)
    v.attach("/", _fs(image))
    f = v.lookup(CTX, v.lookup(CTX, 1, b"sizes").nodeid, b"size-1")
    with pytest.raises(FuseError) as ei:
        v.open(CTX, f.nodeid, os.O_RDONLY)
    assert ei.value.errno == errno.ENOSYS  # the kernel then stops sending OPEN/RELEASE
    assert len(b"".join(v.read(CTX, f.nodeid, 0, 0, 10))) == 1  # reads need no open
    v.close_all()


def test_getattr_and_entries_are_packed_once(image: tuple[Path, Path]) -> None:
    v = RafsVfs()
    fs = _fs(image)
    v.attach("/", fs)
    e1 = v.lookup(CTX, 1, b"sizes")
    e2 = v.lookup(CTX, 1, b"sizes")
    assert e1 is e2 and e1.raw is not None and len(e1.raw) == 128
    a1 = v.getattr(CTX, e1.nodeid, None)
    assert a1 is v.getattr(CTX, e1.nodeid, None) and a1.raw is not None and len(a1.raw) == 104
    from nydus.fuse import protocol as p

    assert p.ATTR.unpack_from(a1.raw, 16)[0] == e1.nodeid
    assert a1.raw[16:] == e1.raw[40:]  # same fuse_attr in both replies
    v.close_all()
