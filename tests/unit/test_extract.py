"""The layer extractor (:mod:`nydus.builder.extract`) and its in-root resolver.

containerd's applier semantics one by one (whiteouts, opaque directories, replacement, hard
links, symlinks, devices, xattrs, times), the result compared with GNU ``tar -xpf`` for a
normal layer, both path resolvers (openat2 and the component walk) compared with each other.
The hostile corpus runs in tests/integration/test_extract_hostile.py. Owners and devices need
root (the tests here run as root).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

import oci_images as oi
from hostile_tars import end, entry, pax
from nydus.builder.extract import extract_layer
from nydus.builder.inroot import RootDir, openat2_available
from nydus.errors import FormatError, IntegrityError, NotFoundError
from treecmp import compare_trees

T = oi.T
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="owners and devices need root")
RESOLVERS = [pytest.param(True, id="openat2"), pytest.param(False, id="walk")]


def _apply(root: Path, entries: list[T], how: str = "none", walk: bool = False) -> None:
    layer = oi.layer(entries, how)
    r = extract_layer(
        io.BytesIO(layer.blob), root, diff_id=layer.diff_id, use_openat2=False if walk else None
    )
    assert r.diff_id == layer.diff_id


def _names(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def _tree_diffs(a: Path, b: Path) -> list[str]:
    """compare_trees without the roots' own attributes (made by the test)."""
    return [d for d in compare_trees(a, b) if not d.startswith(".:")]


NORMAL = [
    T("dir", "etc", mode=0o755),
    T("file", "etc/passwd", b"root:x:0:0\n", mode=0o644),
    T("file", "etc/shadow", b"root:*:1\n", mode=0o640, gid=42),
    T("dir", "usr", mode=0o755),
    T("dir", "usr/bin", mode=0o755),
    T("file", "usr/bin/su", b"\x7fELF su", mode=0o4755),
    T("file", "usr/bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
    T("link", "usr/bin/su2", target="usr/bin/su", mode=0o4755),
    T("symlink", "bin", target="usr/bin"),
    # at the top: GNU tar makes absolute symlinks last, after restoring directory mtimes
    T("symlink", "abs", target="/etc/passwd"),
    T("dir", "tmp", mode=0o1777),
    T("dir", "home", mode=0o755),
    T("dir", "home/user", mode=0o700, uid=1000, gid=1000),
    T(
        "file",
        "home/user/notes",
        b"n" * 100_000,
        mode=0o600,
        uid=1000,
        gid=1000,
        xattrs={"user.tag": b"v1"},
    ),
    T("fifo", "run-fifo", mode=0o600),
    T("chr", "null", mode=0o666, dev=(1, 3)),
    T("blk", "loop9", mode=0o660, dev=(7, 9), gid=6),
    T("dir", "late", mode=0o711, mtime=1_600_000_000),
    T("file", "late/child", b"c"),
]


@root_only
def test_normal_layer_matches_gnu_tar(tmp_path: Path) -> None:
    tar = oi.tar_layer(NORMAL)
    (tmp_path / "layer.tar").write_bytes(tar)
    ours, theirs = tmp_path / "ours", tmp_path / "tar"
    ours.mkdir()
    theirs.mkdir()
    extract_layer(io.BytesIO(oi.compress(tar, "gzip")[0]), ours)
    subprocess.run(
        [
            "tar",
            "-xpf",
            tmp_path / "layer.tar",
            "-C",
            theirs,
            "--same-owner",
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
        ],
        check=True,
    )
    assert _tree_diffs(ours, theirs) == []
    assert len(_names(ours)) == len(NORMAL)
    assert stat.S_IMODE(os.lstat(ours / "usr/bin/su").st_mode) == 0o4755
    assert os.lstat(ours / "late").st_mtime == 1_600_000_000  # set after its child


@root_only
def test_resolvers_agree(tmp_path: Path) -> None:
    if not openat2_available():
        pytest.skip("no openat2 here")
    a, b = tmp_path / "a", tmp_path / "b"
    for d, walk in ((a, False), (b, True)):
        d.mkdir()
        _apply(
            d,
            [
                *NORMAL,
                T("file", "bin/through", b"x"),
                T("symlink", "up", target="../.."),
                T("file", "up/etc/at-root", b"y"),
            ],
            walk=walk,
        )
    assert _tree_diffs(a, b) == []
    assert (a / "usr/bin/through").read_bytes() == b"x"
    assert (a / "etc/at-root").read_bytes() == b"y"


@pytest.mark.parametrize("walk", RESOLVERS)
def test_rootdir_resolves_inside(tmp_path: Path, walk: bool) -> None:
    if not walk and not openat2_available():
        pytest.skip("no openat2 here")
    (tmp_path / "r" / "real").mkdir(parents=True)
    os.symlink("/real", tmp_path / "r" / "abs")
    os.symlink("../../../..", tmp_path / "r" / "up")
    os.symlink("loop", tmp_path / "r" / "loop")
    with RootDir(tmp_path / "r", use_openat2=walk) as rd:
        for parts in ([b"abs"], [b"up", b"real"], [b"up", b"up", b"abs"]):
            fd = rd.open_dir(parts)
            try:
                assert os.fstat(fd).st_ino == os.stat(tmp_path / "r" / "real").st_ino
            finally:
                os.close(fd)
        fd = rd.open_dir([b"up"])
        try:
            assert os.fstat(fd).st_ino == os.stat(tmp_path / "r").st_ino  # not above
        finally:
            os.close(fd)
        with pytest.raises(OSError):
            rd.open_dir([b"loop"])
        with pytest.raises(FileNotFoundError):
            rd.open_dir([b"abs", b"missing"])
        os.close(rd.open_dir([b"up", b"made", b"deep"], create=True))
    assert (tmp_path / "r" / "made" / "deep").is_dir()


@pytest.mark.parametrize("walk", RESOLVERS)
def test_whiteouts(tmp_path: Path, walk: bool) -> None:
    _apply(
        tmp_path,
        [
            T("dir", "a"),
            T("file", "a/x", b"1"),
            T("dir", "a/sub"),
            T("file", "a/sub/y", b"2"),
            T("file", "keep", b"k"),
        ],
        walk=walk,
    )
    _apply(
        tmp_path,
        [
            T("whiteout", "a/sub"),
            T("whiteout", "a/missing"),
            T("file", "new", b"n"),
            T("whiteout", "new"),  # own entries stay
            T("file", ".wh..wh.plnk/1", b"aufs"),
        ],
        walk=walk,
    )
    assert _names(tmp_path) == ["a", "a/x", "keep", "new"]


@pytest.mark.parametrize("walk", RESOLVERS)
def test_opaque_directories(tmp_path: Path, walk: bool) -> None:
    lower = [
        T("dir", "d"),
        T("file", "d/old", b"o"),
        T("dir", "d/sub"),
        T("file", "d/sub/old", b"o"),
        T("dir", "d/gone"),
        T("file", "d/gone/x", b"x"),
        T("dir", "e"),
        T("file", "e/old", b"o"),
    ]
    _apply(tmp_path, lower, walk=walk)
    _apply(
        tmp_path,
        [
            T("dir", "d"),
            T("opaque", "d"),
            T("file", "d/new", b"n"),
            # the marker after the children (any order works)
            T("dir", "e/sub"),
            T("file", "e/sub/f", b"f"),
            T("file", "e/new", b"n"),
            T("opaque", "e"),
        ],
        walk=walk,
    )
    assert _names(tmp_path) == ["d", "d/new", "e", "e/new", "e/sub", "e/sub/f"]
    # a kept lower directory loses its lower children too; an implied one survives
    _apply(
        tmp_path,
        [T("file", "e/sub/g", b"g"), T("file", "e/deep/er/f", b"f"), T("opaque", "e")],
        walk=walk,
    )
    assert _names(tmp_path) == [
        "d",
        "d/new",
        "e",
        "e/deep",
        "e/deep/er",
        "e/deep/er/f",
        "e/sub",
        "e/sub/g",
    ]


def test_bad_whiteouts(tmp_path: Path) -> None:
    for name in (b"d/.wh.", b"d/.wh..", b"d/.wh..."):
        with pytest.raises(FormatError, match="names no file"):
            extract_layer(io.BytesIO(entry(name) + end()), tmp_path)


def test_replacement(tmp_path: Path) -> None:
    _apply(
        tmp_path,
        [
            T("dir", "d", mode=0o700),
            T("file", "d/keep", b"k"),
            T("dir", "x"),
            T("file", "x/in", b"i"),
            T("file", "f", b"file"),
            T("symlink", "s", target="f"),
            T("file", "tgt", b"t"),
        ],
    )
    _apply(
        tmp_path,
        [
            T("dir", "d", mode=0o751),  # merged: attributes only
            T("file", "x", b"now a file"),  # a tree replaced
            T("dir", "f"),  # a file replaced by a directory
            T("file", "s", b"not through"),  # a symlink replaced, not followed
        ],
    )
    assert _names(tmp_path) == ["d", "d/keep", "f", "s", "tgt", "x"]
    assert stat.S_IMODE(os.lstat(tmp_path / "d").st_mode) == 0o751
    assert (tmp_path / "x").read_bytes() == b"now a file"
    assert (tmp_path / "f").is_dir() and not (tmp_path / "s").is_symlink()
    assert (tmp_path / "tgt").read_bytes() == b"t"


def test_symlinked_parents_resolve_inside(tmp_path: Path) -> None:
    """merged /usr: a later layer's ``lib/x`` lands in ``usr/lib``, as with containerd."""
    _apply(
        tmp_path,
        [
            T("dir", "usr/lib"),
            T("symlink", "lib", target="usr/lib"),
            T("symlink", "abs", target="/usr/lib"),
        ],
    )
    _apply(
        tmp_path,
        [
            T("file", "lib/x", b"x"),
            T("file", "abs/y", b"y"),
            T("symlink", "dangling", target="/made/here"),
            T("file", "dangling/z", b"z"),
        ],
    )
    assert (tmp_path / "usr/lib/x").read_bytes() == b"x"
    assert (tmp_path / "usr/lib/y").read_bytes() == b"y"
    assert (tmp_path / "made/here/z").read_bytes() == b"z"  # mkdir -p through the link
    assert os.readlink(tmp_path / "abs") == "/usr/lib"
    with pytest.raises(FormatError, match="not a directory"):
        _apply(tmp_path, [T("file", "lib/x/below", b"")])


@root_only
def test_hardlinks(tmp_path: Path) -> None:
    _apply(tmp_path, [T("dir", "d"), T("file", "d/lower", b"L", mode=0o644)])
    _apply(
        tmp_path,
        [
            T("file", "f", b"data", mode=0o644),
            T("link", "h", target="f", mode=0o4755, uid=7),  # containerd: the header's attributes
            T("symlink", "s", target="/etc/passwd"),
            T("link", "hs", target="s", mode=0o4777, uid=4242),  # links the symlink itself
            T("link", "hl", target="/d/lower"),  # a lower layer's file
            T("symlink", "sd", target="d"),
            T("link", "via", target="sd/lower"),  # a symlinked parent resolves inside
        ],
    )
    st_f, st_h = os.lstat(tmp_path / "f"), os.lstat(tmp_path / "h")
    assert st_f.st_ino == st_h.st_ino and stat.S_IMODE(st_f.st_mode) == 0o4755
    assert st_f.st_uid == 7
    st_hs = os.lstat(tmp_path / "hs")
    assert stat.S_ISLNK(st_hs.st_mode) and st_hs.st_ino == os.lstat(tmp_path / "s").st_ino
    assert st_hs.st_uid == 4242
    lower = os.lstat(tmp_path / "d/lower").st_ino
    assert os.lstat(tmp_path / "hl").st_ino == lower == os.lstat(tmp_path / "via").st_ino
    with pytest.raises(FormatError, match="names a directory"):
        _apply(tmp_path, [T("link", "hd", target="d")])
    with pytest.raises(FormatError, match="target missing"):
        _apply(tmp_path, [T("link", "hm", target="nope")])


@root_only
def test_devices_fifos_owners_xattrs(tmp_path: Path) -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)  # cap_net_bind_service, v2
    tar = oi.tar_layer(
        [
            T("chr", "null", mode=0o666, dev=(1, 3), uid=0, gid=5),
            T("blk", "sda", mode=0o640, dev=(8, 0), gid=6),
            T("fifo", "p", mode=0o620, uid=11, gid=12),
            T(
                "file",
                "ping",
                b"elf",
                mode=0o755,
                uid=0,
                xattrs={"user.k": b"v", "trusted.overlay.opaque": b"y"},
            ),
            T("symlink", "s", target="ping", uid=3, gid=4),
        ]
    )
    # security.capability as a binary PAX record, after the file's chown
    tar = tar[: tar.rfind(b"\0" * 1024)].rstrip(b"\0")
    tar += bytes(-len(tar) % 512)
    tar += (
        pax([(b"SCHILY.xattr.security.capability", cap)])
        + entry(b"capped", b"x", mode=0o755, uid=1234)
        + end()
    )
    extract_layer(io.BytesIO(tar), tmp_path)
    st = os.lstat(tmp_path / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666 and st.st_gid == 5
    assert stat.S_ISBLK(os.lstat(tmp_path / "sda").st_mode)
    st = os.lstat(tmp_path / "p")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o620
    assert (st.st_uid, st.st_gid) == (11, 12)
    assert os.getxattr(tmp_path / "ping", "user.k") == b"v"
    assert "trusted.overlay.opaque" not in os.listxattr(tmp_path / "ping")
    assert os.lstat(tmp_path / "s").st_uid == 3
    assert os.getxattr(tmp_path / "capped", "security.capability") == cap
    assert os.lstat(tmp_path / "capped").st_uid == 1234


def test_holes_and_streaming_input(tmp_path: Path) -> None:
    """Zero pieces become holes; a pipe (not seekable) is read as a stream."""
    size = 8 << 20
    layer = oi.layer([T("file", "zeros", bytes(size)), T("file", "tail", b"t" * 10)], "zstd")
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(layer.blob)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb") as f:
        res = extract_layer(f, tmp_path, diff_id=layer.diff_id)
    t.join()
    assert res.compression == "zstd" and res.entries == 2
    st = os.stat(tmp_path / "zeros")
    assert st.st_size == size and st.st_blocks * 512 < size // 8
    with open(tmp_path / "zeros", "rb") as f:
        assert f.read() == bytes(size)


@pytest.mark.parametrize("how", ["none", "gzip", "zstd"])
def test_diff_id_checked_after_the_apply(tmp_path: Path, how: str) -> None:
    layer = oi.layer([T("file", "f", b"x")], how)
    with pytest.raises(IntegrityError, match="discard it"):
        extract_layer(io.BytesIO(layer.blob), tmp_path, diff_id="sha256:" + "0" * 64)
    res = extract_layer(io.BytesIO(layer.blob), tmp_path, diff_id=layer.diff_id)
    assert res.diff_id == layer.diff_id and res.compression == how


def test_missing_root_and_corrupt_stream(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        extract_layer(io.BytesIO(b""), tmp_path / "nope")
    blob = oi.layer([T("file", "f", b"x" * 5000)], "gzip").blob
    with pytest.raises(FormatError, match="gzip"):
        extract_layer(io.BytesIO(blob[: len(blob) // 2]), tmp_path)


def test_not_root_leaves_owners_and_skips_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like tar without --same-owner (and containerd in a user namespace)."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    layer = oi.layer(
        [T("chr", "null", dev=(1, 3)), T("fifo", "p"), T("file", "f", b"x", uid=4242, gid=4242)]
    )
    res = extract_layer(io.BytesIO(layer.blob), tmp_path)
    assert res.skipped == 1 and _names(tmp_path) == ["f", "p"]
    st = os.lstat(tmp_path / "f")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
