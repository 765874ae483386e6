"""Prefetch: file lists and prefetch_all fill the cache in merged requests, the bandwidth
limit, user reads that do not wait for the queue, and shutdown mid-prefetch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from test_storage_device import Image, build, chunks_of, data_requests, device  # type: ignore

from nydus.storage import MemoryBackend
from nydus.storage.fetcher import Chunk
from nydus.storage.prefetch import TokenBucket, batches


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("img"), "zstd")


def pf(**kw: Any) -> dict[str, Any]:
    return {"fs_prefetch": {"enable": True, **kw}}


def test_prefetch_is_off_unless_enabled(img: Image, tmp_path: Path) -> None:
    dev, be = device(img, tmp_path / "c")
    with dev:
        dev.prefetch_files([chunks_of(img, "/big")])
        dev.prefetch_all()
        assert dev.wait_prefetch(5)
    assert be.requests == []
    dev, be = device(img, None, **pf())  # no cache, nothing to fill
    with dev:
        dev.prefetch_all()
        assert dev.wait_prefetch(5)
    assert be.requests == []


def test_prefetch_files_fills_the_cache_in_merged_requests(img: Image, tmp_path: Path) -> None:
    merging = 0x30000
    dev, be = device(img, tmp_path / "c", **pf(threads_count=2, merging_size=merging))
    with dev:
        dev.prefetch_files([chunks_of(img, "/big"), chunks_of(img, "/text")])
        assert dev.wait_prefetch(20)
        reqs = data_requests(be, img)
        assert reqs and all(size <= merging for _, size in reqs)
        m = dev.metrics_blobcache()
        assert m["prefetch_data_amount"] == sum(s for _, s in reqs)
        assert m["prefetch_requests_count"] == len(reqs)
        assert m["prefetch_workers"] == 2
        assert m["prefetch_unmerged_chunks"] == len(chunks_of(img, "/big")) + len(
            chunks_of(img, "/text")
        )
        assert m["prefetch_end_time_secs"] >= m["prefetch_begin_time_secs"] > 0
        n = len(data_requests(be, img))
        assert b"".join(dev.read_chunks(chunks_of(img, "/big"))) == img.files["/big"]
        assert len(data_requests(be, img)) == n  # all from the cache
        assert not dev.is_blob_ready(0)  # /dir/mid was not prefetched


def test_prefetch_all_makes_the_blob_ready(img: Image, tmp_path: Path) -> None:
    dev, be = device(img, tmp_path / "c", **pf(threads_count=4, merging_size=1 << 20))
    with dev:
        dev.prefetch_all()
        assert dev.wait_prefetch(20)
        assert dev.is_blob_ready(0)
        assert dev.metrics_blobcache()["data_all_ready"]
        for path, data in img.files.items():
            assert b"".join(dev.read_chunks(chunks_of(img, path))) == data
    fetched = [o for o, _ in data_requests(be, img)]
    assert len(fetched) == len(set(fetched))


def test_cache_prefetch_config_also_enables_prefetch(img: Image, tmp_path: Path) -> None:
    dev, _ = device(img, tmp_path / "c")
    dev.close()
    from nydus.config import DaemonConfig
    from nydus.storage import open_device

    cfg = DaemonConfig.from_json(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": "/x"}},
                "cache": {
                    "type": "blobcache",
                    "config": {"work_dir": str(tmp_path / "c2")},
                    "prefetch_config": {"enable": True, "threads_count": 1},
                },
            }
        },
        environ={},
    )
    with open_device(img.md.blobs, cfg, backend=MemoryBackend({img.blob_id: img.blob})) as d:
        d.prefetch_all()
        assert d.wait_prefetch(20) and d.is_blob_ready(0)


def test_user_reads_jump_the_queue(img: Image, tmp_path: Path) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    be.hook = lambda *a: time.sleep(0.1)
    dev, _ = device(
        img, tmp_path / "c", backend=be, amplify_io=0, **pf(threads_count=1, merging_size=0x10000)
    )
    big = chunks_of(img, "/big")
    with dev:
        dev.prefetch_files([big])  # ~40 requests of 0.1 s each, one worker
        time.sleep(0.15)
        t0 = time.monotonic()
        assert dev.read_chunks([big[-1]])[0] == img.files["/big"][big[-1].file_offset :]
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"user read waited {elapsed:.2f}s behind prefetch"
    # close() with work still queued returned promptly and dropped the rest
    assert len(data_requests(be, img)) < len(big)


def test_token_bucket_limits_rate() -> None:
    b = TokenBucket(200_000)
    t0 = time.monotonic()
    for _ in range(6):
        b.acquire(50_000)  # 300 KB: 200 KB of burst, then 100 KB at 200 KB/s
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 1.5
    assert TokenBucket(0).acquire(10**9) == 0.0


def test_bandwidth_rate_is_applied_to_prefetch(img: Image, tmp_path: Path) -> None:
    dev, be = device(
        img, tmp_path / "c", **pf(threads_count=2, merging_size=0x40000, bandwidth_rate=1_500_000)
    )
    t0 = time.monotonic()
    with dev:
        dev.prefetch_files([chunks_of(img, "/big")])  # ~2.6 MB
        assert dev.wait_prefetch(30)
    elapsed = time.monotonic() - t0
    total = sum(s for _, s in data_requests(be, img))
    assert total > 2_000_000
    assert elapsed >= (total - 1_500_000) / 1_500_000 * 0.8


def test_batches_sort_dedupe_and_cut() -> None:
    cs = [Chunk(i, i * 100, 100, i * 4096, 4096, True) for i in (5, 1, 2, 3, 1, 9)]
    out = batches(cs, 250)
    assert [[c.index for c in b] for b in out] == [[1, 2], [3], [5], [9]]
    assert batches([], 100) == []
    big = [Chunk(0, 0, 1000, 0, 4096, True)]
    assert batches(big, 10) == [big]


def test_prefetch_calls_return_at_once(img: Image, tmp_path: Path) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    be.hook = lambda *a: time.sleep(0.3)  # even the ci array fetch is slow
    dev, _ = device(img, tmp_path / "c", backend=be, **pf(threads_count=2))
    with dev:
        t0 = time.monotonic()
        dev.prefetch_all()
        dev.prefetch_files([chunks_of(img, "/text")])
        assert time.monotonic() - t0 < 0.2
        assert dev.wait_prefetch(30)
        assert dev.is_blob_ready(0)
