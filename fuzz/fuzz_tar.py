"""Atheris fuzz target: bytes -> the builder's tar reader (``nydus.builder.tarreader``).

The input is a layer: gzip/zstd (by its magic) are read through the real ``LayerStream``, a
plain tar through :class:`PlainStream`, a thread-free stand-in with the same reading contract
(``LayerStream`` starts a decompression thread per layer, which made the target three times
slower); then ``TarReader`` reads it: every entry is listed and every regular file's data is
read in 4 KiB chunks.
Contract: a malformed layer raises a NydusError (FormatError, UnsupportedError) with a
message, nothing else, within the time limit. Beyond that it checks the reader's own promises:
chunks of a plain file cover exactly ``size`` bytes in order; those of a sparse file lie
inside its apparent size. (Names are checked by the tree builder, not the reader.)

Run (from the repository root; seeds in ``fuzz/corpus-tar/``, made by ``fuzz/make_corpus.py``)::

    nice -n 10 .venv/bin/python fuzz/fuzz_tar.py fuzz/corpus-tar -atheris_runs=1000000 \\
        -timeout=10 -rss_limit_mb=2048 -artifact_prefix=fuzz/regressions/tar-

Imported as a module it needs no atheris (``tests/unit/test_fuzz_corpus.py`` replays the
corpus and ``fuzz/regressions/tar-*`` with :func:`check`). Single-threaded driver (the
LayerStream's decompression thread is joined on close).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzlib

fuzzlib.add_src_to_path()

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["nydus"]):
        from nydus.builder.tarreader import REG, TarLimits, TarReader
        from nydus.builder.tarstream import GZIP_MAGIC, ZSTD_MAGIC, LayerStream
        from nydus.errors import FormatError, NydusError
else:
    from nydus.builder.tarreader import REG, TarLimits, TarReader
    from nydus.builder.tarstream import GZIP_MAGIC, ZSTD_MAGIC, LayerStream
    from nydus.errors import FormatError, NydusError

__all__ = ["NydusError", "check"]

CHUNK = 4096
# Small bounds so that a fuzz input cannot make one execution take seconds.
LIMITS = TarLimits(max_entries=20_000, max_sparse_segments=4096, max_sparse_chunks=1 << 16)


class PlainStream:
    """``LayerStream``'s reading contract over bytes in memory (no thread, no hashing)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.pos = 0
        self.trailing_nonzero = False

    def read(self, n: int) -> bytes:
        out = self._data[self.pos : self.pos + n]
        self.pos += len(out)
        return out

    def read_exact(self, n: int, what: str) -> bytes:
        out = self.read(n)
        if len(out) != n:
            raise FormatError(f"tar stream truncated in {what} (at byte {self.pos})")
        return out

    def skip(self, n: int, what: str) -> None:
        if self.pos + n > len(self._data):
            self.pos = len(self._data)
            raise FormatError(f"tar stream truncated in {what} (at byte {self.pos})")
        self.pos += n

    def drain(self, limit: int) -> int:
        rest = self._data[self.pos :]
        if len(rest) > limit:
            raise FormatError(f"more than {limit} bytes after the tar end-of-archive marker")
        self.trailing_nonzero = rest.count(0) != len(rest)
        self.pos = len(self._data)
        return len(rest)

    def __enter__(self) -> PlainStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def check(data: bytes) -> int:
    """Read every entry and all file data; returns the number of entries."""
    compressed = data.startswith((GZIP_MAGIC, ZSTD_MAGIC))
    stream: Any = LayerStream(io.BytesIO(data)) if compressed else PlainStream(data)
    with stream as ls:
        reader = TarReader(ls, LIMITS)
        n = 0
        for e in reader:
            n += 1
            assert isinstance(e.name, bytes), e.name
            assert 0 <= e.mode <= 0o7777, e.mode
            if e.kind != REG:
                continue
            pos = 0
            for off, piece in reader.chunks(e, CHUNK):
                if e.sparse is None:
                    assert off == pos, (off, pos)
                    pos += len(piece)
                else:
                    assert off % CHUNK == 0 and off >= pos, (off, pos)
                    assert off + len(piece) <= e.size, (off, len(piece), e.size)
                    pos = off + len(piece)
            if e.sparse is None:
                assert pos == e.size, (pos, e.size)
        return n


def replay(data: bytes) -> BaseException | None:
    return fuzzlib.replay(check, data, NydusError)


if __name__ == "__main__":
    fuzzlib.fuzz_main(check, NydusError)
