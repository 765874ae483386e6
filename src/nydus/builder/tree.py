"""The in-memory file tree a build works on.

Sources (a directory walk, a tar stream, a parent bootstrap) produce a tree of
:class:`Node` objects; the overlay code merges trees; the blob writer fills in
each regular file's chunks; the bootstrap writer serialises the result. A
hardlink group is one Node object referenced from several directories.
Both classes use ``__slots__``: a layer may hold millions of entries.

Not thread-safe: a tree belongs to one build.
"""

from __future__ import annotations

import contextlib
import gc
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, TypeVar

from ..errors import FormatError
from ..metadata.model import ChunkInfo, FileKind

__all__ = ["Node", "PathData", "new_dir", "iter_tree", "check_name", "paused_gc"]


@dataclass(frozen=True, slots=True)
class PathData:
    """``Node.open_data`` of a regular file on disk (a directory walk's).

    Called, it opens the file like any data source; the blob writer instead opens
    ``path`` itself with ``os.open`` and reads it with ``pread`` (no file object per
    file), and looks for holes only when ``maybe_sparse`` (the walk's ``st_blocks``
    covered less than ``st_size``).
    """

    path: bytes
    maybe_sparse: bool = True

    def __call__(self) -> BinaryIO:
        return open(self.path, "rb", buffering=0)


@dataclass(eq=False, slots=True)
class Node(FileKind):
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    symlink: bytes = b""
    children: dict[bytes, Node] | None = None
    # A regular file's data: ``open_data()`` returns a binary file object; or
    # chunks already placed (from a parent image).
    open_data: Callable[[], object] | None = None
    chunks: list[ChunkInfo] | None = None
    # source path, for error messages and the prefetch list
    path: bytes = b""
    # runtime fields used while writing
    nlink: int = 0
    nid: int = -1
    # a directory a tar layer implied (a parent of an entry) without an entry of its own: on
    # top of a lower layer it keeps the lower directory's attributes, as containerd does
    implicit: bool = False


def new_dir(mode: int = 0o40755, **kw: object) -> Node:
    n = Node(mode=stat.S_IFDIR | (mode & 0o7777), **kw)  # type: ignore[arg-type]
    n.children = {}
    return n


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FormatError(f"invalid file name {name!r}")
    if len(name) > 255:
        raise FormatError(f"file name longer than 255 bytes: {name[:40]!r}...")


class _Tree(Protocol):
    """Any tree node with named children (``None`` for a leaf)."""

    @property
    def children(self) -> Mapping[bytes, Any] | None: ...


_N = TypeVar("_N", bound=_Tree)


def iter_tree(root: _N) -> Iterator[tuple[bytes, _N]]:
    """Pre-order (path, node) with children in bytewise name order; root is b'/'.
    Iterative: trees thousands of directories deep are fine. Any node type with a
    ``children`` mapping (the builder's :class:`Node`, nydusify's layer tree)."""
    stack: list[tuple[bytes, _N]] = [(b"/", root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        kids = node.children
        if kids:
            prefix = b"" if path == b"/" else path
            for name in sorted(kids, reverse=True):
                stack.append((prefix + b"/" + name, kids[name]))


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection inside: a walk or build makes many long-lived objects and
    no reference cycles, so each collection only re-scans the growing tree."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
