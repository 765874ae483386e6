"""Compressors and digesters, registered by name and by on-disk id.

Owns the mapping between upstream Nydus algorithm names / numeric codes and
the Python implementations. Stateless apart from per-thread codec objects, so
every function here is safe to call from any thread.

Compression ids (blob table ``compression_algo``): none=0, lz4_block=1,
gzip=2, zstd=3. Digest ids: blake3=0, sha256=1. ``lz4_block`` is the raw LZ4
block format without a size prefix, as upstream writes it; the uncompressed
size always comes from the chunk info.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import blake3
import lz4.block
import zstandard

from .errors import ConfigError, IntegrityError

__all__ = [
    "Compressor",
    "Digester",
    "COMPRESSORS",
    "DIGESTERS",
    "compressor_by_name",
    "compressor_by_id",
    "digester_by_name",
    "digester_by_id",
    "compress",
    "decompress",
]

_tls = threading.local()


def _zstd_c() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "zc", None)
    if c is None:
        c = _tls.zc = zstandard.ZstdCompressor(level=3, write_content_size=True)
    return c


def _zstd_d() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def _zstd_decompress(data: bytes, size: int) -> bytes:
    return _zstd_d().decompress(data, max_output_size=size)


def _gzip_compress(data: bytes | memoryview) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, 31)
    return co.compress(data) + co.flush()


def _gzip_decompress(data: bytes, size: int) -> bytes:
    d = zlib.decompressobj(47)
    out = d.decompress(data, size + 1)
    return out


@dataclass(frozen=True)
class Compressor:
    name: str
    id: int
    compress_fn: Callable[[bytes | memoryview], bytes] | None
    decompress_fn: Callable[[bytes, int], bytes] | None

    @property
    def is_none(self) -> bool:
        return self.compress_fn is None


@dataclass(frozen=True)
class Digester:
    name: str
    id: int
    new: Callable[[], hashlib._Hash]

    def digest(self, data: bytes | memoryview) -> bytes:
        h = self.new()
        h.update(data)
        return h.digest()


_Algo = TypeVar("_Algo", Compressor, Digester)

COMPRESSORS: dict[str, Compressor] = {
    "none": Compressor("none", 0, None, None),
    "lz4_block": Compressor(
        "lz4_block",
        1,
        lambda d: lz4.block.compress(d, store_size=False),
        lambda d, n: lz4.block.decompress(d, uncompressed_size=n),
    ),
    "gzip": Compressor("gzip", 2, _gzip_compress, _gzip_decompress),
    "zstd": Compressor("zstd", 3, lambda d: _zstd_c().compress(d), _zstd_decompress),
}

DIGESTERS: dict[str, Digester] = {
    "blake3": Digester("blake3", 0, blake3.blake3),  # type: ignore[arg-type]
    "sha256": Digester("sha256", 1, hashlib.sha256),
}


def _by_name(table: dict[str, _Algo], kind: str, name: str) -> _Algo:
    try:
        return table[name]
    except KeyError:
        raise ConfigError(
            f"unknown {kind} {name!r} (expected one of: {', '.join(table)})"
        ) from None


def _by_id(table: dict[str, _Algo], kind: str, algo_id: int) -> _Algo:
    for algo in table.values():
        if algo.id == algo_id:
            return algo
    raise IntegrityError(f"unknown {kind} algorithm id {algo_id}")


def compressor_by_name(name: str) -> Compressor:
    return _by_name(COMPRESSORS, "compressor", name)


def compressor_by_id(cid: int) -> Compressor:
    return _by_id(COMPRESSORS, "compression", cid)


def digester_by_name(name: str) -> Digester:
    return _by_name(DIGESTERS, "digester", name)


def digester_by_id(did: int) -> Digester:
    return _by_id(DIGESTERS, "digest", did)


def compress(c: Compressor, data: bytes | memoryview) -> tuple[bytes, bool]:
    """Compress ``data``; return (bytes, compressed). Raw (as bytes) when not smaller."""
    if c.compress_fn is not None and len(data):
        out = c.compress_fn(data)
        if len(out) < len(data):
            return out, True
    return bytes(data), False


def decompress(c: Compressor, data: bytes, size: int) -> bytes:
    """Decompress one chunk to exactly ``size`` bytes or raise IntegrityError."""
    if c.decompress_fn is None:
        out = data
    else:
        try:
            out = c.decompress_fn(data, size)
        except Exception as e:  # zstd.ZstdError, LZ4BlockError, zlib.error
            raise IntegrityError(f"{c.name} decompression failed: {e}") from e
    if len(out) != size:
        raise IntegrityError(f"{c.name} chunk decompressed to {len(out)} bytes, expected {size}")
    return out
