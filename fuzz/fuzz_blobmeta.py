"""Atheris fuzz target: bytes -> the blob meta parsers (ci header and chunk-info arrays, ToC,
section tar headers, chunk digest array) of ``nydus.format.blob_meta`` and
``nydus.storage.metacache``.

Input layout: byte 0 picks the mode, the next 48 bytes are a blob table entry (``BlobInfo``:
chunk count, ci offset and sizes, ci compressor, features, blob sizes, ToC size; the ToC digest
is left empty so the ToC is parsed rather than rejected by its hash), the rest is the blob's
bytes, served by a ``fetch(start, end)`` that raises BackendError outside them (as a backend
does).

Modes: 0 the raw format functions (``CiHeader.unpack``, ``unpack_ci_array`` v1 and v2,
``unpack_toc``, ``parse_tar_header``); 1 ``load_blob_meta`` fetching from the blob; 2
``load_blob_meta`` from a cached ``.blob.meta`` file (the blob bytes are the file; the
fetch fails); 3 ``load_toc`` + ``load_digests``. After a successful load the ci lookups
(``chunks_in``) are exercised and their promises checked.

Contract: NydusError (with a message) or success, nothing else, within the time limit.

    nice -n 10 .venv/bin/python fuzz/fuzz_blobmeta.py fuzz/corpus-blobmeta \\
        -atheris_runs=1000000 -timeout=10 -artifact_prefix=fuzz/regressions/blobmeta-

Single-threaded. Uses one private temporary directory for mode 2, removed at exit.
"""

from __future__ import annotations

import atexit
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzzlib

fuzzlib.add_src_to_path()

if __name__ == "__main__":
    import atheris

    with atheris.instrument_imports(include=["nydus"]):
        from nydus.errors import BackendError, NydusError
        from nydus.format import blob_meta as bm
        from nydus.metadata import BlobInfo
        from nydus.storage import metacache as blobmeta
else:
    from nydus.errors import BackendError, NydusError
    from nydus.format import blob_meta as bm
    from nydus.metadata import BlobInfo
    from nydus.storage import metacache as blobmeta

__all__ = ["NydusError", "check", "make_input"]

# mode, then the blob table entry: chunk_count, ci_offset, ci_compressed_size,
# ci_uncompressed_size (u32 each), compressed_size, uncompressed_size (u64), features,
# toc_size (u32), ci_compressor id (u8), 7 bytes spare.
_ENTRY = struct.Struct("<BIIIIQQII B7x")
CI_COMPRESSORS = ("none", "lz4_block", "gzip", "zstd")
BLOB_ID = "f" * 64
_WORK = tempfile.mkdtemp(prefix="fuzz-blobmeta-")
atexit.register(shutil.rmtree, _WORK, True)


def make_input(
    mode: int,
    blob: bytes,
    *,
    chunk_count: int,
    ci_offset: int,
    ci_csize: int,
    ci_usize: int,
    features: int,
    toc_size: int = 0,
    ci_compressor: int = 0,
    compressed_size: int | None = None,
    uncompressed_size: int = 0,
) -> bytes:
    """An input for :func:`check` (used by ``make_corpus.py`` for seeds)."""
    return (
        _ENTRY.pack(
            mode,
            chunk_count,
            ci_offset,
            ci_csize,
            ci_usize,
            len(blob) if compressed_size is None else compressed_size,
            uncompressed_size,
            features,
            toc_size,
            ci_compressor,
        )
        + blob
    )


def _check_meta(meta: blobmeta.BlobMeta) -> None:
    n = len(meta.ci)
    assert sorted(meta.by_uoff) == list(range(n))
    for start in {0, *(e.uncompressed_offset for e in meta.ci[:8])}:
        for i in meta.chunks_in(start, 4096):
            e = meta.ci[i]
            assert e.uncompressed_offset < start + 4096
            assert e.uncompressed_offset + e.uncompressed_size > start


def check(data: bytes) -> None:
    if len(data) < _ENTRY.size:
        return
    (mode, count, ci_off, ci_csize, ci_usize, csize, usize, features, toc_size, comp) = (
        _ENTRY.unpack_from(data)
    )
    blob = data[_ENTRY.size :]
    mode %= 4
    if mode == 0:  # each parser on its own: one rejecting the input does not hide the rest
        with_ci = blob[: count * 24 % (len(blob) + 1)]
        calls: list[Callable[[], object]] = [
            lambda: bm.unpack_ci_array(with_ci, min(count, len(with_ci) // 16), False),
            lambda: bm.unpack_ci_array(with_ci, min(count, len(with_ci) // 24), True),
            lambda: bm.CiHeader.unpack(blob[-bm.CI_HEADER_SIZE :]),
            lambda: bm.unpack_toc(blob[: len(blob) - len(blob) % bm.TOC_ENTRY_SIZE]),
            lambda: bm.parse_tar_header(blob[: bm.TAR_BLOCK]),
        ]
        for call in calls:
            try:
                out = call()
            except NydusError:
                continue
            if isinstance(out, list):
                for e in out:
                    if isinstance(e, bm.CiEntry):
                        assert e.compressed_size >= 0 and e.uncompressed_size > 0, e
        return
    info = BlobInfo(
        0,
        BLOB_ID,
        0x100000,
        count,
        "zstd",
        "sha256",
        features,
        csize,
        usize,
        CI_COMPRESSORS[comp % 4],
        ci_off,
        ci_csize,
        ci_usize,
        toc_size,
        b"",
        0,
    )

    def fetch(start: int, end: int) -> bytes:
        if mode == 2 or not 0 <= start <= end <= len(blob):
            raise BackendError(f"range {start}-{end} outside the blob of {len(blob)} bytes")
        return blob[start:end]

    if mode == 1:
        _check_meta(
            blobmeta.load_blob_meta(info, fetch, None, verify_toc=True, blob_size=len(blob))
        )
    elif mode == 2:
        Path(blobmeta.meta_path(_WORK, BLOB_ID)).write_bytes(blob)
        _check_meta(blobmeta.load_blob_meta(info, fetch, _WORK))
    else:
        blobmeta.load_toc(info, fetch, None, len(blob))
        digests = blobmeta.load_digests(info, fetch, None, len(blob))
        assert digests is None or all(len(d) == 32 for d in digests)


def replay(data: bytes) -> BaseException | None:
    return fuzzlib.replay(check, data, NydusError)


if __name__ == "__main__":
    fuzzlib.fuzz_main(check, NydusError)
