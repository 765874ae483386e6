"""BlobDevice over an in-memory backend: bytes, cache layout, amplification, merging, dedup of
concurrent fetches, validation of backend and cache data, restarts and repairs, read_range."""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nydus.builder.build import BuildOptions, build_image
from nydus.builder.dirsource import load_directory
from nydus.config import DaemonConfig
from nydus.errors import IntegrityError
from nydus.metadata import ChunkInfo, RafsMetadata, open_bootstrap
from nydus.storage import BlobDevice, MemoryBackend, open_device
from nydus.storage.chunkmap import HEADER_SIZE, MAGIC


@dataclass
class Image:
    root: Path
    md: RafsMetadata
    blob_id: str
    blob: bytes
    files: dict[str, bytes]


def build(tmp: Path, compressor: str, chunk_size: int = 0x10000) -> Image:
    src = tmp / "src"
    src.mkdir(parents=True)
    rnd = random.Random(7)
    files = {
        "/big": rnd.randbytes(40 * chunk_size + 1234),  # incompressible
        "/text": b"".join(b"line %d of some text\n" % i for i in range(30000)),
        "/small": b"tiny file\n",
        "/dir/mid": rnd.randbytes(3 * chunk_size) + bytes(chunk_size),  # with a zero chunk
        "/dup": b"",
    }
    files["/dup"] = files["/small"] * 2
    for name, data in files.items():
        p = src / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    tmp_blob = tmp / "blob.tmp"
    with open(tmp_blob, "wb") as out:
        res = build_image(
            load_directory(src), out, BuildOptions(chunk_size=chunk_size, compressor=compressor)
        )
    assert res.blob is not None
    blob_id = res.blob.entry.blob_id
    blob = tmp_blob.read_bytes()
    return Image(src, open_bootstrap(res.bootstrap), blob_id, blob, files)


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("img-zstd"), "zstd")


@pytest.fixture(scope="module")
def raw_img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("img-none"), "none")


def config(work_dir: Path | None, **top: Any) -> DaemonConfig:
    cache: dict[str, Any] = {"type": ""}
    if work_dir is not None:
        cache = {"type": "blobcache", "config": {"work_dir": str(work_dir)}}
        cache["compressed"] = top.pop("compressed", False)
        cache["validate"] = top.pop("cache_validate", False)
    doc = {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": "/nonexistent"}},
            "cache": cache,
        },
        **top,
    }
    return DaemonConfig.from_json(doc, environ={})


def device(
    image: Image,
    work_dir: Path | None,
    backend: MemoryBackend | None = None,
    id: str = "",
    **top: Any,
) -> tuple[BlobDevice, MemoryBackend]:
    be = backend or MemoryBackend({image.blob_id: image.blob})
    return open_device(image.md.blobs, config(work_dir, **top), backend=be, id=id), be


def chunks_of(image: Image, path: str) -> list[ChunkInfo]:
    return image.md.chunks(image.md.resolve(path))


def read_file(dev: BlobDevice, image: Image, path: str) -> bytes:
    return b"".join(dev.read_chunks(chunks_of(image, path)))


def data_requests(be: MemoryBackend, image: Image) -> list[tuple[int, int]]:
    """(offset, size) of backend requests inside the chunk data section."""
    ci_off = image.md.blobs[0].ci_offset
    return [(o, s) for _, o, s in be.requests if o < ci_off]


def fetched_chunk_indexes(be: MemoryBackend, image: Image) -> list[int]:
    """For every data request, the chunks it covered (a chunk fetched twice appears twice)."""
    ci = _ci(image)
    out = []
    for off, size in data_requests(be, image):
        out.extend(i for i, (co, cs) in enumerate(ci) if co >= off and co + cs <= off + size)
    return out


def _ci(image: Image) -> list[tuple[int, int]]:
    from nydus.storage.metacache import load_blob_meta

    info = image.md.blobs[0]
    meta = load_blob_meta(info, lambda s, e: image.blob[s:e], None)
    return [(e.compressed_offset, e.compressed_size) for e in meta.ci]


# ------------------------------------------------------------------------ bytes


@pytest.mark.parametrize("mode", ["dummy", "blobcache", "compressed"])
def test_every_file_reads_back(img: Image, tmp_path: Path, mode: str) -> None:
    wd = None if mode == "dummy" else tmp_path / "cache"
    kw: dict[str, Any] = {"compressed": True} if mode == "compressed" else {}
    dev, _ = device(img, wd, digest_validate=True, **kw)
    with dev:
        for path, data in img.files.items():
            assert read_file(dev, img, path) == data, path
        assert dev.read_chunks([]) == []
    if wd is not None:
        suffix = "blob.raw" if mode == "compressed" else "blob.data"
        names = sorted(os.listdir(wd))
        assert f"{img.blob_id}.{suffix}" in names
        assert f"{img.blob_id}.{suffix}.chunk_map" in names
        assert f"{img.blob_id}.blob.meta" in names


def test_cache_layout_is_upstreams(img: Image, tmp_path: Path) -> None:
    wd = tmp_path / "c"
    dev, _ = device(img, wd)
    info = img.md.blobs[0]
    with dev:
        for path in img.files:
            read_file(dev, img, path)
        assert dev.cache_file(0) == str(wd / f"{img.blob_id}.blob.data")
        data_path = wd / f"{img.blob_id}.blob.data"
        assert data_path.stat().st_size == info.uncompressed_size
        # every chunk sits decompressed at its uncompressed offset
        for path in img.files:
            for c in chunks_of(img, path):
                with open(data_path, "rb") as f:
                    f.seek(c.uncompressed_offset)
                    got = f.read(c.uncompressed_size)
                start = c.file_offset
                assert got == img.files[path][start : start + c.uncompressed_size]
        cmap = (wd / f"{img.blob_id}.blob.data.chunk_map").read_bytes()
        assert len(cmap) == HEADER_SIZE + (info.chunk_count + 7) // 8
        assert struct.unpack_from("<I", cmap)[0] == MAGIC
        meta = (wd / f"{img.blob_id}.blob.meta").read_bytes()
        usize = info.ci_uncompressed_size
        assert len(meta) == (usize + 4095) // 4096 * 4096 + 4096
        assert struct.unpack_from("<I", meta, len(meta) - 4096)[0] == 0xB10BB10B


# ------------------------------------------------------------------------ amplification


def test_a_miss_is_amplified_within_amplify_io(img: Image, tmp_path: Path) -> None:
    amplify = 0x20000
    dev, be = device(img, tmp_path / "c", amplify_io=amplify)
    big = chunks_of(img, "/big")
    with dev:
        assert dev.read_chunks(big[:1])[0] == img.files["/big"][: big[0].uncompressed_size]
        reqs = data_requests(be, img)
        assert len(reqs) == 1
        assert reqs[0][1] <= amplify + big[0].compressed_size
        assert reqs[0][1] > big[0].compressed_size  # it did amplify
        # the amplified chunks are decoded, verified and cached after the read returned
        cache = dev._blob(0).cache
        assert cache is not None
        deadline = time.monotonic() + 10
        while not cache.is_ready(big[1].index) and time.monotonic() < deadline:
            time.sleep(0.01)
        before = len(be.requests)
        n_extra = reqs[0][1] // big[0].compressed_size
        dev.read_chunks(big[1:n_extra])  # already fetched by amplification
        assert len(be.requests) == before
        m = dev.metrics_blobcache()
        assert m["whole_hits"] >= 1 and m["total"] == 2


def test_amplify_io_minimum_is_128k(img: Image, tmp_path: Path) -> None:
    dev, be = device(img, tmp_path / "c", amplify_io=4096)
    with dev:
        dev.read_chunks(chunks_of(img, "/big")[:1])
        ((_, size),) = data_requests(be, img)
        assert 0x10000 < size <= 0x20000 + 0x10000


def test_no_amplification_without_cache_or_when_disabled(img: Image, tmp_path: Path) -> None:
    big = chunks_of(img, "/big")
    for wd, amp in ((None, 1 << 20), (tmp_path / "c", 0)):
        dev, be = device(img, wd, amplify_io=amp)
        with dev:
            dev.read_chunks(big[:1])
            assert data_requests(be, img) == [(big[0].compressed_offset, big[0].compressed_size)]


def test_adjacent_chunks_merge_into_one_request(img: Image, tmp_path: Path) -> None:
    big = chunks_of(img, "/big")
    dev, be = device(img, tmp_path / "c", amplify_io=0)
    with dev:
        out = dev.read_chunks([big[0], big[1], big[2], big[10]])
        assert b"".join(out[:3]) == img.files["/big"][: 3 * 0x10000]
        reqs = sorted(data_requests(be, img))
        assert reqs == [
            (
                big[0].compressed_offset,
                big[2].compressed_offset + big[2].compressed_size - big[0].compressed_offset,
            ),
            (big[10].compressed_offset, big[10].compressed_size),
        ]


# ------------------------------------------------------------------------ concurrency


def test_concurrent_readers_of_one_chunk_cause_one_fetch(img: Image, tmp_path: Path) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    be.hook = lambda *a: time.sleep(0.05)  # a slow backend widens the race window
    dev, _ = device(img, tmp_path / "c", backend=be, amplify_io=0)
    big = chunks_of(img, "/big")
    want = img.files["/big"][:0x10000]
    results: list[bytes] = []
    barrier = threading.Barrier(16)

    def reader() -> None:
        barrier.wait()
        results.append(dev.read_chunks(big[:1])[0])

    with dev:
        ts = [threading.Thread(target=reader) for _ in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert results == [want] * 16
    assert len(data_requests(be, img)) == 1


@pytest.mark.parametrize("cached", [True, False])
def test_many_threads_many_chunks_each_fetched_once(
    img: Image, tmp_path: Path, cached: bool
) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    be.hook = lambda *a: time.sleep(0.002)
    wd = tmp_path / "c" if cached else None
    dev, _ = device(img, wd, backend=be, amplify_io=0x40000)
    paths = list(img.files)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(30):
                path = rnd.choice(paths)
                cs = chunks_of(img, path)
                if not cs:
                    continue
                k = rnd.randrange(len(cs))
                got = dev.read_chunks(cs[k : k + 2])
                off = cs[k].file_offset
                assert b"".join(got) == img.files[path][off : off + sum(map(len, got))]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with dev:
        ts = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors, errors[0]
    if cached:
        fetched = fetched_chunk_indexes(be, img)
        assert len(fetched) == len(set(fetched)), "a chunk was fetched twice"


# ------------------------------------------------------------------------ validation


def _corrupt(image: Image, chunk: ChunkInfo) -> bytes:
    b = bytearray(image.blob)
    b[chunk.compressed_offset + chunk.compressed_size // 2] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("which", ["raw", "zstd"])
def test_backend_corruption_is_detected_refetched_once_and_never_cached(
    img: Image, raw_img: Image, tmp_path: Path, which: str
) -> None:
    image = raw_img if which == "raw" else img
    big = chunks_of(image, "/big")
    bad = big[3]
    be = MemoryBackend({image.blob_id: _corrupt(image, bad)})
    wd = tmp_path / "c"
    dev, _ = device(image, wd, backend=be, digest_validate=True, amplify_io=0)
    with dev:
        with pytest.raises(IntegrityError):
            dev.read_chunks([bad])
        tries = [r for r in data_requests(be, image) if r[0] <= bad.compressed_offset < r[0] + r[1]]
        assert len(tries) == 2  # the read, then one refetch of that chunk alone
        assert tries[1] == (bad.compressed_offset, bad.compressed_size)
        # good neighbours still read fine, the bad chunk is not marked ready nor written
        assert dev.read_chunks([big[2]])[0] == image.files["/big"][2 * 0x10000 : 3 * 0x10000]
        assert not dev._blob(0).cache.is_ready(bad.index)  # type: ignore[union-attr]
        with open(wd / f"{image.blob_id}.blob.data", "rb") as f:
            f.seek(bad.uncompressed_offset)
            assert f.read(bad.uncompressed_size) == bytes(bad.uncompressed_size)
        # the whole file fails, not silently
        with pytest.raises(IntegrityError):
            read_file(dev, image, "/big")


def test_amplified_neighbour_corruption_does_not_fail_the_read(
    raw_img: Image, tmp_path: Path
) -> None:
    big = chunks_of(raw_img, "/big")
    be = MemoryBackend({raw_img.blob_id: _corrupt(raw_img, big[1])})
    dev, _ = device(raw_img, tmp_path / "c", backend=be, digest_validate=True, amplify_io=0x40000)
    with dev:
        assert dev.read_chunks([big[0]])[0] == raw_img.files["/big"][:0x10000]
        assert not dev._blob(0).cache.is_ready(big[1].index)  # type: ignore[union-attr]
        with pytest.raises(IntegrityError):
            dev.read_chunks([big[1]])


def test_transient_corruption_is_healed_by_the_refetch(raw_img: Image, tmp_path: Path) -> None:
    big = chunks_of(raw_img, "/big")
    good = raw_img.blob
    be = MemoryBackend({raw_img.blob_id: _corrupt(raw_img, big[5])})

    def heal(blob_id: str, off: int, size: int) -> None:
        if size == big[5].compressed_size and off == big[5].compressed_offset:
            be.blobs[blob_id] = good  # the refetch sees good data

    be.hook = heal
    dev, _ = device(raw_img, tmp_path / "c", backend=be, digest_validate=True)
    with dev:
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]


def test_without_validation_undecodable_data_still_fails(img: Image, tmp_path: Path) -> None:
    """Decompression and size checks run always: a broken zstd frame is an IntegrityError."""
    text = chunks_of(img, "/text")
    assert text[0].compressed
    b = bytearray(img.blob)
    b[text[0].compressed_offset] ^= 0xFF  # the zstd frame magic
    be = MemoryBackend({img.blob_id: bytes(b)})
    dev, _ = device(img, None, backend=be)
    with dev, pytest.raises(IntegrityError, match="decompression failed"):
        dev.read_chunks(text[:1])


def test_corrupted_cache_chunk_is_detected_and_refetched(raw_img: Image, tmp_path: Path) -> None:
    wd = tmp_path / "c"
    dev, _ = device(raw_img, wd)
    with dev:
        read_file(dev, raw_img, "/big")
    big = chunks_of(raw_img, "/big")
    victim = big[7]
    path = wd / f"{raw_img.blob_id}.blob.data"
    with open(path, "r+b") as f:
        f.seek(victim.uncompressed_offset + 100)
        f.write(b"\xde\xad\xbe\xef")
    # without validation too: the file changed since its chunks were verified (its record no
    # longer matches), so they are hashed on first read; the bad one is refetched once and
    # repaired in place (upstream would serve it)
    dev, be = device(raw_img, wd)
    with dev:
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
        assert data_requests(be, raw_img) == [(victim.compressed_offset, victim.compressed_size)]
    with open(path, "r+b") as f:
        f.seek(victim.uncompressed_offset + 100)
        f.write(b"\xde\xad\xbe\xef")
    # with validation likewise
    dev, be = device(raw_img, wd, digest_validate=True)
    with dev:
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
        assert data_requests(be, raw_img) == [(victim.compressed_offset, victim.compressed_size)]
    dev, be = device(raw_img, wd, cache_validate=True)
    with dev:
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
        assert data_requests(be, raw_img) == []


# ------------------------------------------------------------------------ restarts, repair


def test_cache_survives_restart(img: Image, tmp_path: Path) -> None:
    wd = tmp_path / "c"
    dev, be = device(img, wd)
    with dev:
        read_file(dev, img, "/text")
    assert be.requests
    dev, be = device(img, wd)
    with dev:
        assert read_file(dev, img, "/text") == img.files["/text"]
        assert be.requests == []  # no data and no ci array fetched again


@pytest.mark.parametrize("victim", ["chunk_map", "data", "meta"])
def test_damaged_cache_files_are_rebuilt(img: Image, tmp_path: Path, victim: str) -> None:
    wd = tmp_path / "c"
    dev, _ = device(img, wd)
    with dev:
        for p in img.files:
            read_file(dev, img, p)
    base = wd / f"{img.blob_id}"
    target = {
        "chunk_map": f"{base}.blob.data.chunk_map",
        "data": f"{base}.blob.data",
        "meta": f"{base}.blob.meta",
    }[victim]
    if victim == "meta":
        raw = bytearray(Path(target).read_bytes())
        raw[-4096 + 12] ^= 1  # ci_entries no longer matches the blob table
        Path(target).write_bytes(bytes(raw))
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) - 1)
    dev, be = device(img, wd, digest_validate=True)
    with dev:
        for p, data in img.files.items():
            assert read_file(dev, img, p) == data
    assert be.requests  # something had to be fetched again
    if victim == "meta":
        assert data_requests(be, img) == []  # only the ci array
    else:
        assert data_requests(be, img)


# ------------------------------------------------------------------------ read_range / ci


def uncompressed_space(image: Image) -> bytes:
    info = image.md.blobs[0]
    buf = bytearray(info.uncompressed_size)
    for path, data in image.files.items():
        for c in chunks_of(image, path):
            buf[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size] = data[
                c.file_offset : c.file_offset + c.uncompressed_size
            ]
    return bytes(buf)


@pytest.mark.parametrize("cached", [True, False])
def test_read_range_is_the_uncompressed_address_space(
    img: Image, tmp_path: Path, cached: bool
) -> None:
    space = uncompressed_space(img)
    dev, _ = device(img, tmp_path / "c" if cached else None, digest_validate=True)
    rnd = random.Random(3)
    with dev:
        for _ in range(40):
            off = rnd.randrange(len(space))
            size = rnd.randrange(1, 300_000)
            assert dev.read_range(0, off, size) == (space + bytes(size))[off : off + size]
        assert dev.read_range(0, len(space), 4096) == bytes(4096)
        assert dev.read_range(0, 0, 0) == b""
        if cached:
            dev.prefetch_all()  # no-op: prefetch not enabled
            assert not dev.is_blob_ready(0)
            assert dev.read_range(0, 0, len(space)) == space
            assert dev.is_blob_ready(0)
            assert Path(dev.cache_file(0) or "").read_bytes() == space
            assert dev.metrics_blobcache()["data_all_ready"]


def test_chunk_span_and_ready_extent(img: Image, tmp_path: Path) -> None:
    """What the EROFS blob fs widens reads to, and how far it may push with no fetch."""
    dev, be = device(img, tmp_path / "c", amplify_io=0)
    big = chunks_of(img, "/big")
    c1, c2 = big[1], big[2]
    with dev:
        mid = c1.uncompressed_offset + 100
        assert dev.chunk_span(0, mid, 10) == (
            c1.uncompressed_offset,
            c1.uncompressed_offset + c1.uncompressed_size,
        )
        start = c1.uncompressed_offset
        assert dev.ready_extent(0, start, 1 << 30) == start  # nothing cached yet
        dev.read_range(0, start, c1.uncompressed_size)  # amplify_io 0: exactly chunk 1
        assert dev.ready_extent(0, start, 1 << 30) == start + c1.uncompressed_size
        assert dev.ready_extent(0, start, 10) == start + 10  # bounded by the limit
        requests = len(be.requests)
        after = c2.uncompressed_offset
        assert dev.ready_extent(0, after, 1 << 30) == after  # chunk 2 was never fetched
        assert len(be.requests) == requests  # asking fetched nothing
        assert dev.amplify_io == 0


def test_chunks_without_placement_resolve_through_the_ci_array(img: Image, tmp_path: Path) -> None:
    """A v6 bootstrap without the chunk table gives only chunk indexes: the device uses the
    blob's ci array and, to validate, its digest array."""
    dev, _ = device(img, tmp_path / "c", digest_validate=True)
    bare = [
        ChunkInfo(
            b"", c.blob_index, c.index, c.file_offset, -1, -1, c.uncompressed_offset, -1, False
        )
        for c in chunks_of(img, "/text")
    ]
    with dev:
        assert b"".join(dev.read_chunks(bare)) == img.files["/text"]
    assert (Path(tmp_path / "c") / f"{img.blob_id}.blob.digest").exists()
    # a corrupted chunk is caught through the digest array
    be2 = MemoryBackend({img.blob_id: _corrupt(img, chunks_of(img, "/big")[4])})
    big = chunks_of(img, "/big")[4]
    dev, _ = device(img, tmp_path / "c2", backend=be2, digest_validate=True)
    with dev, pytest.raises(IntegrityError):
        dev.read_chunks(
            [ChunkInfo(b"", 0, big.index, 0, -1, -1, big.uncompressed_offset, -1, False)]
        )


# ------------------------------------------------------------------------ metrics


def test_metrics_use_upstream_names(img: Image, tmp_path: Path) -> None:
    dev, _ = device(img, tmp_path / "c", id="mnt")
    with dev:
        read_file(dev, img, "/text")
        read_file(dev, img, "/text")
        b = dev.metrics_backend()
        c = dev.metrics_blobcache()
    assert b["backend_type"] == "memory" and b["read_count"] >= 2
    assert b["read_amount_total"] > 0 and b["read_errors"] == 0
    assert len(b["read_latency_sizes_dist"]) == 8 and len(b["read_count_block_size_dist"]) == 8
    for key in ("read_cumulative_latency_millis_total", "read_cumulative_latency_millis_dist"):
        assert key in b
    for key in (
        "underlying_files",
        "store_path",
        "partial_hits",
        "whole_hits",
        "total",
        "entries_count",
        "prefetch_data_amount",
        "prefetch_requests_count",
        "prefetch_workers",
        "prefetch_unmerged_chunks",
        "prefetch_begin_time_secs",
        "prefetch_end_time_secs",
        "prefetch_cumulative_time_millis",
        "buffered_backend_size",
        "data_all_ready",
    ):
        assert key in c, key
    assert c["id"] == "mnt" and c["whole_hits"] >= 1


def test_data_all_durable_follows_the_cache_files_sync(img: Image, tmp_path: Path) -> None:
    """``data_all_durable`` (an extension): false while a chunk is missing, true once every
    cache file is complete and fdatasync'ed; a device opened later on the complete cache
    (another process's work) syncs it itself before saying so."""
    dev, _ = device(img, tmp_path / "c")
    space = uncompressed_space(img)
    with dev:
        c = dev.metrics_blobcache()
        assert c["data_all_durable"] is False and c["data_all_ready"] is False
        read_file(dev, img, "/text")
        assert dev.metrics_blobcache()["data_all_durable"] is False
        assert dev.read_range(0, 0, len(space)) == space
        assert dev.metrics_blobcache()["data_all_ready"]
        assert _eventually(lambda: dev.metrics_blobcache()["data_all_durable"])
    dev, _ = device(img, tmp_path / "c")
    with dev:
        assert dev.is_blob_ready(0)
        assert _eventually(lambda: dev.metrics_blobcache()["data_all_durable"])


def _eventually(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_unexpected_backend_exceptions_become_backend_errors(img: Image, tmp_path: Path) -> None:
    from nydus.errors import BackendError

    be = MemoryBackend({img.blob_id: img.blob})
    calls = []

    def boom(blob_id: str, off: int, size: int) -> None:
        calls.append(off)
        if off < img.md.blobs[0].ci_offset:
            raise ValueError("a bug below us")

    be.hook = boom
    dev, _ = device(img, tmp_path / "c", backend=be)
    results: list[BaseException] = []

    def reader() -> None:
        try:
            dev.read_chunks(chunks_of(img, "/big")[:1])
        except BaseException as e:
            results.append(e)

    with dev:
        ts = [threading.Thread(target=reader) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert not any(t.is_alive() for t in ts)  # nobody is left waiting
    assert len(results) == 4 and all(isinstance(e, BackendError) for e in results)


def test_compressed_cache_corruption_is_caught_by_validation(
    raw_img: Image, tmp_path: Path
) -> None:
    wd = tmp_path / "c"
    dev, _ = device(raw_img, wd, compressed=True)
    with dev:
        read_file(dev, raw_img, "/big")
        assert dev.cache_file(0) is None  # no plain data file to hand to the kernel
    victim = chunks_of(raw_img, "/big")[2]
    with open(wd / f"{raw_img.blob_id}.blob.raw", "r+b") as f:
        f.seek(victim.compressed_offset + 10)
        f.write(b"\x00\xff\x00\xff")
    dev, be = device(raw_img, wd, compressed=True, digest_validate=True)
    with dev:
        assert read_file(dev, raw_img, "/big") == raw_img.files["/big"]
        assert data_requests(be, raw_img) == [(victim.compressed_offset, victim.compressed_size)]


def test_blob_without_sizes_is_read_without_cache(img: Image, tmp_path: Path) -> None:
    import dataclasses

    info = dataclasses.replace(img.md.blobs[0], uncompressed_size=0)
    be = MemoryBackend({img.blob_id: img.blob})
    cfg = config(tmp_path / "c")
    with open_device([info], cfg, backend=be) as dev:
        assert read_file(dev, img, "/text") == img.files["/text"]
        assert dev.cache_file(0) is None and not dev.is_blob_ready(0)
