"""The real upstream RAFS v6 image: tree, blob table, blob trailer, every chunk verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nydus.codec import digester_by_name
from nydus.format import blob_meta as bm
from nydus.metadata import open_bootstrap
from nydus.storage.blobfile import open_local_blob

BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


@pytest.fixture
def v6(fixtures_dir: Path):  # type: ignore[no-untyped-def]
    with open_bootstrap(fixtures_dir / "v6" / "rafs-v6-2.2.boot") as md:
        yield md


def test_tree_and_attributes(v6) -> None:  # type: ignore[no-untyped-def]
    listing = {p: v6.getattr(n) for p, n in v6.walk()}
    assert sorted(listing) == [b"/", b"/lib.rs", b"/sync_io.rs"]
    assert listing[b"/lib.rs"].size == 16931
    assert listing[b"/sync_io.rs"].size == 13400
    assert listing[b"/"].is_dir
    assert v6.compressor == "zstd" and v6.digester == "blake3"
    assert [b.blob_id for b in v6.blobs] == [BLOB_ID]
    assert v6.lookup(v6.root_nid, b"lib.rs") == v6.resolve("/lib.rs")


def test_every_chunk_decompresses_and_verifies(v6, fixtures_dir: Path) -> None:  # type: ignore[no-untyped-def]
    blob = fixtures_dir / "v6" / "blobs" / BLOB_ID
    reader, close = open_local_blob(str(blob), v6.blobs[0])
    try:
        tr = reader.trailer()
        assert len(tr.ci) == 2 and len(tr.digests) == 2
        assert [e.name for e in tr.toc] == [
            "image.blob",
            "blob.meta",
            "blob.meta.header",
            "blob.digest",
        ]
        digester = digester_by_name("blake3")
        for path, nid in v6.walk():
            a = v6.getattr(nid)
            if not a.is_reg:
                continue
            data = b"".join(reader.read_chunk(c) for c in v6.chunks(nid))
            assert len(data) == a.size, path
            for c in v6.chunks(nid):
                assert tr.digests[c.index] == c.digest
                assert digester.digest(reader.read_chunk(c)) == c.digest
        assert data.startswith(b"// Copyright")  # Rust source
    finally:
        close()


def test_upstream_blob_id_rule(fixtures_dir: Path) -> None:
    """Upstream's blob id: sha256 of the blob minus the digest array payload."""
    raw = (fixtures_dir / "v6" / "blobs" / BLOB_ID).read_bytes()
    # locate the digest array from the ToC at the end
    name, size = bm.parse_tar_header(raw[-512:])
    assert name == "rafs.blob.toc"
    toc = bm.unpack_toc(raw[-512 - size : -512])
    dig = next(e for e in toc if e.name == "blob.digest")
    rest = raw[: dig.compressed_offset] + raw[dig.compressed_offset + dig.compressed_size :]
    assert hashlib.sha256(rest).hexdigest() == BLOB_ID
    # and the section headers are byte-identical to what our writer emits
    data = next(e for e in toc if e.name == "image.blob")
    hdr_off = data.compressed_size
    assert raw[hdr_off : hdr_off + 512] == bm.tar_header("image.blob", data.compressed_size)
