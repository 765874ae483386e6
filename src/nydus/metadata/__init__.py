"""Open a RAFS bootstrap (v5 or v6) as a read-only :class:`RafsMetadata`.

Owns reading a bootstrap from a path safely: the path must name a regular file (a FIFO, a
device, a socket or a directory is refused at once, never read or waited on) of at most
:data:`MAX_BOOTSTRAP_SIZE` bytes, so a hostile path (``/dev/zero``, a FIFO, a huge file) cannot
make a reader hang or fill memory. A data blob built with ``--blob-inline-meta`` is accepted
too: only its trailing ToC and its ``image.boot`` section are read, never the whole blob.

Also owns checking a bootstrap against an expected ``sha256:HEX`` digest
(:func:`read_verified_bootstrap`): the bytes hashed are the bytes returned, read once, so what
is served is what was checked (no second read of the path between check and use).

Pure functions; safe from any thread (each call uses its own file descriptor).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConfigError, FormatError, IntegrityError
from ..format.oci import parse_digest
from .model import BlobInfo, ChunkInfo, DirEntry, Inode, Nid, RafsMetadata

if TYPE_CHECKING:
    from ..format.blob_meta import TocEntry

__all__ = [
    "MAX_BOOTSTRAP_SIZE",
    "open_bootstrap",
    "parse_bootstrap_digest",
    "read_bootstrap_file",
    "read_verified_bootstrap",
    "verify_bootstrap_digest",
    "BlobInfo",
    "ChunkInfo",
    "Nid",
    "DirEntry",
    "Inode",
    "RafsMetadata",
]

EROFS_MAGIC = 0xE0F5E1E2
RAFS_V5_MAGIC = 0x52414653

#: Largest bootstrap read into memory. Bootstraps of images with a million files stay well
#: below this; anything bigger is refused with this limit named in the message.
MAX_BOOTSTRAP_SIZE = 512 << 20


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _pread_exact(fd: int, size: int, offset: int, name: str) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        part = os.pread(fd, min(size - got, 8 << 20), offset + got)
        if not part:
            raise FormatError(f"bootstrap {name} is shorter than its header says")
        chunks.append(part)
        got += len(part)
    return b"".join(chunks)


def read_bootstrap_file(path: str | os.PathLike[str], max_size: int = MAX_BOOTSTRAP_SIZE) -> bytes:
    """The bytes of the bootstrap at ``path`` (or of the bootstrap inlined in a data blob).

    Opened with ``O_NONBLOCK`` so a FIFO cannot block the open, then checked with ``fstat``:
    only a regular file of at most ``max_size`` bytes is read. Symlinks are followed (the
    snapshotter and users point at bootstraps through them); what they lead to is checked.
    """
    name = os.fsdecode(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise FormatError(f"cannot read bootstrap {name}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"bootstrap {name} is {_kind(st.st_mode)}, not a regular file")
        try:
            head = _pread_exact(fd, min(st.st_size, 1028), 0, name)
            if _has_magic(head):
                if st.st_size > max_size:
                    raise FormatError(
                        f"bootstrap {name} is {_human(st.st_size)}, over the "
                        f"{_human(max_size)} limit"
                    )
                return _pread_exact(fd, st.st_size, 0, name)
            inner = _inlined_bootstrap_file(fd, st.st_size, name, max_size)
        except OSError as e:
            raise FormatError(f"cannot read bootstrap {name}: {e.strerror}") from e
        if inner is None:
            if st.st_size > max_size:
                raise FormatError(
                    f"bootstrap {name} is {_human(st.st_size)}, over the {_human(max_size)} limit"
                )
            raise FormatError(
                f"{name} is not a RAFS bootstrap: no EROFS magic at 1024 and no RAFS v5 magic at 0"
            )
        return inner
    finally:
        os.close(fd)


def parse_bootstrap_digest(digest: str) -> str:
    """``digest`` normalised to ``sha256:`` + 64 lowercase hex digits; anything else is a
    :class:`ConfigError` (a usage mistake, not a bad image)."""
    algo, _, hexpart = digest.strip().partition(":")
    if algo == "sha256":
        with contextlib.suppress(FormatError):
            return "sha256:" + parse_digest(f"sha256:{hexpart.lower()}")[1]
    raise ConfigError(f"bootstrap digest {digest[:80]!r} is not of the form sha256:<64 hex digits>")


def verify_bootstrap_digest(data: bytes, expected: str, name: str) -> None:
    """Raise :class:`IntegrityError` unless ``sha256(data)`` is ``expected``."""
    want = parse_bootstrap_digest(expected)
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != want:
        raise IntegrityError(f"bootstrap {name} is {got}, expected {want}: refusing to mount")


def read_verified_bootstrap(path: str | os.PathLike[str], expected: str) -> bytes:
    """The bootstrap at ``path`` (see :func:`read_bootstrap_file`), checked against
    ``expected`` (``sha256:HEX``): the digest is of exactly the bytes returned, which for a
    data blob with an inlined bootstrap are the inlined bootstrap's."""
    parse_bootstrap_digest(expected)  # a malformed digest is refused before any read
    data = read_bootstrap_file(path)
    verify_bootstrap_digest(data, expected, os.fsdecode(path))
    return data


def _has_magic(data: bytes) -> bool:
    if len(data) >= 1028 and int.from_bytes(data[1024:1028], "little") == EROFS_MAGIC:
        return True
    return len(data) >= 4 and int.from_bytes(data[0:4], "little") == RAFS_V5_MAGIC


def open_bootstrap(path: str | os.PathLike[str] | bytes) -> RafsMetadata:
    """Open a bootstrap file or bytes, detecting its version from the magic."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        data = bytes(path)
        if not _has_magic(data):
            inner = _inlined_bootstrap_bytes(data)
            if inner is None:
                raise FormatError(
                    "not a RAFS bootstrap: no EROFS magic at 1024 and no RAFS v5 magic at 0"
                )
            data = inner
    else:
        data = read_bootstrap_file(path)
    if len(data) >= 1028 and int.from_bytes(data[1024:1028], "little") == EROFS_MAGIC:
        from .v6 import RafsV6Metadata

        return RafsV6Metadata(data)
    if len(data) >= 4 and int.from_bytes(data[0:4], "little") == RAFS_V5_MAGIC:
        from .v5 import RafsV5Metadata

        return RafsV5Metadata(data)
    raise FormatError("not a RAFS bootstrap: no EROFS magic at 1024 and no RAFS v5 magic at 0")


def _inlined_bootstrap_bytes(data: bytes) -> bytes | None:
    """:func:`_inlined_bootstrap` over bytes already in memory."""

    def read_at(size: int, offset: int) -> bytes:
        if offset < 0 or offset + size > len(data):
            raise FormatError("inlined bootstrap section is out of range")
        return data[offset : offset + size]

    return _inlined_bootstrap(read_at, len(data), "<bytes>", max(len(data), 1))


def _inlined_bootstrap_file(fd: int, size: int, name: str, max_size: int) -> bytes | None:
    """:func:`_inlined_bootstrap` over an open file."""
    return _inlined_bootstrap(lambda n, off: _pread_exact(fd, n, off, name), size, name, max_size)


def _inlined_bootstrap(
    read_at: Callable[[int, int], bytes], size: int, name: str, max_size: int
) -> bytes | None:
    """The ``image.boot`` section of a data blob built with --blob-inline-meta, or None.

    As upstream reads it: with a ToC (``rafs.blob.toc`` the last section), its ``image.boot``
    entry, which upstream's builder stores zstd-compressed (the entry's flags name the
    compression; its digest is the sha256 of the uncompressed bootstrap); without a ToC
    (older upstream builds), the last section itself when it is ``image.boot``: the bootstrap,
    uncompressed, right before its trailing tar header. Reads only the trailing tar header,
    the section it frames and the bootstrap, through ``read_at(size, offset)``; every size is
    bounded (``max_size`` for the bootstrap, 1 MiB for the ToC).
    """
    from ..format import blob_meta as bm

    if size < bm.TAR_BLOCK:
        return None
    trailer = read_at(bm.TAR_BLOCK, size - bm.TAR_BLOCK)
    if trailer[257:262] != b"ustar":
        return None
    sect_name, sect_size = bm.parse_tar_header(trailer)
    if sect_size + bm.TAR_BLOCK > size:
        return None
    if sect_name == bm.TOC_ENTRY_BOOTSTRAP:
        if sect_size > max_size:
            raise FormatError(
                f"bootstrap inlined in {name} is {_human(sect_size)}, over the "
                f"{_human(max_size)} limit"
            )
        return read_at(sect_size, size - bm.TAR_BLOCK - sect_size)
    if sect_name != bm.TOC_ENTRY_BLOB_TOC:
        return None
    if sect_size > 1 << 20:
        raise FormatError(f"blob ToC of {name} is {_human(sect_size)}, over the 1 MiB limit")
    toc = read_at(sect_size, size - bm.TAR_BLOCK - sect_size)
    for e in bm.unpack_toc(toc):
        if e.name == bm.TOC_ENTRY_BOOTSTRAP:
            return _toc_bootstrap(read_at, size, name, max_size, e)
    return None


def _toc_bootstrap(
    read_at: Callable[[int, int], bytes], size: int, name: str, max_size: int, e: TocEntry
) -> bytes:
    """The bootstrap a ToC entry names: read, decompressed as its flags say, checked."""
    from .. import codec
    from ..format import blob_meta as bm

    end = e.compressed_offset + e.compressed_size
    if end > size:
        raise FormatError("inlined bootstrap entry is out of range")
    if e.uncompressed_size > max_size or e.compressed_size > max_size:
        raise FormatError(
            f"bootstrap inlined in {name} is {_human(e.uncompressed_size)}, "
            f"over the {_human(max_size)} limit"
        )
    raw = read_at(e.compressed_size, e.compressed_offset)
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
