"""Nothing unverified is served (issue 12 point 3): chunks from the backend are verified with
the default config too, on every fetch path; cached chunks are trusted only with proof (a
matching record, or hashed by this process); a blob's cache file is handed out for native
reads only after every chunk was hashed by this process. See nydus/storage/verified.py."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from test_storage_device import (
    Image,
    chunks_of,
    data_requests,
    device,
    read_file,
    uncompressed_space,
)

from nydus import codec
from nydus.errors import FormatError, IntegrityError
from nydus.metadata import ChunkInfo
from nydus.storage import MemoryBackend, open_device

# as in nydus.storage.verified, spelled out: this file also runs against older code
RECORD_SUFFIX = ".verified"


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    from test_storage_device import build

    return build(tmp_path_factory.mktemp("vimg-zstd"), "zstd")


@pytest.fixture(scope="module")
def raw_img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    from test_storage_device import build

    return build(tmp_path_factory.mktemp("vimg-none"), "none")


def flipped(image: Image, c: ChunkInfo, decodable: bool = False) -> bytes:
    """The blob with one byte of chunk ``c`` flipped; with ``decodable``, a byte whose flip
    still decompresses (zstd frames carry no checksum) to wrong bytes of the right size."""
    b = bytearray(image.blob)
    if not decodable:
        b[c.compressed_offset + c.compressed_size // 2] ^= 0xFF
        return bytes(b)
    comp = codec.compressor_by_name(image.md.blobs[0].compressor)
    raw = image.blob[c.compressed_offset : c.compressed_offset + c.compressed_size]
    good = codec.decompress(comp, raw, c.uncompressed_size)
    for pos in range(len(raw) // 2, len(raw)):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        try:
            out = codec.decompress(comp, bytes(bad), c.uncompressed_size)
        except Exception:
            continue
        if out != good:
            b[c.compressed_offset + pos] ^= 0x01
            return bytes(b)
    raise AssertionError("no decodable corruption found")


def cache_path(image: Image, wd: Path) -> Path:
    return wd / f"{image.blob_id}.blob.data"


def flip_cache(image: Image, wd: Path, c: ChunkInfo) -> None:
    with open(cache_path(image, wd), "r+b") as f:
        f.seek(c.uncompressed_offset + 7)
        b = f.read(1)
        f.seek(c.uncompressed_offset + 7)
        f.write(bytes([b[0] ^ 0x20]))


# ------------------------------------------------------------------------ on the way in


@pytest.mark.parametrize("which", ["raw", "zstd-decodable"])
def test_backend_corruption_is_caught_with_the_default_config(
    img: Image, raw_img: Image, tmp_path: Path, which: str
) -> None:
    image = raw_img if which == "raw" else img
    path = "/big" if which == "raw" else "/text"
    victim = chunks_of(image, path)[1]
    assert victim.compressed == (which != "raw")
    be = MemoryBackend({image.blob_id: flipped(image, victim, decodable=which != "raw")})
    for wd in (tmp_path / "c", None):  # with a blob cache and without
        dev, _ = device(image, wd, backend=be)  # default config: digest_validate off
        with dev:
            with pytest.raises(IntegrityError, match="digest mismatch"):
                dev.read_chunks([victim])  # FUSE RAFS reads
            with pytest.raises(IntegrityError, match="digest mismatch"):
                dev.read_range(0, victim.uncompressed_offset, 4096)  # blob-device reads
            good = chunks_of(image, path)[0]
            assert dev.read_chunks([good])[0] == image.files[path][: good.uncompressed_size]
            if wd is not None:
                assert not dev._blob(0).cache.is_ready(victim.index)  # type: ignore[union-attr]


def test_prefetch_and_amplification_never_cache_bad_chunks(raw_img: Image, tmp_path: Path) -> None:
    big = chunks_of(raw_img, "/big")
    be = MemoryBackend({raw_img.blob_id: flipped(raw_img, big[3])})
    wd = tmp_path / "c"
    dev, _ = device(raw_img, wd, backend=be, fs_prefetch={"enable": True, "threads_count": 2})
    with dev:
        dev.prefetch_all()
        assert dev.wait_prefetch(30)
        cache = dev._blob(0).cache
        assert cache is not None and not cache.is_ready(big[3].index)
        assert cache.is_ready(big[2].index) and cache.is_ready(big[4].index)
    wd2 = tmp_path / "c2"
    dev, _ = device(raw_img, wd2, backend=be, amplify_io=1 << 20)
    with dev:
        dev.read_chunks([big[0]])  # amplified over big[1..] in one request
        dev.read_chunks([big[2]])  # waits for the amplified chunks (cached after the read)
        cache = dev._blob(0).cache
        assert cache is not None and cache.is_ready(big[2].index)
        assert not cache.is_ready(big[3].index)
    with open(cache_path(raw_img, wd2), "rb") as f:
        f.seek(big[3].uncompressed_offset)
        assert f.read(big[3].uncompressed_size) == bytes(big[3].uncompressed_size)


def test_chunks_located_through_the_ci_array_use_the_bootstraps_digest(
    img: Image, tmp_path: Path
) -> None:
    """Blob-device reads (EROFS mode) know chunks only by their ci entry: the digest comes from
    the bootstrap's chunk record, without fetching the blob's digest array."""
    victim = chunks_of(img, "/text")[2]
    be = MemoryBackend({img.blob_id: flipped(img, victim, decodable=True)})
    dev = open_device(
        img.md.blobs, device(img, None)[0].cfg, backend=be, chunk_lookup=img.md.chunk_record
    )
    with dev:
        assert dev.read_range(0, 0, 4096)
        with pytest.raises(IntegrityError):
            dev.read_range(0, victim.uncompressed_offset, 4096)
    # without a record in the bootstrap and without a digest array the bootstrap vouches for,
    # a chunk cannot be verified: it is not served
    info = dataclasses.replace(img.md.blobs[0], toc_digest=bytes(32))
    dev = open_device(
        [info], device(img, None)[0].cfg, backend=MemoryBackend({img.blob_id: img.blob})
    )
    with dev, pytest.raises(IntegrityError, match="cannot be verified"):
        dev.read_range(0, 0, 4096)


def test_ci_placement_must_agree_with_the_bootstrap(img: Image) -> None:
    c = chunks_of(img, "/big")[0]

    def lying(blob: int, index: int) -> ChunkInfo | None:
        rec = img.md.chunk_record(blob, index)
        if rec is not None and index == c.index:
            return dataclasses.replace(rec, compressed_offset=rec.compressed_offset + 1)
        return rec

    dev = open_device(
        img.md.blobs,
        device(img, None)[0].cfg,
        backend=MemoryBackend({img.blob_id: img.blob}),
        chunk_lookup=lying,
    )
    with dev, pytest.raises(FormatError, match="disagrees with the bootstrap"):
        dev.read_range(0, c.uncompressed_offset, 4096)


# ------------------------------------------------------------------------ in the cache


@pytest.mark.parametrize("where", ["restart", "running"])
def test_a_flipped_cache_byte_is_refetched_with_the_default_config(
    raw_img: Image, tmp_path: Path, where: str
) -> None:
    wd = tmp_path / "c"
    space = uncompressed_space(raw_img)
    big = chunks_of(raw_img, "/big")
    victim = big[6]
    dev, _ = device(raw_img, wd)
    with dev:
        for p in raw_img.files:
            read_file(dev, raw_img, p)
        assert dev.is_blob_ready(0)
        if where == "running":  # behind the daemon's back, while it runs
            flip_cache(raw_img, wd, victim)
            be = dev.backend
            assert isinstance(be, MemoryBackend)
            be.requests.clear()
            assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
            assert dev.read_range(0, 0, len(space)) == space
            assert data_requests(be, raw_img) == [
                (victim.compressed_offset, victim.compressed_size)
            ]
    if where == "restart":
        flip_cache(raw_img, wd, victim)
    dev, be = device(raw_img, wd)
    with dev:
        assert dev.read_range(0, 0, len(space)) == space  # blob-device reads
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]  # FUSE RAFS reads
        refetched = [(victim.compressed_offset, victim.compressed_size)]
        assert data_requests(be, raw_img) == ([] if where == "running" else refetched)
    assert cache_path(raw_img, wd).read_bytes() == space


def test_an_unchanged_cache_is_trusted_across_restarts_by_its_record(
    raw_img: Image, tmp_path: Path
) -> None:
    wd = tmp_path / "c"
    dev, _ = device(raw_img, wd)
    with dev:
        read_file(dev, raw_img, "/big")
    record = Path(f"{cache_path(raw_img, wd)}{RECORD_SUFFIX}")
    assert record.exists()
    hashed: list[int] = []
    dev, be = device(raw_img, wd)
    with dev:
        f = dev._blob(0).fetcher
        real = f.verify
        f.verify = lambda c, data: (hashed.append(c.index), real(c, data))[-1]  # type: ignore
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
    assert hashed == [] and data_requests(be, raw_img) == []
    # a record that does not match (the file was touched) is not believed
    os.utime(cache_path(raw_img, wd))
    dev, be = device(raw_img, wd)
    with dev:
        f = dev._blob(0).fetcher
        real2 = f.verify
        f.verify = lambda c, data: (hashed.append(c.index), real2(c, data))[-1]  # type: ignore
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
    assert sorted(set(hashed)) == sorted(c.index for c in chunks_of(raw_img, "/big"))


def test_ready_bits_set_by_someone_else_are_not_trusted(raw_img: Image, tmp_path: Path) -> None:
    """Another writer of the shared cache (an upstream nydusd without validation, a tool) sets
    a ready bit for bytes nobody here verified: they are hashed before they are served."""
    wd = tmp_path / "c"
    dev, _ = device(raw_img, wd)
    with dev:
        read_file(dev, raw_img, "/small")  # the cache files exist
        cache = dev._blob(0).cache
        assert cache is not None
        victim = chunks_of(raw_img, "/big")[2]
        with open(cache_path(raw_img, wd), "r+b") as f:
            f.seek(victim.uncompressed_offset)
            f.write(b"X" * victim.uncompressed_size)
        cache.map.set_ready([victim.index])  # as the other writer would
        assert (
            dev.read_chunks([victim])[0]
            == raw_img.files["/big"][
                victim.file_offset : victim.file_offset + victim.uncompressed_size
            ]
        )


# ------------------------------------------------------------------------ native reads


def test_native_file_only_after_every_chunk_is_hashed_here(raw_img: Image, tmp_path: Path) -> None:
    wd = tmp_path / "c"
    space = uncompressed_space(raw_img)
    dev, _ = device(raw_img, wd)
    with dev:
        assert dev.native_file(0) is None and not dev.verify_blob(0)  # not complete
        dev.read_range(0, 0, len(space))
        # fetched (and hashed) by this process: may go native at once
        assert dev.native_file(0) == str(cache_path(raw_img, wd))
        assert dev.verify_blob(0)
    victim = chunks_of(raw_img, "/dir/mid")[1]
    flip_cache(raw_img, wd, victim)
    dev, be = device(raw_img, wd)
    with dev:
        assert dev.is_blob_ready(0)
        assert dev.native_file(0) is None  # complete, but not hashed by this process
        assert not dev.verify_blob(0)  # the flipped chunk is found and cleared
        assert not dev.is_blob_ready(0) and dev.native_file(0) is None
        assert data_requests(be, raw_img) == []  # verification reads only the cache
        assert dev.read_range(0, 0, len(space)) == space  # refetches the bad chunk
        assert dev.verify_blob(0)
        assert dev.native_file(0) == str(cache_path(raw_img, wd))
    assert cache_path(raw_img, wd).read_bytes() == space
    # an intact cache with a matching record still needs hashing here before native reads
    dev, be = device(raw_img, wd)
    with dev:
        assert dev.native_file(0) is None
        assert dev.verify_blob(0) and dev.native_file(0) is not None
        assert be.requests == []


def test_the_record_goes_with_its_blob_in_cache_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nydus.snapshotter.daemons import cachegc

    a, b = "a" * 64, "b" * 64
    for blob in (a, b):
        for suffix in (".blob.data", ".blob.data.chunk_map", ".blob.data.verified"):
            (tmp_path / (blob + suffix)).write_bytes(b"x")
    monkeypatch.setattr(cachegc, "blob_ids_of", lambda p: frozenset({a}))
    res = cachegc.collect_garbage(tmp_path, [Path("/img")])
    assert res.deleted_blobs == {b} and res.deleted_files == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        a + s for s in (".blob.data", ".blob.data.chunk_map", ".blob.data.verified")
    )


def test_a_damaged_or_foreign_record_is_not_believed(raw_img: Image, tmp_path: Path) -> None:
    wd = tmp_path / "c"
    dev, _ = device(raw_img, wd)
    with dev:
        read_file(dev, raw_img, "/big")
    record = Path(f"{cache_path(raw_img, wd)}{RECORD_SUFFIX}")
    good = record.read_bytes()
    dev, _ = device(raw_img, wd)
    with dev:
        cache = dev._blob(0).cache
        assert cache is not None and cache.trust.trusted_count() == len(chunks_of(raw_img, "/big"))
    other = wd / f"{'e' * 64}.blob.data{RECORD_SUFFIX}"
    for bad in (good[:-1] + bytes([good[-1] ^ 1]), good[:40], b""):
        record.write_bytes(bad)
        dev, _ = device(raw_img, wd)
        with dev:
            cache = dev._blob(0).cache
            assert cache is not None and cache.trust.trusted_count() == 0
    # another blob's record (renamed into place) names the wrong blob
    other.write_bytes(good)
    os.replace(other, record)
    info = dataclasses.replace(raw_img.md.blobs[0], blob_id="e" * 64)
    from nydus.storage.verified import load_record

    assert load_record(str(record), info.blob_id, info.chunk_count) is None
    assert load_record(str(record), raw_img.blob_id, info.chunk_count) is not None


def test_compressed_cache_flip_is_refetched_with_the_default_config(
    img: Image, tmp_path: Path
) -> None:
    wd = tmp_path / "c"
    dev, _ = device(img, wd, compressed=True)
    with dev:
        read_file(dev, img, "/text")
    victim = chunks_of(img, "/text")[1]
    with open(wd / f"{img.blob_id}.blob.raw", "r+b") as f:
        f.seek(victim.compressed_offset + victim.compressed_size // 2)
        b = f.read(1)
        f.seek(victim.compressed_offset + victim.compressed_size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    dev, be = device(img, wd, compressed=True)
    with dev:
        assert read_file(dev, img, "/text") == img.files["/text"]
        assert data_requests(be, img) == [(victim.compressed_offset, victim.compressed_size)]
