"""Zran blob meta: upstream's fixture parses with upstream's own expectations; contexts we
write for upstream's zran test layers inflate to exactly the bytes of ``gzip -dc``."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import pytest

from nydus import codec
from nydus.builder.build import BuildOptions
from nydus.builder.targz_ref import build_targz_ref
from nydus.errors import FormatError, IntegrityError
from nydus.format import blob_meta as bm
from nydus.format import rafs_v6 as v6
from nydus.format import zran
from nydus.metadata import open_bootstrap

FIX = Path("/work/shared/fixtures/nydus/zran")
META = FIX / "233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta"


def _parse(meta: bytes) -> tuple[bm.CiHeader, list[bm.CiEntry], zran.ZranTable]:
    h = bm.CiHeader.unpack(meta[-bm.CI_HEADER_SIZE :])
    data = meta[: h.ci_uncompressed_size]
    ci = bm.unpack_ci_array(data, h.ci_entries, True)
    return h, ci, zran.unpack_zran_meta(h, data, ci)


def test_upstream_fixture_parses_fully() -> None:
    h, ci, t = _parse(META.read_bytes())
    # upstream storage/src/meta/mod.rs test_load_meta_ci_zran_*: 0xa3 chunks, 0x15 contexts,
    # a dictionary table of 0xa0348 - 0x15 * 40 bytes
    assert (h.ci_entries, h.zran_count, len(t.windows)) == (0xA3, 0x15, 0xA0348 - 0x15 * 40)
    assert h.features & 0x8 and all(e.flags & bm.CI_V2_FLAG_ZRAN for e in ci)
    # the first context starts after the 10-byte gzip header with an empty window; the rest
    # carry full windows, in stream order, within the layer (9,839,040 bytes)
    assert (t.contexts[0].in_offset, t.contexts[0].dict_size) == (10, 0)
    assert all(c.dict_size == zran.WINDOW_SIZE for c in t.contexts[1:])
    assert all(a.in_offset < b.in_offset for a, b in zip(t.contexts, t.contexts[1:], strict=False))
    assert all(c.in_offset + c.in_len <= 9839040 for c in t.contexts)
    for e in ci:  # a chunk's compressed range lies inside its context's
        c = t.contexts[e.data >> 32]
        assert c.in_offset <= e.compressed_offset
        assert e.compressed_offset + e.compressed_size <= c.in_offset + c.in_len
    assert max(e.uncompressed_offset + e.uncompressed_size for e in ci) <= 0x16C6000
    assert b"".join(c.pack() for c in t.contexts) == META.read_bytes()[3912 : 3912 + 21 * 40]


def test_malformed_tables_are_format_errors() -> None:
    h, _ci, t = _parse(META.read_bytes())
    raw = t.pack()
    with pytest.raises(FormatError):
        zran.unpack_zran_table(raw[:100], 21)
    bad = bytearray(raw)
    struct.pack_into("<I", bad, 40 + 32, 1 << 20)  # context 1 window size past the table
    with pytest.raises(FormatError):
        zran.unpack_zran_table(bytes(bad), 21)
    bad = bytearray(raw)
    bad[40 + 37] = 9  # 9 pending bits
    with pytest.raises(FormatError):
        zran.unpack_zran_table(bytes(bad), 21)
    wrong = [bm.CiEntry(0, 1, 0, 0x200000, True, bm.CI_V2_FLAG_ZRAN, 0)]
    data = META.read_bytes()[: h.ci_uncompressed_size]
    with pytest.raises(FormatError):
        zran.unpack_zran_meta(h, data, wrong)


def _our_meta(layer: Path, spacing: int) -> tuple[list[bm.CiEntry], zran.ZranTable, bytes]:
    with layer.open("rb") as f:
        res, meta_blob = build_targz_ref(f, BuildOptions(), spacing=spacing)
    md = open_bootstrap(res.bootstrap)
    info = md.blobs[0]
    tail = meta_blob[info.ci_offset :]
    h = bm.CiHeader.unpack(tail[info.ci_compressed_size :])
    comp = codec.compressor_by_id(h.ci_compressor)
    data = codec.decompress(comp, tail[: h.ci_compressed_size], h.ci_uncompressed_size)
    ci = bm.unpack_ci_array(data, h.ci_entries, True)
    return ci, zran.unpack_zran_meta(h, data, ci), res.bootstrap


@pytest.mark.parametrize(
    ("name", "spacing"),
    [
        ("zran-single-stream.tar.gz", 0x8000),
        ("zran-two-streams.tar.gz", 0x8000),
        ("zran-zero-file.tar.gz", 0x8000),
        ("bgzip.tar.gz", 0x8000),  # many gzip members: chunks cross member boundaries
        ("bgzip.tar.gz", 0x80000),
    ],
)
def test_every_chunk_inflates_to_the_gunzipped_bytes(name: str, spacing: int) -> None:
    gz = (FIX / name).read_bytes()
    plain = gzip.decompress(gz)
    ci, t, _boot = _our_meta(FIX / name, spacing)
    assert ci
    for e in ci:
        k, off = e.data >> 32, e.data & 0xFFFFFFFF
        c = t.contexts[k]
        end = e.compressed_offset + e.compressed_size
        data = gz[c.in_offset : end]
        out = zran.inflate_context(c, t.window(k), data, off + e.uncompressed_size)
        got = zran.inflate_context(c, t.window(k), data, off + e.uncompressed_size, skip=off)
        assert out[off:] == got
        assert got == plain[c.out_offset + off : c.out_offset + off + e.uncompressed_size]


def test_corrupt_input_is_an_integrity_error() -> None:
    gz = (FIX / "bgzip.tar.gz").read_bytes()
    ci, t, _boot = _our_meta(FIX / "bgzip.tar.gz", 0x8000)
    e = max(ci, key=lambda e: e.compressed_size)
    k, off = e.data >> 32, e.data & 0xFFFFFFFF
    c = t.contexts[k]
    raw = bytearray(gz[c.in_offset : e.compressed_offset + e.compressed_size])
    with pytest.raises(IntegrityError):  # short input
        zran.inflate_context(c, t.window(k), bytes(raw[: len(raw) // 2]), off + e.uncompressed_size)
    plain = gzip.decompress(gz)
    want = plain[c.out_offset + off : c.out_offset + off + e.uncompressed_size]
    for pos in range(len(raw) // 3, len(raw), len(raw) // 7):
        bad = bytearray(raw)
        bad[pos] ^= 0x55
        try:
            out = zran.inflate_context(c, t.window(k), bytes(bad), off + e.uncompressed_size)
        except IntegrityError:
            continue
        # deflate has no checksum of its own: wrong bytes are caught by the chunk digest
        assert out[off:] != want or bytes(bad) == bytes(raw)


def test_the_meta_blob_is_laid_out_as_upstreams() -> None:
    """``--blob`` of targz-ref: blob.meta at 0 (ci + zran table, zstd, then the 4 KiB header),
    blob.digest, image.boot, the ToC; the bootstrap names it and vouches for its ToC."""
    layer = FIX / "zran-two-streams.tar.gz"
    with layer.open("rb") as f:
        res, meta_blob = build_targz_ref(f, BuildOptions(), inline_bootstrap=True)
    info = open_bootstrap(res.bootstrap).blobs[0]
    assert info.blob_id == hashlib.sha256(layer.read_bytes()).hexdigest()
    assert info.meta_blob_id == hashlib.sha256(meta_blob).hexdigest()
    assert info.meta_blob_size == len(meta_blob) and info.ci_offset == 0
    assert info.toc_digest == hashlib.sha256(meta_blob[-info.toc_size :]).digest()
    toc = bm.unpack_toc(meta_blob[-info.toc_size : -bm.TAR_BLOCK])
    names = [e.name for e in toc]
    assert names == ["blob.meta", "blob.meta.header", "blob.digest", "image.boot"]
    h = bm.CiHeader.unpack(meta_blob[info.ci_compressed_size : info.ci_compressed_size + 4096])
    fixture = bm.CiHeader.unpack(META.read_bytes()[-4096:])
    same = v6.BLOB_FEATURE_ALIGNED | v6.BLOB_FEATURE_CHUNK_INFO_V2 | v6.BLOB_FEATURE_ZRAN
    assert h.features & same == fixture.features & same == same
    assert h.features & v6.BLOB_FEATURE_SEPARATE and h.zran_count and h.zran_offset
    name, size = bm.parse_tar_header(
        meta_blob[toc[0].compressed_size + 4096 : toc[0].compressed_size + 4096 + 512]
    )
    assert (name, size) == ("blob.meta", toc[0].compressed_size + 4096)
    digests = meta_blob[
        toc[2].compressed_offset : toc[2].compressed_offset + toc[2].compressed_size
    ]
    assert len(digests) == 32 * info.chunk_count
    boot = open_bootstrap(
        meta_blob[toc[3].compressed_offset : toc[3].compressed_offset + toc[3].compressed_size]
    )
    assert boot.blobs[0].blob_id == info.blob_id  # the inner copy cannot name its own blob
