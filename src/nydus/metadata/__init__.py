"""Open a RAFS bootstrap (v5 or v6) as a read-only :class:`RafsMetadata`."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

from ..errors import FormatError
from .model import BlobInfo, ChunkInfo, DirEntry, Inode, RafsMetadata

if TYPE_CHECKING:
    from ..format.blob_meta import TocEntry

__all__ = ["open_bootstrap", "BlobInfo", "ChunkInfo", "DirEntry", "Inode", "RafsMetadata"]

EROFS_MAGIC = 0xE0F5E1E2
RAFS_V5_MAGIC = 0x52414653


def open_bootstrap(path: str | os.PathLike[str] | bytes) -> RafsMetadata:
    """Open a bootstrap file or bytes, detecting its version from the magic."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        data = bytes(path)
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise FormatError(f"cannot read bootstrap {os.fsdecode(path)}: {e.strerror}") from e
    if len(data) >= 1028 and int.from_bytes(data[1024:1028], "little") == EROFS_MAGIC:
        from .v6 import RafsV6Metadata

        return RafsV6Metadata(data)
    if len(data) >= 4 and int.from_bytes(data[0:4], "little") == RAFS_V5_MAGIC:
        from .v5 import RafsV5Metadata

        return RafsV5Metadata(data)
    inner = _inlined_bootstrap(data)
    if inner is not None:
        return open_bootstrap(inner)
    raise FormatError("not a RAFS bootstrap: no EROFS magic at 1024 and no RAFS v5 magic at 0")


def _inlined_bootstrap(data: bytes) -> bytes | None:
    """The ``image.boot`` section of a data blob built with --blob-inline-meta.

    As upstream reads it: with a ToC (``rafs.blob.toc`` the last section), its ``image.boot``
    entry, which upstream's builder stores zstd-compressed (the entry's flags name the
    compression; its digest is the sha256 of the uncompressed bootstrap); without a ToC
    (older upstream builds), the last section itself when it is ``image.boot``: the bootstrap,
    uncompressed, right before its trailing tar header.
    """
    from ..format import blob_meta as bm

    if len(data) < bm.TAR_BLOCK or data[-bm.TAR_BLOCK + 257 : -bm.TAR_BLOCK + 262] != b"ustar":
        return None
    name, size = bm.parse_tar_header(data[-bm.TAR_BLOCK :])
    if size + bm.TAR_BLOCK > len(data):
        return None
    section = data[-bm.TAR_BLOCK - size : -bm.TAR_BLOCK]
    if name == bm.TOC_ENTRY_BOOTSTRAP:
        return section
    if name != bm.TOC_ENTRY_BLOB_TOC:
        return None
    for e in bm.unpack_toc(section):
        if e.name == bm.TOC_ENTRY_BOOTSTRAP:
            return _toc_bootstrap(data, e)
    return None


def _toc_bootstrap(data: bytes, e: TocEntry) -> bytes:
    from .. import codec
    from ..format import blob_meta as bm

    end = e.compressed_offset + e.compressed_size
    if end > len(data) or e.uncompressed_size > 1 << 32:
        raise FormatError("inlined bootstrap entry is out of range")
    raw = data[e.compressed_offset : end]
    names = {f: n for n, f in bm.TOC_COMPRESSION.items()}
    kind = names.get(e.flags & 0x7)
    if kind is None:
        raise FormatError(f"inlined bootstrap: unknown compression flags {e.flags:#x}")
    if kind == "none":
        if e.compressed_size != e.uncompressed_size:
            raise FormatError("inlined bootstrap: stored sizes differ without compression")
        boot = raw
    else:
        boot = codec.decompress(codec.compressor_by_name(kind), raw, e.uncompressed_size)
    if hashlib.sha256(boot).digest() != e.digest:
        raise FormatError("inlined bootstrap digest mismatch")
    return boot
