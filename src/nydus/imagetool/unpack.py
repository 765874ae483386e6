"""``unpack``: write the whole tree of an image as a PAX tar.

Everything the format keeps goes into the tar: modes, 32-bit uid/gid, mtimes
with nanoseconds, xattrs (``SCHILY.xattr.*``, binary-safe), hardlinks (later
paths of one inode become hard links), symlinks, devices and fifos. Sockets
cannot be represented in tar and are skipped with a count in the result.
File data is streamed chunk by chunk from the blobs, verified; holes are
zeros. Single-threaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import FormatError, NotFoundError
from ..metadata import ChunkInfo, RafsMetadata, open_bootstrap
from ..storage.blobfile import BlobReader, open_local_blob
from .check import find_blob

__all__ = ["unpack_image", "UnpackResult", "FileReader"]


@dataclass
class UnpackResult:
    entries: int = 0
    bytes: int = 0
    skipped_sockets: int = 0


class FileReader(io.RawIOBase):
    """A file's bytes, assembled from its chunks on demand (holes read as zeros)."""

    def __init__(
        self, size: int, chunks: list[ChunkInfo], read_chunk: Callable[[ChunkInfo], bytes]
    ) -> None:
        self.size = size
        self.chunks = chunks
        self.read_chunk = read_chunk
        self.pos = 0
        self._ci = 0
        self._cur: tuple[int, bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.size:
            return 0
        n = min(len(b), self.size - self.pos)
        while self._ci < len(self.chunks) and (
            self.chunks[self._ci].file_offset + self.chunks[self._ci].uncompressed_size <= self.pos
        ):
            self._ci += 1
        if self._ci < len(self.chunks) and self.chunks[self._ci].file_offset <= self.pos:
            c = self.chunks[self._ci]
            if self._cur is None or self._cur[0] != self._ci:
                self._cur = (self._ci, self.read_chunk(c))
            rel = self.pos - c.file_offset
            piece = self._cur[1][rel : rel + n]
        else:
            nxt = self.chunks[self._ci].file_offset if self._ci < len(self.chunks) else self.size
            piece = bytes(min(n, nxt - self.pos))
        b[: len(piece)] = piece
        self.pos += len(piece)
        return len(piece)


_ACL_KEYS = {
    b"system.posix_acl_access": "SCHILY.acl.access",
    b"system.posix_acl_default": "SCHILY.acl.default",
}
_ACL_TAGS = {0x01: "user", 0x02: "user", 0x04: "group", 0x08: "group", 0x10: "mask", 0x20: "other"}


def acl_to_text(value: bytes) -> str:
    """Binary POSIX ACL xattr (version 2) to the short text form tar uses."""
    if len(value) < 4 or (len(value) - 4) % 8 or int.from_bytes(value[:4], "little") != 2:
        raise FormatError("malformed POSIX ACL xattr")
    parts = []
    for off in range(4, len(value), 8):
        tag = int.from_bytes(value[off : off + 2], "little")
        perm = int.from_bytes(value[off + 2 : off + 4], "little")
        qid = int.from_bytes(value[off + 4 : off + 8], "little")
        name = _ACL_TAGS.get(tag)
        if name is None:
            raise FormatError(f"unknown ACL tag {tag:#x}")
        who = str(qid) if tag in (0x02, 0x08) else ""
        rwx = "".join(c if perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        parts.append(f"{name}:{who}:{rwx}")
    return ",".join(parts)


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def unpack_image(
    bootstrap: str,
    output: str | BinaryIO,
    blob_dir: str | None = None,
    blob_file: str | None = None,
) -> UnpackResult:
    md = open_bootstrap(bootstrap)
    readers: dict[int, BlobReader] = {}
    closers: list[Callable[[], None]] = []

    def reader(idx: int) -> BlobReader:
        r = readers.get(idx)
        if r is None:
            info = md.blobs[idx]
            path = find_blob(info.blob_id, blob_dir, blob_file if len(md.blobs) == 1 else None)
            if path is None:
                if blob_dir is not None:
                    where = f"no file {info.blob_id} in {blob_dir}"
                elif blob_file is not None:
                    where = "--blob is only for images with one blob; give -D"
                else:
                    where = "give -D DIR or --blob FILE"
                raise NotFoundError(f"blob {info.blob_id} not found: {where}")
            r, close = open_local_blob(path, info)
            readers[idx] = r
            closers.append(close)
        return r

    res = UnpackResult()
    kw = {"format": tarfile.PAX_FORMAT, "encoding": "utf-8", "errors": "surrogateescape"}
    try:
        if isinstance(output, str):
            _unpack_to_file(output, lambda f: _write_tar(md, f, kw, reader, res))
        else:
            with tarfile.open(fileobj=output, mode="w|", **kw) as tf:  # type: ignore[call-overload]
                _write_entries(md, tf, reader, res)
    finally:
        for c in closers:
            c()
    return res


def _write_tar(
    md: RafsMetadata,
    f: BinaryIO,
    kw: dict[str, Any],
    reader: Callable[[int], BlobReader],
    res: UnpackResult,
) -> None:
    with tarfile.open(fileobj=f, mode="w", **kw) as tf:
        _write_entries(md, tf, reader, res)


def _unpack_to_file(output: str, write: Callable[[BinaryIO], None]) -> None:
    """Write the tar through a temporary file beside ``output``: a failure leaves nothing."""
    d = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(prefix=".unpack-", suffix=".tar", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_entries(
    md: RafsMetadata, tf: tarfile.TarFile, reader: Callable[[int], BlobReader], res: UnpackResult
) -> None:
    first_path: dict[int, str] = {}
    for path, nid in md.walk():
        a = md.getattr(nid)
        name = "." if path == b"/" else _s(path[1:])
        ti = tarfile.TarInfo(name)
        ti.mode = stat.S_IMODE(a.mode)
        ti.uid, ti.gid = a.uid, a.gid
        ti.uname = ti.gname = ""
        ti.mtime = a.mtime
        pax = {"mtime": f"{a.mtime}.{a.mtime_nsec:09d}"}
        for k, v in sorted(md.xattrs(nid).items()):
            acl_key = _ACL_KEYS.get(k)
            if acl_key:  # tar tools restore ACLs from their text form only
                pax[acl_key] = acl_to_text(v)
            else:
                pax["SCHILY.xattr." + _s(k)] = _s(v)
        ti.pax_headers = pax
        fileobj = None
        if a.is_dir:
            ti.type = tarfile.DIRTYPE
        elif a.nlink > 1 and nid in first_path:
            ti.type = tarfile.LNKTYPE
            ti.linkname = first_path[nid]
        elif a.is_reg:
            first_path[nid] = name
            ti.type = tarfile.REGTYPE
            ti.size = a.size
            chunks = md.chunks(nid)
            fileobj = io.BufferedReader(
                FileReader(a.size, chunks, lambda c: reader(c.blob_index).read_chunk(c)),
                buffer_size=1 << 20,
            )
            res.bytes += a.size
        elif a.is_symlink:
            first_path[nid] = name
            ti.type = tarfile.SYMTYPE
            ti.linkname = _s(md.readlink(nid))
        elif stat.S_ISCHR(a.mode) or stat.S_ISBLK(a.mode):
            first_path[nid] = name
            ti.type = tarfile.CHRTYPE if stat.S_ISCHR(a.mode) else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(a.rdev), os.minor(a.rdev)
        elif stat.S_ISFIFO(a.mode):
            first_path[nid] = name
            ti.type = tarfile.FIFOTYPE
        else:
            res.skipped_sockets += 1
            continue
        tf.addfile(ti, fileobj)
        res.entries += 1
