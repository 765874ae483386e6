"""Sources of blob uploads: bytes, paths, file objects, iterables, or iterable factories.

Owns reading the data of one upload attempt in pieces while counting and hashing it, so the
client can refuse to finish an upload whose size or digest is not the announced one, and
knows whether the source can be read again (for restarting a failed upload).

Threading: an :class:`UploadSource` belongs to one upload (one thread).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from nydus.errors import ConfigError, IntegrityError
from nydus.format.oci import BlobCheck, parse_digest

__all__ = ["BlobData", "UploadSource"]

BlobData = (
    bytes
    | bytearray
    | memoryview
    | str
    | os.PathLike[str]
    | BinaryIO
    | Iterable[bytes]
    | Callable[[], Iterable[bytes]]
)


class UploadSource:
    """One blob's data for upload, read in ``chunk_size`` pieces, hashed on the way."""

    def __init__(
        self,
        data: BlobData,
        size: int | None,
        digest: str,
        chunk_size: int,
        digest_known: bool = False,
    ) -> None:
        self.digest = digest
        parse_digest(digest)  # malformed: refused before any byte is read
        # the caller computed the digest while writing the data: it is not hashed again
        # (the size is still checked, and the registry checks the digest on the final PUT)
        self.digest_known = digest_known
        self._chunk = chunk_size
        self._bytes: memoryview | None = None
        self._path: str | None = None
        self._file: BinaryIO | None = None
        self._file_start = 0
        self._factory: Callable[[], Iterable[bytes]] | None = None
        self._iterable: Iterable[bytes] | None = None
        self._used = False
        self._check: BlobCheck | None = None
        if isinstance(data, bytes | bytearray | memoryview):
            self._bytes = memoryview(data).cast("B")
            self.size: int | None = len(self._bytes)
            self.replayable = True
        elif isinstance(data, str | os.PathLike):
            self._path = os.fspath(data)
            try:
                self.size = os.stat(self._path).st_size
            except OSError as e:
                raise ConfigError(f"cannot upload {self._path}: {e}") from None
            self.replayable = True
        elif hasattr(data, "read"):
            self._file = data  # type: ignore[assignment]
            assert self._file is not None
            seekable = False
            try:
                seekable = self._file.seekable()
                if seekable:
                    self._file_start = self._file.tell()
            except (OSError, ValueError):
                seekable = False
            self.replayable = seekable
            self.size = size
            if self.size is None and seekable:
                end = self._file.seek(0, os.SEEK_END)
                self._file.seek(self._file_start)
                self.size = end - self._file_start
        elif callable(data):
            self._factory = data
            self.size = size
            self.replayable = True
        else:
            self._iterable = data
            self.size = size
            self.replayable = False
        if size is not None and self.size is not None and size != self.size:
            raise IntegrityError(f"blob {digest}: size given as {size}, data has {self.size}")

    def _raw_pieces(self, reuse: bool = False) -> Iterator[bytes | bytearray]:
        if self._bytes is not None:
            for off in range(0, len(self._bytes), self._chunk):
                yield bytes(self._bytes[off : off + self._chunk])
        elif self._path is not None:
            with open(self._path, "rb", buffering=0) as f:
                if reuse:
                    yield from _file_pieces(f, self._chunk)
                    return
                while piece := f.read(self._chunk):
                    yield piece
        elif self._file is not None:
            if self.replayable:
                self._file.seek(self._file_start)
            elif self._used:
                raise ConfigError(f"blob {self.digest}: the file object cannot be re-read")
            self._used = True
            while piece := self._file.read(self._chunk):
                yield piece
        elif self._factory is not None:
            yield from self._factory()
        else:
            if self._used:
                raise ConfigError(f"blob {self.digest}: the iterable cannot be re-read")
            self._used = True
            assert self._iterable is not None
            yield from self._iterable

    def chunks(self, reuse: bool = False) -> Iterator[bytes | bytearray]:
        """Pieces of exactly ``chunk_size`` bytes (the last may be shorter), hashed.

        ``reuse``: a path's full pieces are one buffer, read again for the next piece: each
        must be used up (sent) before the next is asked for. A ``chunk_size`` buffer per
        upload instead of a new one per piece: freed pieces of several MiB stay resident in
        the heap of a long-running process (a converter pushing while it builds)."""
        self._check = check = BlobCheck(self.digest, self.size, digest_known=self.digest_known)
        buf = bytearray()
        for piece in self._raw_pieces(reuse):
            if not buf and len(piece) == self._chunk:  # a file's reads: no copy
                check.update(piece)
                yield piece
                continue
            buf += piece
            while len(buf) >= self._chunk:
                out = bytes(buf[: self._chunk])
                del buf[: self._chunk]
                check.update(out)
                yield out
        if buf:
            out = bytes(buf)
            check.update(out)
            yield out

    def read_all(self) -> bytes:
        """All the data (for a monolithic upload), checked like :meth:`check_complete`."""
        data = b"".join(self.chunks())
        self.check_complete()
        return data

    def check_complete(self) -> None:
        """After :meth:`chunks` is exhausted: size and digest must be the announced ones."""
        assert self._check is not None
        self._check.finish()


def _file_pieces(f: io.FileIO, size: int) -> Iterator[bytes | bytearray]:
    """A file in ``size`` pieces read into one buffer (yielded again for every full piece;
    the last, shorter piece is a copy)."""
    buf = bytearray(size)
    view = memoryview(buf)
    while True:
        got = 0
        while got < size and (n := f.readinto(view[got:])):
            got += n
        if got == size:
            yield buf
        else:
            if got:
                yield bytes(view[:got])
            return
