"""Data-blob framing: chunk-info (ci) arrays v1/v2, the 4 KiB ci header, the
ToC and the trailing ("reverse") tar headers (nydus-reference.md §2.2).

A native blob is laid out as::

    chunk data | tar hdr "image.blob"
    ci array (maybe compressed) | ci header (4096 B) | tar hdr "blob.meta"
    chunk digest array (32 B each) | tar hdr "blob.digest"
    ToC (128 B entries) | tar hdr "rafs.blob.toc"

Each tar header *follows* its section, so the blob can be written as a stream
and parsed from the end. Pure bytes in and out; stateless and thread-safe.
"""

from __future__ import annotations

import operator
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, overload

from ..errors import FormatError
from .record import field_values

BLOB_META_MAGIC = 0xB10BB10B
CI_HEADER_SIZE = 4096
CI_V1_SIZE = 16
CI_V2_SIZE = 24
TOC_ENTRY_SIZE = 128
TAR_BLOCK = 512

TOC_ENTRY_BLOB_RAW = "image.blob"
TOC_ENTRY_BLOB_META = "blob.meta"
TOC_ENTRY_BLOB_META_HEADER = "blob.meta.header"
TOC_ENTRY_BLOB_DIGEST = "blob.digest"
TOC_ENTRY_BOOTSTRAP = "image.boot"
TOC_ENTRY_BLOB_TOC = "rafs.blob.toc"

TOC_FLAG_COMPRESSION_NONE = 0x1
TOC_FLAG_COMPRESSION_ZSTD = 0x2
TOC_FLAG_COMPRESSION_LZ4 = 0x4
TOC_COMPRESSION = {
    "none": TOC_FLAG_COMPRESSION_NONE,
    "zstd": TOC_FLAG_COMPRESSION_ZSTD,
    "lz4_block": TOC_FLAG_COMPRESSION_LZ4,
}

CI_V2_FLAG_COMPRESSED = 0x1
CI_V2_FLAG_ZRAN = 0x2
CI_V2_FLAG_BATCH = 0x4
CI_V2_FLAG_ENCRYPTED = 0x8
CI_V2_FLAG_HAS_CRC32 = 0x10

MAX_CHUNK_FIELD = 1 << 24


# --------------------------------------------------------------------------- ci header

_HDR = struct.Struct("<IIIIQQQQQI")


@dataclass
class CiHeader:
    features: int
    ci_compressor: int
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int = 0
    zran_size: int = 0
    zran_count: int = 0

    def pack(self) -> bytes:
        head = _HDR.pack(BLOB_META_MAGIC, *field_values(self))
        return head.ljust(CI_HEADER_SIZE - 4, b"\0") + struct.pack("<I", BLOB_META_MAGIC)

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> CiHeader:
        if len(buf) < CI_HEADER_SIZE:
            raise FormatError("blob meta header truncated")
        v = _HDR.unpack_from(buf, 0)
        magic2 = struct.unpack_from("<I", buf, CI_HEADER_SIZE - 4)[0]
        if v[0] != BLOB_META_MAGIC or magic2 != BLOB_META_MAGIC:
            raise FormatError("bad blob meta header magic")
        return cls(*v[1:])


# --------------------------------------------------------------------------- chunk info


@dataclass(frozen=True)
class CiEntry:
    """One chunk's place in a blob, as stored in the blob's ci array."""

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    flags: int = 0
    data: int = 0  # v2: zran/batch context or crc32


def pack_ci_v1(e: CiEntry) -> bytes:
    if e.uncompressed_offset & 0xFFF:
        raise FormatError("ci v1 needs 4 KiB aligned uncompressed offsets")
    us = e.uncompressed_size - 1
    cs = e.compressed_size - 1
    if not (0 <= us < MAX_CHUNK_FIELD and 0 <= cs < MAX_CHUNK_FIELD):
        raise FormatError("chunk too large for ci v1")
    uncomp = (
        (e.uncompressed_offset & 0xFFF_FFFF_F000) | ((us >> 20) & 0xF) << 8 | (us & 0xFFFFF) << 44
    )
    comp = (e.compressed_offset & 0xFF_FFFF_FFFF) | ((cs >> 20) & 0xF) << 40 | (cs & 0xFFFFF) << 44
    return struct.pack("<QQ", uncomp, comp)


def unpack_ci_v1(buf: bytes | memoryview, off: int) -> CiEntry:
    uncomp, comp = struct.unpack_from("<QQ", buf, off)
    uoff = uncomp & 0xFFF_FFFF_F000
    usize = ((uncomp >> 44) | (((uncomp >> 8) & 0xF) << 20)) + 1
    coff = comp & 0xFF_FFFF_FFFF
    csize = ((comp >> 44) | (((comp >> 40) & 0xF) << 20)) + 1
    return CiEntry(coff, csize, uoff, usize, csize != usize)


def pack_ci_v2(e: CiEntry) -> bytes:
    us = e.uncompressed_size - 1
    if e.uncompressed_offset & 0xFFF or not 0 <= us < MAX_CHUNK_FIELD:
        raise FormatError("ci v2 needs 4 KiB aligned offsets and sizes of at most 16 MiB")
    if not 0 <= e.compressed_size < MAX_CHUNK_FIELD or e.compressed_offset >> 40:
        raise FormatError("chunk does not fit ci v2 (compressed size or offset too large)")
    flags = e.flags | (CI_V2_FLAG_COMPRESSED if e.compressed else 0)
    uncomp = (e.uncompressed_offset >> 12) | us << 32 | flags << 56
    return struct.pack("<QQQ", uncomp, e.compressed_offset | e.compressed_size << 40, e.data)


def unpack_ci_v2(buf: bytes | memoryview, off: int) -> CiEntry:
    uncomp, comp, data = struct.unpack_from("<QQQ", buf, off)
    flags = uncomp >> 56
    return CiEntry(
        compressed_offset=comp & 0xFF_FFFF_FFFF,
        compressed_size=comp >> 40,
        uncompressed_offset=(uncomp & 0xFFFFFFFF) << 12,
        uncompressed_size=((uncomp >> 32) & 0xFFFFFF) + 1,
        compressed=bool(flags & CI_V2_FLAG_COMPRESSED),
        flags=flags,
        data=data,
    )


T = TypeVar("T")


class _Table(Sequence[T]):
    """A read-only sequence of records made on the spot from compact storage: a subclass
    gives ``__len__`` and ``_at`` (a valid, non-negative index)."""

    __slots__ = ()

    def _at(self, i: int) -> T:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> T: ...

    @overload
    def __getitem__(self, i: slice) -> list[T]: ...

    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(len(self)))]
        return self._at(range(len(self))[i])  # negative indexes and IndexError as a list's

    def __iter__(self) -> Iterator[T]:
        return (self._at(i) for i in range(len(self)))


class CiArray(_Table[CiEntry]):
    """A blob's ci array as columns, 8 bytes a field per chunk (``array('Q')``; 49 bytes a
    chunk in all), instead of an object per chunk: a 1.3 GB image has 40k chunks, which as
    :class:`CiEntry` objects took 10 MB of nydusd and 0.13 s to unpack on a blob's first
    read. Indexing gives a :class:`CiEntry` made on the spot; the columns serve loops over
    every chunk."""

    __slots__ = ("coff", "compressed", "csize", "data", "flags", "uoff", "usize")

    def __init__(
        self,
        coff: array[int],
        csize: array[int],
        uoff: array[int],
        usize: array[int],
        flags: array[int],
        data: array[int],
        compressed: bytes,
    ) -> None:
        n = len(coff)
        if not all(len(c) == n for c in (csize, uoff, usize, flags, data, compressed)):
            raise ValueError("ci columns of different lengths")
        self.coff, self.csize, self.uoff, self.usize = coff, csize, uoff, usize
        self.flags, self.data, self.compressed = flags, data, compressed

    @classmethod
    def of(cls, entries: Iterable[CiEntry]) -> CiArray:
        es = list(entries)
        return cls(
            array("Q", [e.compressed_offset for e in es]),
            array("Q", [e.compressed_size for e in es]),
            array("Q", [e.uncompressed_offset for e in es]),
            array("Q", [e.uncompressed_size for e in es]),
            array("Q", [e.flags for e in es]),
            array("Q", [e.data for e in es]),
            bytes(bool(e.compressed) for e in es),
        )

    def __len__(self) -> int:
        return len(self.coff)

    def _at(self, i: int) -> CiEntry:
        return CiEntry(
            self.coff[i],
            self.csize[i],
            self.uoff[i],
            self.usize[i],
            bool(self.compressed[i]),
            self.flags[i],
            self.data[i],
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CiArray):
            return all(getattr(self, k) == getattr(other, k) for k in CiArray.__slots__)
        if isinstance(other, Sequence):
            return len(other) == len(self) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


class DigestArray(_Table[bytes]):
    """A blob's chunk digest array (``blob.digest``, 32 bytes a chunk) kept as the one
    ``bytes`` it came in; indexing slices a digest out (a list of 40k took 2.6 MB)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) % 32:
            raise FormatError(f"digest array of {len(raw)} bytes: not 32 a chunk")
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw) // 32

    def _at(self, i: int) -> bytes:
        return self.raw[32 * i : 32 * i + 32]


def unpack_ci_array(buf: bytes | memoryview, count: int, v2: bool) -> CiArray:
    size = CI_V2_SIZE if v2 else CI_V1_SIZE
    if count * size > len(buf):
        raise FormatError(f"ci array holds {len(buf) // size} entries, header says {count}")
    words = array("Q", bytes(buf[: count * size]))
    if sys.byteorder == "big":
        words.byteswap()  # the format is little endian
    if v2:  # see unpack_ci_v2
        uncomp, comp, data = words[0::3], words[1::3], words[2::3]
        flags = array("Q", [u >> 56 for u in uncomp])
        return CiArray(
            array("Q", [c & 0xFF_FFFF_FFFF for c in comp]),
            array("Q", [c >> 40 for c in comp]),
            array("Q", [(u & 0xFFFFFFFF) << 12 for u in uncomp]),
            array("Q", [((u >> 32) & 0xFFFFFF) + 1 for u in uncomp]),
            flags,
            data,
            bytes(f & CI_V2_FLAG_COMPRESSED for f in flags),
        )
    uncomp, comp = words[0::2], words[1::2]  # see unpack_ci_v1
    csize = array("Q", [((c >> 44) | (((c >> 40) & 0xF) << 20)) + 1 for c in comp])
    usize = array("Q", [((u >> 44) | (((u >> 8) & 0xF) << 20)) + 1 for u in uncomp])
    return CiArray(
        array("Q", [c & 0xFF_FFFF_FFFF for c in comp]),
        csize,
        array("Q", [u & 0xFFF_FFFF_F000 for u in uncomp]),
        usize,
        array("Q", bytes(8 * count)),
        array("Q", bytes(8 * count)),
        bytes(map(operator.ne, csize, usize)),
    )


# --------------------------------------------------------------------------- ToC

_TOC = struct.Struct("<II16s32sQQQ48x")


@dataclass
class TocEntry:
    flags: int
    name: str
    digest: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    def pack(self) -> bytes:
        return _TOC.pack(
            self.flags,
            0,
            self.name.encode().ljust(16, b"\0"),
            self.digest,
            self.compressed_offset,
            self.compressed_size,
            self.uncompressed_size,
        )

    @classmethod
    def unpack(cls, buf: bytes | memoryview, off: int) -> TocEntry:
        flags, _r, name, digest, coff, csize, usize = _TOC.unpack_from(buf, off)
        try:
            sname = bytes(name).rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise FormatError("ToC entry name is not ASCII") from None
        return cls(flags, sname, bytes(digest), coff, csize, usize)


def unpack_toc(buf: bytes | memoryview) -> list[TocEntry]:
    if len(buf) % TOC_ENTRY_SIZE:
        raise FormatError(f"ToC size {len(buf)} is not a multiple of {TOC_ENTRY_SIZE}")
    return [TocEntry.unpack(buf, i) for i in range(0, len(buf), TOC_ENTRY_SIZE)]


# --------------------------------------------------------------------------- tar framing


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header upstream appends after each blob section."""
    hdr = bytearray(TAR_BLOCK)
    nb = name.encode()
    hdr[0 : len(nb)] = nb
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"%011o\0" % 0
    hdr[156] = ord("0")
    hdr[257:265] = b"ustar  \0"
    hdr[148:156] = b" " * 8
    chk = sum(hdr)
    hdr[148:156] = b"%07o\0" % chk
    return bytes(hdr)


def parse_tar_header(buf: bytes | memoryview) -> tuple[str, int]:
    """(name, size) of a trailing section header; validates the checksum."""
    if len(buf) != TAR_BLOCK:
        raise FormatError("tar header truncated")
    b = bytes(buf)
    if b[257:262] != b"ustar":
        raise FormatError("blob section header has no ustar magic")
    try:
        chk = int(b[148:156].strip(b"\0 ") or b"0", 8)
        size = int(b[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise FormatError("blob section tar header has bad octal fields") from None
    if chk != sum(b[:148]) + 8 * 32 + sum(b[156:]):
        raise FormatError("blob section tar header checksum mismatch")
    name = b[:100].split(b"\0", 1)[0].decode("ascii", "replace")
    return name, size
