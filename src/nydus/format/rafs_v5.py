"""RAFS v5 on-disk structures, parsed from bytes (read only, but for the chunk info).

Owns the byte layout of a RAFS v5 bootstrap (upstream ``rafs/src/metadata/layout/v5.rs``):
the 8192-byte superblock, the inode table (u32 per child index, ``offset >> 3``), the
prefetch table, the blob table and the extended blob table, the 128-byte inode with its
name, symlink target and xattr area, and the 80-byte chunk info, which v6 bootstraps reuse
for their chunk table (so it also packs; :mod:`nydus.format.rafs_v6` imports it from here).
Every parser takes the whole bootstrap and an offset, checks each offset, size and count
against the buffer before use, and raises :class:`nydus.errors.FormatError` naming what is
wrong. Policy (tree shape, chunk ranges against blobs) lives in :mod:`nydus.metadata.v5`.

All functions are pure and all results but :class:`RafsV5ChunkInfo` are frozen (that one is
never changed after it is made), so everything here is safe to call from any thread.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from ..errors import FormatError
from .erofs import FILE_TYPES
from .record import field_values

__all__ = [
    "SUPERBLOCK_SIZE",
    "INODE_SIZE",
    "CHUNK_INFO_SIZE",
    "EXT_BLOB_ENTRY_SIZE",
    "RAFS_V5_MAGIC",
    "RAFS_V5_VERSION",
    "ROOT_INDEX",
    "INODE_SYMLINK",
    "INODE_HARDLINK",
    "INODE_XATTR",
    "INODE_HAS_HOLE",
    "CHUNK_COMPRESSED",
    "CHUNK_HOLE",
    "RafsV5SuperBlock",
    "RafsV5BlobEntry",
    "RafsV5ExtBlobEntry",
    "RafsV5Inode",
    "RafsV5ChunkInfo",
    "align8",
    "check_entry_name",
    "parse_blob_table",
    "parse_ext_blob_table",
    "parse_prefetch_table",
    "inode_table_offset",
    "parse_xattrs",
]

SUPERBLOCK_SIZE = 8192
INODE_SIZE = 128
CHUNK_INFO_SIZE = 80
EXT_BLOB_ENTRY_SIZE = 64
ALIGNMENT = 8
RAFS_V5_MAGIC = 0x52414653
RAFS_V5_VERSION = 0x500
ROOT_INDEX = 1  # child index (and ino) of the root directory
MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 16 << 20
MAX_NAME = 255
MAX_BLOB_ID = 255

# Superblock flags (RafsSuperFlags); v5 only ever sets the low byte.
_COMPRESSORS = {0x1: "none", 0x2: "lz4_block", 0x40: "gzip", 0x80: "zstd"}
_DIGESTERS = {0x4: "blake3", 0x8: "sha256"}
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
_KNOWN_SB_FLAGS = 0xFF

# Inode flags (RafsV5InodeFlags).
INODE_SYMLINK = 0x1
INODE_HARDLINK = 0x2
INODE_XATTR = 0x4
INODE_HAS_HOLE = 0x8
_KNOWN_INODE_FLAGS = 0xF

# Chunk flags (BlobChunkFlags); encrypted/batch chunks do not exist in v5.
CHUNK_COMPRESSED = 0x1
CHUNK_HOLE = 0x2
_KNOWN_CHUNK_FLAGS = 0x3

_SB = struct.Struct("<IIIIQQQQQIIIIQ")  # 80 bytes, the rest of the 8192 is reserved
_INODE = struct.Struct("<32sQQIIIIQQQIIIHHIIQ8x")
_CHUNK = struct.Struct("<32sIIIIQQQII")
_EXT_BLOB = struct.Struct("<IIQQ40x")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BLOB_HEAD = struct.Struct("<II")


def align8(n: int) -> int:
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def _check_range(what: str, start: int, size: int, data_len: int) -> None:
    """A table must start 8-aligned after the superblock and end inside the buffer."""
    if start % ALIGNMENT:
        raise FormatError(f"RAFS v5 {what} offset {start:#x} is not 8-byte aligned")
    if start < SUPERBLOCK_SIZE or start + size > data_len:
        raise FormatError(
            f"RAFS v5 {what} [{start:#x}, {start + size:#x}) is outside the bootstrap "
            f"[{SUPERBLOCK_SIZE:#x}, {data_len:#x})"
        )


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[1] > 0 and b[1] > 0 and a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _one_flag(flags: int, table: dict[int, str], default: str, what: str) -> str:
    hits = [name for bit, name in table.items() if flags & bit]
    if len(hits) > 1:
        raise FormatError(f"RAFS v5 superblock flags {flags:#x} name several {what}s: {hits}")
    return hits[0] if hits else default


def check_entry_name(name: bytes) -> None:
    """A directory entry name: 1..255 bytes, no '/' or NUL, not '.' or '..'."""
    if not name:
        raise FormatError("RAFS v5 inode has an empty name")
    if len(name) > MAX_NAME:
        raise FormatError(f"RAFS v5 inode name is {len(name)} bytes, above {MAX_NAME}")
    if b"/" in name or b"\0" in name:
        raise FormatError(f"RAFS v5 inode name {name!r} contains '/' or NUL")
    if name in (b".", b".."):
        raise FormatError(f"RAFS v5 inode name {name!r} is reserved")


@dataclass(frozen=True, slots=True)
class RafsV5SuperBlock:
    magic: int
    fs_version: int
    sb_size: int
    block_size: int
    flags: int
    inodes_count: int
    inode_table_offset: int
    prefetch_table_offset: int
    blob_table_offset: int
    inode_table_entries: int
    prefetch_table_entries: int
    blob_table_size: int
    ext_blob_table_entries: int
    ext_blob_table_offset: int
    compressor: str
    digester: str

    @classmethod
    def parse(cls, data: bytes) -> RafsV5SuperBlock:
        """Parse and validate the superblock and the placement of every table."""
        n = len(data)
        if n < SUPERBLOCK_SIZE:
            raise FormatError(f"RAFS v5 bootstrap is {n} bytes, shorter than the superblock")
        f = _SB.unpack_from(data, 0)
        (magic, version, sb_size, block_size, flags) = f[:5]
        if magic != RAFS_V5_MAGIC:
            raise FormatError(f"RAFS v5 superblock magic {magic:#x} != {RAFS_V5_MAGIC:#x}")
        if version != RAFS_V5_VERSION:
            raise FormatError(f"RAFS v5 superblock version {version:#x} is not 0x500")
        if sb_size != SUPERBLOCK_SIZE:
            raise FormatError(f"RAFS v5 superblock size {sb_size} != {SUPERBLOCK_SIZE}")
        if block_size & (block_size - 1) or not MIN_CHUNK_SIZE <= block_size <= MAX_CHUNK_SIZE:
            raise FormatError(f"RAFS v5 block (chunk) size {block_size:#x} is invalid")
        if flags & ~_KNOWN_SB_FLAGS:
            raise FormatError(f"RAFS v5 superblock has unknown flags {flags:#x}")
        compressor = _one_flag(flags, _COMPRESSORS, "lz4_block", "compressor")
        digester = _one_flag(flags, _DIGESTERS, "blake3", "digester")
        sb = cls(*f, compressor=compressor, digester=digester)  # type: ignore[misc]
        sb._check_tables(n)
        return sb

    def _check_tables(self, n: int) -> None:
        if self.inode_table_entries == 0:
            raise FormatError("RAFS v5 inode table is empty")
        if self.inodes_count > self.inode_table_entries:
            raise FormatError(
                f"RAFS v5 inodes_count {self.inodes_count} exceeds the inode table's "
                f"{self.inode_table_entries} entries"
            )
        inode_t = (self.inode_table_offset, self.inode_table_entries * 4)
        _check_range("inode table", *inode_t, n)
        blob_t = (self.blob_table_offset, self.blob_table_size)
        _check_range("blob table", *blob_t, n)
        ext_t = (self.ext_blob_table_offset, self.ext_blob_table_entries * EXT_BLOB_ENTRY_SIZE)
        pf_t = (self.prefetch_table_offset, self.prefetch_table_entries * 4)
        tables = [("inode table", inode_t), ("blob table", blob_t)]
        if ext_t[1]:
            _check_range("extended blob table", *ext_t, n)
            tables.append(("extended blob table", ext_t))
        if pf_t[1]:
            _check_range("prefetch table", *pf_t, n)
            tables.append(("prefetch table", pf_t))
        for i, (name_a, a) in enumerate(tables):
            for name_b, b in tables[i + 1 :]:
                if _overlaps(a, b):
                    raise FormatError(f"RAFS v5 {name_a} overlaps the {name_b}")


def inode_table_offset(data: bytes, sb: RafsV5SuperBlock, index: int) -> int:
    """Byte offset of the inode for child ``index`` (1-based) from the inode table."""
    if not 1 <= index <= sb.inode_table_entries:
        raise FormatError(
            f"RAFS v5 child index {index} outside the inode table (1..{sb.inode_table_entries})"
        )
    (entry,) = _U32.unpack_from(data, sb.inode_table_offset + (index - 1) * 4)
    offset = int(entry) << 3
    if offset < SUPERBLOCK_SIZE or offset + INODE_SIZE > len(data):
        raise FormatError(
            f"RAFS v5 inode table entry {index} points at {offset:#x}, outside the bootstrap"
        )
    return offset


@dataclass(frozen=True, slots=True)
class RafsV5BlobEntry:
    """One blob table entry: ``[readahead_offset u32, readahead_size u32, blob_id, NUL]``."""

    readahead_offset: int
    readahead_size: int
    blob_id: str


def parse_blob_table(data: bytes, offset: int, size: int) -> list[RafsV5BlobEntry]:
    """Entries are NUL-separated; the last has no NUL and is followed by < 8 bytes padding."""
    _check_range("blob table", offset, size, len(data))
    out: list[RafsV5BlobEntry] = []
    pos, end = offset, offset + size
    while end - pos > _BLOB_HEAD.size:
        ra_off, ra_size = _BLOB_HEAD.unpack_from(data, pos)
        nul = data.find(b"\0", pos + 8, end)
        stop = end if nul < 0 else nul
        raw = data[pos + 8 : stop]
        if not raw or len(raw) > MAX_BLOB_ID:
            raise FormatError(f"RAFS v5 blob table entry {len(out)} has a bad id length")
        try:
            blob_id = raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(f"RAFS v5 blob table entry {len(out)} id is not ASCII") from None
        if "/" in blob_id or blob_id in (".", "..") or not blob_id.isprintable():
            raise FormatError(f"RAFS v5 blob id {blob_id!r} is not a valid name")
        out.append(RafsV5BlobEntry(ra_off, ra_size, blob_id))
        pos = stop + 1
    if pos < end and any(data[pos:end]):
        raise FormatError("RAFS v5 blob table has trailing garbage")
    return out


@dataclass(frozen=True, slots=True)
class RafsV5ExtBlobEntry:
    """Extended blob table entry (64 B): sizes and chunk count of one blob."""

    chunk_count: int
    features: int
    uncompressed_size: int
    compressed_size: int


def parse_ext_blob_table(data: bytes, offset: int, count: int) -> list[RafsV5ExtBlobEntry]:
    if count == 0:
        return []
    _check_range("extended blob table", offset, count * EXT_BLOB_ENTRY_SIZE, len(data))
    return [
        RafsV5ExtBlobEntry(*_EXT_BLOB.unpack_from(data, offset + i * EXT_BLOB_ENTRY_SIZE))
        for i in range(count)
    ]


def parse_prefetch_table(data: bytes, offset: int, count: int) -> list[int]:
    """Inode numbers (not child indexes upstream; equal for the first link of each inode)."""
    if count == 0:
        return []
    _check_range("prefetch table", offset, count * 4, len(data))
    return list(struct.unpack_from(f"<{count}I", data, offset))


@dataclass(frozen=True, slots=True)
class RafsV5Inode:
    """The 128-byte inode plus the placement of what follows it."""

    offset: int  # of the inode in the bootstrap
    digest: bytes
    parent: int
    ino: int
    uid: int
    gid: int
    projid: int
    mode: int
    size: int
    blocks: int
    flags: int
    nlink: int
    child_index: int
    child_count: int
    name_size: int
    symlink_size: int
    rdev: int
    mtime_nsec: int
    mtime: int

    @classmethod
    def parse(cls, data: bytes, offset: int) -> RafsV5Inode:
        """Parse the inode at ``offset``; its name and symlink target must fit the buffer."""
        if offset % ALIGNMENT or offset < SUPERBLOCK_SIZE or offset + INODE_SIZE > len(data):
            raise FormatError(f"RAFS v5 inode offset {offset:#x} is invalid")
        inode = cls(offset, *_INODE.unpack_from(data, offset))
        if inode.flags & ~_KNOWN_INODE_FLAGS:
            raise FormatError(f"RAFS v5 inode at {offset:#x} has unknown flags {inode.flags:#x}")
        if stat.S_IFMT(inode.mode) not in FILE_TYPES or inode.mode > 0xFFFF:
            raise FormatError(f"RAFS v5 inode at {offset:#x} has invalid mode {inode.mode:#o}")
        if inode.ino == 0 or inode.nlink == 0:
            raise FormatError(f"RAFS v5 inode at {offset:#x} has ino or nlink 0")
        if not 1 <= inode.name_size <= MAX_NAME:
            raise FormatError(f"RAFS v5 inode at {offset:#x} has name size {inode.name_size}")
        is_link = stat.S_ISLNK(inode.mode)
        if is_link != (inode.symlink_size > 0):
            raise FormatError(
                f"RAFS v5 inode at {offset:#x}: symlink size {inode.symlink_size} "
                f"does not match mode {inode.mode:#o}"
            )
        if inode.xattr_offset > len(data):
            raise FormatError(f"RAFS v5 inode at {offset:#x}: name/symlink past the end")
        return inode

    @property
    def name_offset(self) -> int:
        return self.offset + INODE_SIZE

    @property
    def symlink_offset(self) -> int:
        return self.name_offset + align8(self.name_size)

    @property
    def xattr_offset(self) -> int:
        """Where the xattr area (if INODE_XATTR) or else the chunk infos start."""
        return self.symlink_offset + align8(self.symlink_size)

    def name(self, data: bytes) -> bytes:
        return data[self.name_offset : self.name_offset + self.name_size]

    def symlink(self, data: bytes) -> bytes:
        target = data[self.symlink_offset : self.symlink_offset + self.symlink_size]
        if b"\0" in target:
            raise FormatError(f"RAFS v5 symlink target of inode {self.ino} contains NUL")
        return target

    def chunk_offset(self, data: bytes) -> int:
        """Start of the chunk-info array: after the name, symlink and xattr area."""
        if not self.flags & INODE_XATTR:
            return self.xattr_offset
        return self.xattr_offset + 8 + align8(_xattr_size(data, self.xattr_offset))

    def chunk_infos(self, data: bytes) -> list[RafsV5ChunkInfo]:
        """The ``child_count`` chunk infos of a regular file, bounds-checked as a whole."""
        start = self.chunk_offset(data)
        count = self.child_count
        if start + count * CHUNK_INFO_SIZE > len(data):
            raise FormatError(
                f"RAFS v5 inode {self.ino}: {count} chunk infos at {start:#x} run past the end"
            )
        return [RafsV5ChunkInfo.parse(data, start + i * CHUNK_INFO_SIZE) for i in range(count)]


def _xattr_size(data: bytes, offset: int) -> int:
    if offset + 8 > len(data):
        raise FormatError(f"RAFS v5 xattr header at {offset:#x} is past the end")
    (size,) = _U64.unpack_from(data, offset)
    if offset + 8 + size > len(data):
        raise FormatError(f"RAFS v5 xattr area of {size} bytes at {offset:#x} runs past the end")
    return int(size)


def parse_xattrs(data: bytes, offset: int) -> dict[bytes, bytes]:
    """``u64 size`` then pairs of ``u32 pair_size, name, NUL, value``."""
    size = _xattr_size(data, offset)
    pos, end = offset + 8, offset + 8 + size
    out: dict[bytes, bytes] = {}
    while pos < end:
        if end - pos < 4:
            raise FormatError(f"RAFS v5 xattr pair at {pos:#x} has no room for its size")
        (pair_size,) = _U32.unpack_from(data, pos)
        pos += 4
        if pair_size > end - pos:
            raise FormatError(f"RAFS v5 xattr pair at {pos:#x} ({pair_size} B) overruns")
        pair = data[pos : pos + pair_size]
        pos += pair_size
        nul = pair.find(b"\0")
        if nul <= 0:
            raise FormatError("RAFS v5 xattr pair has no name or no NUL after it")
        name = pair[:nul]
        if name in out:
            raise FormatError(f"RAFS v5 xattr {name!r} appears twice")
        out[name] = pair[nul + 1 :]
    return out


@dataclass(slots=True)
class RafsV5ChunkInfo:
    """The 80-byte chunk record (upstream ``RafsV5ChunkInfo``).

    One struct for both formats: v5 bootstraps keep a file's records after its inode
    (:meth:`parse`), v6 bootstraps keep them in the chunk table
    (:class:`nydus.format.rafs_v6.ChunkRecord` is this class; :meth:`unpack`, :meth:`pack`).
    The last u32 is reserved in v5 and holds the chunk's CRC32 in v6.

    Unlike the other results here it is not frozen (treat it as read-only): a chunk table
    can hold millions of records, and a frozen dataclass costs several times as much to build.
    """

    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int = 0

    def pack(self) -> bytes:
        return _CHUNK.pack(*field_values(self))

    @classmethod
    def unpack(cls, buf: bytes | memoryview, off: int) -> RafsV5ChunkInfo:
        """The record at ``off`` of ``buf`` (a v6 chunk table), checking only that it fits."""
        if off + CHUNK_INFO_SIZE > len(buf):
            raise FormatError("chunk info record truncated")
        return cls(*_CHUNK.unpack_from(buf, off))

    @classmethod
    def parse(cls, data: bytes, offset: int) -> RafsV5ChunkInfo:
        """The record at ``offset`` of a v5 bootstrap: after the superblock, v5 flags only."""
        if offset < SUPERBLOCK_SIZE or offset + CHUNK_INFO_SIZE > len(data):
            raise FormatError(f"RAFS v5 chunk info at {offset:#x} is outside the bootstrap")
        ci = cls(*_CHUNK.unpack_from(data, offset))
        if ci.flags & ~_KNOWN_CHUNK_FLAGS:
            raise FormatError(f"RAFS v5 chunk info at {offset:#x} has unknown flags {ci.flags:#x}")
        return ci

    @property
    def compressed(self) -> bool:
        return bool(self.flags & CHUNK_COMPRESSED)

    @property
    def is_hole(self) -> bool:
        return bool(self.flags & CHUNK_HOLE)
