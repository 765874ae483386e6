"""Hand-made tar archives for the tar builder's tests: exact headers, and a hostile corpus.

``entry()``, ``pax()``, ``gnu_long()`` and ``end()`` write tar bytes field by field, so a test
can state precisely the dialect (ustar, GNU, PAX, V7) or the defect it wants; ``header()``
computes a valid checksum unless told otherwise.

``hostile_cases()`` returns the corpus of hostile layers (a few are compressed bombs, built in
a fraction of a second). Each case says what the builder must do: ``"ok"`` (a correct image;
``paths`` are then checked to exist in it, ``absent`` not to), or ``"error"`` with a substring
of the FormatError message. The suite runs every case through ``nydus-image create`` and
checks time, memory and that nothing is written outside the output paths; nydusify's layer
reader (``convert/rootfs.py``) and the layer extractor (``builder/extract.py``, which writes
to disk: the snapshotter's unpacker uses it) run the corpus too.

The ``slip-*`` cases try to write outside an extraction root (tar-slip): through symlinks and
hard links the same tar made, absolute and relative (``..``) symlink chains, whiteouts and
opaque markers through a symlinked directory. They aim at ``outside`` (an absolute directory,
by default one that should not exist) and, relatively, at ``../<basename of outside>``: the
extractor's test puts its root next to a sentinel tree there and checks the sentinel is left
byte, mode and owner identical. The extractor resolves every path inside its root, as
containerd does, so most of them apply *inside* the root: ``apply`` (with ``apply_match``)
gives its outcome where it differs from the builder's and ``apply_paths`` what must exist
under the root then.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import zstandard

__all__ = [
    "BLOCK",
    "DEFAULT_OUTSIDE",
    "Case",
    "end",
    "entry",
    "gnu_long",
    "header",
    "hostile_cases",
    "pax",
]

BLOCK = 512


def _octal(v: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, v)


def _base256(v: int, width: int) -> bytes:
    if v < 0:
        return (v & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
    raw = bytearray(v.to_bytes(width, "big"))
    raw[0] |= 0x80
    return bytes(raw)


def _num(v: int, width: int) -> bytes:
    return _octal(v, width) if 0 <= v < 8 ** (width - 1) else _base256(v, width)


def header(
    name: bytes,
    *,
    typeflag: bytes = b"0",
    size: int = 0,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = 1_700_000_000,
    linkname: bytes = b"",
    fmt: str = "posix",
    prefix: bytes = b"",
    devmajor: int = 0,
    devminor: int = 0,
    checksum: int | None = None,
    patch: dict[int, bytes] | None = None,
) -> bytes:
    """One 512-byte header. ``fmt`` is posix (``ustar\\0 00``), gnu (``ustar  \\0``) or v7."""
    h = bytearray(BLOCK)
    h[0 : len(name[:100])] = name[:100]
    h[100:108] = _num(mode, 8)
    h[108:116] = _num(uid, 8)
    h[116:124] = _num(gid, 8)
    h[124:136] = _num(size, 12)
    h[136:148] = _num(mtime, 12)
    h[156:157] = typeflag
    h[157 : 157 + len(linkname[:100])] = linkname[:100]
    if fmt == "posix":
        h[257:265] = b"ustar\x0000"
    elif fmt == "gnu":
        h[257:265] = b"ustar  \0"
    if fmt != "v7":
        h[265:269] = b"root"
        h[297:301] = b"root"
        h[329:337] = _num(devmajor, 8)
        h[337:345] = _num(devminor, 8)
    if prefix:
        h[345 : 345 + len(prefix)] = prefix
    for off, raw in (patch or {}).items():
        h[off : off + len(raw)] = raw
    h[148:156] = b" " * 8
    chk = sum(h) if checksum is None else checksum
    h[148:156] = b"%06o\0 " % chk
    return bytes(h)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def entry(name: bytes, data: bytes = b"", **kw: object) -> bytes:
    """Header plus data, padded. ``size`` defaults to len(data)."""
    kw.setdefault("size", len(data))
    return header(name, **kw) + _padded(data)  # type: ignore[arg-type]


def pax(records: list[tuple[bytes, bytes]], *, typeflag: bytes = b"x") -> bytes:
    """A PAX extended (``x``) or global (``g``) header with its records."""
    body = b""
    for k, v in records:
        rest = b" " + k + b"=" + v + b"\n"
        n = len(rest) + 1
        while len(str(n)) + len(rest) != n:
            n = len(str(n)) + len(rest)
        body += str(n).encode() + rest
    return header(b"././@PaxHeader", typeflag=typeflag, size=len(body)) + _padded(body)


def gnu_long(value: bytes, typeflag: bytes = b"L") -> bytes:
    """A GNU ``././@LongLink`` header carrying a long name (L) or link target (K)."""
    data = value + b"\0"
    return header(b"././@LongLink", typeflag=typeflag, size=len(data), fmt="gnu") + _padded(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


# --------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    name: str
    make: Callable[[], bytes]
    expect: str  # "ok" or "error"
    match: str = ""  # substring of the error message
    paths: list[str] = field(default_factory=list)  # must exist in the built image
    absent: list[str] = field(default_factory=list)  # must not exist in it
    apply: str = ""  # the extractor's outcome where it differs from ``expect`` (or "either")
    apply_match: str = ""  # substring of its FormatError message
    apply_paths: list[str] | None = None  # must exist under the extraction root (default paths)

    @property
    def apply_expect(self) -> str:
        return self.apply or self.expect


def _dir(name: bytes, **kw: object) -> bytes:
    kw.setdefault("mode", 0o755)
    return entry(name, typeflag=b"5", **kw)


def _gzip_members_of_zeros(mib: int) -> bytes:
    """``mib`` MiB of zeros as that many identical gzip members (instant to make)."""
    return gzip.compress(bytes(1 << 20), 9) * mib


def _gzip_tar_bomb(mib: int) -> bytes:
    """A tar.gz (one member per MiB) holding one file of ``mib`` MiB of zeros."""
    return (
        gzip.compress(header(b"zeros", size=mib << 20))
        + _gzip_members_of_zeros(mib)
        + gzip.compress(end())
    )


def _zstd_tar_bomb(mib: int) -> bytes:
    """The same as zstd frames."""
    z = zstandard.ZstdCompressor(level=3).compress
    return z(header(b"zeros", size=mib << 20)) + z(bytes(1 << 20)) * mib + z(end())


def _many_entries(n: int) -> bytes:
    """``n`` empty files (and every 100th holding one byte) in 100-entry directories."""
    parts = []
    for i in range(n):
        parts.append(entry(b"d%04d/f%07d" % (i // 100, i), b"x" if i % 100 == 0 else b""))
    parts.append(end())
    return b"".join(parts)


DEFAULT_OUTSIDE = b"/tmp/nydus-hostile-outside"


def _slip_cases(outside: bytes) -> list[Case]:
    """Tar-slip attempts at ``outside`` (see the module docstring). The sentinel there holds
    ``passwd`` (a file) and ``dir/`` (with ``dir/file``)."""
    o = outside.rstrip(b"/")
    rel = b"../" + os.path.basename(o)  # the sentinel seen from an extraction root beside it
    so = o.decode()
    evil = {"mode": 0o4777, "uid": 4242, "gid": 4242}

    def sym(name: bytes, target: bytes) -> bytes:
        return entry(name, typeflag=b"2", linkname=target)

    def hard(name: bytes, target: bytes, **kw: object) -> bytes:
        return entry(name, typeflag=b"1", linkname=target, **kw)

    return [
        Case(
            "slip-symlink-dir-abs",
            lambda: sym(b"a", o) + entry(b"a/slip", b"pwned") + end(),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=[f"{so}/slip"],
        ),
        Case(
            "slip-symlink-root",
            lambda: sym(b"a", b"/") + entry(b"a" + o + b"/slip", b"pwned") + end(),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=[f"{so}/slip"],
        ),
        Case(
            "slip-symlink-relative-chain",
            lambda: (
                _dir(b"d/")
                + sym(b"d/up", b"../..")
                + sym(b"l", b"d/up/" + rel[3:])
                + entry(b"l/slip", b"pwned")
                + end()
            ),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=["/" + rel[3:].decode() + "/slip"],
        ),
        Case(
            "slip-symlink-relative",
            lambda: sym(b"a", rel) + entry(b"a/slip", b"pwned") + end(),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=["/" + rel[3:].decode() + "/slip"],
        ),
        Case(
            "slip-symlink-abs-chain",
            lambda: sym(b"s1", o) + sym(b"s2", b"/s1") + entry(b"s2/slip", b"pwned") + end(),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=[f"{so}/slip"],
        ),
        Case(
            "slip-write-through-symlink",
            lambda: sym(b"f", o + b"/passwd") + entry(b"f", b"pwned", **evil) + end(),
            "ok",
            paths=["/f"],
        ),
        Case(
            "slip-dir-over-symlink",
            lambda: sym(b"a", o) + _dir(b"a/", **evil) + end(),
            "ok",
            paths=["/a"],
        ),
        Case(
            "slip-hardlink-to-outside-symlink",
            lambda: sym(b"s", o + b"/passwd") + hard(b"h", b"s", **evil) + end(),
            "ok",
            paths=["/s", "/h"],
        ),
        Case(
            "slip-hardlink-through-symlink-chmod",
            lambda: sym(b"s", o) + hard(b"h", b"s/passwd", **evil) + end(),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "slip-hardlink-abs-outside-then-rewrite",
            lambda: hard(b"p", o + b"/passwd") + entry(b"p", b"pwned", **evil) + end(),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "slip-hardlink-then-rewrite",
            lambda: sym(b"s", o) + hard(b"p", b"s/passwd") + entry(b"p", b"pwned", **evil) + end(),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "slip-hardlink-dir-then-file",
            lambda: sym(b"s", o) + hard(b"p", b"s/dir/file") + end(),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "slip-setuid-via-hardlink-inside",
            lambda: entry(b"f", b"x", mode=0o644) + hard(b"h", b"f", **evil) + end(),
            "ok",
            paths=["/f", "/h"],
        ),
        Case(
            "slip-whiteout-dotdot",
            lambda: entry(b"d/.wh...") + end(),
            "ok",
            paths=["/d"],
            apply="error",
            apply_match="names no file",
        ),
        Case(
            "slip-whiteout-through-symlink",
            lambda: sym(b"a", o) + entry(b"a/.wh.passwd") + end(),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=[so],
        ),
        Case(
            "slip-whiteout-relative",
            lambda: sym(b"a", rel) + entry(b"a/.wh.passwd") + end(),
            "error",
            "not a directory",
            apply="ok",
        ),
        Case(
            "slip-opaque-through-symlink",
            lambda: sym(b"a", o) + entry(b"a/.wh..wh..opq") + end(),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=[so],
        ),
        Case(
            "slip-opaque-relative",
            lambda: sym(b"a", rel) + entry(b"a/.wh..wh..opq") + end(),
            "error",
            "not a directory",
            apply="ok",
        ),
        Case(
            "slip-dotdot-deep",
            lambda: entry(b"d/../../" + rel[3:] + b"/slip", b"pwned") + end(),
            "error",
            "contains '..'",
        ),
        Case(
            "slip-dotdot-hardlink",
            lambda: entry(b"f", b"x") + hard(b"h", rel + b"/passwd") + end(),
            "error",
            "contains '..'",
        ),
    ]


def hostile_cases(outside: bytes = DEFAULT_OUTSIDE) -> list[Case]:
    f = entry(b"file", b"hello")
    cases = [
        Case("dotdot", lambda: entry(b"../evil", b"x") + end(), "error", "contains '..'"),
        Case(
            "dotdot-inner", lambda: entry(b"a/../../evil", b"x") + end(), "error", "contains '..'"
        ),
        Case(
            "absolute-path",
            lambda: entry(b"/tmp/nydus-hostile-abs", b"x") + end(),
            "ok",
            paths=["/tmp/nydus-hostile-abs"],
        ),
        Case(
            "nul-in-pax-path",
            lambda: pax([(b"path", b"a\0b")]) + entry(b"a", b"x") + end(),
            "error",
            "NUL",
        ),
        Case("empty-name", lambda: entry(b"", b"x") + end(), "error", "root must be a directory"),
        Case(
            "dot-is-file", lambda: entry(b"./", b"x") + end(), "error", "root must be a directory"
        ),
        Case(
            "hardlink-missing",
            lambda: entry(b"l", typeflag=b"1", linkname=b"nope") + end(),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "hardlink-escape",
            lambda: entry(b"l", typeflag=b"1", linkname=b"../../etc/passwd") + end(),
            "error",
            "contains '..'",
        ),
        Case(
            "hardlink-absolute-outside",
            lambda: entry(b"l", typeflag=b"1", linkname=b"/etc/passwd") + end(),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "hardlink-absolute-inside",
            lambda: f + entry(b"l", typeflag=b"1", linkname=b"/file") + end(),
            "ok",
            paths=["/file", "/l"],
        ),
        Case(
            "hardlink-to-dir",
            lambda: _dir(b"d/") + entry(b"l", typeflag=b"1", linkname=b"d") + end(),
            "error",
            "names a directory",
        ),
        Case(
            "hardlink-through-symlink",
            lambda: (
                entry(b"s", typeflag=b"2", linkname=b"/etc")
                + entry(b"l", typeflag=b"1", linkname=b"s/passwd")
                + end()
            ),
            "error",
            "not an earlier entry",
            apply_match="target missing",
        ),
        Case(
            "file-through-symlink",
            lambda: (
                entry(b"s", typeflag=b"2", linkname=b"/tmp")
                + entry(b"s/nydus-hostile-through", b"pwned")
                + end()
            ),
            "error",
            "not a directory",
            apply="ok",
            apply_paths=["/tmp/nydus-hostile-through"],
        ),
        Case(
            "file-below-file",
            lambda: f + entry(b"file/x", b"x") + end(),
            "error",
            "not a directory",
        ),
        Case(
            "symlink-absolute",
            lambda: entry(b"s", typeflag=b"2", linkname=b"/etc/shadow") + end(),
            "ok",
            paths=["/s"],
        ),
        Case("symlink-empty", lambda: entry(b"s", typeflag=b"2") + end(), "error", "empty"),
        Case(
            "symlink-too-long",
            lambda: pax([(b"linkpath", b"x" * 5000)]) + entry(b"s", typeflag=b"2") + end(),
            "error",
            "longer than 4095",
        ),
        Case("truncated-header", lambda: (f + end())[: 512 + 512 + 100], "error", "truncated"),
        Case(
            "truncated-data", lambda: header(b"big", size=10000) + b"x" * 3000, "error", "truncated"
        ),
        Case(
            "size-lies-bigger",
            lambda: header(b"a", size=5000) + _padded(b"x" * 100) + f + end(),
            "error",
            "truncated",
        ),
        Case(
            "size-lies-smaller",
            lambda: header(b"a", size=10) + _padded(b"y" * 2000) + end(),
            "error",
            "checksum",
        ),
        Case("bad-checksum", lambda: header(b"a", checksum=1234) + end(), "error", "checksum"),
        Case("not-a-tar", lambda: b"\x7fELF" + bytes(range(256)) * 8, "error", "checksum"),
        Case(
            "bad-octal",
            lambda: header(b"a", patch={124: b"0000000009x\0"}) + end(),
            "error",
            "not octal",
        ),
        Case(
            "unknown-magic", lambda: header(b"a", patch={257: b"xxxxxx"}) + end(), "error", "magic"
        ),
        Case(
            "truncated-gzip",
            lambda: gzip.compress(f + end())[:40],
            "error",
            "gzip stream truncated",
        ),
        Case(
            "corrupt-gzip",
            lambda: (lambda g: g[:20] + b"\xff" * 8 + g[28:])(gzip.compress(f * 20 + end())),
            "error",
            "gzip",
        ),
        Case(
            "truncated-zstd",
            lambda: zstandard.ZstdCompressor().compress(f + end())[:-4],
            "error",
            "zstd stream truncated",
        ),
        Case("gzip-bomb-tar", lambda: _gzip_tar_bomb(1024), "ok", paths=["/zeros"]),
        Case("zstd-bomb-tar", lambda: _zstd_tar_bomb(1024), "ok", paths=["/zeros"]),
        Case(
            "gzip-bomb-zeros",
            lambda: _gzip_members_of_zeros(4096),
            "error",
            "after the tar end-of-archive marker",
        ),
        Case("trailing-garbage", lambda: f + end() + b"garbage" * 10, "ok", paths=["/file"]),
        Case("no-end-marker", lambda: f, "ok", paths=["/file"]),
        Case(
            "long-component",
            lambda: pax([(b"path", b"a" * 256)]) + entry(b"x", b"x") + end(),
            "error",
            "longer than 255",
        ),
        Case(
            "path-too-long",
            lambda: pax([(b"path", b"a/" * 2100 + b"f")]) + entry(b"x") + end(),
            "error",
            "longer than 4096",
        ),
        Case(
            "deep-path-ok",
            lambda: pax([(b"path", b"a/" * 2000 + b"f")]) + entry(b"x", b"1") + end(),
            "ok",
            paths=["/" + "a/" * 2000 + "f"],
        ),
        Case(
            "pax-huge",
            lambda: pax([(b"comment", b"x" * (2 << 20))]) + f + end(),
            "error",
            "exceeds",
        ),
        Case(
            "pax-bad-length",
            lambda: header(b"p", typeflag=b"x", size=20) + _padded(b"99 path=abc\n") + f + end(),
            "error",
            "PAX record length",
        ),
        Case(
            "pax-ends-archive",
            lambda: pax([(b"path", b"x")]),
            "error",
            "ends after an extended header",
        ),
        Case(
            "uid-too-big",
            lambda: pax([(b"uid", b"%d" % (1 << 40))]) + f + end(),
            "error",
            "32 bits",
        ),
        Case(
            "negative-mtime",
            lambda: entry(b"old", b"x", mtime=-86400) + end(),
            "ok",
            paths=["/old"],
        ),
        Case(
            "device-too-big",
            lambda: entry(b"dev", typeflag=b"3", devmajor=5000) + end(),
            "error",
            "does not fit",
        ),
        Case(
            "sparse-overlap",
            lambda: (
                pax([(b"GNU.sparse.size", b"100"), (b"GNU.sparse.map", b"0,10,5,10")])
                + entry(b"sp", b"x" * 20)
                + end()
            ),
            "error",
            "overlap",
        ),
        Case(
            "sparse-sum-lies",
            lambda: (
                pax([(b"GNU.sparse.size", b"100"), (b"GNU.sparse.map", b"0,10,50,10")])
                + entry(b"sp", b"x" * 30)
                + end()
            ),
            "error",
            "sparse segments hold",
        ),
        Case(
            "sparse-huge",
            lambda: (
                pax([(b"GNU.sparse.size", b"%d" % (1 << 50)), (b"GNU.sparse.map", b"0,1")])
                + entry(b"sp", b"x")
                + end()
            ),
            "error",
            "chunk slots",
            apply="either",
            apply_match="File too large",
        ),  # a 1 PiB hole: ext4 refuses it, xfs does not
        Case(
            "xattr-huge",
            lambda: pax([(b"SCHILY.xattr.user.big", b"v" * 70000)]) + f + end(),
            "error",
            "xattrs larger",
        ),
        Case(
            "xattr-foreign-namespace",
            lambda: pax([(b"SCHILY.xattr.com.apple.x", b"v")]) + f + end(),
            "ok",
            paths=["/file"],
        ),
        Case(
            "multivolume",
            lambda: entry(b"mv", b"x", typeflag=b"M") + end(),
            "error",
            "not supported",
        ),
        Case(
            "duplicate-types",
            lambda: (
                _dir(b"x/")
                + entry(b"x/in", b"1")
                + entry(b"x", b"f")
                + _dir(b"x/")
                + entry(b"y", b"1")
                + _dir(b"y/")
                + end()
            ),
            "ok",
            paths=["/x", "/y"],
            absent=["/x/in"],
        ),
        Case("many-entries", lambda: _many_entries(200_000), "ok", paths=["/d1999/f0199999"]),
    ]
    return cases + _slip_cases(outside)


# --------------------------------------------------------------------------- the sentinel

SENTINEL_FILES = {  # path below the sentinel: (mode, uid, gid, content); None: a directory
    "passwd": (0o644, 0, 0, b"root:x:0:0:root:/root:/bin/bash\n"),
    "dir": (0o755, 0, 0, None),
    "dir/file": (0o600, 1234, 1234, b"secret\n"),
    "tool": (0o755, 0, 0, b"#!/bin/sh\n"),
}


def make_sentinel(top: str) -> None:
    """The tree the ``slip-*`` cases aim at, at ``top`` (owners need root)."""
    os.mkdir(top, 0o755)
    for rel, (mode, uid, gid, data) in SENTINEL_FILES.items():
        path = os.path.join(top, rel)
        if data is None:
            os.mkdir(path)
        else:
            with open(path, "wb") as f:
                f.write(data)
        if os.geteuid() == 0:
            os.chown(path, uid, gid)
        os.chmod(path, mode)


def tree_state(top: str) -> dict[str, tuple[object, ...]]:
    """Everything a slip could change below (and of) ``top``: type and mode, owner, size,
    mtime, inode and link count, content or symlink target."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            if os.path.islink(path):
                body: object = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    body = f.read()
            else:
                body = None
            out[os.path.relpath(path, top)] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                st.st_nlink,
                body,
            )
    return out
