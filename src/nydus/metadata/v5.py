"""Read-only RAFS v5 bootstrap as a :class:`RafsMetadata` tree.

Owns the v5 tree semantics on top of :mod:`nydus.format.rafs_v5`: node id = child index
(1-based position in the inode table, root = 1), children of a directory are the
contiguous child indexes ``child_index .. child_index + child_count - 1`` sorted by name,
and chunk infos follow each regular file's inode. Nothing is parsed ahead of time beyond
the superblock and the blob and prefetch tables; each call parses the few inodes it needs
at precomputed offsets, so opening a bootstrap with 100k+ inodes is O(blobs).

Tree shape is checked as it is read, which makes every valid-looking tree a real tree:
a directory's children have larger child indexes than the directory (no cycles), a
directory's ``ino`` is its own child index, and every child records the directory's ino
as its parent (so no node is listed by two directories, and a walk is linear).

The object is immutable after construction (it holds only ``bytes`` and frozen values),
so it is safe to share between threads without locking.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator

from ..errors import FormatError, NotFoundError
from ..format import rafs_v5 as fmt
from ..format.erofs import file_type_of
from .model import BlobInfo, ChunkInfo, DirEntry, Inode, Nid, RafsMetadata

__all__ = ["RafsV5Metadata"]


class RafsV5Metadata(RafsMetadata):
    """A RAFS v5 bootstrap held in memory as ``bytes``."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        sb = fmt.RafsV5SuperBlock.parse(self._data)
        self._sb = sb
        self.version = 5
        self.flags = sb.flags
        self.chunk_size = sb.block_size
        self.compressor = sb.compressor
        self.digester = sb.digester
        self.root_nid = Nid(fmt.ROOT_INDEX)
        self.blobs = self._load_blobs()
        self._prefetch = self._load_prefetch()
        root = self._inode(fmt.ROOT_INDEX)
        if not stat.S_ISDIR(root.mode) or root.ino != fmt.ROOT_INDEX:
            raise FormatError("RAFS v5 root (child index 1) is not directory inode 1")

    # Construction -----------------------------------------------------------------

    def _load_blobs(self) -> list[BlobInfo]:
        sb, data = self._sb, self._data
        ext = fmt.parse_ext_blob_table(data, sb.ext_blob_table_offset, sb.ext_blob_table_entries)
        entries = fmt.parse_blob_table(data, sb.blob_table_offset, sb.blob_table_size)
        if ext and len(ext) < len(entries):
            raise FormatError(
                f"RAFS v5 extended blob table has {len(ext)} entries for {len(entries)} blobs"
            )
        blobs: list[BlobInfo] = []
        for i, entry in enumerate(entries):
            e = ext[i] if ext else fmt.RafsV5ExtBlobEntry(0, 0, 0, 0)
            blobs.append(
                BlobInfo(
                    index=i,
                    blob_id=entry.blob_id,
                    chunk_size=sb.block_size,
                    chunk_count=e.chunk_count,
                    compressor=sb.compressor,
                    digester=sb.digester,
                    features=e.features,
                    compressed_size=e.compressed_size,
                    uncompressed_size=e.uncompressed_size,
                )
            )
        return blobs

    def _load_prefetch(self) -> tuple[Nid, ...]:
        sb = self._sb
        inos = fmt.parse_prefetch_table(
            self._data, sb.prefetch_table_offset, sb.prefetch_table_entries
        )
        for ino in inos:
            # Upstream stores inode numbers; the first link of an inode has child index ==
            # ino, so every valid entry is also a node id.
            if not 1 <= ino <= sb.inode_table_entries:
                raise FormatError(f"RAFS v5 prefetch table names unknown inode {ino}")
        return tuple(map(Nid, inos))

    # Inode access ---------------------------------------------------------------------

    def _inode(self, nid: int) -> fmt.RafsV5Inode:
        if not isinstance(nid, int) or not 1 <= nid <= self._sb.inode_table_entries:
            raise NotFoundError(f"no RAFS v5 node {nid!r}")
        return fmt.RafsV5Inode.parse(self._data, fmt.inode_table_offset(self._data, self._sb, nid))

    def _dir(self, nid: int) -> fmt.RafsV5Inode:
        d = self._inode(nid)
        if not stat.S_ISDIR(d.mode):  # FormatError, as in the v6 reader
            raise FormatError(f"RAFS v5 node {nid} is not a directory")
        if d.ino != nid:
            raise FormatError(f"RAFS v5 directory at child index {nid} has ino {d.ino}")
        if d.child_count:
            last = d.child_index + d.child_count - 1
            if d.child_index <= nid or last > self._sb.inode_table_entries:
                raise FormatError(
                    f"RAFS v5 directory {nid} has children {d.child_index}..{last}, "
                    f"outside ({nid}, {self._sb.inode_table_entries}]"
                )
        return d

    def _child(self, d: fmt.RafsV5Inode, cnid: int) -> tuple[fmt.RafsV5Inode, bytes]:
        """Child inode and its validated name; the child must name ``d`` as its parent."""
        c = fmt.RafsV5Inode.parse(self._data, fmt.inode_table_offset(self._data, self._sb, cnid))
        if c.parent != d.ino:
            raise FormatError(
                f"RAFS v5 node {cnid} is listed by directory {d.ino} but its parent is {c.parent}"
            )
        name = c.name(self._data)
        fmt.check_entry_name(name)
        return c, name

    # RafsMetadata API -----------------------------------------------------------------

    def getattr(self, nid: Nid) -> Inode:
        i = self._inode(nid)
        xattr_count = len(fmt.parse_xattrs(self._data, i.xattr_offset)) if self._has_xattr(i) else 0
        return Inode(
            nid=nid,
            ino=i.ino,
            mode=i.mode,
            nlink=i.nlink,
            uid=i.uid,
            gid=i.gid,
            size=i.size,
            rdev=i.rdev,
            mtime=i.mtime,
            mtime_nsec=i.mtime_nsec,
            blocks=i.blocks,
            xattr_count=xattr_count,
            extra={"projid": i.projid, "flags": i.flags, "parent": i.parent},
        )

    def readdir(self, nid: Nid) -> Iterator[DirEntry]:
        d = self._dir(nid)
        entries: list[DirEntry] = []
        prev = b""
        for cnid in range(d.child_index, d.child_index + d.child_count):
            c, name = self._child(d, cnid)
            if name <= prev:
                raise FormatError(
                    f"RAFS v5 directory {nid}: entry {name!r} is not sorted after {prev!r}"
                )
            if stat.S_ISDIR(c.mode) and c.ino != cnid:
                raise FormatError(f"RAFS v5 directory at child index {cnid} has ino {c.ino}")
            prev = name
            entries.append(DirEntry(name, Nid(cnid), file_type_of(c.mode)))
        return iter(entries)

    def lookup(self, parent: Nid, name: bytes) -> Nid:
        d = self._dir(parent)
        lo, hi = d.child_index, d.child_index + d.child_count - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            _, mid_name = self._child(d, mid)
            if mid_name == name:
                return Nid(mid)
            if mid_name < name:
                lo = mid + 1
            else:
                hi = mid - 1
        raise NotFoundError(f"no entry {name!r} in RAFS v5 directory {parent}")

    def readlink(self, nid: Nid) -> bytes:
        i = self._inode(nid)
        if not stat.S_ISLNK(i.mode):
            raise FormatError(f"RAFS v5 node {nid} is not a symlink")
        return i.symlink(self._data)

    def xattrs(self, nid: Nid) -> dict[bytes, bytes]:
        i = self._inode(nid)
        return fmt.parse_xattrs(self._data, i.xattr_offset) if self._has_xattr(i) else {}

    def chunks(self, nid: Nid) -> list[ChunkInfo]:
        i = self._inode(nid)
        if not stat.S_ISREG(i.mode):
            return []
        if not i.flags & fmt.INODE_HAS_HOLE:
            expected = -(-i.size // self.chunk_size)
            if i.child_count != expected:
                raise FormatError(
                    f"RAFS v5 file {nid} of {i.size} bytes has {i.child_count} chunks, "
                    f"expected {expected}"
                )
        out: list[ChunkInfo] = []
        end = 0
        for n, c in enumerate(i.chunk_infos(self._data)):
            self._check_chunk(nid, n, i.size, end, c)
            end = c.file_offset + c.uncompressed_size
            if c.is_hole:
                continue
            out.append(ChunkInfo.of_record(c, c.file_offset))  # v5: the crc32 field is reserved
        return out

    def prefetch_nids(self) -> list[Nid]:
        return list(self._prefetch)

    # Helpers ----------------------------------------------------------------------------

    @staticmethod
    def _has_xattr(i: fmt.RafsV5Inode) -> bool:
        return bool(i.flags & fmt.INODE_XATTR)

    def _check_chunk(
        self, nid: int, n: int, size: int, prev_end: int, c: fmt.RafsV5ChunkInfo
    ) -> None:
        where = f"RAFS v5 file {nid} chunk {n}"
        if c.blob_index >= len(self.blobs):
            raise FormatError(f"{where}: blob index {c.blob_index} of {len(self.blobs)} blobs")
        blob = self.blobs[c.blob_index]
        if not 0 < c.uncompressed_size <= self.chunk_size:
            raise FormatError(f"{where}: uncompressed size {c.uncompressed_size} is invalid")
        if c.file_offset < prev_end or c.file_offset + c.uncompressed_size > size:
            raise FormatError(
                f"{where}: file range {c.file_offset}+{c.uncompressed_size} overlaps the "
                f"previous chunk or passes the file size {size}"
            )
        if c.is_hole:
            return
        if c.compressed_size == 0 or (
            not c.compressed and c.compressed_size != c.uncompressed_size
        ):
            raise FormatError(f"{where}: compressed size {c.compressed_size} is invalid")
        if blob.chunk_count and c.index >= blob.chunk_count:
            raise FormatError(f"{where}: index {c.index} >= blob chunk count {blob.chunk_count}")
        if blob.compressed_size and c.compressed_offset + c.compressed_size > blob.compressed_size:
            raise FormatError(f"{where}: compressed range passes the blob end")
        if (
            blob.uncompressed_size
            and c.uncompressed_offset + c.uncompressed_size > blob.uncompressed_size
        ):
            raise FormatError(f"{where}: uncompressed range passes the blob end")
