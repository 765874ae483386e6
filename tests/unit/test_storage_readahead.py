"""Locality readahead (storage/readahead.py): after a user read misses the cache, the chunks
after it are queued at the head of the prefetch queue, in windows that grow from 128 KiB while
the misses stay sequential, up to ``readahead_size``. Over the in-process fake link of
test_storage_scheduler (the test image's /big is 41 chunks of exactly 64 KiB, stored as is)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_storage_device import (  # type: ignore
    Image,
    _corrupt,
    build,
    chunks_of,
    config,
    data_requests,
    device,
    fetched_chunk_indexes,
)
from test_storage_scheduler import Link, in_thread  # type: ignore

from nydus.config import DaemonConfig
from nydus.errors import ConfigError, IntegrityError
from nydus.storage import BlobDevice, MemoryBackend
from nydus.storage.scheduler import FetchScheduler, PrefetchJob

K = 1 << 10


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("img"), "zstd")


def ra_device(img: Image, wd: Path, be: MemoryBackend | None = None, **pf: Any) -> BlobDevice:
    """Prefetch on (no prefetch_all queued: readahead alone), no amplification, windows in
    one request each."""
    dev, _ = device(
        img,
        wd,
        backend=be,
        amplify_io=0,
        fs_prefetch={"enable": True, "threads_count": 1, "merging_size": 1 << 20, **pf},
    )
    return dev


def read(dev: BlobDevice, img: Image, i: int) -> None:
    """A user read of /big's chunk ``i`` (checked), then until the readahead it queued is in."""
    c = chunks_of(img, "/big")[i]
    assert dev.read_chunks([c])[0] == img.files["/big"][i * 64 * K : i * 64 * K + 64 * K]
    assert dev.wait_prefetch(10)


def test_sequential_misses_grow_the_window_up_to_readahead_size(img: Image, tmp_path: Path) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    dev = ra_device(img, tmp_path / "c", be, readahead_size=512 * K)
    f = dev._blob(0).fetcher
    with dev:
        read(dev, img, 0)  # miss: 128 KiB window (chunks 1-2)
        assert data_requests(be, img) == [(0, 64 * K), (64 * K, 128 * K)]
        for i in (1, 2):
            read(dev, img, i)  # from the cache: no request, no window
        assert len(data_requests(be, img)) == 2
        read(dev, img, 3)  # the next miss, right after the window: 256 KiB (4-7)
        for i in range(4, 8):
            read(dev, img, i)
        read(dev, img, 8)  # 512 KiB (9-16)
        for i in range(9, 17):
            read(dev, img, i)
        read(dev, img, 17)  # stays at 512 KiB (18-25)
        reqs = data_requests(be, img)
        assert [s for _, s in reqs] == [
            *(64 * K, 128 * K),
            *(64 * K, 256 * K),
            *(64 * K, 512 * K),
            *(64 * K, 512 * K),
        ]
        assert reqs[-1][0] == 18 * 64 * K
        assert dev.readahead is not None and dev.readahead.windows(f) == [512 * K]
        assert sorted(fetched_chunk_indexes(be, img)) == list(range(26))  # each once


def test_a_jump_starts_a_new_stream_at_128k(img: Image, tmp_path: Path) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    dev = ra_device(img, tmp_path / "c", be)
    f = dev._blob(0).fetcher
    with dev:
        read(dev, img, 0)
        read(dev, img, 3)  # 256 KiB
        read(dev, img, 30)  # a jump: 128 KiB (31-32)
        assert data_requests(be, img)[-1] == (31 * 64 * K, 128 * K)
        assert dev.readahead is not None and dev.readahead.windows(f) == [256 * K, 128 * K]
        read(dev, img, 8)  # right after the first stream's window: it goes on, at 512 KiB
        assert data_requests(be, img)[-1] == (9 * 64 * K, 512 * K)
        assert dev.readahead.windows(f) == [128 * K, 512 * K]


def test_cached_chunks_are_skipped(img: Image, tmp_path: Path) -> None:
    wd = tmp_path / "c"
    be = MemoryBackend({img.blob_id: img.blob})
    with ra_device(img, wd, be, readahead_size=0) as dev:
        read(dev, img, 2)  # chunk 2 cached, nothing read ahead
    assert data_requests(be, img) == [(2 * 64 * K, 64 * K)]
    be = MemoryBackend({img.blob_id: img.blob})
    with ra_device(img, wd, be) as dev:
        read(dev, img, 0)  # the window is chunks 1-2: only 1 is fetched
        assert data_requests(be, img) == [(0, 64 * K), (64 * K, 64 * K)]
        m = dev.metrics_blobcache()
        assert m["readahead_bytes"] == 64 * K


def test_readahead_only_with_prefetch_and_a_nonzero_size(img: Image, tmp_path: Path) -> None:
    def requests(**top: Any) -> list[tuple[int, int]]:
        be = MemoryBackend({img.blob_id: img.blob})
        dev, _ = device(img, tmp_path / str(len(seen)), backend=be, amplify_io=0, **top)
        with dev:
            read(dev, img, 0)
            seen.append(dev.readahead is not None)
        return data_requests(be, img)

    seen: list[bool] = []
    on = {"enable": True, "prefetch_all": False}
    assert requests(fs_prefetch=on) == [(0, 64 * K), (64 * K, 128 * K)]  # on by default
    assert requests(fs_prefetch={**on, "readahead_size": 0}) == [(0, 64 * K)]
    assert requests() == [(0, 64 * K)]  # lazy: no prefetch, no readahead
    assert seen == [True, False, False]


def test_readahead_never_goes_out_while_a_user_read_is_on_the_backend(
    img: Image, tmp_path: Path
) -> None:
    link = Link(img)
    text = chunks_of(img, "/text")
    link.hold(text[0].index)
    dev = ra_device(img, tmp_path / "c", link.backend)
    try:
        t, out = in_thread(lambda: dev.read_chunks([text[0]]))
        link.wait_started(text[0].index)  # a user read on the backend, held there
        read_big0 = dev.read_chunks([chunks_of(img, "/big")[0]])  # a miss: window 1-2 queued
        assert read_big0[0] == img.files["/big"][: 64 * K]
        time.sleep(0.3)
        assert dev.scheduler.prefetch_queued == 1
        assert [1, 2] not in link.started_chunks()
        n_before = len(link.started_chunks())
        link.release_all()
        t.join(10)
        assert out and out[0][0] == img.files["/text"][: len(out[0][0])]  # type: ignore[index]
        assert dev.wait_prefetch(10)
        started = link.started_chunks()
        assert started.index([1, 2]) >= n_before  # only after the user read was done
    finally:
        link.release_all()
        dev.close()


def test_readahead_does_not_wait_for_the_user_idle_hold_off(img: Image, tmp_path: Path) -> None:
    link = Link(img)
    dev = ra_device(img, tmp_path / "c", link.backend)
    dev.scheduler.user_idle = 60.0  # speculative prefetch waits a minute after a user read
    try:
        t0 = time.monotonic()
        dev.read_chunks([chunks_of(img, "/big")[0]])
        link.wait_started(1)
        assert time.monotonic() - t0 < 5
        assert dev.wait_prefetch(10)
        # a speculative prefetch batch is still held off by the user read
        dev.prefetch_files([chunks_of(img, "/dir/mid")], hinted=False)
        time.sleep(0.3)
        mid = {c.index for c in chunks_of(img, "/dir/mid")}
        assert not any(set(cs) & mid for cs in link.started_chunks())
    finally:
        dev.close()


def test_readahead_bytes_count_as_prefetch_and_hits_are_counted(img: Image, tmp_path: Path) -> None:
    be = MemoryBackend({img.blob_id: img.blob})
    with ra_device(img, tmp_path / "c", be) as dev:
        read(dev, img, 0)
        m = dev.metrics_blobcache()
        assert m["readahead_windows"] == m["readahead_requests"] == 1
        assert m["readahead_bytes"] == m["prefetch_data_amount"] == 128 * K
        assert m["prefetch_requests_count"] == 1
        assert m["readahead_hits"] == 0
        read(dev, img, 1)
        assert dev.read_range(0, 2 * 64 * K, 1000) == img.files["/big"][2 * 64 * K :][:1000]
        m = dev.metrics_blobcache()
        assert m["readahead_hits"] == 2  # chunks 1 and 2, each once
        big = chunks_of(img, "/big")
        assert m["readahead_hit_bytes"] == big[1].compressed_size + big[2].compressed_size
        assert m["readahead_requests"] == 1  # hits queue no window


def test_a_corrupted_chunk_fetched_by_readahead_is_not_cached(img: Image, tmp_path: Path) -> None:
    big = chunks_of(img, "/big")
    be = MemoryBackend({img.blob_id: _corrupt(img, big[1])})
    with ra_device(img, tmp_path / "c", be) as dev:
        read(dev, img, 0)  # window 1-2: 1 is bad (refetched once, still bad), 2 is good
        cache = dev._blob(0).cache
        assert cache is not None
        assert not cache.is_ready(1) and cache.is_ready(2)
        assert fetched_chunk_indexes(be, img).count(1) == 2
        with pytest.raises(IntegrityError):
            dev.read_chunks([big[1]])
        assert dev.read_chunks([big[2]])[0] == img.files["/big"][2 * 64 * K : 3 * 64 * K]


V2 = """version = 2
[backend]
type = "localfs"
[backend.localfs]
dir = "/x"
[rafs.prefetch]
enable = true
readahead_size = {}
"""


def test_readahead_size_is_parsed_in_v1_and_v2(tmp_path: Path) -> None:
    assert config(None).fs_prefetch.readahead_size == 1 << 20
    assert config(None, fs_prefetch={"readahead_size": 0}).fs_prefetch.readahead_size == 0
    v2 = DaemonConfig.from_json(V2.format(262144), environ={})
    assert v2.fs_prefetch.enable and v2.fs_prefetch.readahead_size == 262144


@pytest.mark.parametrize("bad", [-1, '"1m"', 1.5, "true"])
def test_bad_readahead_size_is_rejected(bad: Any) -> None:
    v1 = bad if not isinstance(bad, str) else {'"1m"': "1m", "true": True}[bad]
    why = r"(-1 is out of range 0\.\.|expected integer, got )"  # not "unknown key"
    with pytest.raises(ConfigError, match=rf"^fs_prefetch\.readahead_size: {why}"):
        config(None, fs_prefetch={"readahead_size": v1})
    with pytest.raises(ConfigError, match=rf"^rafs\.prefetch\.readahead_size: {why}"):
        DaemonConfig.from_json(V2.format(bad), environ={})
    # blob-level prefetch has no readahead key: still an unknown key there
    with pytest.raises(ConfigError, match=r"cache\.prefetch\.readahead_size: unknown key"):
        DaemonConfig.from_json(
            V2.replace("[rafs.prefetch]", "[cache.prefetch]").format(65536), environ={}
        )


def test_scheduler_runs_a_front_job_first_and_without_the_idle_hold_off() -> None:
    sched = FetchScheduler(slots=1, prefetch_cap=1, user_idle=60.0)
    order: list[str] = []
    ran = threading.Event()
    try:
        sched.run_user([lambda: None])  # a user read just ended: the hold-off runs a minute
        sched.submit_prefetch(PrefetchJob(lambda: order.append("P"), lambda: None))
        sched.submit_front(
            PrefetchJob(lambda: order.append("R") or ran.set(), lambda: None, readahead=True)
        )
        assert ran.wait(5)
        time.sleep(0.2)
        assert order == ["R"]  # the speculative job still waits for the hold-off
        sched.user_idle = 0.0
        sched.submit_front(PrefetchJob(lambda: order.append("R2"), lambda: None, readahead=True))
        deadline = time.monotonic() + 5
        while len(order) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert order == ["R", "R2", "P"]  # the head of the queue first
    finally:
        sched.close()
