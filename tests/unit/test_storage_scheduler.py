"""User reads first: the fetch scheduler on its own (slot order, the prefetch cap, close) and
through a blob device over an in-process fake link that records the order in which requests
start and can hold any of them (a read of a queued prefetch batch's chunk, waiting on
in-flight prefetch, no new prefetch while a user read waits, prefetch completing when users
are idle)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_storage_device import (  # type: ignore
    Image,
    _ci,
    build,
    chunks_of,
    data_requests,
    device,
    fetched_chunk_indexes,
)

from nydus.errors import NydusError
from nydus.storage import BlobDevice, MemoryBackend
from nydus.storage.fetcher import BlobFetcher
from nydus.storage.prefetch import batches
from nydus.storage.scheduler import PREFETCH_NICE, FetchScheduler, PrefetchJob

# ------------------------------------------------------------------ the scheduler alone


def test_user_jobs_go_out_at_once_and_ahead_of_queued_prefetch() -> None:
    order: list[str] = []
    lock = threading.Lock()
    sched = FetchScheduler(slots=1, prefetch_cap=1)
    p_hold, u_hold = threading.Event(), threading.Event()

    def job(name: str, hold: threading.Event | None = None) -> Callable[[], str]:
        def run() -> str:
            with lock:
                order.append(name)
            if hold is not None:
                assert hold.wait(10)
            return name

        return run

    def wait_len(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(order) < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    try:
        sched.submit_prefetch(PrefetchJob(job("P0", p_hold), lambda: None))
        wait_len(1)
        for i in range(1, 6):
            sched.submit_prefetch(PrefetchJob(job(f"P{i}"), lambda: None))
        out: list[list[str]] = []
        t = threading.Thread(
            target=lambda: out.append(sched.run_user([job("U0", u_hold), job("U1"), job("U2")]))
        )
        t.start()
        wait_len(2)  # U0 went out while P0 is in flight
        p_hold.set()
        time.sleep(0.2)
        assert order == ["P0", "U0"]  # no prefetch starts while user jobs run or wait
        u_hold.set()
        t.join(10)
        assert out == [["U0", "U1", "U2"]]
        wait_len(9)
        assert order == ["P0", "U0", "U1", "U2", "P1", "P2", "P3", "P4", "P5"]
    finally:
        p_hold.set()
        u_hold.set()
        sched.close()


def test_user_jobs_started_behind_prefetch_in_flight_are_counted() -> None:
    sched = FetchScheduler(slots=1, prefetch_cap=1)
    hold, running = threading.Event(), threading.Event()
    try:
        assert sched.run_user([lambda: 1]) == [1]
        sched.submit_prefetch(
            PrefetchJob(lambda: running.set() or hold.wait(10), lambda: None, 4096)
        )
        assert running.wait(10)
        assert sched.run_user([lambda: 2]) == [2]  # shares the link with 4096 prefetch bytes
        assert sched.behind_prefetch == [1, 4096]
    finally:
        hold.set()
        sched.close()


def test_a_users_request_runs_on_its_own_thread_while_a_slot_is_free() -> None:
    """No hand-off to a fetch thread and back for a read's (first) request; the others of
    the read go to the slots, in parallel with it."""
    sched = FetchScheduler(slots=2, prefetch_cap=1)
    me = threading.current_thread()
    try:
        assert sched.run_user([threading.current_thread]) == [me]
        first, second = sched.run_user([threading.current_thread, threading.current_thread])
        assert first is me and second is not me
    finally:
        sched.close()


def test_requests_on_readers_threads_count_against_the_user_slots() -> None:
    """With every slot taken by readers' own requests, a queued request waits for one (the
    cap holds) and prefetch does not start while any of them runs."""
    sched = FetchScheduler(slots=1, prefetch_cap=1)
    hold = threading.Event()
    running = threading.Event()
    order: list[str] = []

    def held() -> str:
        running.set()
        assert hold.wait(10)
        order.append("A")
        return "A"

    try:
        t1, out1 = in_thread(lambda: sched.run_user([held]))
        assert running.wait(10)
        sched.submit_prefetch(PrefetchJob(lambda: order.append("P"), lambda: None))
        t2, out2 = in_thread(lambda: sched.run_user([lambda: order.append("B") or "B"]))
        time.sleep(0.2)
        assert order == []  # B waits for the slot A holds on its reader's thread; P for both
        hold.set()
        t1.join(10)
        t2.join(10)
        assert out1 == [["A"]] and out2 == [["B"]]
        deadline = time.monotonic() + 10
        while len(order) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert order == ["A", "B", "P"]
    finally:
        hold.set()
        sched.close()


def test_a_started_user_job_runs_even_when_the_scheduler_closes() -> None:
    """A read's amplification goes out as a job the read does not wait for: closing the
    scheduler (a device closing) lets it finish; once closed, none is accepted."""
    sched = FetchScheduler(slots=1, prefetch_cap=1)
    hold = threading.Event()
    ran: list[str] = []
    t, _ = in_thread(lambda: sched.run_user([lambda: hold.wait(10)]))
    time.sleep(0.1)
    assert sched.start_user(lambda: ran.append("ran"), lambda: ran.append("dropped"))
    threading.Timer(0.2, hold.set).start()
    sched.close()
    t.join(10)
    assert ran == ["ran"]
    assert not sched.start_user(lambda: ran.append("late"), lambda: ran.append("dropped"))
    assert ran == ["ran", "dropped"]


class Jobs:
    """Prefetch jobs that take 20 ms each; counts how many ran at once at most."""

    def __init__(self) -> None:
        self.running = self.peak = self.done = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
            self.done += 1

    def wait_done(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.done < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.done == n


def test_prefetch_in_flight_is_capped_and_waits_for_user_demand() -> None:
    sched = FetchScheduler(slots=4, prefetch_cap=2)
    jobs = Jobs()
    try:
        with sched.user_demand():
            for _ in range(10):
                sched.submit_prefetch(PrefetchJob(jobs.run, lambda: None))
            time.sleep(0.2)
            assert jobs.done == 0 and sched.prefetch_queued == 10  # nothing started
        jobs.wait_done(10)
        assert jobs.peak == 2
    finally:
        sched.close()


def test_prefetch_bytes_in_flight_are_capped() -> None:
    for nbytes, expect in ((60, 1), (40, 2)):  # cap 100 bytes: one job always may run
        sched = FetchScheduler(slots=4, prefetch_cap=3, prefetch_bytes=100)
        jobs = Jobs()
        try:
            with sched.user_demand():  # queue them all before any starts
                for _ in range(8):
                    sched.submit_prefetch(PrefetchJob(jobs.run, lambda: None, nbytes))
            jobs.wait_done(8)
            assert jobs.peak == expect
        finally:
            sched.close()


def test_a_prefetch_jobs_fetched_bytes_leave_the_byte_cap_before_it_ends() -> None:
    # the cap is for bytes on the wire: a job whose request is in (decoding, verifying and
    # caching it) lets the next request go out; one that has not said so still counts
    sched = FetchScheduler(slots=2, prefetch_cap=3, prefetch_bytes=100)
    cpu_work = threading.Event()
    started: list[int] = []
    in_cpu_work: list[int] = []
    lock = threading.Lock()

    def run(i: int, job: list[PrefetchJob], announce: bool) -> None:
        with lock:
            started.append(i)
        if announce:
            job[0].fetched(60)
        with lock:
            in_cpu_work.append(i)
        assert cpu_work.wait(10)

    def make(i: int, announce: bool) -> PrefetchJob:
        ref: list[PrefetchJob] = []
        ref.append(PrefetchJob(lambda: run(i, ref, announce), lambda: None, 60))
        return ref[0]

    try:
        with sched.user_demand():  # queue them before any starts
            for i, announce in enumerate((True, True, False, False)):
                sched.submit_prefetch(make(i, announce))
        deadline = time.monotonic() + 10
        while len(started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert started == [0, 1, 2]  # 0 and 1 gave their bytes back; 2 holds the cap
        assert in_cpu_work == [0, 1, 2]  # all three still running
        cpu_work.set()
        deadline = time.monotonic() + 10
        while len(started) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started == [0, 1, 2, 3]
        with sched._cond:
            deadline = time.monotonic() + 10
            assert sched._cond.wait_for(lambda: sched._prefetch_running == 0, 10)
            assert sched._prefetch_bytes_running == 0  # given back exactly once
    finally:
        cpu_work.set()
        sched.close()


def test_fetched_outside_a_slot_is_a_no_op() -> None:
    job = PrefetchJob(lambda: None, lambda: None, 10)
    job.fetched(10)  # not running on a slot: nothing to give back, nothing raised


def test_prefetch_resumes_only_after_users_were_idle_a_while() -> None:
    sched = FetchScheduler(slots=2, prefetch_cap=1, user_idle=0.3)
    started: list[float] = []
    try:
        with sched.user_demand():
            sched.submit_prefetch(
                PrefetchJob(lambda: started.append(time.monotonic()), lambda: None)
            )
        ended = time.monotonic()
        deadline = ended + 10
        while not started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert started and started[0] - ended >= 0.25
    finally:
        sched.close()


def test_take_and_close() -> None:
    sched = FetchScheduler(slots=2, prefetch_cap=1)
    hold = threading.Event()
    dropped: list[int] = []
    ran: list[int] = []
    started = threading.Event()

    def blocker() -> None:
        started.set()
        hold.wait(10)

    sched.submit_prefetch(PrefetchJob(blocker, lambda: dropped.append(0)))
    assert started.wait(10)
    jobs = [
        PrefetchJob(lambda i=i: ran.append(i), lambda i=i: dropped.append(i))  # type: ignore[misc]
        for i in range(1, 5)
    ]
    for j in jobs:
        sched.submit_prefetch(j)
    assert sched.take(jobs[1]) and not sched.take(jobs[1])
    t0 = time.monotonic()
    threading.Timer(0.2, hold.set).start()
    sched.close()
    assert time.monotonic() - t0 < 3
    assert sorted(dropped) == [1, 3, 4]  # queued ones; the taken one is the taker's
    assert ran == []
    assert not sched.take(jobs[0])
    with pytest.raises(NydusError, match="closed"):
        sched.run_user([lambda: 1])
    late = PrefetchJob(lambda: ran.append(9), lambda: dropped.append(9))
    assert not sched.submit_prefetch(late) and dropped[-1] == 9


# ------------------------------------------------------------------ through a blob device


@pytest.fixture(scope="module")
def img(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("img"), "zstd")


class Link:
    """The fake backend's link: records when each data request starts (in order) and holds
    requests whose offset is in ``held`` until that offset is released."""

    def __init__(self, image: Image) -> None:
        self.ci = _ci(image)
        self.ci_off = image.md.blobs[0].ci_offset
        self.started: list[tuple[int, int]] = []
        self.cond = threading.Condition()
        self.held: dict[int, threading.Event] = {}
        self.backend = MemoryBackend({image.blob_id: image.blob})
        self.backend.hook = self.hook

    def hold(self, chunk_index: int) -> None:
        self.held[self.ci[chunk_index][0]] = threading.Event()

    def release(self, chunk_index: int) -> None:
        self.held[self.ci[chunk_index][0]].set()

    def release_all(self) -> None:
        for ev in self.held.values():
            ev.set()

    def hook(self, _blob: str, off: int, size: int) -> None:
        if off >= self.ci_off:
            return
        with self.cond:
            self.started.append((off, size))
            self.cond.notify_all()
        ev = self.held.get(off)
        if ev is not None:
            assert ev.wait(20)

    def chunks(self, off: int, size: int) -> list[int]:
        return [i for i, (co, cs) in enumerate(self.ci) if co >= off and co + cs <= off + size]

    def started_chunks(self) -> list[list[int]]:
        with self.cond:
            return [self.chunks(o, s) for o, s in self.started]

    def wait_started(self, chunk_index: int) -> None:
        with self.cond:
            assert self.cond.wait_for(
                lambda: any(chunk_index in self.chunks(o, s) for o, s in self.started), 10
            )


def pf_device(img: Image, tmp: Path, link: Link, **kw: Any) -> BlobDevice:
    dev, _ = device(
        img,
        tmp / "c",
        backend=link.backend,
        amplify_io=0,
        fs_prefetch={"enable": True, "threads_count": 1, "merging_size": 0x10000, **kw},
    )
    return dev


def wait_queued(dev: BlobDevice, n: int) -> None:
    """Until ``n`` prefetch batches wait in the queue (prefetch_files queues them on a thread)."""
    deadline = time.monotonic() + 10
    while dev.scheduler.prefetch_queued < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def test_user_read_goes_out_before_queued_prefetch(img: Image, tmp_path: Path) -> None:
    link = Link(img)
    big = chunks_of(img, "/big")
    text = chunks_of(img, "/text")
    link.hold(big[0].index)
    dev = pf_device(img, tmp_path, link)
    try:
        dev.prefetch_files([big])  # 41 batches, one in flight (held), 40 queued
        link.wait_started(big[0].index)
        wait_queued(dev, 40)
        data = b"".join(dev.read_chunks(text))
        assert data == img.files["/text"]
        link.release_all()
        assert dev.wait_prefetch(20)
        order = link.started_chunks()
        text_idx = {c.index for c in text}
        user = [n for n, cs in enumerate(order) if set(cs) & text_idx]
        prefetch = [n for n, cs in enumerate(order) if big[0].index not in cs and n not in user]
        assert user and prefetch and max(user) < min(prefetch)
    finally:
        link.release_all()
        dev.close()


def test_user_read_of_a_queued_batch_fetches_only_its_chunk(img: Image, tmp_path: Path) -> None:
    """A read wanting a chunk of a queued prefetch batch fetches that chunk alone at user
    priority (not the whole batch: on a slow link the rest is the reader's wait); the batch
    stays queued and later fetches the rest, each chunk once."""
    link = Link(img)
    big = chunks_of(img, "/big")
    link.hold(big[0].index)
    dev = pf_device(img, tmp_path, link, merging_size=0x30000, readahead_size=0)  # no window
    try:
        f = dev._blob(0).fetcher
        work = batches([f.resolve(c) for c in big], 0x30000)
        assert len(work) > 3 and len(work[2]) > 1
        target = work[2][-1]
        dev.prefetch_files([big])
        link.wait_started(big[0].index)
        wait_queued(dev, len(work) - 1)
        want = next(c for c in big if c.index == target.index)
        (data,) = dev.read_chunks([want])  # while prefetch is stuck on its first batch
        assert data == img.files["/big"][want.file_offset : want.file_offset + len(data)]
        assert link.started_chunks()[1] == [target.index]  # the user's request: its chunk
        assert dev._blob(0).fetcher.scheduler.prefetch_queued == len(work) - 1  # batch kept
        link.release_all()
        assert dev.wait_prefetch(20)
        fetched = fetched_chunk_indexes(link.backend, img)
        assert sorted(fetched) == sorted(c.index for b in work for c in b)  # each once
    finally:
        link.release_all()
        dev.close()


def test_user_read_waits_for_prefetch_in_flight(img: Image, tmp_path: Path) -> None:
    link = Link(img)
    big = chunks_of(img, "/big")
    link.hold(big[0].index)
    dev = pf_device(img, tmp_path, link)
    try:
        dev.prefetch_files([big])
        link.wait_started(big[0].index)
        t, out = in_thread(lambda: dev.read_chunks([big[0]]))
        time.sleep(0.2)
        assert t.is_alive()  # waiting for the prefetch request, not making its own
        link.release(big[0].index)
        t.join(10)
        assert out and out[0] == [img.files["/big"][: len(out[0][0])]]  # type: ignore[index]
        assert dev.wait_prefetch(20)
        assert fetched_chunk_indexes(link.backend, img).count(big[0].index) == 1
    finally:
        link.release_all()
        dev.close()


def test_no_new_prefetch_request_while_a_user_read_waits(img: Image, tmp_path: Path) -> None:
    link = Link(img)
    big = chunks_of(img, "/big")
    text = chunks_of(img, "/text")
    link.hold(big[0].index)
    link.hold(text[0].index)
    dev = pf_device(img, tmp_path, link)
    try:
        dev.prefetch_files([big], hinted=False)
        link.wait_started(big[0].index)
        t, _ = in_thread(lambda: dev.read_chunks([text[0]]))
        link.wait_started(text[0].index)
        link.release(big[0].index)  # the prefetch request in flight finishes ...
        time.sleep(1.5)  # ... and no other starts while the user's read waits
        assert len(link.started) == 2
        link.release(text[0].index)
        t.join(10)
        assert dev.wait_prefetch(20)  # prefetch completes once the user is idle
        assert dev.cache_file(0) is not None
        big_idx = sorted(c.index for c in big)
        assert sorted(i for i in fetched_chunk_indexes(link.backend, img) if i in big_idx) == (
            big_idx
        )
    finally:
        link.release_all()
        dev.close()


def test_hinted_prefetch_keeps_the_link_while_a_user_read_waits(img: Image, tmp_path: Path) -> None:
    # the image's prefetch table (files the workload reads): holding it back while the
    # workload waits for a chunk would turn it into the workload's serial misses
    link = Link(img)
    big = chunks_of(img, "/big")
    text = chunks_of(img, "/text")
    link.hold(text[0].index)
    dev = pf_device(img, tmp_path, link, threads_count=2)
    try:
        t, _ = in_thread(lambda: dev.read_chunks([text[0]]))
        link.wait_started(text[0].index)
        dev.prefetch_files([big])  # hinted: queued while the user's read waits
        assert dev.wait_prefetch(20)  # and all fetched before that read is answered
        assert t.is_alive()
        big_idx = sorted(c.index for c in big)
        assert sorted(i for i in fetched_chunk_indexes(link.backend, img) if i in big_idx) == (
            big_idx
        )
        link.release(text[0].index)
        t.join(10)
        assert not t.is_alive()
    finally:
        link.release_all()
        dev.close()


def test_prefetch_requests_go_out_while_earlier_batches_are_decoded(
    img: Image, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the byte cap (2 batches) counts requests on the wire, not batches being decoded,
    # verified and cached: with 3 slots, a third request goes out while two batches are in
    # that CPU work; and still nothing is cached before it is verified
    link = Link(img)
    big = chunks_of(img, "/big")
    cpu_work = threading.Event()
    in_store: list[int] = []
    store = BlobFetcher._store

    def held_store(self: BlobFetcher, start: int, raw: bytes, chunks: Any) -> None:
        in_store.append(start)
        assert cpu_work.wait(20)
        store(self, start, raw, chunks)

    monkeypatch.setattr(BlobFetcher, "_store", held_store)
    dev = pf_device(img, tmp_path, link, threads_count=3)
    try:
        dev.prefetch_files([big])
        deadline = time.monotonic() + 10
        while len(link.started) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(link.started) == 3 and len(in_store) == 3
        cache = dev._blob(0).cache
        assert cache is not None and not any(cache.is_ready(c.index) for c in big)
        cpu_work.set()
        assert dev.wait_prefetch(20)
        t, out = in_thread(lambda: dev.read_chunks(big))
        t.join(10)
        assert out and b"".join(out[0]) == img.files["/big"]  # type: ignore[arg-type]
        assert sorted(fetched_chunk_indexes(link.backend, img)) == sorted(c.index for c in big)
    finally:
        cpu_work.set()
        link.release_all()
        dev.close()


def test_hinted_prefetch_job_is_admitted_during_user_demand() -> None:
    sched = FetchScheduler(slots=2, prefetch_cap=3, prefetch_bytes=100, user_idle=60.0)
    jobs = Jobs()
    try:
        with sched.user_demand():  # a user read waits, and users were never idle 60 s
            for _ in range(6):
                sched.submit_prefetch(PrefetchJob(jobs.run, lambda: None, 50, hinted=True))
            jobs.wait_done(6)
        assert jobs.peak == 2  # within the byte cap
    finally:
        sched.close()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no per-thread nice value")
def test_speculative_prefetch_yields_the_cpu_but_hinted_batches_do_not() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base == PREFETCH_NICE:
        pytest.skip("this process already runs at the prefetch priority")
    sched = FetchScheduler(slots=1, prefetch_cap=1)  # one slot: every job on the same thread
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def job(kind: str, last: bool = False) -> PrefetchJob:
        def run() -> None:
            seen.append((kind, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
            if last:
                done.set()

        return PrefetchJob(
            run, lambda: None, 1, hinted=kind == "hinted", readahead=kind == "readahead"
        )

    try:
        with sched.user_demand():  # queue them all before the slot starts
            for kind in ("hinted", "guess", "readahead", "guess"):
                sched.submit_prefetch(job(kind))
            sched.submit_prefetch(job("hinted", last=True))
        assert done.wait(10)
    finally:
        sched.close()
    # hinted jobs run first (a guess waits while a user read does), then in queue order
    can_lower = os.geteuid() == 0  # going back down from 19 needs CAP_SYS_NICE
    for kind, nice in seen:
        if kind != "hinted":  # a guess, and a readahead window (the chunks after a miss)
            assert nice == PREFETCH_NICE, (kind, seen)
        elif can_lower:
            assert nice == base, (kind, seen)
    assert sorted(k for k, _ in seen) == ["guess", "guess", "hinted", "hinted", "readahead"]


def test_prefetch_all_completes_around_user_reads(img: Image, tmp_path: Path) -> None:
    link = Link(img)
    dev = pf_device(img, tmp_path, link, threads_count=2, merging_size=0x20000)
    try:
        dev.prefetch_all()
        readers = [
            in_thread(lambda p=p: b"".join(dev.read_chunks(chunks_of(img, p))))  # type: ignore[misc]
            for p in ("/text", "/dir/mid", "/big")
        ]
        for (t, out), p in zip(readers, ("/text", "/dir/mid", "/big"), strict=True):
            t.join(20)
            assert out == [img.files[p]]
        assert dev.wait_prefetch(20)
        assert dev.is_blob_ready(0)
        fetched = fetched_chunk_indexes(link.backend, img)
        assert len(fetched) == len(set(fetched))  # no chunk fetched twice
    finally:
        dev.close()


def test_close_with_queued_prefetch_returns_promptly(img: Image, tmp_path: Path) -> None:
    link = Link(img)
    link.backend.hook = lambda *a: time.sleep(0.1)
    dev = pf_device(img, tmp_path, link)
    big = chunks_of(img, "/big")
    dev.prefetch_files([big])
    assert b"".join(dev.read_chunks(chunks_of(img, "/small"))) == img.files["/small"]
    t0 = time.monotonic()
    dev.close()
    assert time.monotonic() - t0 < 1.0
    assert len(data_requests(link.backend, img)) < len(big) // 2
    assert dev.wait_prefetch(1)  # the dropped batches count as done


# ------------------------------------------------------------------ the read path


@contextlib.contextmanager
def amplifying(img: Image, tmp: Path, hold: int = -1) -> Iterator[tuple[Link, Any, BlobDevice]]:
    """(link, the chunks of /big, a device amplifying each miss over two chunks); the link
    holds the request starting at chunk ``hold`` of /big."""
    link = Link(img)
    big = chunks_of(img, "/big")
    if hold >= 0:
        link.hold(big[hold].index)
    dev, _ = device(img, tmp / "c", backend=link.backend, amplify_io=0x20000)
    try:
        yield link, big, dev
    finally:
        link.release_all()
        dev.close()


def data_of(img: Image, c: Any) -> bytes:
    return img.files["/big"][c.file_offset : c.file_offset + c.uncompressed_size]


def test_concurrent_reads_of_neighbouring_chunks_make_one_request(
    img: Image, tmp_path: Path
) -> None:
    """A read of chunk 1 while chunk 0's fetch (amplified over chunk 1) is in flight waits for
    it: one backend request for both, each chunk fetched once."""
    with amplifying(img, tmp_path, hold=0) as (link, big, dev):
        ta, a = in_thread(lambda: dev.read_chunks([big[0]]))
        link.wait_started(big[0].index)
        tb, b = in_thread(lambda: dev.read_chunks([big[1]]))
        time.sleep(0.2)
        assert tb.is_alive()  # waiting for the request in flight, not making its own
        link.release_all()
        ta.join(10)
        tb.join(10)
        assert a == [[data_of(img, big[0])]] and b == [[data_of(img, big[1])]]
        assert link.started_chunks() == [[big[0].index, big[1].index]]


def test_a_sequential_reader_gets_the_next_window_fetched_ahead(img: Image, tmp_path: Path) -> None:
    """A read that misses right where an earlier fetch ended reads the blob sequentially: the
    window after its own goes out once its chunks are in, and the read does not wait for it;
    a later read there waits for that request instead of making one."""
    with amplifying(img, tmp_path, hold=4) as (link, big, dev):  # read-ahead starts at 4
        assert dev.read_chunks([big[0]]) == [data_of(img, big[0])]
        assert dev.read_chunks([big[2]]) == [data_of(img, big[2])]  # back while 4-5 are held
        link.wait_started(big[4].index)
        pairs = [[c.index for c in big[i : i + 2]] for i in (0, 2, 4)]
        assert link.started_chunks() == pairs
        t, out = in_thread(lambda: dev.read_chunks([big[5]]))
        time.sleep(0.2)
        assert t.is_alive()  # waiting for the read-ahead request
        link.release_all()
        t.join(10)
        assert out == [[data_of(img, big[5])]]
        assert link.started_chunks() == pairs


def test_scattered_reads_fetch_nothing_ahead(img: Image, tmp_path: Path) -> None:
    with amplifying(img, tmp_path) as (link, big, dev):
        for i in (0, 10, 3, 20):
            dev.read_chunks([big[i]])
        time.sleep(0.2)
        assert link.started_chunks() == [[big[i].index, big[i + 1].index] for i in (0, 10, 3, 20)]


def test_a_read_returns_before_its_amplified_chunks_are_verified(
    img: Image, tmp_path: Path
) -> None:
    """The chunks a read wants are decoded, verified and handed back first; the amplified
    chunks of the same request are done after, on a fetch slot (a read of one of them waits
    for that, it is not fetched again)."""
    gate = threading.Event()
    with amplifying(img, tmp_path) as (link, big, dev):
        f = dev._blob(0).fetcher
        verify = f.verify

        def slow_verify(c: Any, data: bytes) -> None:
            if c.index == big[1].index:
                assert gate.wait(10)
            verify(c, data)

        f.verify = slow_verify  # type: ignore[method-assign]
        try:
            t, out = in_thread(lambda: dev.read_chunks([big[0]]))
            t.join(5)
            assert not t.is_alive() and out == [[data_of(img, big[0])]]
            t, out = in_thread(lambda: dev.read_chunks([big[1]]))
            time.sleep(0.2)
            assert t.is_alive()  # waiting for the amplified chunk's verification
            gate.set()
            t.join(10)
            assert out == [[data_of(img, big[1])]]
            assert link.started_chunks() == [[big[0].index, big[1].index]]
        finally:
            gate.set()
