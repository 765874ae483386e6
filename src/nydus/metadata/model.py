"""The read-only metadata model shared by the RAFS v5 and v6 readers.

A bootstrap opened with :func:`nydus.metadata.open_bootstrap` is a
:class:`RafsMetadata`: a tree of inodes addressed by an opaque integer *node id*
(the EROFS nid for v6, the inode-table index for v5). Node ids are stable for
the life of the object; hardlinks share one node id in v6 and share ``ino`` in
both versions.

Readers are immutable after construction and safe to share between threads.
Every method raises :class:`nydus.errors.FormatError` for malformed data and
:class:`nydus.errors.NotFoundError` for names that do not exist; nothing else
escapes.
"""

from __future__ import annotations

import re
import stat as _stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NewType

from ..errors import FormatError

if TYPE_CHECKING:
    from ..format.rafs_v5 import RafsV5ChunkInfo

__all__ = [
    "BlobInfo",
    "ChunkInfo",
    "FileKind",
    "Inode",
    "DirEntry",
    "Nid",
    "RafsMetadata",
    "check_blob_id",
]

#: A node of a bootstrap: the EROFS nid (v6) or the inode-table index (v5). Not the inode
#: number the file system reports (:data:`nydus.fs.Ino`) nor a FUSE node id.
Nid = NewType("Nid", int)

# a blob id names files (<work_dir>/<blob_id>.blob.data, <blob_dir>/<blob_id>): one safe name
_BLOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_blob_id(blob_id: str) -> str:
    """``blob_id`` if it is safe as a file name (letters, digits, ``.``, ``_``, ``-``, not
    starting with a dot or dash, at most 255 characters); else :class:`FormatError`.

    Blob ids come from bootstraps, which may be hostile: ``../../x`` must never become a path.
    """
    if not isinstance(blob_id, str) or not _BLOB_ID_RE.fullmatch(blob_id):
        shown = blob_id[:80] if isinstance(blob_id, str) else blob_id
        raise FormatError(
            f"blob id {shown!r} is not a safe file name (letters, digits, '.', '_', '-' only)"
        )
    return blob_id


@dataclass(frozen=True)
class BlobInfo:
    """One data blob referenced by a bootstrap (blob table entry)."""

    index: int
    blob_id: str
    chunk_size: int
    chunk_count: int
    compressor: str
    digester: str
    features: int
    compressed_size: int
    uncompressed_size: int
    ci_compressor: str = "none"
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    toc_size: int = 0
    toc_digest: bytes = b""
    meta_features: int = 0
    # features separate (zran): the blob meta (ci data, header, ToC) lives in its own blob
    meta_blob_id: str = ""
    meta_blob_size: int = 0

    def __post_init__(self) -> None:
        check_blob_id(self.blob_id)


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk of a file: where it lives in its blob and how to verify it."""

    digest: bytes
    blob_index: int
    index: int  # index into the blob's chunk-info array
    file_offset: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    crc32: int = 0

    def in_blob(self, blob_index: int) -> ChunkInfo:
        """This chunk as referenced from blob-table slot ``blob_index``."""
        return self if blob_index == self.blob_index else replace(self, blob_index=blob_index)

    @classmethod
    def of_record(cls, r: RafsV5ChunkInfo, file_offset: int, crc32: int = 0) -> ChunkInfo:
        """The chunk an 80-byte chunk record (v5 inode or v6 chunk table) describes."""
        place = (r.compressed_offset, r.compressed_size, r.uncompressed_offset, r.uncompressed_size)
        return cls(r.digest, r.blob_index, r.index, file_offset, *place, r.compressed, crc32)


class FileKind:
    """File-type tests for anything with an st_mode-style ``mode``."""

    __slots__ = ()
    mode: int

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)


@dataclass(frozen=True)
class Inode(FileKind):
    """stat(2)-like attributes of one node."""

    nid: Nid
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime: int
    mtime_nsec: int
    blocks: int = 0
    xattr_count: int = 0
    extra: dict[str, int] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    nid: Nid
    # EROFS dirent type: 0 unknown, 1 reg, 2 dir, 3 chr, 4 blk, 5 fifo, 6 sock, 7 lnk
    file_type: int


class RafsMetadata(ABC):
    """A bootstrap opened read-only."""

    version: int  # 5 or 6
    flags: int
    chunk_size: int
    compressor: str
    digester: str
    blobs: list[BlobInfo]
    root_nid: Nid

    @abstractmethod
    def getattr(self, nid: Nid) -> Inode: ...

    @abstractmethod
    def readdir(self, nid: Nid) -> Iterator[DirEntry]:
        """Entries of a directory, without '.' and '..', sorted by name."""

    @abstractmethod
    def lookup(self, parent: Nid, name: bytes) -> Nid:
        """Node id of ``name`` in directory ``parent`` or NotFoundError."""

    @abstractmethod
    def readlink(self, nid: Nid) -> bytes: ...

    @abstractmethod
    def xattrs(self, nid: Nid) -> dict[bytes, bytes]:
        """All extended attributes of a node, full names as keys."""

    @abstractmethod
    def chunks(self, nid: Nid) -> list[ChunkInfo]:
        """Chunks of a regular file in file order; holes are simply absent."""

    @abstractmethod
    def prefetch_nids(self) -> list[Nid]:
        """Node ids listed in the bootstrap's prefetch table."""

    def chunk_record(self, blob_index: int, index: int) -> ChunkInfo | None:
        """The bootstrap's own record of chunk ``index`` of blob ``blob_index`` (placement and
        digest, ``file_offset`` 0), or None when the bootstrap keeps no table of chunks by
        blob position (v5, or v6 without the chunk table). The storage layer uses it to verify
        chunks it locates through a blob's chunk-info array."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (mmaps, file handles)."""

    def __enter__(self) -> RafsMetadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Derived helpers shared by all versions -------------------------------

    def getxattr(self, nid: Nid, name: bytes) -> bytes:
        from ..errors import NotFoundError

        try:
            return self.xattrs(nid)[name]
        except KeyError:
            raise NotFoundError(f"no xattr {name!r}") from None

    def resolve(self, path: str | bytes) -> Nid:
        """Node id of an absolute path inside the image (symlinks not followed)."""
        if isinstance(path, str):
            path = path.encode()
        nid = self.root_nid
        for part in path.split(b"/"):
            if part in (b"", b"."):
                continue
            nid = self.lookup(nid, part)
        return nid

    def walk(self, max_depth: int = 4096) -> Iterator[tuple[bytes, Nid]]:
        """Pre-order (path, nid) of every node, root first as b'/', sorted.

        Guards against loops: a directory node id seen twice on one path, or a
        depth above ``max_depth``, is a FormatError.
        """
        from ..errors import FormatError

        stack: list[tuple[bytes, Nid, tuple[Nid, ...]]] = [(b"/", self.root_nid, ())]
        while stack:
            path, nid, ancestors = stack.pop()
            yield path, nid
            if not self.getattr(nid).is_dir:
                continue
            if nid in ancestors:
                raise FormatError(f"directory loop at {path!r}")
            if len(ancestors) >= max_depth:
                raise FormatError(f"directory tree deeper than {max_depth} at {path!r}")
            chain = (*ancestors, nid)
            prefix = b"" if path == b"/" else path
            for ent in reversed(list(self.readdir(nid))):
                stack.append((prefix + b"/" + ent.name, ent.nid, chain))
