"""Zran: random access into an unmodified gzip layer (upstream ``storage/src/meta/zran.rs``,
``utils/src/compress/zlib_random.rs``).

A zran blob meta holds, after the ci array (``zran_offset`` inside the uncompressed meta)::

    context table (40 B each) | window table (the 32 KiB inflate windows, back to back)

A context is an access point at a deflate block boundary: compressed ``in_offset`` (the
first byte holding bits of the next block; when ``ctx_bits`` is non-zero, the top
``ctx_bits`` bits of ``ctx_byte``, the byte before, come first), the uncompressed
``out_offset``, the window to resume with, and ``in_len``/``out_len``, the span its chunks
need. A zran chunk's ci ``data`` is ``context index << 32 | offset in the context's output``.

:class:`Inflater` is a thin ctypes wrapper over the system zlib, because Python's ``zlib``
has neither ``inflatePrime`` (non-byte-aligned access points) nor ``Z_BLOCK`` (stopping at
block boundaries, to find access points). One Inflater per thread; the rest is stateless.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import FormatError, IntegrityError, UnsupportedError
from .blob_meta import CI_V2_FLAG_ZRAN, CiEntry, CiHeader
from .record import field_values

__all__ = [
    "CONTEXT_SIZE",
    "WINDOW_SIZE",
    "ZranContext",
    "ZranTable",
    "unpack_zran_table",
    "unpack_zran_meta",
    "Inflater",
    "inflate_context",
]

CONTEXT_SIZE = 40
WINDOW_SIZE = 1 << 15
MAX_CONTEXTS = 1 << 24  # upstream's ZRAN_MAX_CI_ENTRIES
MAX_CONTEXT_OUT = 1 << 30  # inflating further to reach one chunk is not a sane layout
# compressed bytes between access points a builder aims at (README: 256 KiB vs 512 KiB vs 1 MiB
# on the ML image: 24 MiB less fetched for W1 than 512 KiB, for 7 MiB more meta)
DEFAULT_SPACING = 0x40000

_CTX = struct.Struct("<QQQIIIBBxx")


@dataclass(frozen=True)
class ZranContext:
    """One access point into the gzip stream (upstream ``ZranInflateContext``)."""

    in_offset: int
    out_offset: int
    dict_offset: int  # into the window table
    in_len: int
    out_len: int
    dict_size: int
    ctx_byte: int
    ctx_bits: int

    def pack(self) -> bytes:
        return _CTX.pack(*field_values(self))


@dataclass(frozen=True)
class ZranTable:
    contexts: list[ZranContext]
    windows: bytes

    def window(self, index: int) -> bytes:
        c = self.contexts[index]
        return self.windows[c.dict_offset : c.dict_offset + c.dict_size]

    def pack(self) -> bytes:
        return b"".join(c.pack() for c in self.contexts) + self.windows


def unpack_zran_table(buf: bytes | memoryview, count: int) -> ZranTable:
    """The context and window tables (``buf`` = the ``zran_size`` bytes), validated."""
    if not 0 <= count <= MAX_CONTEXTS or count * CONTEXT_SIZE > len(buf):
        raise FormatError(f"zran table of {len(buf)} bytes cannot hold {count} contexts")
    windows = bytes(buf[count * CONTEXT_SIZE :])
    contexts = []
    for i in range(count):
        c = ZranContext(*_CTX.unpack_from(buf, i * CONTEXT_SIZE))
        if c.dict_size > WINDOW_SIZE or c.dict_offset + c.dict_size > len(windows):
            raise FormatError(f"zran context {i}: window outside the window table")
        if c.ctx_bits > 7 or c.out_len > MAX_CONTEXT_OUT:
            raise FormatError(f"zran context {i}: {c.ctx_bits} pending bits, {c.out_len} bytes")
        contexts.append(c)
    return ZranTable(contexts, windows)


def unpack_zran_meta(h: CiHeader, data: bytes | memoryview, ci: Sequence[CiEntry]) -> ZranTable:
    """The zran tables of an uncompressed blob meta ``data`` whose ci array is ``ci``;
    every zran chunk must lie inside its context's output."""
    end = h.zran_offset + h.zran_size
    if h.zran_offset < len(ci) * 16 or end > len(data):
        raise FormatError(f"zran table [{h.zran_offset}, {end}) lies outside the blob meta")
    table = unpack_zran_table(data[h.zran_offset : end], h.zran_count)
    for i, e in enumerate(ci):
        if e.flags & CI_V2_FLAG_ZRAN:
            k, off = e.data >> 32, e.data & 0xFFFFFFFF
            if k >= len(table.contexts) or off + e.uncompressed_size > table.contexts[k].out_len:
                raise FormatError(f"zran chunk {i} lies outside its context {k}")
    return table


# --------------------------------------------------------------------------- zlib


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


Z_NO_FLUSH, Z_BLOCK = 0, 5
Z_OK, Z_STREAM_END, Z_BUF_ERROR = 0, 1, -5
_libz: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libz
    if _libz is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
            lib.zlibVersion.restype = ctypes.c_char_p
            lib.inflateGetDictionary  # noqa: B018  (zlib >= 1.2.7.1)
        except (OSError, AttributeError) as e:
            raise UnsupportedError(f"zran needs the system zlib (libz.so.1): {e}") from None
        _libz = lib
    return _libz


class Inflater:
    """One zlib inflate stream (``wbits`` as zlib: -15 raw, 31 gzip)."""

    def __init__(self, wbits: int) -> None:
        self._z = _lib()
        self._s = _ZStream()
        self._in: bytes = b""
        v = self._z.zlibVersion()
        if self._z.inflateInit2_(ctypes.byref(self._s), wbits, v, ctypes.sizeof(_ZStream)):
            raise UnsupportedError("zlib inflateInit2 failed")
        self._open = True

    def close(self) -> None:
        if self._open:
            self._z.inflateEnd(ctypes.byref(self._s))
            self._open = False

    def __del__(self) -> None:
        self.close()

    def reset(self, wbits: int) -> None:
        self._z.inflateReset2(ctypes.byref(self._s), wbits)

    def prime(self, bits: int, value: int) -> None:
        self._z.inflatePrime(ctypes.byref(self._s), bits, value)

    def set_dictionary(self, window: bytes) -> None:
        if window and self._z.inflateSetDictionary(ctypes.byref(self._s), window, len(window)):
            raise FormatError("zran window rejected by zlib")

    def get_dictionary(self) -> bytes:
        buf = ctypes.create_string_buffer(WINDOW_SIZE)
        n = ctypes.c_uint(0)
        self._z.inflateGetDictionary(ctypes.byref(self._s), buf, ctypes.byref(n))
        return buf.raw[: n.value]

    def feed(self, data: bytes) -> None:
        """Input for the next :meth:`inflate` calls (replaces what is left)."""
        self._in = data
        self._s.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p)
        self._s.avail_in = len(data)

    @property
    def avail_in(self) -> int:
        return int(self._s.avail_in)

    @property
    def data_type(self) -> int:
        return int(self._s.data_type)

    def last_consumed_byte(self) -> int:
        """The input byte before ``next_in`` (holds the pending bits of a block boundary)."""
        pos = len(self._in) - self._s.avail_in
        return self._in[pos - 1] if pos > 0 else 0

    def unused(self) -> bytes:
        return self._in[len(self._in) - self._s.avail_in :]

    def inflate(self, max_out: int, flush: int = Z_NO_FLUSH) -> tuple[int, bytes]:
        """(zlib status, output of at most ``max_out`` bytes)."""
        out = ctypes.create_string_buffer(max_out)
        self._s.next_out = ctypes.addressof(out)
        self._s.avail_out = max_out
        ret = int(self._z.inflate(ctypes.byref(self._s), flush))
        return ret, out.raw[: max_out - self._s.avail_out]


def inflate_context(
    ctx: ZranContext, window: bytes, data: bytes, size: int, skip: int = 0
) -> bytes:
    """Uncompressed bytes ``[skip, size)`` from access point ``ctx``; ``data`` is the gzip
    stream from ``ctx.in_offset`` on. A stream may cross gzip member boundaries (bgzip).
    Corrupt or short input is an IntegrityError."""
    inf = Inflater(-15)
    try:
        if ctx.ctx_bits:
            inf.prime(ctx.ctx_bits, ctx.ctx_byte >> (8 - ctx.ctx_bits))
        inf.set_dictionary(window)
        inf.feed(data)
        parts: list[bytes] = []
        got = 0
        raw = True  # until the first member ends; gzip mode then reads trailers and headers
        while got < size:
            ret, out = inf.inflate(min(size - got, 1 << 22))
            got += len(out)
            if got > skip:
                parts.append(out[max(0, len(out) - (got - skip)) :])
            if ret == Z_STREAM_END and got < size:
                rest = inf.unused()
                if raw:
                    rest, raw = rest[8:], False  # a raw stream leaves the trailer to us
                inf.reset(31)
                inf.feed(rest)
            elif ret != Z_OK or (not out and inf.avail_in == 0):
                raise IntegrityError(
                    f"gzip data from offset {ctx.in_offset} is corrupt or short (zlib {ret})"
                )
        return b"".join(parts)
    finally:
        inf.close()
