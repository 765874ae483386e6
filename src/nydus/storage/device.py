"""The blob device: the storage API the file system and the daemon use.

:func:`open_device` builds, from a bootstrap's blob table and a :class:`DaemonConfig`, one
backend, one blob cache per blob in ``work_dir`` (or none for ``dummycache``), one
:class:`BlobFetcher` per blob and a :class:`Prefetcher`, and a :class:`FetchScheduler` through
which every backend data request goes, user reads ahead of prefetch (or uses the scheduler it is
given: one per daemon). Per-blob state is created lazily on first use, so opening a device does
no I/O. With prefetch on (and ``fs_prefetch.readahead_size`` not 0), a user read that misses the
cache queues the chunks after it at the head of the prefetch queue (:mod:`.readahead`).

Every chunk that comes from the backend is verified against its digest before it is returned
or cached (see :mod:`.verified` for what is verified when); ``chunk_lookup`` (the bootstrap's
chunk records, :meth:`RafsMetadata.chunk_record`) supplies the digests of chunks located through
a blob's ci array. :meth:`BlobDevice.verify_blob` hashes a complete cached blob before
:meth:`BlobDevice.native_file` hands its cache file to the kernel.

Thread-safe: every public method may be called from many threads at once.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..config import BackendConfig, DaemonConfig
from ..errors import (
    ConfigError,
    FormatError,
    IntegrityError,
    NotFoundError,
    NydusError,
    UnsupportedError,
)
from ..format.rafs_v6 import BLOB_FEATURE_ZRAN
from ..metadata import BlobInfo, ChunkInfo
from .backend import BlobBackend
from .blobcache import BlobCacheFile
from .fetcher import BlobFetcher
from .metacache import BlobMeta, has_ci, load_blob_meta, load_digests
from .metrics import BlobcacheMetrics
from .prefetch import Prefetcher
from .readahead import Readahead
from .scheduler import FetchScheduler

__all__ = ["BlobDevice", "open_device", "create_backend"]

log = logging.getLogger(__name__)

ChunkLookup = Callable[[int, int], ChunkInfo | None]

PREFETCH_INFLIGHT_BATCHES = 2  # prefetch bytes in flight: at most this many merged batches
PREFETCH_USER_IDLE = 0.3  # seconds without a user read waiting before prefetch resumes


def create_backend(bcfg: BackendConfig, id: str = "") -> BlobBackend:
    """The backend named by ``device.backend``."""
    from ..config import (
        HttpProxyConfig,
        LocalFsConfig,
        OssConfig,
        RegistryConfig,
        S3Config,
    )

    c = bcfg.config
    if isinstance(c, LocalFsConfig):
        from .localfs import LocalFsBackend

        return LocalFsBackend(c, id)
    if isinstance(c, RegistryConfig):
        from .registry import RegistryBackend

        return RegistryBackend(c, id)
    if isinstance(c, S3Config):
        from .objectstore import S3Backend

        return S3Backend(c, id)
    if isinstance(c, OssConfig):
        from .objectstore import OssBackend

        return OssBackend(c, id)
    if isinstance(c, HttpProxyConfig):
        from .httpproxy import HttpProxyBackend

        return HttpProxyBackend(c, id)
    raise UnsupportedError(f"backend type {bcfg.type!r} is not supported")


class _Blob:
    """Per-blob state: the fetcher and, with a blob cache, its files."""

    def __init__(self, fetcher: BlobFetcher, cache: BlobCacheFile | None) -> None:
        self.fetcher = fetcher
        self.cache = cache


class BlobDevice:
    """Read verified, decompressed chunks of a set of blobs."""

    def __init__(
        self,
        blobs: Sequence[BlobInfo],
        cfg: DaemonConfig,
        backend: BlobBackend,
        id: str = "",
        chunk_lookup: ChunkLookup | None = None,
        scheduler: FetchScheduler | None = None,
    ) -> None:
        self.blobs = list(blobs)
        self.chunk_lookup = chunk_lookup
        self.cfg = cfg
        self.id = id
        self.backend = backend
        cache = cfg.device.cache
        self.work_dir: str | None = None
        if cache.type in ("blobcache", "filecache", "fscache"):
            if cache.type == "fscache":
                log.warning(
                    "fscache is not supported; using a blobcache in %s", cache.config.work_dir
                )
            if cache.config.enable_encryption:
                raise UnsupportedError("blob cache encryption is not supported")
            self.work_dir = os.path.abspath(cache.config.work_dir)
            try:
                os.makedirs(self.work_dir, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"device.cache.config.work_dir: cannot create {self.work_dir}: {e.strerror}"
                ) from e
            if not os.path.isdir(self.work_dir):
                raise ConfigError(
                    f"device.cache.config.work_dir: {self.work_dir} is not a directory"
                )
        self.compressed_cache = cache.compressed
        self.validate = cfg.validation_enabled
        self.cache_metrics = BlobcacheMetrics(id, self.work_dir or "")
        pf = cfg.fs_prefetch
        bpf = cache.prefetch_config
        self.prefetch_enabled = self.work_dir is not None and (pf.enable or bpf.enable)
        threads = pf.threads_count if pf.enable else bpf.threads_count
        merging = pf.merging_size if pf.enable else bpf.merging_size
        rate = pf.bandwidth_rate if pf.enable else bpf.bandwidth_rate
        max_chunk = max((b.chunk_size for b in self.blobs), default=0)
        self.prefetcher = Prefetcher(
            threads, merging or (1 << 20), rate, self.cache_metrics, min_rate=max_chunk
        )
        # locality readahead after user misses: with any prefetch, unless readahead_size is 0
        self.readahead = (
            Readahead(self.prefetcher, pf.readahead_size, self.cache_metrics)
            if self.prefetch_enabled and pf.readahead_size > 0
            else None
        )
        self._own_scheduler = scheduler is None
        self.scheduler = scheduler or FetchScheduler(
            prefetch_cap=threads,
            prefetch_bytes=PREFETCH_INFLIGHT_BATCHES * (merging or (1 << 20)),
            user_idle=PREFETCH_USER_IDLE,
        )
        self._state: dict[int, _Blob] = {}
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ per blob

    def _blob(self, blob_index: int) -> _Blob:
        st = self._state.get(blob_index)
        if st is not None:
            return st
        if not 0 <= blob_index < len(self.blobs):
            raise NotFoundError(f"no blob with index {blob_index}")
        with self._lock:
            st = self._state.get(blob_index)
            if st is None:
                if self._closed:
                    raise NydusError("blob device is closed")
                st = self._state[blob_index] = self._open_blob(blob_index, self.blobs[blob_index])
        return st

    def _open_blob(self, blob_index: int, info: BlobInfo) -> _Blob:
        backend, blob_id, work_dir = self.backend, info.blob_id, self.work_dir
        fetch = backend.fetcher(blob_id)

        def fetch_ranges(ranges: Sequence[tuple[int, int]]) -> list[bytes]:
            return backend.read_ranges(blob_id, [(s, e - s) for s, e in ranges])

        # a zran blob's meta (ci, ToC, digests) is a blob of its own (upstream's meta blob)
        meta_id = info.meta_blob_id or blob_id
        meta_fetch = backend.fetcher(meta_id) if info.meta_blob_id else fetch

        def blob_size() -> int:
            if info.meta_blob_id:
                return info.meta_blob_size or backend.blob_size(meta_id)
            return info.compressed_size or backend.blob_size(blob_id)

        def meta() -> BlobMeta | None:
            if not has_ci(info):
                return None
            return load_blob_meta(
                info, meta_fetch, work_dir, verify_toc=True, blob_size=blob_size()
            )

        def digests() -> Sequence[bytes] | None:
            if not any(info.toc_digest):
                return None  # a ToC the bootstrap does not vouch for cannot vouch for digests
            return load_digests(info, meta_fetch, work_dir, blob_size())

        lookup = self.chunk_lookup

        def chunk_record(index: int) -> ChunkInfo | None:
            return lookup(blob_index, index) if lookup is not None else None

        cache = None
        if work_dir is not None:
            try:
                # zran chunks are cached inflated: the layer's gzip bytes are no chunk's own
                raw = self.compressed_cache and not info.features & BLOB_FEATURE_ZRAN
                cache = BlobCacheFile(work_dir, info, compressed=raw)
            except NydusError as e:  # e.g. a blob table without sizes or chunk counts
                log.warning("blob %s is read without a cache: %s", blob_id, e)
            except OSError as e:
                raise NydusError(
                    f"cannot open the cache of blob {blob_id} in {work_dir}: {e.strerror}"
                ) from e
        if cache is not None:
            self.cache_metrics.add_file(cache.path)
            self.cache_metrics.add("entries_count", cache.ready_count())
        fetcher = BlobFetcher(
            info,
            fetch,
            cache=cache,
            meta=meta,
            digests=digests,
            validate=self.validate,
            amplify_io=self.cfg.amplify_io,
            metrics=self.cache_metrics,
            scheduler=self.scheduler,
            fetch_ranges=fetch_ranges,
            chunk_lookup=chunk_record if lookup is not None else None,
            on_read=self.readahead.on_read if self.readahead is not None else None,
        )
        return _Blob(fetcher, cache)

    # ------------------------------------------------------------------ the contract

    def read_chunks(self, chunks: Sequence[ChunkInfo]) -> list[bytes]:
        """Decompressed, verified bytes of ``chunks``, in order."""
        out: list[bytes | None] = [None] * len(chunks)
        by_blob: dict[int, list[int]] = {}
        for pos, c in enumerate(chunks):
            by_blob.setdefault(c.blob_index, []).append(pos)
        for bi, positions in by_blob.items():
            f = self._blob(bi).fetcher
            resolved = [f.resolve(chunks[p]) for p in positions]
            for p, data in zip(positions, f.read(resolved), strict=True):
                out[p] = data
        return out  # type: ignore[return-value]

    def read_range(self, blob_index: int, offset: int, size: int, *, amplify: bool = True) -> bytes:
        """Bytes ``[offset, offset + size)`` of the blob's uncompressed address space; a miss
        is amplified (``amplify_io``) unless ``amplify`` is False."""
        if offset < 0 or size < 0:
            raise NydusError(f"bad range [{offset}, +{size})")
        if size == 0:
            return b""
        st = self._blob(blob_index)
        f = st.fetcher
        meta = f.meta()
        if meta is None:
            raise UnsupportedError(
                f"blob {self.blobs[blob_index].blob_id} has no chunk info array; "
                f"read_range needs a RAFS v6 blob"
            )
        idxs = meta.chunks_in(offset, size)
        cache = st.cache
        if (
            cache is not None
            and not cache.compressed
            and not self.validate
            and cache.all_trusted(idxs)
        ):
            f._count_hits(1, 1)
            f.notify_read(idxs, ())
            return cache.read_range(offset, size)
        chunks = [f.chunk_from_ci(i) for i in idxs]
        datas = f.read(chunks, amplify=amplify)
        buf = bytearray(size)
        end = offset + size
        for c, data in zip(chunks, datas, strict=True):
            lo = max(c.uncompressed_offset, offset)
            hi = min(c.uncompressed_offset + len(data), end)
            if lo < hi:
                src = lo - c.uncompressed_offset
                buf[lo - offset : hi - offset] = data[src : src + hi - lo]
        return bytes(buf)

    def chunk_span(self, blob_index: int, offset: int, size: int) -> tuple[int, int]:
        """The uncompressed extent ``[start, end)`` of the chunks overlapping ``[offset, offset
        + size)`` of the blob: what one fetch of that range decompresses anyway. The range itself
        when no chunk overlaps it."""
        end = offset + size
        f = self._blob(blob_index).fetcher
        meta = f.meta()
        if meta is None or size <= 0:
            return offset, end
        lo, hi = offset, end
        for i in meta.chunks_in(offset, size):
            e = meta.ci[i]
            lo = min(lo, e.uncompressed_offset)
            hi = max(hi, e.uncompressed_offset + e.uncompressed_size)
        return lo, hi

    def ready_extent(self, blob_index: int, offset: int, limit: int) -> int:
        """How far from ``offset`` (at most ``limit`` bytes) the blob's uncompressed space is
        made of chunks already complete in the cache, back to back in blob order: what can be
        read with no fetch. ``offset`` itself when there is no cache or nothing ready."""
        st = self._blob(blob_index)
        cache = st.cache
        meta = st.fetcher.meta() if cache is not None and limit > 0 else None
        if meta is None or cache is None:
            return offset
        end = offset
        for i in meta.chunks_in(offset, limit):
            e = meta.ci[i]
            if e.uncompressed_offset > end + 4095 or not cache.is_ready(i):
                break  # a gap that is not just alignment padding, or a chunk not here yet
            end = e.uncompressed_offset + e.uncompressed_size
        return min(end, offset + limit)

    @property
    def amplify_io(self) -> int:
        return int(self.cfg.amplify_io)

    def prefetch_files(
        self, chunk_lists: Sequence[Sequence[ChunkInfo]], *, hinted: bool = True
    ) -> None:
        """Queue the chunks of these files for background fetching (in the given order). By
        default as hinted prefetch: the workload is known to read them (the image's prefetch
        table), so it does not yield the link to user reads (:class:`.scheduler.PrefetchJob`).

        A no-op without a blob cache or when neither ``fs_prefetch.enable`` nor
        ``device.cache.prefetch_config.enable`` is set.
        """
        if not self.prefetch_enabled:
            return
        by_blob: dict[int, list[ChunkInfo]] = {}
        for chunks in chunk_lists:
            for c in chunks:
                by_blob.setdefault(c.blob_index, []).append(c)

        def submit() -> None:
            for bi, cs in by_blob.items():
                try:
                    f = self._blob(bi).fetcher
                    self.prefetcher.submit(f, [f.resolve(c) for c in cs], hinted=hinted)
                except NydusError as e:
                    log.warning("prefetch of blob %d not started: %s", bi, e)

        self.prefetcher.run_async(submit)

    def prefetch_all(self) -> None:
        """Queue every chunk of every blob (blobs with a ci array) for background fetching."""
        if not self.prefetch_enabled:
            return

        def submit() -> None:
            for bi, info in enumerate(self.blobs):
                if not has_ci(info):
                    continue
                try:
                    f = self._blob(bi).fetcher
                    meta = f.meta()
                    if meta is None:
                        continue
                    chunks = [f.chunk_from_ci(i) for i in range(len(meta.ci))]
                    self.prefetcher.submit(f, chunks)
                except NydusError as e:
                    log.warning("prefetch of blob %s not started: %s", info.blob_id, e)

        self.prefetcher.run_async(submit)

    def wait_prefetch(self, timeout: float | None = None) -> bool:
        """Block until queued prefetch work is done (False on timeout). An extension."""
        return self.prefetcher.wait(timeout)

    def is_blob_ready(self, blob_index: int) -> bool:
        st = self._blob(blob_index)
        return st.cache is not None and st.cache.all_ready

    def verify_blob(self, blob_index: int) -> bool:
        """Hash every chunk of a blob complete in the cache that this process has not hashed
        yet (a record of an earlier run is not enough: :mod:`.verified`); bad chunks are
        cleared (fetched again when read). True when the whole blob is complete and verified,
        so :meth:`native_file` may hand it out.
        Reads and hashes up to the whole blob: call it off the user's read path."""
        st = self._blob(blob_index)
        cache, f = st.cache, st.fetcher
        if cache is None or cache.compressed or not cache.all_ready:
            return False
        if cache.fully_verified():
            return True
        meta = f.meta()
        if meta is None:
            return False
        bad = 0
        for i in range(len(meta.ci)):
            if cache.hashed(i):
                continue
            try:
                c = f.chunk_from_ci(i)
                f.verify(c, cache.read(c))
            except (IntegrityError, FormatError) as e:
                log.warning(
                    "blob %s: cached chunk %d is bad (%s); it is fetched again when read",
                    self.blobs[blob_index].blob_id,
                    i,
                    e,
                )
                cache.clear(i)
                bad += 1
                continue
            cache.mark_verified([i])
        if bad or not cache.fully_verified():
            return False
        cache.save_record()
        log.info("blob %s: every cached chunk verified", self.blobs[blob_index].blob_id)
        return True

    def native_file(self, blob_index: int) -> str | None:
        """The blob's cache file if it may be read directly (by the kernel, in EROFS mode):
        complete, every chunk verified by :meth:`verify_blob` or on its way in, and unchanged
        since. None otherwise (no verification is done here)."""
        st = self._blob(blob_index)
        cache = st.cache
        if cache is None or cache.compressed or not cache.fully_verified():
            return None
        return cache.path

    def cache_file(self, blob_index: int) -> str | None:
        st = self._blob(blob_index)
        if st.cache is None or st.cache.compressed:
            return None
        return st.cache.path

    def update_registry_auth(self, auth: str) -> None:
        """Hot-reload registry credentials (base64 ``user:pass``). An extension."""
        from .registry import RegistryBackend

        if not isinstance(self.backend, RegistryBackend):
            raise UnsupportedError(f"{self.backend.type} backend has no registry credentials")
        self.backend.update_auth(auth)

    def blob_uncompressed_size(self, blob_index: int) -> int:
        return self.blobs[blob_index].uncompressed_size

    def metrics_backend(self) -> dict[str, Any]:
        return self.backend.metrics.export()

    def metrics_blobcache(self) -> dict[str, Any]:
        with self._lock:
            states = list(self._state.values())
        m = self.cache_metrics
        m.set("readpath_behind_prefetch", self.scheduler.behind_prefetch[0])
        m.set("readpath_behind_prefetch_bytes", self.scheduler.behind_prefetch[1])
        m.data_all_ready = (
            bool(self.work_dir)
            and len(states) == len(self.blobs)
            and all(st.cache is None or st.cache.all_ready for st in states)
        )
        # every cache file's data and chunk map on disk since it was complete (a list, not a
        # generator: asking is what requests the sync of a blob found complete)
        m.data_all_durable = m.data_all_ready and all(
            [st.cache is None or st.cache.durable for st in states]
        )
        return m.export()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            states = list(self._state.values())
        self.prefetcher.close()
        if self._own_scheduler:
            self.scheduler.close()
        for st in states:
            if st.cache is not None:
                st.cache.close()
        self.backend.close()

    def __enter__(self) -> BlobDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_device(
    blobs: Sequence[BlobInfo],
    cfg: DaemonConfig,
    *,
    id: str = "",
    backend: BlobBackend | None = None,
    chunk_lookup: ChunkLookup | None = None,
    scheduler: FetchScheduler | None = None,
) -> BlobDevice:
    """A :class:`BlobDevice` over ``blobs``; ``backend`` overrides the configured one.
    ``chunk_lookup(blob_index, chunk_index)``: the bootstrap's record of a chunk (its digest),
    usually ``RafsMetadata.chunk_record``. ``scheduler``: a daemon's shared fetch scheduler
    (the device makes its own without one)."""
    if backend is None:
        backend = create_backend(cfg.device.backend, id)
    return BlobDevice(blobs, cfg, backend, id, chunk_lookup, scheduler)
