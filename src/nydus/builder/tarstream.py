"""The uncompressed bytes of an OCI layer, read once from a file or pipe.

:class:`LayerStream` sniffs the compression from the first bytes (gzip ``1f 8b``, zstd
``28 b5 2f fd``, anything else is a plain tar), decompresses on the fly in bounded pieces (a
decompression bomb costs time, never memory), hashes every uncompressed byte with sha256 (the
layer's ``diff_id``) and hands out exact-length reads to the tar parser.

Strictness: a truncated gzip member or zstd frame is a :class:`~nydus.errors.FormatError`
(python-zstandard's stream reader stops silently mid-frame, so the zstd frame and block
headers are followed on the compressed side, see :class:`_ZstdFrames`); gzip is inflated by
ISA-L (``isal``: twice zlib's speed, same strictness); concatenated gzip
members and zstd frames are read as one stream (as ``gzip -d`` and ``zstd -d`` do); zero
padding after the last gzip member is accepted, anything else after it is an error.

Threading: one consumer reads a stream. Reading the input, decompressing and hashing run on
a producer thread of the stream's own (the C code releases the GIL, so this overlaps with the
consumer's parsing and chunking), handing pieces over through a queue of :data:`QUEUE_DEPTH`
pieces; :meth:`LayerStream.close` stops it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO, cast

import zstandard
from isal import isal_zlib

from ..errors import FormatError

__all__ = ["LayerStream", "GZIP_MAGIC", "ZSTD_MAGIC"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_SIZE = 1 << 20  # compressed bytes read at a time
PIECE = 1 << 20  # most uncompressed bytes produced at a time
ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default limit (128 MiB) made explicit
MAX_GZIP_PADDING = 1 << 20  # zero bytes tolerated after the last gzip member
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)  # its stub declares an instance
QUEUE_DEPTH = 4  # pieces in flight between the producer thread and the reader


class LayerStream:
    """Decompressed, hashed, exact reads over a layer stream (see the module docstring)."""

    def __init__(self, raw: BinaryIO, read_size: int = READ_SIZE) -> None:
        self._raw = raw
        self._read_size = read_size
        first = _read_raw(raw, read_size)
        self.compressed_bytes = len(first)
        if first.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            pieces = self._gunzip(first)
        elif first.startswith(ZSTD_MAGIC):
            self.compression = "zstd"
            pieces = self._unzstd(first)
        else:
            self.compression = "none"
            pieces = self._plain(first)
        self._hash = hashlib.sha256()
        self._buf = b""
        self._off = 0
        self.pos = 0  # uncompressed bytes handed out (or skipped)
        self._eof = False
        self._q: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(pieces,), name="layer-reader", daemon=True
        )
        self._thread.start()

    def _produce(self, pieces: Iterator[bytes]) -> None:
        item: bytes | BaseException | None
        try:
            for piece in pieces:
                if piece:
                    self._hash.update(piece)
                    if not self._put(piece):
                        return
            item = None
        except BaseException as e:  # handed to the reader, raised there
            item = e
        self._put(item)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stop the producer thread (the stream cannot be read afterwards)."""
        self._stop.set()
        self._thread.join()
        self._eof = True

    def __enter__(self) -> LayerStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sources

    def _more(self) -> bytes:
        data = _read_raw(self._raw, self._read_size)
        self.compressed_bytes += len(data)
        return data

    def _plain(self, first: bytes) -> Iterator[bytes]:
        data = first
        while data:
            yield data
            data = self._more()

    def _gunzip(self, first: bytes) -> Iterator[bytes]:
        d = isal_zlib.decompressobj(31)
        data = first
        while True:
            try:
                out = d.decompress(data, PIECE)
            except _INFLATE_ERROR as e:
                raise FormatError(f"gzip stream corrupt: {e}") from None
            data = d.unconsumed_tail
            if out:
                yield out
            if d.eof:
                rest = self._after_member(d.unused_data)
                if not rest:
                    return
                d = isal_zlib.decompressobj(31)  # another member follows
                data = rest
            elif not data and not out:  # inflate wants more input
                data = self._more()
                if not data:
                    raise FormatError("gzip stream truncated (the last member is incomplete)")

    def _after_member(self, rest: bytes) -> bytes:
        """The input after a gzip member: the next member's first bytes, or b"" at the end
        of the stream (zero padding only)."""
        if len(rest) < 2:
            rest += self._more()
        if rest and not rest.startswith(GZIP_MAGIC):
            self._zero_padding(rest)
            return b""
        return rest

    def _zero_padding(self, rest: bytes) -> None:
        seen = 0
        while rest:
            if rest.count(0) != len(rest):
                raise FormatError("data after the end of the gzip stream")
            seen += len(rest)
            if seen > MAX_GZIP_PADDING:
                raise FormatError(f"more than {MAX_GZIP_PADDING} bytes after the gzip stream")
            rest = self._more()

    def _unzstd(self, first: bytes) -> Iterator[bytes]:
        frames = _ZstdFrames(first, self._more)
        dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        reader = dctx.stream_reader(
            frames,  # type: ignore[arg-type]
            read_size=self._read_size,
            read_across_frames=True,
        )
        while True:
            try:
                out = reader.read(PIECE)
            except zstandard.ZstdError as e:
                raise FormatError(f"zstd stream corrupt: {e}") from None
            if not out:
                break
            yield out
        frames.check_complete()

    # ------------------------------------------------------------------ reading

    def _next_piece(self) -> bool:
        if self._eof:
            return False
        item = self._q.get()
        if isinstance(item, bytes):
            self._buf, self._off = item, 0
            return True
        self._eof = True
        self._buf, self._off = b"", 0
        self._thread.join()
        if item is not None:
            raise item
        return False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        avail = len(self._buf) - self._off
        if n <= avail:
            out = self._buf[self._off : self._off + n]
            self._off += n
            self.pos += n
            return out
        parts = [self._buf[self._off :]] if avail else []
        got = avail
        self._buf, self._off = b"", 0
        while got < n and self._next_piece():
            take = min(n - got, len(self._buf))
            parts.append(self._buf[:take])
            self._off = take
            got += take
        self.pos += got
        return b"".join(parts)

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise FormatError(f"tar stream truncated in {what} (at byte {self.pos})")
        return data

    def skip(self, n: int, what: str) -> None:
        """Consume exactly ``n`` bytes without keeping them."""
        while n > 0:
            avail = len(self._buf) - self._off
            if avail == 0:
                if not self._next_piece():
                    raise FormatError(f"tar stream truncated in {what} (at byte {self.pos})")
                continue
            take = min(n, avail)
            self._off += take
            self.pos += take
            n -= take

    def drain(self, limit: int) -> int:
        """Read (and hash) the rest of the stream; returns the bytes read. More than
        ``limit`` bytes is a FormatError (a padded bomb after the end-of-archive marker)."""
        total = len(self._buf) - self._off
        nonzero = self._buf.count(0, self._off) != total
        self._buf, self._off = b"", 0
        while total <= limit and self._next_piece():
            total += len(self._buf)
            nonzero |= self._buf.count(0) != len(self._buf)
            self._buf = b""
        if total > limit:
            raise FormatError(f"more than {limit} bytes after the tar end-of-archive marker")
        self.pos += total
        self.trailing_nonzero = nonzero
        return total

    @property
    def diff_id(self) -> str:
        """``sha256:<hex>`` of the whole uncompressed stream; valid once it was read (or
        drained) to its end."""
        if not self._eof or self._thread.is_alive():
            raise RuntimeError("diff_id asked before the end of the layer")
        return "sha256:" + self._hash.hexdigest()

    trailing_nonzero = False


def _read_raw(raw: BinaryIO, n: int) -> bytes:
    try:
        data = raw.read(n)
    except OSError as e:
        raise FormatError(f"cannot read the layer: {e}") from e
    return bytes(data or b"")


class _ZstdFrames:
    """A pass-through reader of the compressed side that follows zstd frame and block
    headers, so an input ending inside a frame is noticed (:meth:`check_complete`)."""

    _MAGIC = 0xFD2FB528

    def __init__(self, first: bytes, more: Callable[[], bytes]) -> None:
        self._pending = first
        self._more = more
        self._hdr = bytearray()  # header bytes collected so far
        self._need = 4  # header bytes wanted in the current state
        self._skip = 0  # payload bytes to pass over
        self._state = "magic"
        self._checksum = False
        self._frames = 0

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
        else:
            data = self._more()
        self._track(data)
        return data

    def _track(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                take = min(self._skip, end - pos)
                self._skip -= take
                pos += take
                if self._skip == 0 and self._state == "skippable":
                    self._state, self._need = "magic", 4
                continue
            take = min(self._need - len(self._hdr), end - pos)
            self._hdr += data[pos : pos + take]
            pos += take
            if len(self._hdr) == self._need:
                self._header(bytes(self._hdr))
                self._hdr.clear()

    def _header(self, h: bytes) -> None:
        st = self._state
        if st == "magic":
            magic = int.from_bytes(h, "little")
            if magic == self._MAGIC:
                self._state, self._need = "descriptor", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skipsize", 4
            else:
                raise FormatError("zstd stream corrupt: data after the last frame is not a frame")
        elif st == "skipsize":
            self._skip = int.from_bytes(h, "little")
            self._state, self._need = "skippable", 4
            if self._skip == 0:
                self._state = "magic"
        elif st == "descriptor":
            fd = h[0]
            single = bool(fd & 0x20)
            self._checksum = bool(fd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fd >> 6]
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[fd & 3] + fcs
            self._state, self._need = "block", 3
        elif st == "block":
            b = int.from_bytes(h, "little")
            last, btype, size = b & 1, (b >> 1) & 3, b >> 3
            if btype == 3:
                raise FormatError("zstd stream corrupt: reserved block type")
            self._skip = 1 if btype == 1 else size
            if last:
                self._frames += 1
                self._skip += 4 if self._checksum else 0
                self._state, self._need = "magic", 4

    def check_complete(self) -> None:
        if self._state != "magic" or self._hdr or self._skip or not self._frames:
            raise FormatError("zstd stream truncated (the last frame is incomplete)")
