"""The fetcher serves zran chunks: one request per access point span (neighbouring chunks of
a context merged), verified bytes, and an error (never wrong bytes) for a bad layer."""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from nydus.builder.build import BuildOptions
from nydus.builder.targz_ref import build_targz_ref
from nydus.errors import IntegrityError
from nydus.metadata import open_bootstrap
from nydus.storage.fetcher import BlobFetcher
from nydus.storage.metacache import load_blob_meta

LAYER = Path("/work/shared/fixtures/nydus/zran/bgzip.tar.gz")


def _fetcher(gz: bytes, requests: list[tuple[int, int]]) -> tuple[BlobFetcher, list, bytes]:
    res, meta_blob = build_targz_ref(
        io.BytesIO(LAYER.read_bytes()), BuildOptions(chunk_size=0x10000)
    )
    md = open_bootstrap(res.bootstrap)
    info = md.blobs[0]

    def fetch(s: int, e: int) -> bytes:
        return gz[s:e]

    def ranges(rs: Sequence[tuple[int, int]]) -> list[bytes]:
        requests.extend(rs)
        return [gz[s:e] for s, e in rs]

    meta = load_blob_meta(info, lambda s, e: meta_blob[s:e], None)
    f = BlobFetcher(info, fetch, meta=lambda: meta, fetch_ranges=ranges, amplify_io=0)
    chunks = md.chunks(md.resolve("/bin/busybox"))
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(LAYER.read_bytes()))) as tf:
        member = tf.extractfile("bin/busybox")
        assert member is not None
        want = member.read()
    return f, [f.resolve(c) for c in chunks], want


def test_chunks_of_one_context_cost_one_request() -> None:
    requests: list[tuple[int, int]] = []
    f, chunks, want = _fetcher(LAYER.read_bytes(), requests)
    assert len(chunks) == 13
    got = f.read(chunks, amplify=False)
    assert b"".join(got) == want
    contexts = {f.meta().ci[c.index].data >> 32 for c in chunks}  # type: ignore[union-attr]
    assert len(requests) <= len(contexts) < len(chunks)


def test_a_corrupted_layer_is_an_error_not_wrong_bytes() -> None:
    gz = bytearray(LAYER.read_bytes())
    requests: list[tuple[int, int]] = []
    f, chunks, _want = _fetcher(bytes(gz), requests)
    c = chunks[5]
    e = f.meta().ci[c.index]  # type: ignore[union-attr]
    mid = e.compressed_offset + e.compressed_size // 2
    gz[mid : mid + 32] = bytes(32)
    f2, chunks2, _ = _fetcher(bytes(gz), requests)
    with pytest.raises(IntegrityError):
        f2.read([chunks2[5]], amplify=False)
