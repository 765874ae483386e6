"""Chunk fetching for one blob: cache lookup, in-flight dedup, amplification, merging,
decompression and validation (nydus-reference.md §3.1, §3.4, §3.5).

:class:`BlobFetcher` turns "give me these chunks" into the fewest backend range requests:

1. Chunks whose readiness bit is set are read from the cache file. They are hashed again when
   validation is on (``digest_validate``: every cache read) or when this process cannot vouch
   for them (:meth:`BlobCacheFile.trusted`, see :mod:`.verified`); a bad cached chunk is
   cleared and fetched again.
2. A chunk another thread is already fetching is waited for, not fetched twice: each missing
   chunk is *claimed* in an in-flight table under one lock, and its claimant publishes the
   bytes (or the error) to every waiter. The claim is dropped only after the readiness bit is
   set, so a reader always finds a chunk either ready or in flight.
3. A miss is widened to the following not-ready, unclaimed chunks of the blob (in blob order,
   from the ci array) while the fetched span stays within ``amplify_io`` (at least 128 KiB,
   as upstream v6). The extra chunks are cached but not returned: while a fetch slot is
   free, the read's own chunks are decoded, verified and handed back first, the extra ones
   after, on that slot (a read of one of them waits for that). A read that misses right
   where an earlier window ended (a sequential reader, :mod:`.streams`) also claims the next
   window, fetched on a slot once its own chunks are in (read-ahead).
4. Claimed chunks are sorted by compressed offset and merged into one request when the gap
   between them is at most ``amplify_io >> 7``; several requests run in parallel.
5. Each chunk is decompressed, checked for size (and CRC32 when its ci entry carries one) and
   hashed and compared with its digest, always, whatever ``validate`` says (a zstd frame has no
   checksum: a corrupted one can decode to wrong bytes). The digest is the bootstrap's (the
   chunk's own, or ``chunk_lookup`` for chunks located through the ci array, whose placement
   must agree with it), else the blob's digest array; a chunk with no digest anywhere is not
   served. A mismatch is an IntegrityError: the chunk alone is fetched once more, and if it is
   still bad the read fails. Bad bytes are never returned or written to the cache.

Backend requests go through the device's :class:`.scheduler.FetchScheduler`: a read's requests
as user jobs, each fetching, verifying and caching its chunks (the first on the reader's
thread, the others in parallel on fetch slots); a prefetch batch is queued there
(:meth:`BlobFetcher.queue_prefetch`) and fetched on a fetch slot when users leave the link
free. A read that wants a chunk of a batch still queued fetches that chunk (and its usual
amplification) itself at user priority; the batch stays queued at prefetch priority and skips
what is then ready or in flight (so nothing is fetched twice, and a user request is no larger
than without prefetch: a promoted 1 MiB batch cost the reader ~40 ms at 200 Mbit/s). A chunk
whose prefetch is in flight is waited for like any other.

Thread-safe; many readers and the fetch slots share one fetcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
import zlib
from array import array
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from .. import codec
from ..errors import BackendError, FormatError, IntegrityError, NydusError, UnsupportedError
from ..format import blob_meta as bm
from ..format.rafs_v6 import BLOB_FEATURE_ZRAN
from ..metadata import BlobInfo, ChunkInfo
from ..singleflight import Flight, FlightTable
from .backend import Fetch
from .blobcache import BlobCacheFile
from .metacache import BlobMeta
from .metrics import BlobcacheMetrics
from .scheduler import FetchScheduler, PrefetchJob
from .streams import Streams
from .zran import ZranChunks, is_zran

__all__ = ["BlobFetcher", "Chunk", "MIN_AMPLIFY"]

log = logging.getLogger(__name__)

MIN_AMPLIFY = 0x20000
_UNSUPPORTED_FLAGS = bm.CI_V2_FLAG_BATCH | bm.CI_V2_FLAG_ENCRYPTED
_ATTEMPTS = 3

FetchRanges = Callable[[Sequence[tuple[int, int]]], list[bytes]]
# after a read: (the fetcher, chunks read from the cache or another's flight, chunks it missed)
OnRead = Callable[["BlobFetcher", Sequence[int], Sequence["Chunk"]], None]


@dataclass(frozen=True)
class Chunk:
    """A chunk resolved to its place in the blob (from the bootstrap or the ci array)."""

    index: int
    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed: bool
    digest: bytes = b""
    flags: int = 0
    crc32: int = 0

    @property
    def end(self) -> int:
        return self.compressed_offset + self.compressed_size


def _same_place(rec: ChunkInfo, e: bm.CiEntry) -> bool:
    return (
        rec.compressed_offset,
        rec.compressed_size,
        rec.uncompressed_offset,
        rec.uncompressed_size,
    ) == (e.compressed_offset, e.compressed_size, e.uncompressed_offset, e.uncompressed_size)


def _ci_chunk(index: int, e: bm.CiEntry, digest: bytes) -> Chunk:
    """Chunk ``index`` of the blob's ci array, with the digest to check it against."""
    crc = e.data & 0xFFFFFFFF if e.flags & bm.CI_V2_FLAG_HAS_CRC32 else 0
    return Chunk(
        index,
        e.compressed_offset,
        e.compressed_size,
        e.uncompressed_offset,
        e.uncompressed_size,
        e.compressed,
        digest,
        e.flags,
        crc,
    )


@dataclass
class _Group:
    start: int
    end: int
    chunks: list[tuple[Chunk, Flight[bytes]]]


class BlobFetcher:
    """Fetches, verifies and caches the chunks of one blob."""

    def __init__(
        self,
        info: BlobInfo,
        fetch: Fetch,
        *,
        cache: BlobCacheFile | None = None,
        meta: Callable[[], BlobMeta | None] | None = None,
        digests: Callable[[], Sequence[bytes] | None] | None = None,
        validate: bool = False,
        amplify_io: int = 1 << 20,
        metrics: BlobcacheMetrics | None = None,
        scheduler: FetchScheduler | None = None,
        fetch_ranges: FetchRanges | None = None,
        chunk_lookup: Callable[[int], ChunkInfo | None] | None = None,
        on_read: OnRead | None = None,
    ) -> None:
        self.info = info
        # told of each read's hits and misses once it is done (locality readahead)
        self.on_read = on_read
        self._lookup = chunk_lookup
        self._fetch = fetch
        self._fetch_ranges_fn = fetch_ranges
        self.cache = cache
        self._meta_fn = meta
        self._digests_fn = digests
        self.validate = validate
        self.amplify = max(amplify_io, MIN_AMPLIFY) if amplify_io > 0 else 0
        self.merge_gap = self.amplify >> 7
        self.max_request = max(self.amplify, 1 << 20)
        self.metrics = metrics or BlobcacheMetrics("", "")
        self.scheduler = scheduler
        self.compressor = codec.compressor_by_name(info.compressor)
        self.digester = codec.digester_by_name(info.digester)
        self._lock = threading.Lock()
        self._inflight: FlightTable[int, bytes] = FlightTable()
        self._streams = Streams(64)  # where recent user fetches ended (see _plan)
        self._meta: BlobMeta | None = None
        self._meta_loaded = False
        # chunk indexes in blob (compressed offset) order, and each chunk's position in it
        self._order: array[int] = array("I")
        self._order_pos: array[int] = array("I")
        self._digests: Sequence[bytes] | None = None
        self._digests_loaded = False
        self._load_lock = threading.Lock()
        self._zran: ZranChunks | None = None

    # ------------------------------------------------------------------ lazy metadata

    def meta(self) -> BlobMeta | None:
        """The ci array (fetched on first use), or None for blobs without one (v5)."""
        if self._meta_loaded:
            return self._meta
        with self._load_lock:
            if not self._meta_loaded:
                meta = self._meta_fn() if self._meta_fn else None
                if meta is not None:
                    order = array("I", sorted(range(len(meta.ci)), key=meta.ci.coff.__getitem__))
                    pos = array("I", bytes(4 * len(order)))
                    for p, idx in enumerate(order):
                        pos[idx] = p
                    self._order, self._order_pos = order, pos
                self._meta = meta
                self._meta_loaded = True
        return self._meta

    def _digest_array(self) -> Sequence[bytes] | None:
        if self._digests_loaded:
            return self._digests
        with self._load_lock:
            if not self._digests_loaded:
                self._digests = self._digests_fn() if self._digests_fn else None
                self._digests_loaded = True
        return self._digests

    def chunk_from_ci(self, index: int) -> Chunk:
        meta = self.meta()
        if meta is None or not 0 <= index < len(meta.ci):
            raise FormatError(f"blob {self.info.blob_id}: no chunk info for chunk {index}")
        e = meta.ci[index]
        digest = b""
        rec = self._lookup(index) if self._lookup is not None else None
        if rec is not None:
            if not _same_place(rec, e):
                raise FormatError(
                    f"blob {self.info.blob_id}: chunk {index} placement in the blob's chunk "
                    f"info array disagrees with the bootstrap"
                )
            digest = rec.digest
        return _ci_chunk(index, e, digest)

    def resolve(self, c: ChunkInfo) -> Chunk:
        """A bootstrap chunk as a fetchable :class:`Chunk`."""
        if c.compressed_size < 0:
            ch = self.chunk_from_ci(c.index)
            if c.digest and c.digest != ch.digest:
                ch = dataclasses.replace(ch, digest=c.digest)  # the bootstrap is trusted
            return ch
        if c.index < 0 or (self.info.chunk_count and c.index >= self.info.chunk_count):
            raise FormatError(f"blob {self.info.blob_id}: chunk index {c.index} out of range")
        flags = crc = 0
        zran = self.info.features & BLOB_FEATURE_ZRAN  # its chunk flags are in the ci array
        meta = self.meta() if zran else self._meta if self._meta_loaded else None
        if meta is not None and c.index < len(meta.ci):
            e = meta.ci[c.index]
            if (e.compressed_offset, e.compressed_size) != (c.compressed_offset, c.compressed_size):
                raise FormatError(
                    f"blob {self.info.blob_id}: chunk {c.index} placement in the bootstrap "
                    f"disagrees with the blob's chunk info array"
                )
            flags = e.flags
            crc = e.data & 0xFFFFFFFF if e.flags & bm.CI_V2_FLAG_HAS_CRC32 else 0
        return Chunk(
            c.index,
            c.compressed_offset,
            c.compressed_size,
            c.uncompressed_offset,
            c.uncompressed_size,
            c.compressed,
            c.digest,
            flags,
            crc,
        )

    # ------------------------------------------------------------------ reads

    def read(self, chunks: Sequence[Chunk], *, amplify: bool = True) -> list[bytes]:
        """Verified, decompressed bytes of ``chunks`` in order."""
        want: dict[int, Chunk] = {}
        for c in chunks:
            want.setdefault(c.index, c)
        got: dict[int, bytes] = {}
        last_error: BaseException | None = None
        hits_first = 0
        seen: list[int] = []
        missed: list[Chunk] = []
        for attempt in range(_ATTEMPTS):
            need = [c for i, c in want.items() if i not in got]
            if not need:
                break
            hits, waits, claims, ahead = self._plan(need, amplify and attempt == 0)
            if attempt == 0 and self.on_read is not None:
                seen = [c.index for c in hits] + [c.index for c, _ in waits]
                missed = [c for c, _ in claims] + [c for c, _ in ahead]
            for c in hits:
                data = self._read_cached(c)
                if data is not None:
                    got[c.index] = data
            if attempt == 0:
                hits_first = len(got)
            if claims or waits:
                self._fetch_for_user(claims, waits, ahead, want.keys())
            for c, p in claims:
                if c.index not in want:
                    continue
                if p.value is not None:
                    got[c.index] = p.value
                else:
                    assert p.error is not None
                    raise p.error  # our own fetch already retried integrity errors once
            for c, p in waits:
                if p.value is not None:
                    got[c.index] = p.value
                elif p.error is not None:
                    last_error = p.error  # another reader's fetch failed: try ourselves
        self._count_hits(len(want), hits_first)
        missing = [i for i in want if i not in got]
        if missing:
            raise last_error or BackendError(
                f"blob {self.info.blob_id}: chunks {missing[:8]} could not be read"
            )
        if seen or missed:
            self.notify_read(seen, missed)
        return [got[c.index] for c in chunks]

    def notify_read(self, seen: Sequence[int], missed: Sequence[Chunk]) -> None:
        """Tell :attr:`on_read` of a read done (never fails the read)."""
        if self.on_read is None:
            return
        try:
            self.on_read(self, seen, missed)
        except Exception:  # a bug in the listener must not fail a read that succeeded
            log.exception("blob %s: read listener failed", self.info.blob_id)

    def window_after(self, pos: int, span: int) -> tuple[list[Chunk], int, int]:
        """The chunks from blob-order position ``pos`` on while their compressed span from the
        first stays within ``span`` bytes (at least one chunk is looked at), less those ready,
        in flight, unsupported or too large for the cache: what a readahead window fetches.
        Also the position after the last chunk looked at and the compressed end of the span
        (-1 when nothing was looked at). Nothing without a ci array or a cache."""
        meta, cache = self._meta, self.cache
        if meta is None or cache is None or not 0 <= pos < len(self._order):
            return [], pos, -1
        out: list[Chunk] = []
        coff, csize = meta.ci.coff, meta.ci.csize
        start = coff[self._order[pos]]
        end = start
        first = pos
        with self._lock:
            while pos < len(self._order):
                idx = self._order[pos]
                new_end = coff[idx] + csize[idx]
                if pos > first and new_end - start > span:
                    break
                pos += 1
                end = max(end, new_end)
                if (ch := self._fetchable_locked(idx)) is not None:
                    out.append(ch)
        return out, pos, end

    def order_position(self, index: int) -> int | None:
        """Chunk ``index``'s position in blob (compressed offset) order; None if unknown."""
        pos = self._order_pos
        return pos[index] if 0 <= index < len(pos) else None

    def _fetch_for_user(
        self,
        claims: list[tuple[Chunk, Flight[bytes]]],
        waits: list[tuple[Chunk, Flight[bytes]]],
        ahead: list[tuple[Chunk, Flight[bytes]]],
        wanted: Collection[int],
    ) -> None:
        """Fetch a read's claims at user priority and wait for the flights it shares; no
        prefetch request starts meanwhile. The read-ahead
        window goes out when the claims are in, as a user job the read does not wait for."""
        sched = self.scheduler
        t0 = time.perf_counter_ns()
        try:
            with sched.user_demand() if sched is not None else contextlib.nullcontext():
                if claims:
                    self._run(claims, wanted=wanted)
                if ahead:
                    ahead, started = [], ahead
                    self._start_ahead(claims, started)
                for _, p in waits:
                    p.wait()
        finally:
            if ahead:  # interrupted before it went out
                self._resolve(ahead, BackendError(f"blob {self.info.blob_id}: not fetched"))
            self.metrics.add("readpath_user_fetches")
            self.metrics.add("readpath_user_fetch_micros", (time.perf_counter_ns() - t0) // 1000)

    def _start_ahead(
        self, claims: list[tuple[Chunk, Flight[bytes]]], ahead: list[tuple[Chunk, Flight[bytes]]]
    ) -> None:
        """Fetch ``ahead`` on a fetch slot, unless the read's own fetch failed."""
        failed = next((p.error for _, p in claims if p.error is not None), None)
        if failed is not None or self.scheduler is None:
            self._resolve(ahead, BackendError(f"blob {self.info.blob_id}: read-ahead dropped"))
            return
        self.metrics.add("readpath_ahead_requests")
        self.scheduler.start_user(
            functools.partial(self._run, ahead, user=False),
            functools.partial(self._resolve, ahead, NydusError("fetch scheduler is closed")),
        )

    def _count_hits(self, total: int, hits: int) -> None:
        m = self.metrics
        m.add("total")
        if total and hits == total:
            m.add("whole_hits")
        elif hits:
            m.add("partial_hits")

    def _plan(
        self, need: list[Chunk], amplify: bool
    ) -> tuple[
        list[Chunk],
        list[tuple[Chunk, Flight[bytes]]],
        list[tuple[Chunk, Flight[bytes]]],
        list[tuple[Chunk, Flight[bytes]]],
    ]:
        """Split a read into cache hits, flights to wait for, chunks to claim and the claimed
        read-ahead window."""
        hits: list[Chunk] = []
        waits: list[tuple[Chunk, Flight[bytes]]] = []
        claims: list[tuple[Chunk, Flight[bytes]]] = []
        ahead: list[tuple[Chunk, Flight[bytes]]] = []
        mine: set[int] = set()
        cache = self.cache
        if amplify and cache is not None and self.amplify:
            self.meta()  # load outside the lock
        with self._lock:
            for c in need:
                if c.index in mine:
                    continue
                if cache is not None and cache.is_ready(c.index):
                    hits.append(c)
                elif (p := self._inflight.get(c.index)) is not None:
                    waits.append((c, p))
                else:
                    claims.append((c, self._inflight.claim(c.index)))
                    mine.add(c.index)
            if claims and amplify and cache is not None and (amp := self.amplify):
                first = min((c for c, _ in claims), key=lambda c: c.compressed_offset)
                last = max((c for c, _ in claims), key=lambda c: c.end)
                stream = self._streams.follow(first.compressed_offset, self.merge_gap)
                claims.extend(self._claim_after_locked(last, first.compressed_offset, mine))
                last = max((c for c, _ in claims), key=lambda c: c.end)
                if stream is not None:  # a sequential reader: claim the window after it too
                    ahead = self._claim_after_locked(last, last.end, set())
                last = ahead[-1][0] if ahead else last
                if (pos := self.order_position(last.index)) is not None:  # remember its end
                    self._streams.note(stream, last.compressed_offset, last.end, pos + 1, amp)
        return hits, waits, claims, ahead

    def _claim_after_locked(
        self, last: Chunk, start: int, taken: set[int]
    ) -> list[tuple[Chunk, Flight[bytes]]]:
        """Claim the not-ready, unclaimed chunks after ``last`` in blob order (not in ``taken``)
        while the span from ``start`` stays within ``amplify_io`` (amplification of a miss)."""
        pos = self.order_position(last.index)
        if self._meta is None or self.cache is None or pos is None:
            return []
        end, amp, gap, order = last.end, self.amplify, self.merge_gap, self._order
        out: list[tuple[Chunk, Flight[bytes]]] = []
        for p in range(pos + 1, len(order)):
            idx = order[p]
            if idx in taken:
                continue
            ch = self._fetchable_locked(idx)
            if ch is None or ch.end - start > amp or ch.compressed_offset - end > gap:
                break
            out.append((ch, self._inflight.claim(idx)))
            end = max(end, ch.end)
        return out

    def _fetchable_locked(self, idx: int) -> Chunk | None:
        """Chunk ``idx`` of the ci array for a window: None if it is unsupported, ready, in
        flight or too large for the cache."""
        assert self._meta is not None and self.cache is not None
        e = self._meta.ci[idx]
        if e.flags & _UNSUPPORTED_FLAGS or self.cache.is_ready(idx) or idx in self._inflight:
            return None
        digest = b""
        rec = self._lookup(idx) if self._lookup is not None else None
        if rec is not None and _same_place(rec, e):
            digest = rec.digest  # otherwise the digest array, or the chunk is not cached
        elif self._digests_loaded and self._digests is not None:
            digest = self._digests[idx]
        ch = _ci_chunk(idx, e, digest)
        return ch if self.cache.fits(ch) else None

    # ------------------------------------------------------------------ cache side

    def _read_cached(self, c: Chunk) -> bytes | None:
        cache = self.cache
        assert cache is not None
        try:
            stored = cache.read(c)
            data = self._decode(c, stored) if cache.compressed else stored
            if self.validate or not cache.trusted(c.index):
                self.verify(c, data)
                cache.mark_verified([c.index])
            return data
        except NydusError as e:
            log.warning(
                "blob %s chunk %d: cached copy is bad (%s); fetching it again",
                self.info.blob_id,
                c.index,
                e,
            )
            cache.clear(c.index)
            return None

    # ------------------------------------------------------------------ backend side

    def _merge(
        self, claims: list[tuple[Chunk, Flight[bytes]]], max_request: int | None = None
    ) -> list[_Group]:
        limit = max_request or self.max_request
        groups: list[_Group] = []
        for c, p in sorted(claims, key=lambda t: self._span(t[0])):
            start, end = self._span(c)
            g = groups[-1] if groups else None
            if (
                g is not None
                and start - g.end <= self.merge_gap
                and max(g.end, end) - g.start <= limit
            ):
                g.end = max(g.end, end)
                g.chunks.append((c, p))
            else:
                groups.append(_Group(start, end, [(c, p)]))
        return groups

    def _fetch_now(self, start: int, end: int) -> bytes:
        """One backend request, on the calling thread."""
        if self._fetch_ranges_fn is not None:
            return self._fetch_ranges_fn([(start, end)])[0]
        return self._fetch(start, end)

    def _run(
        self,
        claims: list[tuple[Chunk, Flight[bytes]]],
        groups: list[_Group] | None = None,
        *,
        user: bool = True,
        wanted: Collection[int] | None = None,
        fetched: Callable[[int], object] | None = None,
    ) -> None:
        """Fetch, verify and cache claimed chunks, one job per merged request: user jobs of
        the scheduler (in parallel, the first on this thread), or one after the other on this
        thread (``user=False``: a prefetch job on its slot). ``fetched(nbytes)`` is told of
        each request's bytes as they arrive, before their CPU work. Always resolves every
        claim."""
        try:
            if groups is None:
                groups = self._merge(claims)
            queued = time.perf_counter_ns() if user else None
            jobs = [
                functools.partial(self._fetch_group, g, queued, wanted, fetched) for g in groups
            ]
            if user and self.scheduler is not None:
                self.scheduler.run_user(jobs)
            else:
                for job in jobs:
                    job()
        except BaseException as e:  # no job ran (a closed scheduler), or interrupted
            err = e if isinstance(e, NydusError) else BackendError(f"fetch failed: {e!r}")
            self._resolve(claims, err)
            if not isinstance(e, Exception):
                raise

    def _resolve(self, claims: list[tuple[Chunk, Flight[bytes]]], err: NydusError) -> None:
        """Fail the claims not resolved yet with ``err``, release every claim and settle."""
        with self._lock:
            for c, p in claims:
                if p.value is None and p.error is None:
                    p.error = err
                self._inflight.release(c.index, p)
        for _, p in claims:
            p.settle()

    def _fetch_group(
        self,
        g: _Group,
        queued: int | None,
        wanted: Collection[int] | None = None,
        fetched: Callable[[int], object] | None = None,
    ) -> None:
        """One merged request: fetch it, decode, verify and cache its chunks, then release
        and settle their claims (waiters wake as soon as their request is done).
        ``fetched(nbytes)`` runs once the request's bytes have arrived,
        before the CPU work (a prefetch job gives its share of the link back). With
        ``wanted`` (a reader's chunks) and a fetch slot free, the group's other chunks
        (amplification) are decoded, verified and cached after the reader's are settled, by
        a user job on that slot (with every slot busy, handing work over only adds
        thread switches).
        Errors go to the claims, never up."""
        m = self.metrics
        err: NydusError | None = None
        try:
            t0 = time.perf_counter_ns()
            try:
                raw = self._fetch_now(g.start, g.end)
            except OSError as e:
                raise BackendError(f"blob {self.info.blob_id}: {e}") from e
            finally:
                if queued is not None:
                    m.add("readpath_requests")
                    m.add("readpath_queue_micros", (t0 - queued) // 1000)
                    m.add("readpath_backend_micros", (time.perf_counter_ns() - t0) // 1000)
                if fetched is not None:
                    fetched(g.end - g.start)
            now, later = g.chunks, []
            if (
                wanted is not None
                and self.scheduler is not None
                and self.scheduler.user_slot_free()
            ):
                now = [t for t in g.chunks if t[0].index in wanted]
                later = [t for t in g.chunks if t[0].index not in wanted]
            if now and later:
                assert self.scheduler is not None
                self._store(g.start, raw, now)
                self._resolve(now, BackendError(f"blob {self.info.blob_id}: not fetched"))
                self.scheduler.start_user(
                    functools.partial(self._store_later, g.start, raw, later),
                    functools.partial(self._resolve, later, NydusError("fetch scheduler closed")),
                )
                return
            self._store(g.start, raw, g.chunks)
        except NydusError as e:
            err = e
        except Exception as e:  # a bug or an untranslated error below us: report, do not leak
            log.exception("blob %s: fetch failed", self.info.blob_id)
            err = BackendError(f"blob {self.info.blob_id}: fetch failed: {e!r}")
        except BaseException as e:
            self._resolve(
                g.chunks, BackendError(f"blob {self.info.blob_id}: fetch interrupted: {e!r}")
            )
            raise
        self._resolve(g.chunks, err or BackendError(f"blob {self.info.blob_id}: not fetched"))

    def _store_later(
        self, start: int, raw: bytes, chunks: list[tuple[Chunk, Flight[bytes]]]
    ) -> None:
        """:meth:`_store` then resolve (a fetched request's amplified chunks, on a slot)."""
        err: NydusError | None = None
        try:
            self._store(start, raw, chunks)
        except Exception as e:  # a bug below us: report, do not leak
            log.exception("blob %s: caching fetched chunks failed", self.info.blob_id)
            err = BackendError(f"blob {self.info.blob_id}: fetch failed: {e!r}")
        finally:
            self._resolve(chunks, err or BackendError(f"blob {self.info.blob_id}: not fetched"))

    def _store(self, start: int, raw: bytes, chunks: list[tuple[Chunk, Flight[bytes]]]) -> None:
        """Decode and verify each chunk of ``raw`` (the blob from ``start``), set its flight's
        value (or error) and write it to the cache (marked ready)."""
        m = self.metrics
        ready: list[int] = []
        plain = self._zran_decode([c for c, _ in chunks], raw, start)
        for c, p in chunks:
            lo = c.compressed_offset - start
            payload = raw[lo : lo + c.compressed_size]
            try:
                data = self._checked(c, payload, plain)
            except IntegrityError as e:
                log.warning(
                    "blob %s chunk %d: %s; fetching it again", self.info.blob_id, c.index, e
                )
                try:
                    span_start, span_end = self._span(c)
                    payload = self._fetch_now(span_start, span_end)
                    data = self._checked(c, payload, self._zran_decode([c], payload, span_start))
                except NydusError as e2:
                    p.error = e2
                    continue
            except NydusError as e:
                p.error = e
                continue
            p.value = data
            t1 = time.perf_counter_ns()
            if self.cache is not None and self.cache.write(
                c, payload if self.cache.compressed else data
            ):
                ready.append(c.index)
            m.add("readpath_cache_micros", (time.perf_counter_ns() - t1) // 1000)
        if self.cache is not None and ready:
            try:
                self.cache.mark_ready(ready)
                m.add("entries_count", len(ready))
            except (OSError, NydusError) as e:
                log.warning("blob %s: cannot mark chunks ready: %s", self.info.blob_id, e)

    def _checked(
        self, c: Chunk, payload: bytes, plain: dict[int, bytes | NydusError] | None = None
    ) -> bytes:
        """Decoded and verified bytes of a chunk from the backend (always verified); a zran
        chunk's bytes come decoded in ``plain``."""
        t0 = time.perf_counter_ns()
        if is_zran(c):
            got = (plain or {}).get(c.index) or IntegrityError(f"zran chunk {c.index} not decoded")
            if isinstance(got, NydusError):
                raise got
            data = got
        else:
            data = self._decode(c, payload)
        t1 = time.perf_counter_ns()
        self.verify(c, data)
        m = self.metrics
        m.add("readpath_decode_micros", (t1 - t0) // 1000)
        m.add("readpath_verify_micros", (time.perf_counter_ns() - t1) // 1000)
        return data

    # ------------------------------------------------------------------ zran (storage/zran.py)

    def _span(self, c: Chunk) -> tuple[int, int]:
        """The blob range to fetch for ``c``: from its access point for a zran chunk."""
        return self._zran_chunks().span(c.index) if is_zran(c) else (c.compressed_offset, c.end)

    def _zran_chunks(self) -> ZranChunks:
        if self._zran is None:
            meta = self.meta()
            if meta is None:
                raise FormatError(f"blob {self.info.blob_id}: zran chunks without chunk info")
            self._zran = ZranChunks(self.info.blob_id, meta.ci, meta.zran_table)
        return self._zran

    def _zran_decode(
        self, chunks: list[Chunk], raw: bytes, start: int
    ) -> dict[int, bytes | NydusError]:
        if not any(is_zran(c) for c in chunks):
            return {}
        return self._zran_chunks().decode(chunks, raw, start)

    def _decode(self, c: Chunk, payload: bytes) -> bytes:
        if c.flags & _UNSUPPORTED_FLAGS:
            raise UnsupportedError(
                f"blob {self.info.blob_id} chunk {c.index}: zran/batch/encrypted chunks are "
                f"not supported"
            )
        if len(payload) != c.compressed_size:
            raise IntegrityError(f"blob {self.info.blob_id} chunk {c.index}: short data")
        if c.compressed:
            data = codec.decompress(self.compressor, payload, c.uncompressed_size)
        else:
            if len(payload) != c.uncompressed_size:
                raise IntegrityError(
                    f"blob {self.info.blob_id} chunk {c.index}: stored size != uncompressed size"
                )
            data = payload
        if c.flags & bm.CI_V2_FLAG_HAS_CRC32 and zlib.crc32(data) != c.crc32:
            raise IntegrityError(f"blob {self.info.blob_id} chunk {c.index}: CRC32 mismatch")
        return data

    def verify(self, c: Chunk, data: bytes) -> None:
        """IntegrityError unless ``data`` hashes to the chunk's digest (module docstring)."""
        digest = c.digest
        if not digest:
            digests = self._digest_array()
            if digests is not None and c.index < len(digests):
                digest = digests[c.index]
        if not digest:
            raise IntegrityError(
                f"blob {self.info.blob_id} chunk {c.index}: no digest in the bootstrap or the "
                f"blob, so it cannot be verified and is not served"
            )
        if self.digester.digest(data) != digest:
            raise IntegrityError(
                f"blob {self.info.blob_id} chunk {c.index}: {self.digester.name} digest mismatch"
            )

    # ------------------------------------------------------------------ prefetch

    def queue_prefetch(self, job: PrefetchJob, *, front: bool = False) -> bool:
        """Queue ``job`` (whose ``run`` calls :meth:`prefetch`) on the scheduler, at the head
        of the prefetch queue with ``front``. False if the job was not queued (no scheduler,
        or closed: its ``on_drop`` was called)."""
        if self.scheduler is None:
            job.on_drop()
            return False
        if front:
            return self.scheduler.submit_front(job)
        return self.scheduler.submit_prefetch(job)

    def prefetch(
        self,
        chunks: Sequence[Chunk],
        *,
        max_request: int = 1 << 20,
        before_fetch: Callable[[int], object] | None = None,
        fetched: Callable[[int], object] | None = None,
    ) -> tuple[int, int]:
        """Fetch and cache those of ``chunks`` that are neither ready nor in flight, on this
        thread (the queued batch now running, see :meth:`queue_prefetch`).

        Requests are merged up to ``max_request`` bytes; ``before_fetch(nbytes)`` runs first
        (the bandwidth limiter), ``fetched(nbytes)`` as each request's bytes arrive, before
        they are decoded, verified and cached (:meth:`.scheduler.PrefetchJob.fetched`).
        Returns (chunks cached, compressed bytes requested). Errors are logged, never raised:
        prefetch is best effort.
        """
        cache = self.cache
        if cache is None:
            return 0, 0
        claims: list[tuple[Chunk, Flight[bytes]]] = []
        with self._lock:
            for c in chunks:
                if cache.is_ready(c.index) or c.index in self._inflight or not cache.fits(c):
                    continue
                p = self._inflight.claim(c.index)
                claims.append((c, p))
        if not claims:
            return 0, 0
        groups = self._merge(claims, max_request)
        nbytes = sum(g.end - g.start for g in groups)
        try:
            if before_fetch is not None:
                before_fetch(nbytes)
            self._run(claims, groups, user=False, fetched=fetched)
        except Exception as e:  # never let a prefetch worker die
            log.warning("prefetch of blob %s failed: %s", self.info.blob_id, e)
        finally:
            # before_fetch may raise before _run resolved the claims
            with self._lock:
                for c, p in claims:
                    if self._inflight.get(c.index) is p and not p.settled:
                        self._inflight.release(c.index, p)
                        p.error = p.error or BackendError("prefetch cancelled")
                        p.settle()
        failed = [p.error for _, p in claims if p.value is None]
        if failed and failed[0] is not None:
            log.warning(
                "prefetch of blob %s: %d chunks failed: %s",
                self.info.blob_id,
                len(failed),
                failed[0],
            )
        return len(claims) - len(failed), nbytes
