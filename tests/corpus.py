"""Deterministic sample trees for tests, the demo and the benchmark.

``make_tree`` builds a tree holding every file type and metadata edge case a Nydus image has to
carry (the list is in its docstring); two calls with the same arguments give trees that
``treecmp.compare_trees`` finds identical. ``make_large_tree`` builds the benchmark tree: many
files, a mix of compressible, incompressible and duplicate data, generated quickly from a few
random pools.

Root-only features (device nodes, uid/gid changes, trusted.* and security.* xattrs, a 0000
directory) are skipped when not running as root; the returned ``TreeInfo.skipped`` says which.

Not thread-safe (it changes nothing global, but two calls must not share a ``root``).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["KiB", "MiB", "GiB", "TreeInfo", "make_large_tree", "make_tree"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

IS_ROOT = os.geteuid() == 0

# Special timestamps (seconds, nanoseconds).
T_EPOCH_1NS = (0, 1)  # 1 ns after the epoch
T_2038_EDGE = (2**31 - 1, 999_999_999)  # last second of signed 32-bit time
T_2103 = (4_204_800_000, 123_456_789)  # year 2103, beyond signed 32-bit time
T_BEYOND_U32 = (2**32 + 12_345, 987_654_321)  # year 2106, beyond unsigned 32-bit time
_BASE_TIME = 1_700_000_000  # 2023-11-14: base for every other timestamp

# posix ACL xattr encoding (linux/posix_acl_xattr.h), used when setfacl is not installed.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
)
_ACL_UNDEFINED_ID = 0xFFFFFFFF


@dataclass
class TreeInfo:
    """What ``make_tree`` built: relative paths by category, and what it had to skip."""

    root: Path
    scale: str
    paths: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def add(self, category: str, rel: str) -> None:
        self.paths.setdefault(category, []).append(rel)


def _split_time(t: tuple[int, int]) -> int:
    return t[0] * 1_000_000_000 + t[1]


def _default_ns(rel: str, salt: int) -> int:
    """A deterministic timestamp with nanoseconds derived from a relative path."""
    h = zlib.crc32(rel.encode("utf-8", "surrogateescape"), salt)
    return (_BASE_TIME + h % 10_000_000) * 1_000_000_000 + (h * 7919) % 1_000_000_000


def _text_block(rng: random.Random, size: int) -> bytes:
    """Compressible, text-like data (log lines with varying numbers), exactly ``size`` bytes."""
    words = [
        "nydus", "chunk", "blob", "bootstrap", "erofs", "inode", "dirent", "layer", "image",
        "container", "prefetch", "digest", "zstd", "lz4", "superblock", "daemon", "fuse", "read",
    ]  # fmt: skip
    lines = []
    for i in range(512):
        picked = " ".join(rng.choice(words) for _ in range(6 + i % 7))
        lines.append(f"{i:06d} level={rng.choice('DIWE')} id={rng.getrandbits(32):08x} {picked}\n")
    unit = "".join(lines).encode()
    reps = size // len(unit) + 1
    return (unit * reps)[:size]


class _Builder:
    """Creates entries under ``root`` and remembers explicit timestamps for the final pass."""

    def __init__(self, root: Path, seed: int, info: TreeInfo) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.info = info
        self.times: dict[str, tuple[int, int]] = {}  # rel -> (atime_ns, mtime_ns)
        self._random_pool = self.rng.randbytes(4 * MiB + 4 * KiB)
        self._text_pool = _text_block(self.rng, 4 * MiB + 4 * KiB)

    # -- data ---------------------------------------------------------------------------------
    def random_data(self, size: int) -> bytes:
        if size <= len(self._random_pool) // 2:
            off = self.rng.randrange(len(self._random_pool) - size + 1)
            return self._random_pool[off : off + size]
        return self.rng.randbytes(size)

    def text_data(self, size: int) -> bytes:
        pool = self._text_pool
        if size <= len(pool):
            off = self.rng.randrange(len(pool) - size + 1)
            return pool[off : off + size]
        return (pool * (size // len(pool) + 1))[:size]

    # -- entries ------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.root / rel

    def ensure_dir(self, p: Path) -> None:
        """Create missing directories down to ``p`` with mode 0755, whatever the umask."""
        if p.is_dir():
            return
        self.ensure_dir(p.parent)
        p.mkdir()
        os.chmod(p, 0o755)

    def mkdir(self, rel: str, mode: int = 0o755) -> Path:
        p = self.path(rel)
        self.ensure_dir(p)
        os.chmod(p, mode)
        return p

    def file(self, rel: str, data: bytes = b"", mode: int = 0o644) -> Path:
        p = self.path(rel)
        self.ensure_dir(p.parent)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    def symlink(self, rel: str, target: str) -> Path:
        p = self.path(rel)
        self.ensure_dir(p.parent)
        os.symlink(target, p)
        self.info.add("symlink", rel)
        return p

    def link(self, existing: str, rel: str) -> None:
        os.link(self.path(existing), self.path(rel))

    def set_time(self, rel: str, t: tuple[int, int], atime: tuple[int, int] | None = None) -> None:
        self.times[rel] = (_split_time(atime or t), _split_time(t))

    def chown(self, rel: str, uid: int, gid: int) -> None:
        os.chown(self.path(rel), uid, gid, follow_symlinks=False)


def _acl_xattr(entries: list[tuple[int, int, int]]) -> bytes:
    out = _ACL_VERSION.to_bytes(4, "little")
    for tag, perm, ident in entries:
        out += tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + ident.to_bytes(4, "little")
    return out


def _set_acls(b: _Builder, file_rel: str, dir_rel: str) -> None:
    """An access ACL on a file; an access and a default ACL on a directory."""
    f, d = b.path(file_rel), b.path(dir_rel)
    setfacl = shutil.which("setfacl")
    if setfacl:
        subprocess.run([setfacl, "-m", "u:1000:rwx,g:1000:r-x,m::rwx", f], check=True)
        subprocess.run([setfacl, "-m", "u:1000:r-x,g::r-x,m::r-x", d], check=True)
        subprocess.run([setfacl, "-d", "-m", "u:1000:rwx,g:1000:r-x,o::---", d], check=True)
        return
    access_file = [
        (_ACL_USER_OBJ, 6, _ACL_UNDEFINED_ID),
        (_ACL_USER, 7, 1000),
        (_ACL_GROUP_OBJ, 4, _ACL_UNDEFINED_ID),
        (_ACL_GROUP, 5, 1000),
        (_ACL_MASK, 7, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 4, _ACL_UNDEFINED_ID),
    ]
    os.setxattr(f, "system.posix_acl_access", _acl_xattr(access_file))
    access_dir = [
        (_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID),
        (_ACL_USER, 5, 1000),
        (_ACL_GROUP_OBJ, 5, _ACL_UNDEFINED_ID),
        (_ACL_MASK, 5, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 5, _ACL_UNDEFINED_ID),
    ]
    os.setxattr(d, "system.posix_acl_access", _acl_xattr(access_dir))
    default_dir = [
        (_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID),
        (_ACL_USER, 7, 1000),
        (_ACL_GROUP_OBJ, 5, _ACL_UNDEFINED_ID),
        (_ACL_GROUP, 5, 1000),
        (_ACL_MASK, 7, _ACL_UNDEFINED_ID),
        (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
    ]
    os.setxattr(d, "system.posix_acl_default", _acl_xattr(default_dir))


def _capability_v2(permitted: int) -> bytes:
    """A valid security.capability value (VFS_CAP_REVISION_2, effective bit set)."""
    magic = 0x02000000 | 0x1
    lo, hi = permitted & 0xFFFFFFFF, permitted >> 32
    return b"".join(x.to_bytes(4, "little") for x in (magic, lo, 0, hi, 0))


# --- sections of make_tree ------------------------------------------------------------------


def _sizes(b: _Builder) -> None:
    sizes = [0, 1, 4095, 4096, 4097, MiB - 1, MiB, MiB + 1, 3 * MiB + 5]
    for i, size in enumerate(sizes):
        data = b.random_data(size) if i % 2 else b.text_data(size)
        rel = f"sizes/size-{size}"
        b.file(rel, data)
        b.info.add("regular", rel)


def _data(b: _Builder) -> None:
    b.file("data/text-3m.txt", b.text_data(3 * MiB + 17))
    b.file("data/random-2m.bin", b.rng.randbytes(2 * MiB))
    b.file("data/zeros-2m.bin", bytes(2 * MiB))  # written, not sparse
    mixed = b"".join(
        b.random_data(256 * KiB) if i % 2 else b.text_data(256 * KiB) for i in range(8)
    )
    b.file("data/mixed-2m.bin", mixed)


def _dedup(b: _Builder) -> None:
    block_a = b.rng.randbytes(MiB)
    block_b = b.rng.randbytes(MiB)
    orig = b.rng.randbytes(2 * MiB + 123)
    b.file("dedup/orig.bin", orig)
    b.file("dedup/copy.bin", orig)  # whole-file duplicate
    b.file("dedup/sub/copy-again.bin", orig)
    # Repeated 1 MiB blocks inside one file, chunk aligned, plus a partial tail.
    b.file("dedup/repeated-blocks.bin", block_a * 2 + block_b + block_a * 2 + block_a[:1000])
    # Shares its first chunk with repeated-blocks.bin.
    b.file("dedup/shares-first-chunk.bin", block_a + b.rng.randbytes(MiB // 2))
    small = b.text_data(5000)
    for i in range(10):
        b.file(f"dedup/small-{i}.txt", small)
    b.info.add("dedup", "dedup/orig.bin")


def _sparse(b: _Builder, scale: str) -> None:
    p = b.path("sparse/holes-8m.bin")
    b.ensure_dir(p.parent)
    with open(p, "wb") as f:  # hole [0, 1 MiB+100), data, hole, data, hole to 8 MiB
        f.seek(MiB + 100)
        f.write(b.random_data(5000))
        f.seek(4 * MiB)
        f.write(b.text_data(MiB + 3))
        f.truncate(8 * MiB)
    os.chmod(p, 0o644)
    b.info.add("sparse", "sparse/holes-8m.bin")
    with open(b.path("sparse/all-hole-3m.bin"), "wb") as f:
        f.truncate(3 * MiB)
    os.chmod(b.path("sparse/all-hole-3m.bin"), 0o644)
    b.info.add("sparse", "sparse/all-hole-3m.bin")
    if scale == "medium":
        with open(b.path("sparse/huge-4g.bin"), "wb") as f:
            f.seek(4 * GiB + 1000)
            f.write(b.random_data(5000))
            f.truncate(4 * GiB + 8 * KiB)
        os.chmod(b.path("sparse/huge-4g.bin"), 0o644)
        b.info.add("sparse", "sparse/huge-4g.bin")
        b.info.add("huge", "sparse/huge-4g.bin")


def _links(b: _Builder) -> None:
    b.file("links/hl-a", b.text_data(10_000))
    b.mkdir("links/sub")
    b.link("links/hl-a", "links/hl-b")
    b.link("links/hl-a", "links/sub/hl-c")  # 3-way group across directories
    b.file("links/empty")
    b.link("links/empty", "links/empty-hardlink")  # hardlink to an empty file
    for rel in (
        "links/hl-a",
        "links/hl-b",
        "links/sub/hl-c",
        "links/empty",
        "links/empty-hardlink",
    ):
        b.info.add("hardlink", rel)
    b.symlink("links/sym-short", "hl-a")
    long_target = "/".join(["t" * 199] * 20) + "x"  # 4000 bytes
    assert len(long_target) == 4000
    b.symlink("links/sym-4000", long_target)
    b.symlink("links/sym-dangling", "does/not/exist")
    b.symlink("links/sym-dir", "../sizes")
    b.symlink("links/sym-abs", "/etc/hostname")


def _special(b: _Builder) -> None:
    d = b.mkdir("special")
    os.mkfifo(d / "fifo")
    os.chmod(d / "fifo", 0o640)
    b.info.add("fifo", "special/fifo")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fsdecode(d / "socket"))
    finally:
        sock.close()
    os.chmod(d / "socket", 0o755)
    b.info.add("socket", "special/socket")
    if not IS_ROOT:
        b.info.skipped.append("device nodes (not root)")
        return
    for name, kind, dev in [
        ("chr-null", stat.S_IFCHR, os.makedev(1, 3)),
        ("chr-big", stat.S_IFCHR, os.makedev(300, 70_000)),
        ("blk-loop", stat.S_IFBLK, os.makedev(7, 200)),
    ]:
        os.mknod(d / name, kind | 0o660, dev)
        os.chmod(d / name, 0o660)
        b.info.add("device", f"special/{name}")


def _deep(b: _Builder) -> None:
    rel = "deep/" + "/".join(f"l{i:02d}" for i in range(1, 61))
    b.mkdir(rel)
    b.file(f"{rel}/leaf.txt", b"at depth 60\n")
    b.info.add("deep", rel)


def _names(b: _Builder, max_name: int) -> None:
    b.mkdir("names")
    ascii_long = "n" * max_name
    b.file(f"names/{ascii_long}", b"255-byte ascii name\n")
    # A UTF-8 name of exactly max_name bytes: 2-byte characters plus ASCII padding.
    utf8_long = "é" * ((max_name - 1) // 2)
    utf8_long += "x" * (max_name - len(utf8_long.encode()))
    assert len(utf8_long.encode()) == max_name
    b.mkdir(f"names/{utf8_long}")
    b.file(f"names/{utf8_long}/inside", b"in a long utf-8 directory\n")
    b.symlink(f"names/{'s' * max_name}", ascii_long)
    for rel in (f"names/{ascii_long}", f"names/{utf8_long}"):
        b.info.add("long_name", rel)
    for name in [
        "café.txt",
        "日本語のファイル名.txt",
        "emoji-🐳🚀.bin",
        "Ωmega with spaces.txt",
        "-leading-dash",
        ".hidden",
        "..double-dot-prefix",
        "quote'double\"back\\slash",
        "tab\there",
        "Ünïcödé-ディレクトリ",
    ]:
        b.file(f"names/{name}", name.encode() + b"\n")
        b.info.add("non_ascii_name", f"names/{name}")


def _bigdir(b: _Builder, n: int) -> None:
    b.mkdir("bigdir")
    for i in range(n):
        name = f"e{i:05d}-" + "x" * (i % 150)
        rel = f"bigdir/{name}"
        if i % 100 == 99:
            b.mkdir(rel)
        elif i % 50 == 49:
            b.symlink(rel, f"e{i - 1:05d}-" + "x" * ((i - 1) % 150))
        elif i % 10 == 0:
            b.file(rel, f"entry {i}\n".encode() * (1 + i % 13))
        else:
            b.file(rel)
    b.info.add("bigdir", "bigdir")


def _modes(b: _Builder) -> None:
    for mode in (0o000, 0o4755, 0o2755, 0o6755, 0o1755, 0o7777, 0o0600, 0o0444, 0o0111):
        readable = IS_ROOT or mode & 0o400  # a non-root owner cannot read it back
        data = f"mode {mode:04o}\n".encode() if readable else b""
        b.file(f"modes/file-{mode:04o}", data, mode)
    for mode in (0o1777, 0o2775, 0o0700, 0o0555, 0o7755):
        b.mkdir(f"modes/dir-{mode:04o}")
        b.file(f"modes/dir-{mode:04o}/child", b"child\n")
        os.chmod(b.path(f"modes/dir-{mode:04o}"), mode)
    if IS_ROOT:
        b.mkdir("modes/dir-0000")
        b.file("modes/dir-0000/child", b"behind 0000\n")
        os.chmod(b.path("modes/dir-0000"), 0o000)
    else:
        b.info.skipped.append("0000 directory (not root)")


def _owners(b: _Builder) -> None:
    if not IS_ROOT:
        b.info.skipped.append("uid/gid changes (not root)")
        return
    for uid, gid in ((0, 0), (1000, 1000), (123456, 123456), (1000, 123456)):
        rel = f"owners/file-{uid}-{gid}"
        b.file(rel, f"owned by {uid}:{gid}\n".encode())
        b.chown(rel, uid, gid)
        b.info.add("owner", rel)
    b.mkdir("owners/dir-1000")
    b.chown("owners/dir-1000", 1000, 1000)
    b.symlink("owners/symlink-123456", "file-0-0")
    b.chown("owners/symlink-123456", 123456, 123456)
    os.mkfifo(b.path("owners/fifo-1000"))
    os.chmod(b.path("owners/fifo-1000"), 0o600)
    b.chown("owners/fifo-1000", 1000, 0)
    # setuid survives only if chmod comes after chown (chown clears it).
    b.file("owners/setuid-123456", b"#!/bin/sh\n", 0o755)
    b.chown("owners/setuid-123456", 123456, 1000)
    os.chmod(b.path("owners/setuid-123456"), 0o4755)


def _times(b: _Builder) -> None:
    b.mkdir("times")
    cases = {
        "epoch-plus-1ns": T_EPOCH_1NS,
        "y2038-edge": T_2038_EDGE,
        "y2103": T_2103,
        "beyond-u32": T_BEYOND_U32,
    }
    for name, t in cases.items():
        b.file(f"times/{name}", name.encode())
        b.set_time(f"times/{name}", t, atime=(t[0] + 1, 5))
        b.info.add("special_time", f"times/{name}")
    b.mkdir("times/dir-y2103")
    b.set_time("times/dir-y2103", T_2103)
    b.symlink("times/symlink-epoch-plus-1ns", "y2103")
    b.set_time("times/symlink-epoch-plus-1ns", T_EPOCH_1NS)
    b.set_time("times", T_BEYOND_U32)


def _xattrs(b: _Builder) -> None:
    b.mkdir("xattrs")
    p = b.file("xattrs/user", b"has user xattrs\n")
    os.setxattr(p, "user.empty", b"")
    os.setxattr(p, "user.plain", b"value")
    os.setxattr(p, "user.binary", bytes(range(256)))
    os.setxattr(p, "user.mime_type", b"text/plain")
    p = b.file("xattrs/big-value", b"3000-byte xattr value\n")
    os.setxattr(p, "user.big", b.text_data(3000))
    d = b.mkdir("xattrs/dir-with-xattr")
    os.setxattr(d, "user.dir", b"on a directory")
    for i in range(20):  # same name/value on many inodes: EROFS shared xattrs
        p = b.file(f"xattrs/shared/f{i:02d}", f"{i}\n".encode())
        os.setxattr(p, "user.shared", b"the same value everywhere")
        os.setxattr(p, "user.unique", f"value {i}".encode())
    b.info.add("xattr", "xattrs/user")
    b.file("xattrs/acl-file", b"acl\n")
    b.mkdir("xattrs/acl-dir")
    _set_acls(b, "xattrs/acl-file", "xattrs/acl-dir")
    b.info.add("acl", "xattrs/acl-file")
    b.info.add("acl", "xattrs/acl-dir")
    if not IS_ROOT:
        b.info.skipped.append("trusted.* and security.* xattrs (not root)")
        return
    p = b.file("xattrs/trusted-security", b"privileged xattrs\n", 0o755)
    os.setxattr(p, "trusted.nydus", b"trusted value")
    os.setxattr(p, "trusted.empty", b"")
    os.setxattr(p, "security.capability", _capability_v2(1 << 10))  # CAP_NET_BIND_SERVICE
    os.setxattr(p, "security.nydus-test", b"security value")
    os.setxattr(b.path("links/sym-short"), "trusted.on-symlink", b"x", follow_symlinks=False)
    b.info.add("xattr", "xattrs/trusted-security")


def _apply_times(b: _Builder) -> None:
    """Set atime/mtime on every entry, children before parents (directories last)."""

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as it:
                children = [e.name for e in it]
            for name in children:
                visit(path / name, f"{rel}/{name}" if rel else name)
        key = rel or "."
        times = b.times.get(key)
        if times is None:
            times = (_default_ns(key, 1), _default_ns(key, 2))
        os.utime(path, ns=times, follow_symlinks=False)

    visit(b.root, "")


def make_tree(
    root: Path,
    *,
    scale: str = "small",
    seed: int = 0,
    max_name: int = 255,
) -> TreeInfo:
    """Create the edge-case corpus under ``root`` (created if missing; must be empty).

    Contents: regular files of sizes 0, 1, 4095, 4096, 4097, 1 MiB-1, 1 MiB, 1 MiB+1, 3 MiB+5;
    compressible, incompressible and zero data; whole-file duplicates and repeated 1 MiB blocks;
    sparse files (holes at start, middle and end; a 4 GiB+8 KiB one for ``scale="medium"``);
    hardlinks (a 3-way group, a link to an empty file); symlinks (short, 4000-byte target,
    dangling, to a directory, absolute); fifo, unix socket, char and block devices (root);
    depth 60; names of ``max_name`` bytes (ASCII and UTF-8) and non-ASCII names; a directory
    with 300 (small) or 3000 (medium) entries; modes with setuid/setgid/sticky and 0000;
    uid/gid 0, 1000, 123456 (root); mtimes with nanoseconds, 1 ns after the epoch, 2038, 2103 and
    after 2^32 s; user/trusted/security xattrs with an empty and a 3000-byte value, shared
    xattrs, and posix ACLs (access and default).

    ``max_name=254`` avoids the 255-byte names that Debian's mkfs.erofs 1.5 cannot store.
    """
    if scale not in ("small", "medium"):
        raise ValueError(f"scale must be 'small' or 'medium', got {scale!r}")
    if not 16 <= max_name <= 255:
        raise ValueError("max_name must be in 16..255")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"make_tree needs an empty directory: {root}")
    info = TreeInfo(root=root, scale=scale)
    b = _Builder(root, seed, info)
    sections: list[Callable[[], None]] = [
        lambda: _sizes(b),
        lambda: _data(b),
        lambda: _dedup(b),
        lambda: _sparse(b, scale),
        lambda: _links(b),
        lambda: _special(b),
        lambda: _deep(b),
        lambda: _names(b, max_name),
        lambda: _bigdir(b, 3000 if scale == "medium" else 300),
        lambda: _modes(b),
        lambda: _owners(b),
        lambda: _times(b),
        lambda: _xattrs(b),
    ]
    for section in sections:
        section()
    b.mkdir("empty-dir")
    os.chmod(root, 0o755)
    _apply_times(b)
    return info


# --- the benchmark tree ---------------------------------------------------------------------


def _file_sizes(rng: random.Random, total_bytes: int, nfiles: int) -> list[int]:
    """File sizes summing to ``total_bytes``: a long tail of small files and a few big ones."""
    n_big = max(1, nfiles // 2000)
    small = [int(2 ** rng.uniform(7, 16.5)) for _ in range(nfiles - n_big)]  # 128 B .. ~90 KiB
    small_total = sum(small)
    if small_total > total_bytes // 2:  # keep at least half of the bytes in big files
        factor = (total_bytes // 2) / small_total
        small = [max(1, int(s * factor)) for s in small]
        small_total = sum(small)
    remaining = total_bytes - small_total
    weights = [rng.uniform(0.5, 2.0) for _ in range(n_big)]
    weights[0] *= 4  # one file much bigger than the others
    big = [int(remaining * w / sum(weights)) for w in weights]
    big[0] += remaining - sum(big)
    sizes = small + big
    rng.shuffle(sizes)
    return sizes


def make_large_tree(root: Path, total_bytes: int, nfiles: int, seed: int = 0) -> dict[str, int]:
    """Create a benchmark tree of about ``total_bytes`` in ``nfiles`` regular files.

    Data is cut from two pools made once (64 MiB random, 16 MiB text-like) at random offsets, so
    it is fast to write yet not chunk-aligned repeats: each 1 MiB piece is compressible text
    (zstd ~3-4x) with probability 1/3, else incompressible; about 10% of the small files are
    whole-file duplicates of earlier ones. Files sit 100 to a directory, two
    directory levels deep. Deterministic for a given ``seed``. Returns counts for the report.
    """
    if nfiles < 1 or total_bytes < nfiles:
        raise ValueError("need nfiles >= 1 and total_bytes >= nfiles")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rand_pool = memoryview(rng.randbytes(64 * MiB))
    text_pool = memoryview(_text_block(rng, 16 * MiB))
    sizes = _file_sizes(rng, total_bytes, nfiles)
    stats = {"files": 0, "bytes": 0, "dirs": 0, "duplicates": 0, "compressible_bytes": 0}
    written: list[tuple[Path, int]] = []
    piece = MiB
    for i, size in enumerate(sizes):
        d = root / f"d{i // 10_000:02d}" / f"s{(i // 100) % 100:02d}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
            stats["dirs"] += 1
        path = d / f"f{i:06d}.{'txt' if i % 3 == 1 else 'bin'}"
        kind = rng.random()
        if kind < 0.10 and written and size < 4 * MiB:
            src, src_size = written[rng.randrange(len(written))]
            shutil.copyfile(src, path)
            stats["duplicates"] += 1
            stats["bytes"] += src_size
            stats["files"] += 1
            continue
        with open(path, "wb") as f:
            left = size
            while left:  # each 1 MiB piece is text (1/3) or random (2/3)
                n = min(left, piece)
                if rng.random() < 1 / 3:
                    pool = text_pool
                    stats["compressible_bytes"] += n
                else:
                    pool = rand_pool
                off = rng.randrange(len(pool) - n + 1)
                f.write(pool[off : off + n])
                left -= n
        if size < 4 * MiB:
            written.append((path, size))
        stats["files"] += 1
        stats["bytes"] += size
    return stats
