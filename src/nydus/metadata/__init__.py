"""Open a RAFS bootstrap (v5 or v6) as a read-only :class:`RafsMetadata`."""

from __future__ import annotations

import os

from ..errors import FormatError
from .model import BlobInfo, ChunkInfo, DirEntry, Inode, RafsMetadata

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
    raise FormatError("not a RAFS bootstrap: no EROFS magic at 1024 and no RAFS v5 magic at 0")
