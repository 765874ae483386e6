"""File trees for ``nydusify check``: the OCI rootfs (layers applied) and a Nydus image's.

:class:`OciRootfs` applies layer tars in order with the OCI rules, independently of the
builder (Python's :mod:`tarfile` reads the tars, decompressed by the builder's strict
:class:`~nydus.builder.tarstream.LayerStream`): within a layer a later entry replaces an
earlier one (a directory entry for an existing directory only updates its attributes);
parents without entries are 0755 root-owned directories with mtime 0, keeping the lower
directory's attributes when there is one; ``.wh.NAME`` removes ``NAME`` of the lower layers
and ``.wh..wh..opq`` empties the directory of lower entries; hardlinks share one node.
Symlinks are 0777 (what every Linux extraction gives) and xattrs EROFS cannot store (see
:func:`nydus.format.erofs.split_xattr_name`) are left out, as the builder documents.
File contents are kept as sha256 digests only, so memory is the tree, never the data.

:func:`nydus_rootfs` reads the same model from a bootstrap, hashing file data through a
``read_chunk`` callable (verified chunks from our storage readers). :func:`compare` lists every
difference: missing/extra paths, type, mode, uid, gid, size, mtime (seconds), symlink
target, device number, xattrs, content, and hardlink grouping.

Single-threaded.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

import zstandard

from ..builder.tarstream import LayerStream
from ..builder.tree import iter_tree
from ..errors import FormatError
from ..format.erofs import split_xattr_name
from ..metadata import ChunkInfo, Nid, RafsMetadata

__all__ = ["FileNode", "OciRootfs", "nydus_rootfs", "compare", "Difference"]

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_TAR_KINDS: tuple[tuple[str, Callable[[tarfile.TarInfo], bool]], ...] = (
    ("dir", tarfile.TarInfo.isdir),
    ("file", tarfile.TarInfo.isreg),
    ("symlink", tarfile.TarInfo.issym),
    ("chr", tarfile.TarInfo.ischr),
    ("blk", tarfile.TarInfo.isblk),
    ("fifo", tarfile.TarInfo.isfifo),
)
MAX_SPARSE_SIZE = 1 << 36  # a sparse file's apparent size: hashing more takes too long


@dataclass(eq=False)
class FileNode:
    kind: str
    mode: int  # permission bits (07777)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    digest: str = ""
    children: dict[bytes, FileNode] | None = None
    implicit: bool = False
    opaque: bool = False
    whiteouts: set[bytes] = field(default_factory=set)
    link_id: int = 0  # nodes sharing data (hardlinks) share this
    uncertain: bool = False  # a directory some layer only implied: attributes not compared

    @classmethod
    def new_dir(cls, implicit: bool = False) -> FileNode:
        return cls("dir", 0o755, children={}, implicit=implicit)


def _xattrs(pax: Mapping[str, str], kind: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            name = k[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape")
            value = v.encode("utf-8", "surrogateescape")
        elif k.startswith("LIBARCHIVE.xattr."):
            name = k[len("LIBARCHIVE.xattr.") :].encode("utf-8", "surrogateescape")
            value = base64.b64decode(v + "=" * (-len(v) % 4))
        else:
            continue
        if split_xattr_name(name) is None:
            continue
        if name == b"system.posix_acl_default" and kind != "dir":
            continue
        out[name] = value
    return out


def _norm(name: str) -> list[bytes]:
    parts = []
    for p in name.encode("utf-8", "surrogateescape").split(b"/"):
        if p in (b"", b"."):
            continue
        if p == b"..":
            raise FormatError(f"tar entry {name!r} contains '..'")
        parts.append(p)
    return parts


def open_layer_tar(stream: IO[bytes]) -> tuple[tarfile.TarFile, LayerStream]:
    """A streaming TarFile over a plain, gzip or zstd layer stream, and the decompressing
    :class:`~nydus.builder.tarstream.LayerStream` under it (strict about truncation,
    concatenated gzip members and zstd frames like the builder; close it when done)."""
    ls = LayerStream(cast(BinaryIO, stream))
    try:
        return tarfile.open(fileobj=cast(IO[bytes], ls), mode="r|"), ls
    except BaseException:
        ls.close()
        raise


class OciRootfs:
    """The rootfs of an OCI image, built by :meth:`apply` one layer at a time."""

    def __init__(self) -> None:
        self.root = FileNode.new_dir(implicit=True)
        self._next_link = 1

    def apply(self, stream: IO[bytes]) -> None:
        upper = self._read_layer(stream)
        self.root = _overlay(self.root, upper)

    def _read_layer(self, stream: IO[bytes]) -> FileNode:
        root = FileNode.new_dir(implicit=True)
        ls: LayerStream | None = None
        try:
            tf, ls = open_layer_tar(stream)
            for m in tf:
                parts = _norm(m.name)
                if not parts:
                    if m.isdir():
                        _set(root, m, _xattrs(m.pax_headers, "dir"))
                        root.implicit = False
                    continue
                parent = root
                for p in parts[:-1]:
                    assert parent.children is not None
                    child = parent.children.get(p)
                    if child is None:
                        child = FileNode.new_dir(implicit=True)
                        parent.children[p] = child
                    elif child.children is None:
                        raise FormatError(f"tar entry {m.name!r} lies below a non-directory")
                    parent = child
                assert parent.children is not None
                name = parts[-1]
                if name == b".wh..wh..opq":
                    parent.opaque = True
                    continue
                if name.startswith(b".wh."):
                    parent.whiteouts.add(name[4:])
                    continue
                if m.islnk():
                    tgt = root
                    for p in _norm(m.linkname):
                        if tgt.children is None or p not in tgt.children:
                            raise FormatError(f"hardlink {m.name!r} to missing {m.linkname!r}")
                        tgt = tgt.children[p]
                    if tgt.link_id == 0:
                        tgt.link_id = self._next_link
                        self._next_link += 1
                    parent.children[name] = tgt
                    continue
                kind = next((k for k, test in _TAR_KINDS if test(m)), "")
                if not kind:
                    raise FormatError(f"tar entry {m.name!r} has unsupported type {m.type!r}")
                xattrs = _xattrs(m.pax_headers, kind)
                old = parent.children.get(name)
                if kind == "dir":
                    if old is not None and old.children is not None:
                        _set(old, m, xattrs)
                        old.implicit = False
                        continue
                    node = FileNode.new_dir()
                    _set(node, m, xattrs)
                    parent.children[name] = node
                    continue
                node = FileNode(kind, 0o777 if kind == "symlink" else m.mode & 0o7777)
                _set(node, m, xattrs)
                if kind == "symlink":
                    node.target = m.linkname.encode("utf-8", "surrogateescape")
                    node.size = len(node.target)
                elif kind in ("chr", "blk"):
                    node.rdev = (m.devmajor, m.devminor)
                elif kind == "file":
                    if m.sparse is not None and m.size > MAX_SPARSE_SIZE:
                        raise FormatError(
                            f"sparse file {m.name!r} of {m.size} bytes: more "
                            f"than {MAX_SPARSE_SIZE} cannot be compared"
                        )
                    node.size = m.size
                    h = hashlib.sha256()
                    f = tf.extractfile(m)
                    if f is not None:
                        while piece := f.read(1 << 20):
                            h.update(piece)
                    node.digest = h.hexdigest()
                parent.children[name] = node
            tf.close()
        except (tarfile.TarError, EOFError, zstandard.ZstdError) as e:
            raise FormatError(f"layer is not a readable tar: {e}") from None
        finally:
            if ls is not None:
                ls.close()
        return root


def _set(node: FileNode, m: tarfile.TarInfo, xattrs: dict[bytes, bytes]) -> None:
    if node.kind == "dir":
        node.mode = m.mode & 0o7777
    node.uid, node.gid = m.uid, m.gid
    node.mtime = math.floor(m.mtime)
    node.xattrs = xattrs


def _overlay(lower: FileNode, upper: FileNode) -> FileNode:
    """``upper`` (one layer, with whiteout marks) applied onto ``lower``; returns the dir.
    Iterative: a layer may be thousands of directories deep."""
    top = _merge_dir(lower, upper)
    todo = [(top, upper)]
    while todo:
        merged, up = todo.pop()
        kids = merged.children
        assert kids is not None and up.children is not None
        for name, node in up.children.items():
            below = kids.get(name)
            if node.children is None:
                kids[name] = node
                continue
            if below is None or below.children is None:
                below = FileNode.new_dir(implicit=True)
            kids[name] = _merge_dir(below, node)
            todo.append((kids[name], node))
    return top


def _merge_dir(lower: FileNode, upper: FileNode) -> FileNode:
    """The directory ``upper`` over ``lower``: attributes and the lower children that stay
    (``upper``'s own children are added by :func:`_overlay`)."""
    assert lower.children is not None and upper.children is not None
    if upper.opaque:
        kids: dict[bytes, FileNode] = {}
    else:
        kids = {k: v for k, v in lower.children.items() if k not in upper.whiteouts}
    merged = lower
    if not upper.implicit:
        merged = FileNode(
            "dir", upper.mode, upper.uid, upper.gid, upper.mtime, xattrs=upper.xattrs, children={}
        )
    else:
        # A parent without an entry of its own: containerd creates it 0755 (mtime "now")
        # and overlayfs then shows those attributes; a bootstrap keeps the lower directory's
        # (single build) or the implicit ones (merge). Neither is wrong, so not compared.
        merged.uncertain = True
    merged.children = kids
    merged.opaque, merged.whiteouts = False, set()
    return merged


def nydus_rootfs(
    md: RafsMetadata,
    read_chunk: Callable[[ChunkInfo], bytes],
    on_file: Callable[[bytes], None] | None = None,
) -> FileNode:
    """The tree of a bootstrap, file contents hashed through ``read_chunk``."""
    nodes: dict[Nid, FileNode] = {}
    counts: dict[Nid, int] = {}
    root: FileNode | None = None
    for path, nid in md.walk():
        a = md.getattr(nid)
        node = nodes.get(nid)
        if node is None:
            kind = KINDS.get(stat.S_IFMT(a.mode), "?")
            node = FileNode(kind, a.mode & 0o7777, a.uid, a.gid, a.mtime, xattrs=md.xattrs(nid))
            if kind == "dir":
                node.children = {}
            elif kind == "symlink":
                node.target = md.readlink(nid)
                node.size = len(node.target)
            elif kind in ("chr", "blk"):
                node.rdev = (os.major(a.rdev), os.minor(a.rdev))
            elif kind == "file":
                node.size = a.size
                if on_file is not None:
                    on_file(path)
                node.digest = _hash_file(a.size, md.chunks(nid), read_chunk)
            nodes[nid] = node
        counts[nid] = counts.get(nid, 0) + 1
        if path == b"/":
            root = node
            continue
        parent_path, _, name = path.rpartition(b"/")
        parent = nodes[md.resolve(parent_path or b"/")]
        assert parent.children is not None
        parent.children[name] = node
    for nid, c in counts.items():
        if c > 1:
            nodes[nid].link_id = nid + 1
    if root is None:
        raise FormatError("bootstrap has no root")
    return root


def _hash_file(size: int, chunks: list[ChunkInfo], read_chunk: Callable[[ChunkInfo], bytes]) -> str:
    h = hashlib.sha256()
    pos = 0
    for c in chunks:
        if c.file_offset < pos:
            raise FormatError(f"chunks overlap at offset {c.file_offset}")
        if c.file_offset > pos:
            h.update(bytes(c.file_offset - pos))
            pos = c.file_offset
        data = read_chunk(c)
        take = min(len(data), size - pos)
        h.update(data[:take])
        pos += take
    if pos < size:
        h.update(bytes(size - pos))
    return h.hexdigest()


@dataclass
class Difference:
    path: str
    what: str
    oci: str = ""
    nydus: str = ""

    def __str__(self) -> str:
        if self.oci or self.nydus:
            return f"{self.path}: {self.what} differs (oci {self.oci}, nydus {self.nydus})"
        return f"{self.path}: {self.what}"


def _walk(node: FileNode) -> Iterator[tuple[bytes, FileNode]]:
    """Pre-order, children by name; iterative (deep trees)."""
    return iter_tree(node)


def compare(oci: FileNode, nydus: FileNode, limit: int = 1000) -> tuple[list[Difference], int, int]:
    """Differences between two trees (at most ``limit`` listed), the paths compared and
    the implied directories whose attributes were not compared."""
    a = dict(_walk(oci))
    b = dict(_walk(nydus))
    out: list[Difference] = []
    uncertain = 0

    def add(d: Difference) -> None:
        if len(out) < limit:
            out.append(d)

    for path in sorted(a.keys() | b.keys()):
        p = path.decode("utf-8", "replace")
        x, y = a.get(path), b.get(path)
        if y is None:
            add(Difference(p, "missing in the Nydus image"))
            continue
        if x is None:
            add(Difference(p, "only in the Nydus image"))
            continue
        if x.kind != y.kind:
            add(Difference(p, "type", x.kind, y.kind))
            continue
        if x.uncertain:
            uncertain += 1
        for attr in () if x.uncertain else ("mode", "uid", "gid", "mtime"):
            vx, vy = getattr(x, attr), getattr(y, attr)
            if vx != vy:
                fmt = oct if attr == "mode" else str
                add(Difference(p, attr, fmt(vx), fmt(vy)))
        if x.kind == "file" and x.size != y.size:
            add(Difference(p, "size", str(x.size), str(y.size)))
        elif x.kind == "file" and x.digest != y.digest:
            add(Difference(p, "content", x.digest[:16], y.digest[:16]))
        if x.kind == "symlink" and x.target != y.target:
            add(Difference(p, "symlink target", repr(x.target), repr(y.target)))
        if x.kind in ("chr", "blk") and x.rdev != y.rdev:
            add(Difference(p, "device", f"{x.rdev[0]}:{x.rdev[1]}", f"{y.rdev[0]}:{y.rdev[1]}"))
        if x.xattrs != y.xattrs:
            add(Difference(p, "xattrs", _xs(x.xattrs), _xs(y.xattrs)))
    # hardlinks: paths sharing a node on one side must share it on the other
    groups_a: dict[int, set[bytes]] = {}
    groups_b: dict[int, set[bytes]] = {}
    for path, n in a.items():
        if n.link_id:
            groups_a.setdefault(n.link_id, set()).add(path)
    for path, n in b.items():
        if n.link_id:
            groups_b.setdefault(n.link_id, set()).add(path)
    sets_a = {frozenset(s) for s in groups_a.values() if len(s) > 1}
    sets_b = {frozenset(s) for s in groups_b.values() if len(s) > 1}
    for s in sorted(sets_a ^ sets_b, key=sorted):
        side = "OCI" if s in sets_a else "Nydus"
        names = ", ".join(sorted(x.decode("utf-8", "replace") for x in s))
        add(Difference(names, f"hardlinked only in the {side} image"))
    return out, len(a.keys() | b.keys()), uncertain


def _xs(x: dict[bytes, bytes]) -> str:
    return (
        "{"
        + ", ".join(f"{k.decode('utf-8', 'replace')}={v[:16]!r}" for k, v in sorted(x.items()))
        + "}"
    )
