"""treecmp.compare_trees must see every kind of difference, and none between identical trees.

Each case builds the same small tree twice, changes one thing in the second copy, puts the
directory timestamps back (so only the intended difference remains) and checks the exact
report. The corpus cases also check that ``corpus.make_tree`` is deterministic.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from corpus import make_tree
from treecmp import compare_trees, scan_tree

IS_ROOT = os.geteuid() == 0
NS = 1_000_000_000
root_only = pytest.mark.skipif(not IS_ROOT, reason="needs root (chown, mknod)")


def _build(root: Path) -> None:
    """A small tree with one entry of each kind and fixed timestamps."""
    root.mkdir()
    (root / "dir").mkdir()
    (root / "file.txt").write_bytes(b"hello world\n" * 100)
    (root / "dir" / "nested.bin").write_bytes(bytes(range(256)) * 64)
    (root / "empty").write_bytes(b"")
    os.link(root / "file.txt", root / "dir" / "hardlink.txt")
    (root / "twin-1").write_bytes(b"twins\n")  # twins: equal in all but the inode
    (root / "twin-2").write_bytes(b"twins\n")
    os.symlink("file.txt", root / "link")
    os.symlink("..", root / "dir" / "up")  # would loop if followed
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"tail")
    os.setxattr(root / "file.txt", "user.color", b"blue")
    os.setxattr(root / "dir", "user.empty", b"")
    if IS_ROOT:
        os.mknod(root / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.chown(root / "twin-1", 1000, 2000)
        os.chown(root / "twin-2", 1000, 2000)
    for i, path in enumerate([*sorted(root.rglob("*"), reverse=True), root]):
        t = (1_600_000_000 + i) * NS + 123_456_789
        if path.name.startswith("twin-"):
            t = 1_500_000_000 * NS + 1
        os.utime(path, ns=(t + 7, t), follow_symlinks=False)


def _sync_dir_times(a: Path, b: Path) -> None:
    """Give every directory of ``b`` the timestamps of the same directory in ``a``."""
    for rel, entry in scan_tree(b).items():
        src = a / rel
        if stat.S_ISDIR(entry.st.st_mode) and src.is_dir() and not src.is_symlink():
            st = os.lstat(src)
            os.utime(entry.path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    _build(a)
    _build(b)
    return a, b


def test_identical_trees_have_no_differences(pair: tuple[Path, Path]) -> None:
    a, b = pair
    assert compare_trees(a, b, check_atime=True) == []  # first: readlink updates symlink atimes
    assert compare_trees(a, b) == []


def _replace_symlink(p: Path, target: str) -> None:
    st = os.lstat(p)
    p.unlink()
    os.symlink(target, p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _rewrite(p: Path, data: bytes) -> None:
    st = os.lstat(p)
    p.write_bytes(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _break_hardlink(b: Path) -> None:
    p = b / "dir" / "hardlink.txt"
    st = os.lstat(p)
    p.unlink()
    shutil.copy2(b / "file.txt", p)  # same content, xattrs, times: only the inode differs
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _join_hardlink(b: Path) -> None:
    (b / "twin-2").unlink()
    os.link(b / "twin-1", b / "twin-2")


def _file_to_dir(b: Path) -> None:
    (b / "empty").unlink()
    (b / "empty").mkdir()


def _zeros_for_hole(b: Path) -> None:
    p = b / "sparse"
    st = os.lstat(p)
    p.write_bytes(bytes(3 << 20) + b"tail")  # same bytes, no hole: not a difference
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _data_in_hole(b: Path) -> None:
    p = b / "sparse"
    st = os.lstat(p)
    with open(p, "r+b") as f:
        f.seek(2 << 20)
        f.write(b"x")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("missing", lambda b: (b / "empty").unlink(), ["empty: only in a (regular)"]),
    ("extra", lambda b: (b / "new").write_bytes(b""), ["new: only in b (regular)"]),
    ("type", _file_to_dir, ["empty: type regular != directory"]),
    (
        "mode",
        lambda b: os.chmod(b / "dir" / "nested.bin", 0o4755),
        ["dir/nested.bin: mode 0o100644 != 0o104755"],
    ),
    (
        "size",
        lambda b: _rewrite(b / "dir" / "nested.bin", bytes(range(256)) * 64 + b"!"),
        ["dir/nested.bin: size 16384 != 16385"],
    ),
    (
        "content",
        lambda b: _rewrite(b / "dir" / "nested.bin", bytes(range(256)) * 63 + bytes(256)),
        ["dir/nested.bin: content differs from offset 16129"],
    ),
    (
        "mtime",
        lambda b: os.utime(b / "empty", ns=(0, os.lstat(b / "empty").st_mtime_ns + 1)),
        ["empty: mtime_ns"],
    ),
    ("symlink", lambda b: _replace_symlink(b / "link", "fileXtxt"), ["link: symlink target"]),
    (
        "symlink-dir",
        lambda b: _replace_symlink(b / "dir" / "up", "."),
        ["dir/up: size 2 != 1", "dir/up: symlink target"],
    ),
    (
        "xattr-value",
        lambda b: os.setxattr(b / "file.txt", "user.color", b"red"),
        [  # a hardlinked inode: reported under both names
            "dir/hardlink.txt: xattr user.color b'blue' != b'red'",
            "file.txt: xattr user.color b'blue' != b'red'",
        ],
    ),
    (
        "xattr-missing",
        lambda b: os.removexattr(b / "dir", "user.empty"),
        ["dir: xattr user.empty only in a"],
    ),
    (
        "xattr-extra",
        lambda b: os.setxattr(b / "empty", "user.new", b""),
        ["empty: xattr user.new only in b"],
    ),
    ("hardlink-broken", _break_hardlink, ["dir/hardlink.txt: hardlink group", "file.txt: hard"]),
    ("hardlink-joined", _join_hardlink, ["twin-1: hardlink group", "twin-2: hardlink group"]),
    ("sparse-zeros", _zeros_for_hole, []),
    ("sparse-data", _data_in_hole, ["sparse: content differs from offset 2097152"]),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_detects_difference(
    pair: tuple[Path, Path], mutate: Callable[[Path], None], expected: list[str]
) -> None:
    a, b = pair
    mutate(b)
    _sync_dir_times(a, b)
    diffs = compare_trees(a, b)
    assert len(diffs) == len(expected), diffs
    for line, want in zip(diffs, expected, strict=True):
        assert line.startswith(want), (line, want)


@root_only
def test_detects_owner_and_rdev(pair: tuple[Path, Path]) -> None:
    a, b = pair
    os.chown(b / "dir" / "nested.bin", 1000, 0)
    os.chown(b / "empty", 0, 1000)
    (b / "chr").unlink()
    os.mknod(b / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    st = os.lstat(a / "chr")
    os.utime(b / "chr", ns=(st.st_atime_ns, st.st_mtime_ns))
    _sync_dir_times(a, b)
    assert compare_trees(a, b) == [
        "chr: rdev 1:3 != 1:5",
        "dir/nested.bin: uid 0 != 1000",
        "empty: gid 0 != 1000",
    ]


def test_atime_only_when_asked(pair: tuple[Path, Path]) -> None:
    a, b = pair
    st = os.lstat(b / "empty")
    os.utime(b / "empty", ns=(st.st_atime_ns + 1, st.st_mtime_ns))
    assert compare_trees(a, b, check_atime=True) == [  # first: readlink updates symlink atimes
        f"empty: atime_ns {st.st_atime_ns} != {st.st_atime_ns + 1}"
    ]
    assert compare_trees(a, b) == []


def test_exclude(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (b / "fifo").unlink()
    shutil.rmtree(b / "dir")
    _sync_dir_times(a, b)
    assert compare_trees(a, b, exclude=["fifo", "dir"]) == []


def test_corpus_is_deterministic_and_compares_clean(tmp_path: Path) -> None:
    info = make_tree(tmp_path / "a", seed=3)
    make_tree(tmp_path / "b", seed=3)
    # atimes first: reading symlinks (readlink) updates their atime, even for a comparison.
    assert compare_trees(tmp_path / "a", tmp_path / "b", check_atime=True) == []
    assert len(scan_tree(tmp_path / "a")) > 400
    assert "socket" in info.paths and "symlink" in info.paths
    other = make_tree(tmp_path / "c", seed=4)
    diffs = compare_trees(tmp_path / "a", other.root)
    assert diffs and all("content differs" in d or "xattr user.big" in d for d in diffs)
