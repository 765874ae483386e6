"""Build a :class:`Node` tree from an OCI layer tar, streaming file data into a blob.

:func:`load_tar` reads the layer once (see :mod:`.tarstream` and :mod:`.tarreader`): every
regular file's data is cut into chunks and handed to the :class:`BlobWriter` while the tar is
read, so nothing is extracted to disk and memory holds only the tree and a few chunks.

Layer semantics (what a container sees when the layer is applied, and what GNU tar
extracts for a single layer):

- names are normalised: leading ``/`` and ``./`` dropped, empty and ``.`` components removed;
  a ``..`` component, a NUL byte, a component over 255 bytes or a path over
  ``max_path`` bytes is a FormatError. The entry ``./`` sets the root's attributes.
- a later entry for a name replaces the earlier one (OCI: the later wins); a directory
  entry for an existing directory only updates its attributes, so directories may come after
  their children.
- parents without an entry of their own are created as *implicit* directories (0755, root,
  mtime 0); on top of a parent image they keep the lower directory's attributes.
- a hardlink names an earlier entry of the same layer (after normalisation); it may not name
  a directory, a missing entry or a path with ``..``. All names of a hardlink share one node,
  with the target's metadata, as link(2) gives.
- symlinks are data: never followed. An entry below a symlink (or below any non-directory)
  is a FormatError, so nothing can be placed "through" a link. Their permission bits are
  0777, as every Linux extraction (tar, containerd) leaves them, whatever the header says.
- whiteouts are kept as they are (``.wh.*`` files, 0:0 character devices, opaque xattrs):
  :func:`.overlay.apply_layer` applies them onto a lower tree.
- xattrs in a namespace EROFS cannot store (e.g. macOS names) are dropped with a warning,
  as GNU tar cannot set them either.

Single-threaded (the blob writer has its own pool).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import ConfigError, FormatError
from ..format.erofs import split_xattr_name
from .blob import BlobWriter
from .tarreader import BLK, CHR, DIR, FIFO, HARDLINK, REG, SYMLINK, TarEntry, TarLimits, TarReader
from .tarstream import LayerStream
from .tree import Node, check_name, new_dir

__all__ = ["TarLayer", "TarLimits", "load_tar", "split_entry_path"]

log = logging.getLogger(__name__)

_IFMT = {
    REG: stat.S_IFREG,
    DIR: stat.S_IFDIR,
    SYMLINK: stat.S_IFLNK,
    CHR: stat.S_IFCHR,
    BLK: stat.S_IFBLK,
    FIFO: stat.S_IFIFO,
}
MAX_SYMLINK = 4095
MAX_MAJOR = 0xFFF  # EROFS stores device numbers in the kernel's 32-bit "new" encoding
MAX_MINOR = 0xFFFFF


@dataclass
class TarLayer:
    """A layer read from a tar: its tree and what was learnt on the way."""

    root: Node
    diff_id: str  # sha256 of the uncompressed tar: the layer's diff_id
    compression: str  # none, gzip or zstd
    tar_bytes: int  # uncompressed size
    compressed_bytes: int
    entries: int
    bytes_read: int  # file data bytes

    def stats(self) -> dict[str, Any]:
        return {
            "diff_id": self.diff_id,
            "compression": self.compression,
            "tar_size": self.tar_bytes,
            "compressed_size": self.compressed_bytes,
            "entries": self.entries,
        }


def split_entry_path(raw: bytes, what: str, limits: TarLimits, at: int) -> list[bytes]:
    """The components of a tar entry's path (or hardlink target) ``raw``: empty and ``.``
    components dropped; ``..``, NUL, over-long paths or names are a FormatError naming the
    entry's offset ``at``. Shared by the image builder and the layer extractor."""
    if len(raw) > limits.max_path:
        raise FormatError(f"tar entry at {at}: {what} longer than {limits.max_path} bytes")
    if b"\0" in raw:
        raise FormatError(f"tar entry at {at}: {what} {raw[:60]!r} contains a NUL byte")
    parts: list[bytes] = []
    for p in raw.split(b"/"):
        if p in (b"", b"."):
            continue
        if p == b"..":
            raise FormatError(f"tar entry at {at}: {what} {raw[:200]!r} contains '..'")
        try:
            check_name(p)
        except FormatError as e:
            raise FormatError(f"tar entry at {at}: {what}: {e}") from None
        parts.append(p)
    return parts


class _TreeBuilder:
    def __init__(self, limits: TarLimits) -> None:
        self.limits = limits
        self.root = new_dir(0o755, implicit=True)
        self._cache: tuple[tuple[bytes, ...], Node] | None = None
        self._warned: set[bytes] = set()

    def parent_of(self, parts: list[bytes], e: TarEntry) -> Node:
        key = tuple(parts[:-1])
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        node = self.root
        for i, name in enumerate(key):
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                child = new_dir(0o755, implicit=True, path=b"/" + b"/".join(key[: i + 1]))
                node.children[name] = child
            elif not child.is_dir:
                raise FormatError(
                    f"tar entry at {e.offset}: {b'/'.join(parts)[:200]!r} lies below "
                    f"{b'/'.join(key[: i + 1])[:200]!r}, which is not a directory"
                )
            node = child
        self._cache = (key, node)
        return node

    def lookup(self, parts: list[bytes]) -> Node | None:
        node = self.root
        for name in parts:
            if node.children is None:
                return None
            nxt = node.children.get(name)
            if nxt is None:
                return None
            node = nxt
        return node

    def xattrs(self, e: TarEntry) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        total = 0
        for name, value in e.xattrs.items():
            split = split_xattr_name(name)
            if split is None or len(split[1]) > 255:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("xattr %r cannot be stored in EROFS: dropped", name)
                continue
            if name == b"system.posix_acl_default" and e.kind != DIR:
                continue  # only directories have default ACLs
            total += len(name) + len(value) + 4
            if len(value) > 0xFFFF or total > self.limits.max_xattr_bytes:
                raise FormatError(
                    f"tar entry at {e.offset}: xattrs larger than "
                    f"{self.limits.max_xattr_bytes} bytes"
                )
            out[name] = value
        return out

    def replace(self, parent: Node, name: bytes, node: Node) -> None:
        assert parent.children is not None
        old = parent.children.get(name)
        if old is not None and old.is_dir:
            self._cache = None  # a cached parent may lie below it
        parent.children[name] = node


def load_tar(
    stream: BinaryIO,
    writer: BlobWriter | None,
    *,
    chunk_size: int,
    prefetch: Callable[[bytes], bool] | None = None,
    limits: TarLimits | None = None,
) -> TarLayer:
    """Read a layer tar (plain, gzip or zstd) from ``stream`` into a tree.

    File data goes to ``writer`` as it is read; a file for which ``prefetch(path)`` is false
    goes to the writer's deferred region (prefetched files first). ``writer`` may be None
    only for layers without file data.
    """
    limits = limits or TarLimits()
    with LayerStream(stream) as ls:
        return _load(ls, writer, chunk_size, prefetch, limits)


def _load(
    ls: LayerStream,
    writer: BlobWriter | None,
    chunk_size: int,
    prefetch: Callable[[bytes], bool] | None,
    limits: TarLimits,
) -> TarLayer:
    reader = TarReader(ls, limits)
    tb = _TreeBuilder(limits)
    data_bytes = 0
    for e in reader:
        parts = split_entry_path(e.name, "path", limits, e.offset)
        if not parts:
            if e.kind != DIR:
                raise FormatError(f"tar entry at {e.offset}: the root must be a directory")
            _set_attrs(tb.root, e, tb.xattrs(e))
            tb.root.implicit = False
            continue
        parent = tb.parent_of(parts, e)
        assert parent.children is not None
        name = parts[-1]
        path = b"/" + b"/".join(parts)
        if e.kind == HARDLINK:
            target_parts = split_entry_path(e.linkname, "hardlink target", limits, e.offset)
            target = tb.lookup(target_parts) if target_parts else None
            if target is None:
                raise FormatError(
                    f"tar entry at {e.offset}: hardlink {path[:200]!r} to "
                    f"{e.linkname[:200]!r}, which is not an earlier entry of this layer"
                )
            if target.is_dir:
                raise FormatError(
                    f"tar entry at {e.offset}: hardlink {path[:200]!r} names a directory"
                )
            tb.replace(parent, name, target)
            continue
        xattrs = tb.xattrs(e)
        if e.kind == DIR:
            old = parent.children.get(name)
            if old is not None and old.is_dir:
                _set_attrs(old, e, xattrs)
                old.implicit = False
                continue
            node = new_dir(e.mode, path=path)
            _set_attrs(node, e, xattrs)
            tb.replace(parent, name, node)
            continue
        perm = 0o777 if e.kind == SYMLINK else e.mode  # no Linux extraction keeps another
        node = Node(mode=_IFMT[e.kind] | perm, path=path)
        _set_attrs(node, e, xattrs)
        if e.kind == SYMLINK:
            if not e.linkname:
                raise FormatError(f"tar entry at {e.offset}: symlink {path[:200]!r} is empty")
            if len(e.linkname) > MAX_SYMLINK or b"\0" in e.linkname:
                raise FormatError(
                    f"tar entry at {e.offset}: symlink target of {path[:200]!r} is longer "
                    f"than {MAX_SYMLINK} bytes or holds a NUL"
                )
            node.symlink = e.linkname
            node.size = len(e.linkname)
        elif e.kind in (CHR, BLK):
            if e.devmajor > MAX_MAJOR or e.devminor > MAX_MINOR:
                raise FormatError(
                    f"tar entry at {e.offset}: device {e.devmajor}:{e.devminor} of "
                    f"{path[:200]!r} does not fit the 12:20-bit encoding"
                )
            node.rdev = os.makedev(e.devmajor, e.devminor)
        elif e.kind == REG:
            node.size = e.size
            if e.sparse is not None:
                _check_sparse_size(e, chunk_size, limits)
            has_data = e.size > 0 and (e.sparse is None or any(n for _o, n in e.sparse))
            if has_data:
                if writer is None:
                    raise ConfigError("the layer has file data: give --blob or --blob-dir")
                deferred = prefetch is not None and not prefetch(path)
                data_bytes += writer.add_file(node, reader.chunks(e, chunk_size), deferred=deferred)
            else:
                node.chunks = []
        tb.replace(parent, name, node)
    if writer is not None:
        writer.flush()
    return TarLayer(
        root=tb.root,
        diff_id=ls.diff_id,
        compression=ls.compression,
        tar_bytes=ls.pos,
        compressed_bytes=ls.compressed_bytes,
        entries=reader.entries,
        bytes_read=data_bytes,
    )


def _set_attrs(node: Node, e: TarEntry, xattrs: dict[bytes, bytes]) -> None:
    if node.is_dir:
        node.mode = stat.S_IFDIR | e.mode
    node.uid, node.gid = e.uid, e.gid
    node.mtime, node.mtime_nsec = e.mtime, e.mtime_nsec
    node.xattrs = xattrs


def _check_sparse_size(e: TarEntry, chunk_size: int, limits: TarLimits) -> None:
    slots = -(-e.size // chunk_size)
    if slots > limits.max_sparse_chunks:
        raise FormatError(
            f"tar entry at {e.offset}: sparse file of apparent size {e.size} needs {slots} "
            f"chunk slots (more than {limits.max_sparse_chunks})"
        )
