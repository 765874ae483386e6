"""Compare two directory trees entry by entry, without following symlinks.

``compare_trees(a, b)`` returns human-readable differences (an empty list means the trees are
the same) in: the set of relative paths, file type, mode (all 12 permission bits), uid, gid,
size (regular files and symlinks), mtime in nanoseconds, atime (optional), content of regular
files, symlink targets, device numbers, every xattr (``security.selinux`` ignored) and
hardlink groups (the partition of regular files by inode must be the same).

Directory sizes and link counts are not compared: they are file-system specific.
Content is compared by streaming both files side by side (ranges that are holes in both are
skipped via SEEK_DATA), reporting the first differing offset and, when cheap, both sha256s.
Files and directories are opened with O_NOATIME where permitted, so comparing does not disturb
the atimes it may be asked to compare; readlink(2) still updates a symlink's atime (relatime), so
compare atimes in the first scan of a tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Entry", "compare_trees", "scan_tree"]

IGNORED_XATTRS = frozenset({"security.selinux"})
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """What is compared of one entry (``lstat`` plus xattrs and symlink target)."""

    path: Path
    st: os.stat_result
    xattrs: dict[str, bytes]
    target: bytes | None  # symlink target


def _type_name(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "regular"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISCHR, "char device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return f"unknown type {stat.S_IFMT(mode):#o}"


def _read_xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in names:
        if name in IGNORED_XATTRS:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed between list and get
                raise
    return out


def _open_noatime(path: Path, flags: int) -> int:
    """Open without updating atime where allowed (owner or CAP_FOWNER), else plainly."""
    try:
        return os.open(path, flags | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        return os.open(path, flags | os.O_CLOEXEC)


def scan_tree(root: Path, exclude: Iterable[str] = ()) -> dict[str, Entry]:
    """Map each relative path ("." for the root) to its Entry, never following symlinks.

    ``exclude`` holds relative paths left out, with everything below them.
    """
    root = Path(root)
    skip = {os.path.normpath(p) for p in exclude}
    entries: dict[str, Entry] = {}
    stack = ["."]
    while stack:
        rel = stack.pop()
        if rel in skip:
            continue
        path = root if rel == "." else root / rel
        st = os.lstat(path)
        target = os.readlink(os.fsencode(path)) if stat.S_ISLNK(st.st_mode) else None
        entries[rel] = Entry(path, st, _read_xattrs(path), target)
        if stat.S_ISDIR(st.st_mode):
            fd = _open_noatime(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                with os.scandir(fd) as it:
                    names = [e.name for e in it]
            finally:
                os.close(fd)
            stack.extend(name if rel == "." else f"{rel}/{name}" for name in names)
    return entries


def _data_start(fd: int, pos: int, size: int) -> int:
    """Offset of the next data at or after ``pos`` (``size`` if only a hole is left)."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return size
        if e.errno in (errno.EINVAL, errno.ENOTSUP):
            return pos  # no SEEK_DATA support: treat everything as data
        raise


def _sha256(path: Path) -> str:
    with open(_open_noatime(path, os.O_RDONLY), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _content_diff(a: Path, b: Path, size: int) -> str | None:
    """None if the two files (both ``size`` bytes) have the same bytes, else a description."""
    with (
        open(_open_noatime(a, os.O_RDONLY), "rb", buffering=0) as fa,
        open(_open_noatime(b, os.O_RDONLY), "rb", buffering=0) as fb,
    ):
        pos = 0
        while pos < size:
            # Skip what is a hole in both files: holes read as zeros on either side.
            nxt = min(_data_start(fa.fileno(), pos, size), _data_start(fb.fileno(), pos, size))
            pos = max(pos, nxt)
            if pos >= size:
                break
            n = min(_BLOCK, size - pos)
            da = os.pread(fa.fileno(), n, pos)
            db = os.pread(fb.fileno(), n, pos)
            if da != db:
                off = pos + next(
                    (i for i in range(min(len(da), len(db))) if da[i] != db[i]),
                    min(len(da), len(db)),
                )
                detail = f"content differs from offset {off}"
                if size <= 64 * _BLOCK:
                    detail += f" (sha256 {_sha256(a)[:16]}... != {_sha256(b)[:16]}...)"
                return detail
            if len(da) < n:
                return f"short read at offset {pos + len(da)} (file shrank?)"
            pos += n
    return None


def _hardlink_groups(entries: dict[str, Entry]) -> dict[str, frozenset[str]]:
    """For each regular file with another name in the tree, the set of all its names."""
    by_inode: dict[tuple[int, int], set[str]] = {}
    for rel, e in entries.items():
        if stat.S_ISREG(e.st.st_mode):
            by_inode.setdefault((e.st.st_dev, e.st.st_ino), set()).add(rel)
    groups: dict[str, frozenset[str]] = {}
    for names in by_inode.values():
        if len(names) > 1:
            group = frozenset(names)
            for rel in names:
                groups[rel] = group
    return groups


def _fmt_group(group: frozenset[str] | None) -> str:
    return "{" + ", ".join(sorted(group)) + "}" if group else "no other links"


def _compare_entry(rel: str, ea: Entry, eb: Entry, check_atime: bool) -> list[str]:
    sa, sb = ea.st, eb.st
    out: list[str] = []
    ta, tb = stat.S_IFMT(sa.st_mode), stat.S_IFMT(sb.st_mode)
    if ta != tb:
        return [f"{rel}: type {_type_name(sa.st_mode)} != {_type_name(sb.st_mode)}"]
    if stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
        out.append(f"{rel}: mode {sa.st_mode:#o} != {sb.st_mode:#o}")
    if sa.st_uid != sb.st_uid:
        out.append(f"{rel}: uid {sa.st_uid} != {sb.st_uid}")
    if sa.st_gid != sb.st_gid:
        out.append(f"{rel}: gid {sa.st_gid} != {sb.st_gid}")
    if (stat.S_ISREG(ta) or stat.S_ISLNK(ta)) and sa.st_size != sb.st_size:
        out.append(f"{rel}: size {sa.st_size} != {sb.st_size}")
    if sa.st_mtime_ns != sb.st_mtime_ns:
        out.append(f"{rel}: mtime_ns {sa.st_mtime_ns} != {sb.st_mtime_ns}")
    if check_atime and sa.st_atime_ns != sb.st_atime_ns:
        out.append(f"{rel}: atime_ns {sa.st_atime_ns} != {sb.st_atime_ns}")
    if (stat.S_ISCHR(ta) or stat.S_ISBLK(ta)) and sa.st_rdev != sb.st_rdev:
        out.append(
            f"{rel}: rdev {os.major(sa.st_rdev)}:{os.minor(sa.st_rdev)}"
            f" != {os.major(sb.st_rdev)}:{os.minor(sb.st_rdev)}"
        )
    if ea.target != eb.target:
        out.append(f"{rel}: symlink target {ea.target!r} != {eb.target!r}")
    if stat.S_ISREG(ta) and sa.st_size == sb.st_size and sa.st_size > 0:
        detail = _content_diff(ea.path, eb.path, sa.st_size)
        if detail:
            out.append(f"{rel}: {detail}")
    for name in sorted(ea.xattrs.keys() | eb.xattrs.keys()):
        va, vb = ea.xattrs.get(name), eb.xattrs.get(name)
        if va == vb:
            continue
        if va is None:
            out.append(f"{rel}: xattr {name} only in b")
        elif vb is None:
            out.append(f"{rel}: xattr {name} only in a")
        else:
            out.append(f"{rel}: xattr {name} {_short(va)} != {_short(vb)}")
    return out


def _short(value: bytes, limit: int = 40) -> str:
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} bytes)"


def compare_trees(
    a: Path,
    b: Path,
    *,
    check_atime: bool = False,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Differences between trees ``a`` and ``b`` as sorted human-readable lines.

    ``exclude`` names relative paths (and everything below them) that are left out on both
    sides, e.g. a socket that a tar round trip cannot carry.
    """
    exclude = list(exclude)
    ea_all, eb_all = scan_tree(Path(a), exclude), scan_tree(Path(b), exclude)
    diffs: list[str] = []
    for rel in sorted(ea_all.keys() - eb_all.keys()):
        diffs.append(f"{rel}: only in a ({_type_name(ea_all[rel].st.st_mode)})")
    for rel in sorted(eb_all.keys() - ea_all.keys()):
        diffs.append(f"{rel}: only in b ({_type_name(eb_all[rel].st.st_mode)})")
    common = sorted(ea_all.keys() & eb_all.keys())
    for rel in common:
        diffs.extend(_compare_entry(rel, ea_all[rel], eb_all[rel], check_atime))
    ga, gb = _hardlink_groups(ea_all), _hardlink_groups(eb_all)
    in_both = frozenset(common)
    for rel in common:
        grp_a, grp_b = ga.get(rel), gb.get(rel)
        if grp_a is None and grp_b is None:
            continue
        # Compare only names present on both sides, so a missing path is reported once.
        na, nb = (g & in_both if g else frozenset() for g in (grp_a, grp_b))
        if na != nb and (len(na) > 1 or len(nb) > 1):
            diffs.append(f"{rel}: hardlink group {_fmt_group(grp_a)} != {_fmt_group(grp_b)}")
    return sorted(diffs)
