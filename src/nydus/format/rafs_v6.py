"""RAFS v6 additions to EROFS: extended superblock, blob table, chunk indexes.

Pure structures (nydus-reference.md §2.1). The extended superblock lives at
byte 1152, the device table at 1408 (slot offset 11), the blob table and the
prefetch table after the EROFS metadata, then the legacy chunk-info table of
80-byte ``RafsV5ChunkInfo`` records. Stateless and thread-safe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import FormatError
from .rafs_v5 import CHUNK_INFO_SIZE as CHUNK_INFO_SIZE  # re-exported: the chunk record size
from .rafs_v5 import RafsV5ChunkInfo
from .record import field_values

EXT_SB_OFFSET = 1152
EXT_SB_SIZE = 256
DEVTABLE_OFFSET = 1408
DEVT_SLOTOFF = DEVTABLE_OFFSET // 128
BLOB_ENTRY_SIZE = 256
MAX_BLOBS = 255
MAX_CHUNKS_PER_BLOB = 1 << 24
MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x1000000

# RafsSuperFlags
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200
FLAG_ENCRYPTION_NONE = 0x0100_0000
FLAG_ENCRYPTION_AES_128_XTS = 0x0200_0000

COMPRESSION_FLAGS = {
    "none": FLAG_COMPRESSION_NONE,
    "lz4_block": FLAG_COMPRESSION_LZ4,
    "gzip": FLAG_COMPRESSION_GZIP,
    "zstd": FLAG_COMPRESSION_ZSTD,
}
DIGEST_FLAGS = {"blake3": FLAG_HASH_BLAKE3, "sha256": FLAG_HASH_SHA256}


def compressor_from_flags(flags: int) -> str:
    found = [n for n, f in COMPRESSION_FLAGS.items() if flags & f]
    if len(found) != 1:
        raise FormatError(f"superblock flags {flags:#x} do not name exactly one compressor")
    return found[0]


def digester_from_flags(flags: int) -> str:
    found = [n for n, f in DIGEST_FLAGS.items() if flags & f]
    if len(found) != 1:
        raise FormatError(f"superblock flags {flags:#x} do not name exactly one digester")
    return found[0]


# BlobFeatures
BLOB_FEATURE_ALIGNED = 0x1
BLOB_FEATURE_INLINED_FS_META = 0x2
BLOB_FEATURE_CHUNK_INFO_V2 = 0x4
BLOB_FEATURE_ZRAN = 0x8
BLOB_FEATURE_SEPARATE = 0x10
BLOB_FEATURE_INLINED_CHUNK_DIGEST = 0x20
BLOB_FEATURE_TARFS = 0x40
BLOB_FEATURE_BATCH = 0x80
BLOB_FEATURE_ENCRYPTED = 0x100
BLOB_FEATURE_HAS_TAR_HEADER = 0x1000_0000
BLOB_FEATURE_HAS_TOC = 0x2000_0000
BLOB_FEATURE_CAP_TAR_TOC = 0x4000_0000
BLOB_FEATURE_NAMES = {  # upstream's BlobFeatures names, lower case
    BLOB_FEATURE_ALIGNED: "aligned",
    BLOB_FEATURE_INLINED_FS_META: "inlined_fs_meta",
    BLOB_FEATURE_CHUNK_INFO_V2: "chunk_info_v2",
    BLOB_FEATURE_ZRAN: "zran",
    BLOB_FEATURE_SEPARATE: "separate",
    BLOB_FEATURE_INLINED_CHUNK_DIGEST: "inlined_chunk_digest",
    BLOB_FEATURE_TARFS: "tarfs",
    BLOB_FEATURE_BATCH: "batch",
    BLOB_FEATURE_ENCRYPTED: "encrypted",
    BLOB_FEATURE_HAS_TAR_HEADER: "has_tar_header",
    BLOB_FEATURE_HAS_TOC: "has_toc",
    BLOB_FEATURE_CAP_TAR_TOC: "cap_tar_toc",
}


def feature_names(features: int) -> list[str]:
    """The names of the blob feature bits set in ``features`` (unknown bits in hex)."""
    names = [n for bit, n in BLOB_FEATURE_NAMES.items() if features & bit]
    rest = features & ~sum(BLOB_FEATURE_NAMES)
    if rest:
        names.append(hex(rest))
    return names


_EXT = struct.Struct("<QQIIQQQII200x")


@dataclass
class ExtSuperBlock:
    flags: int
    blob_table_offset: int
    blob_table_size: int
    chunk_size: int
    chunk_table_offset: int
    chunk_table_size: int
    prefetch_table_offset: int
    prefetch_table_size: int

    def pack(self) -> bytes:
        return _EXT.pack(*field_values(self), 0)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> ExtSuperBlock:
        if len(buf) < EXT_SB_OFFSET + EXT_SB_SIZE:
            raise FormatError("RAFS v6 extended superblock truncated")
        v = _EXT.unpack_from(buf, EXT_SB_OFFSET)
        return cls(*v[:8])


_BLOB = struct.Struct("<64sIIIIIIQQIIQQQ32s32sQQI36x")


@dataclass
class BlobEntry:
    blob_id: str
    blob_index: int
    chunk_size: int
    chunk_count: int
    compression_algo: int
    digest_algo: int
    features: int
    compressed_size: int
    uncompressed_size: int
    blob_toc_size: int = 0
    ci_compressor: int = 0
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_digest: bytes = b"\0" * 32
    blob_meta_digest: bytes = b"\0" * 32
    blob_meta_size: int = 0
    cipher_iv: int = 0
    cipher_algo: int = 0

    def pack(self) -> bytes:
        blob_id, *rest = field_values(self)
        return _BLOB.pack(blob_id.encode().ljust(64, b"\0"), *rest)

    @classmethod
    def unpack(cls, buf: bytes | memoryview, off: int) -> BlobEntry:
        if off + BLOB_ENTRY_SIZE > len(buf):
            raise FormatError("blob table entry truncated")
        v = list(_BLOB.unpack_from(buf, off))
        raw_id = bytes(v[0]).rstrip(b"\0")
        try:
            blob_id = raw_id.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("blob id is not ASCII") from None
        if not blob_id or not blob_id.isprintable() or "/" in blob_id:
            raise FormatError(f"invalid blob id {raw_id!r}")
        v[0] = blob_id
        v[14] = bytes(v[14])
        v[15] = bytes(v[15])
        return cls(*v)


# --------------------------------------------------------------------------- chunk index


def pack_chunk_index(blob_index: int, ci_index: int, blkaddr: int) -> bytes:
    """8-byte chunk index: device = blob index + 1, 24-bit ci index, block address."""
    lo = ci_index & 0xFFFF
    hi = ((blob_index + 1) & 0xFF) | (((ci_index >> 16) & 0xFF) << 8)
    return struct.pack("<HHI", lo, hi, blkaddr)


def unpack_chunk_index(buf: bytes | memoryview, off: int) -> tuple[int, int, int]:
    """(device_id, ci_index, blkaddr); device 0 with blkaddr NULL_ADDR is a hole."""
    lo, hi, blkaddr = struct.unpack_from("<HHI", buf, off)
    return hi & 0xFF, lo | ((hi >> 8) << 16), blkaddr


# --------------------------------------------------------------------------- chunk table

CHUNK_FLAG_COMPRESSED = 0x1
CHUNK_FLAG_HOLECHUNK = 0x2
CHUNK_FLAG_ENCRYPTED = 0x4
CHUNK_FLAG_BATCH = 0x8

#: The 80-byte chunk record of the chunk table: upstream's ``RafsV5ChunkInfo``, the same
#: struct as in v5 bootstraps (its last u32, reserved in v5, holds the chunk's CRC32 here).
ChunkRecord = RafsV5ChunkInfo
