"""Early writeback of the blob cache's dirty pages (issue 17; nydus/storage/writeback.py): the
cache starts writeback of what it wrote every 8 MiB per file and when a blob is complete, on one
worker thread, never failing or blocking a writer; closed descriptors and fork are handled. A
complete blob is made durable (fdatasync of the data file, then of its chunk map) on that
thread, never a reader's or a writer's.

The first two tests run against older code too (they see sync_file_range through nydus.libc
and fdatasync through os only); the others import the module inside the test."""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import nydus.libc
from nydus.metadata import BlobInfo, ChunkInfo

MIB = 1 << 20
BATCH = 8 * MIB
SYNC_FILE_RANGE_WRITE = 2


class FakeLibc:
    """Records sync_file_range calls (inode, offset, length, flags, thread name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, int, str]] = []
        self.lock = threading.Lock()

    def sync_file_range(self, fd: int, off: int, n: int, flags: int) -> int:
        with self.lock:
            self.calls.append((os.fstat(fd).st_ino, off, n, flags, threading.current_thread().name))
        return 0

    def of(self, ino: int) -> list[tuple[int, int, int]]:
        with self.lock:
            return [(off, n, flags) for i, off, n, flags, _ in self.calls if i == ino]


def chunk(i: int, size: int = MIB) -> ChunkInfo:
    return ChunkInfo(b"", 0, i, i * size, i * size, size, i * size, size, False)


def wait_for(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def covered(calls: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The byte ranges the calls started, merged; asserts that no byte was started twice and
    that every call asked for SYNC_FILE_RANGE_WRITE."""
    spans = sorted((off, off + n) for off, n, _ in calls)
    assert all(flags == SYNC_FILE_RANGE_WRITE for *_, flags in calls), calls
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start < merged[-1][1]:
            raise AssertionError(f"range started twice: {spans}")
        if merged and start == merged[-1][1]:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def test_cache_starts_writeback_of_exactly_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 x 8 MiB written (the first batch in reverse order): sync_file_range over exactly those
    bytes, each once, SYNC_FILE_RANGE_WRITE, not on the writer's thread (one call per batch, or
    fewer when the worker was behind and a waiting file took the later batch into its own); 2
    MiB more start nothing; the blob's last chunk (blob complete) starts the remaining 3 MiB."""
    from nydus.storage.blobcache import BlobCacheFile

    fake = FakeLibc()
    monkeypatch.setattr(nydus.libc, "libc", lambda: fake)
    count = 27
    info = BlobInfo(0, "c" * 64, MIB, count, "none", "sha256", 0, count * MIB, count * MIB)
    cache = BlobCacheFile(str(tmp_path), info)
    try:
        ino = os.stat(cache.path).st_ino
        payload = b"\xa5" * MIB
        for i in [*range(7, -1, -1), *range(8, 24)]:
            assert cache.write(chunk(i), payload)
            cache.mark_ready([i])
        want = [(0, 3 * BATCH)]
        assert wait_for(lambda: covered(fake.of(ino)) == want), fake.calls
        assert 1 <= len(fake.of(ino)) <= 3, fake.calls
        started = len(fake.of(ino))
        for i in (24, 25):
            assert cache.write(chunk(i), payload)
            cache.mark_ready([i])
        time.sleep(0.2)
        assert len(fake.of(ino)) == started  # 2 MiB: below a batch, nothing started yet
        assert cache.write(chunk(26), payload)
        cache.mark_ready([26])
        assert cache.all_ready
        assert wait_for(lambda: covered(fake.of(ino)) == [(0, count * MIB)]), fake.calls
        assert (24 * MIB, 3 * MIB, SYNC_FILE_RANGE_WRITE) in fake.of(ino)
        threads = {t for i, *_, t in fake.calls if i == ino}
        assert threading.current_thread().name not in threads
        assert len(threads) == 1
    finally:
        cache.close()


def test_the_cache_syncs_a_complete_blob_off_the_writers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default cache (the process's writeback): no fdatasync of the data file while a
    chunk is missing; once the blob is complete, one, after its writeback was started, on
    another thread than the writer's (main's code starts writeback and never syncs)."""
    from nydus.storage.blobcache import BlobCacheFile

    fake = FakeLibc()
    monkeypatch.setattr(nydus.libc, "libc", lambda: fake)
    synced: list[tuple[int, str, int]] = []  # inode, thread, sync_file_range calls before

    def fdatasync(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, threading.current_thread().name, len(fake.calls)))

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    info = BlobInfo(0, "a" * 64, MIB, 3, "none", "sha256", 0, 3 * MIB, 3 * MIB)
    cache = BlobCacheFile(str(tmp_path), info)
    try:
        ino = os.stat(cache.path).st_ino
        for i in (0, 1):
            assert cache.write(chunk(i), b"w" * MIB)
            cache.mark_ready([i])
        time.sleep(0.2)
        assert [s for s in synced if s[0] == ino] == []
        assert cache.write(chunk(2), b"w" * MIB)
        cache.mark_ready([2])
        assert wait_for(lambda: [s for s in synced if s[0] == ino])
        time.sleep(0.2)
        mine = [s for s in synced if s[0] == ino]
        assert len(mine) == 1
        assert mine[0][1] != threading.current_thread().name
        assert mine[0][2] >= 1 and covered(fake.of(ino)) == [(0, 3 * MIB)]
    finally:
        cache.close()


def test_close_starts_writeback_of_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nydus.storage.blobcache import BlobCacheFile
    from nydus.storage.writeback import Writeback

    calls: list[tuple[int, int]] = []
    wb = Writeback(lambda fd, off, n: calls.append((off, n)))
    info = BlobInfo(0, "d" * 64, MIB, 4, "none", "sha256", 0, 4 * MIB, 4 * MIB)
    cache = BlobCacheFile(str(tmp_path), info, writeback=wb)
    assert cache.write(chunk(2), b"x" * MIB)
    assert cache.write(chunk(1), b"x" * MIB)
    cache.close()
    assert wb.idle(5)
    assert calls == [(MIB, 2 * MIB)]
    off = BlobCacheFile(str(tmp_path), info, writeback=None)  # off: nothing to account
    assert off.write(chunk(0), b"x" * MIB)
    off.close()
    assert calls == [(MIB, 2 * MIB)]


def test_batches_merge_adjacent_ranges_only() -> None:
    from nydus.storage.writeback import Writeback, merge_ranges

    assert merge_ranges([(10, 5), (0, 10), (20, 1), (15, 2), (16, 1)]) == [(0, 17), (20, 1)]
    calls: list[tuple[int, int]] = []
    wb = Writeback(lambda fd, off, n: calls.append((off, n)), batch=4 * MIB)
    r, w = os.pipe()
    try:
        f = wb.file(r)
        for off in (0, MIB, 3 * MIB):
            f.wrote(off, MIB)
        assert wb.idle(1) and calls == []
        f.wrote(5 * MIB, MIB)  # 4 MiB pending: one batch, three ranges
        assert wb.idle(5)
        assert calls == [(0, 2 * MIB), (3 * MIB, MIB), (5 * MIB, MIB)]
        assert wb.ranges_started == 3 and wb.bytes_started == 4 * MIB
    finally:
        os.close(r)
        os.close(w)


def test_a_slow_disk_drops_nothing() -> None:
    """Batches written while the worker is busy join the waiting file's ranges: one more call
    over all of them once the worker is free, none dropped however small the queue."""
    from nydus.storage.writeback import Writeback

    gate = threading.Event()
    calls: list[tuple[int, int]] = []

    def slow(fd: int, off: int, n: int) -> None:
        gate.wait(5)
        calls.append((off, n))

    wb = Writeback(slow, batch=MIB, queue_limit=1)
    r, w = os.pipe()
    try:
        f = wb.file(r)
        f.wrote(0, MIB)  # the worker is held at the gate on this one
        assert wait_for(lambda: wb._current >= 0)
        for k in (3, 1, 2, 5, 6, 7, 8, 9):
            f.wrote(k * MIB, MIB)
        other = wb.file(w)
        other.wrote(0, MIB)  # a second file: over the queue limit of 1, dropped
        gate.set()
        assert wb.idle(5)
    finally:
        os.close(r)
        os.close(w)
    assert calls == [(0, MIB), (MIB, 3 * MIB), (5 * MIB, 5 * MIB)]
    assert wb.dropped == 1


def test_a_closed_descriptor_drops_the_batch_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Closed before the batch: dropped, no exception; closed after it was queued: the dup
    keeps it valid; EBADF from the call itself: counted, no traceback, no warning."""
    from nydus.storage.writeback import Writeback

    caplog.set_level(logging.DEBUG, logger="nydus.storage.writeback")
    gate = threading.Event()
    seen: list[tuple[int, int, int]] = []

    def sync(fd: int, off: int, n: int) -> None:
        gate.wait(5)
        seen.append((os.fstat(fd).st_ino, off, n))

    wb = Writeback(sync, batch=MIB)
    p = tmp_path / "f"
    p.write_bytes(b"\0" * 4 * MIB)
    fd = os.open(p, os.O_RDWR)
    f = wb.file(fd)
    f.wrote(0, MIB)  # the worker is held at the gate on this one
    assert wait_for(lambda: wb._current >= 0)
    f.wrote(MIB, MIB)  # queued behind it, with its own dup
    os.close(fd)
    gate.set()
    assert wb.idle(5)
    assert seen == [(p.stat().st_ino, 0, MIB), (p.stat().st_ino, MIB, MIB)]
    f.wrote(2 * MIB, MIB)  # the descriptor is gone: nothing to dup
    f.flush()
    assert wb.idle(5) and len(seen) == 2 and wb.dropped == 1

    def bad(fd: int, off: int, n: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    wb.sync = bad
    r, w = os.pipe()
    try:
        wb.file(r).wrote(0, MIB)
        assert wb.idle(5)
    finally:
        os.close(r)
        os.close(w)
    assert wb.errors == 1
    assert not [x for x in caplog.records if x.exc_info or x.levelno >= logging.WARNING]


def test_sync_file_range_through_libc(tmp_path: Path) -> None:
    """The real call: dirty pages of a file, then the descriptor closed (EBADF)."""
    from nydus.storage.writeback import start_writeback

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"z" * (3 * MIB), MIB)
        start_writeback(fd, MIB, 3 * MIB)
        start_writeback(fd, 0, 0)  # 0: to the end of the file
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        start_writeback(fd, 0, MIB)
    assert e.value.errno == errno.EBADF


def test_fork_child_gets_a_fresh_writeback() -> None:
    """A fork while the parent's worker is busy, a batch is queued and another thread holds
    the lock: the child closes the parent's queued descriptors, and its own batches are
    handled by its own thread (without the reset the child would deadlock on the lock)."""
    from nydus.storage.writeback import Writeback

    gate = threading.Event()

    def held_at_gate(fd: int, off: int, n: int) -> None:
        gate.wait(10)

    wb = Writeback(held_at_gate, batch=MIB)
    r, w = os.pipe()
    held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with wb._lock:
            held.set()
            release.wait(10)

    try:
        f = wb.file(r)
        f.wrote(0, MIB)  # the worker waits at the gate with this batch's dup
        assert wait_for(lambda: wb._current >= 0)
        f.wrote(MIB, MIB)  # queued
        inherited = [q._dup for q in wb._queue] + [wb._current]
        assert len(inherited) == 2
        holder = threading.Thread(target=hold_lock)
        holder.start()
        assert held.wait(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            pid = os.fork()
        if pid == 0:  # the child: report through the exit status, never return into pytest
            code = 1
            try:
                signal.alarm(10)
                closed = 0
                for fd in inherited:
                    try:
                        os.fstat(fd)
                    except OSError:
                        closed += 1
                got: list[tuple[int, int]] = []
                wb.sync = lambda fd, off, n: got.append((off, n))
                wb.file(r).wrote(2 * MIB, MIB)
                ok = wb.idle(5) and got == [(2 * MIB, MIB)]
                code = 0 if ok and closed == 2 else 2 if not ok else 3
            finally:
                os._exit(code)
        release.set()
        holder.join()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status), f"child killed by signal {os.WTERMSIG(status)} (deadlock?)"
        assert os.WEXITSTATUS(status) == 0
        gate.set()
        assert wb.idle(5)
        assert wb.ranges_started == 2  # the parent's batches, unaffected
    finally:
        gate.set()
        release.set()
        os.close(r)
        os.close(w)


class SyncLog:
    """One ordered record of sync_file_range ("range") and fdatasync ("data"/"map") calls:
    (kind, inode, thread name); ``hold`` makes the fdatasync of one inode wait for ``gate``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, str]] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        self.hold = -1
        self.fail: list[int] = []  # errnos the next fdatasync calls raise, in turn

    def _add(self, kind: str, fd: int) -> None:
        ino = os.fstat(fd).st_ino
        if ino == self.hold:
            self.gate.wait(10)
        with self.lock:
            if kind != "range" and self.fail:
                raise OSError(self.fail.pop(0), os.strerror(errno.EIO))
            self.events.append((kind, ino, threading.current_thread().name))

    def sync(self, fd: int, off: int, n: int) -> None:
        self._add("range", fd)

    def datasync(self, fd: int) -> None:
        self._add("sync", fd)

    def kinds(self) -> list[tuple[str, int]]:
        with self.lock:
            return [(k, i) for k, i, _ in self.events]


def small_cache(tmp_path: Path, wb: Any, count: int = 4) -> Any:
    from nydus.storage.blobcache import BlobCacheFile

    info = BlobInfo(0, "e" * 64, MIB, count, "none", "sha256", 0, count * MIB, count * MIB)
    return BlobCacheFile(str(tmp_path), info, writeback=wb)


def test_a_complete_blob_is_made_durable_data_then_map_on_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No fdatasync while chunks are missing; the last chunk: the rest's writeback started,
    then fdatasync of the data file, then of the chunk map, on the worker thread, and
    ``durable``. Asking again syncs nothing more; a chunk cleared and written again makes the
    blob not durable until it was synced again."""
    from nydus.storage.writeback import Writeback

    sl = SyncLog()
    monkeypatch.setattr(os, "fdatasync", sl.datasync)  # the chunk map's sync
    wb = Writeback(sl.sync, datasync=sl.datasync, batch=64 * MIB)
    cache = small_cache(tmp_path, wb)
    try:
        data, cmap = os.stat(cache.path).st_ino, os.stat(cache.map_path).st_ino
        for i in (2, 0, 1):
            assert cache.write(chunk(i), b"d" * MIB)
            cache.mark_ready([i])
        assert wb.idle(5) and not cache.durable and wb.idle(5)
        assert sl.kinds() == []  # incomplete: nothing asked, not even by ``durable``
        assert cache.write(chunk(3), b"d" * MIB)
        cache.mark_ready([3])
        assert wait_for(lambda: cache.durable)
        assert sl.kinds() == [("range", data), ("sync", data), ("sync", cmap)]
        assert {t for *_, t in sl.events} == {"nydus-writeback"}
        assert wb.synced == 1
        cache.mark_ready([3])  # complete again: the same state, no second sync
        assert cache.durable and wb.idle(5) and len(sl.events) == 3
        cache.clear(1)
        assert not cache.durable
        assert cache.write(chunk(1), b"d" * MIB)
        assert not cache.durable  # written, not yet synced
        cache.mark_ready([1])
        assert wait_for(lambda: cache.durable)
        assert sl.kinds()[3:] == [("range", data), ("sync", data), ("sync", cmap)]
    finally:
        cache.close()


def test_a_blob_found_complete_is_synced_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache file completed by someone else (another process, an earlier run): not durable
    for this object until it synced the file itself, which ``durable`` asks for once."""
    from nydus.storage.writeback import Writeback

    writer = small_cache(tmp_path, None)
    for i in range(4):
        assert writer.write(chunk(i), b"o" * MIB)
        writer.mark_ready([i])
    sl = SyncLog()
    monkeypatch.setattr(os, "fdatasync", sl.datasync)
    wb = Writeback(sl.sync, datasync=sl.datasync)
    cache = small_cache(tmp_path, wb)
    try:
        data, cmap = os.stat(cache.path).st_ino, os.stat(cache.map_path).st_ino
        assert cache.all_ready and not cache.durable
        assert wait_for(lambda: cache.durable)
        assert sl.kinds() == [("sync", data), ("sync", cmap)]  # no range: nothing written here
        assert cache.durable and wb.idle(5) and len(sl.events) == 2
    finally:
        cache.close()
        writer.close()


def test_a_failed_sync_is_not_durable_and_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """fdatasync fails (EIO): not durable, one warning, counted, no exception anywhere; the
    next ``durable`` asks again and the retry succeeds."""
    from nydus.storage.writeback import Writeback

    caplog.set_level(logging.DEBUG, logger="nydus.storage.writeback")
    sl = SyncLog()
    sl.fail = [errno.EIO]
    monkeypatch.setattr(os, "fdatasync", sl.datasync)
    wb = Writeback(sl.sync, datasync=sl.datasync)
    cache = small_cache(tmp_path, wb, count=1)
    try:
        data = os.stat(cache.path).st_ino
        assert cache.write(chunk(0), b"f" * MIB)
        cache.mark_ready([0])
        assert wb.idle(5)
        assert wb.errors == 1 and wb.synced == 0
        assert not cache.durable  # and that asked again
        assert wait_for(lambda: cache.durable)
        assert sl.kinds()[0] == ("range", data)
        assert [k for k, _ in sl.kinds()[1:]] == ["sync", "sync"]  # data, then the map
        assert wb.synced == 1
    finally:
        cache.close()
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "durable" in warned[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


def test_a_slow_sync_blocks_no_reader_or_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the chunk map's fdatasync hangs on the worker: the blob reads, its bits change,
    and another cache file is written and queued, each on the caller's thread without
    waiting for the sync (a lock held across it would hang them: joined with a deadline)."""
    from nydus.storage.writeback import Writeback

    sl = SyncLog()
    monkeypatch.setattr(os, "fdatasync", sl.datasync)
    wb = Writeback(sl.sync, datasync=sl.datasync, batch=MIB)
    cache = small_cache(tmp_path / "a", wb, count=1)
    other = small_cache(tmp_path / "b", wb, count=2)
    sl.hold, done = os.stat(cache.map_path).st_ino, threading.Event()
    sl.gate.clear()
    try:
        assert cache.write(chunk(0), b"s" * MIB)
        cache.mark_ready([0])
        assert wait_for(lambda: ("sync", os.stat(cache.path).st_ino) in sl.kinds())

        def use() -> None:
            assert cache.read(chunk(0)) == b"s" * MIB
            cache.clear(0)
            assert not cache.is_ready(0) and not cache.durable
            assert other.write(chunk(1), b"t" * MIB)
            other.mark_ready([1])
            done.set()

        t = threading.Thread(target=use)
        t.start()
        t.join(10)
        held = not sl.gate.is_set()
        sl.gate.set()
        t.join()
        assert held and done.is_set()
        assert wb.idle(5)
        assert ("range", os.stat(other.path).st_ino) in sl.kinds()
        assert not cache.durable  # synced, but a chunk is missing since
    finally:
        sl.gate.set()
        cache.close()
        other.close()
