"""``nydusify convert``: an OCI/Docker image in a registry to a Nydus image in a registry.

For each selected platform manifest:

1. the config is fetched; every layer's media type must be one the tar builder reads;
2. layers are converted in parallel (``parallel`` at a time): each layer blob is streamed from
   the source registry straight into :func:`nydus.builder.build.build_from_tar` (never
   downloaded whole; memory per layer is the builder's few chunks plus its tree), which
   writes one Nydus data blob to ``<work>/blobs`` and a layer bootstrap to ``<work>/layers``.
   The layer's digest and size are checked when its stream ends, its ``diff_id`` against the
   config. The blob is pushed at once (skipped when the target already has it), with
   ``push_retry_count`` retries;
3. the layers are merged lowest first, as :func:`nydus.builder.merge.merge_bootstraps` merges
   their bootstraps, but over the trees the builder left in memory
   (:class:`nydus.builder.merge.BootstrapMerger`: same bytes, nothing read back); blob ids
   become the pushed blobs' sha256. Every prefix is kept as
   ``<work>/bootstraps/<n>-<source layer digest>``, the image up to layer ``n`` (the last one is
   the whole image, as in the article: ``nydusd --bootstrap ./tmp/bootstraps/4-sha256:...``);
4. the bootstrap layer (tar.gz with ``image/image.boot``), the config (diff_ids rewritten, a
   history entry appended) and the manifest are pushed, the manifest last, so a failure at
   any step leaves nothing referenced that is not complete. The source is only read.

With ``--chunk-dict REF`` the dictionary image's bootstrap is pulled and every layer is
deduplicated against it; its blobs that the new image references are listed in the manifest
and copied (or mounted) into the target repository if it lacks them. With a backend
(``localfs``/``s3``/``oss``) data blobs go there and only the bootstrap layer is in the
manifest.

Threading: one thread per layer in flight (plus each builder's chunk pool) and one per blob
push; the prefix merges run on the calling thread while later layers build and blobs upload.
Registry clients are shared; the first failure stops the other layers at their next read.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, TypeVar, cast

from ..builder.build import BuildOptions, BuildResult, build_from_tar
from ..builder.merge import BootstrapMerger, LayerMeta, MergeOptions
from ..config import BackendConfig
from ..errors import (
    BackendError,
    ConfigError,
    FormatError,
    IntegrityError,
    NydusError,
    RegistryAuthError,
    RegistryNotFound,
    UnsupportedError,
)
from ..format import oci
from ..format.zran import DEFAULT_SPACING
from ..libc import trim_heap
from ..metadata import open_bootstrap
from ..registry import parse_reference
from ..registry.client import BlobUpload
from . import image as im
from .progress import LayerProgress, Progress, human
from .remote import Remote
from .store import BlobStore, RegistryStore, make_store

__all__ = [
    "ConvertOptions",
    "default_parallel",
    "build_order",
    "ConvertResult",
    "ManifestResult",
    "LayerResult",
    "convert",
    "ChunkDictImage",
    "load_chunk_dict",
    "retry",
    "Cancelled",
]

log = logging.getLogger("nydusify")

T = TypeVar("T")


class Cancelled(NydusError):
    """Another layer failed; this one stopped early."""


class _LayerFailed(Exception):
    """A layer's build or push failed (its future holds the error)."""


@dataclass
class ConvertOptions:
    work_dir: str = "./tmp"
    fs_version: str = "6"
    compressor: str = "zstd"
    chunk_size: int = 0x100000
    digester: str = "blake3"
    prefetch_patterns: list[bytes] | None = None
    chunk_dict: str | None = None
    platforms: list[im.Platform] | None = None
    all_platforms: bool = False
    merge_platform: bool = False
    with_referrer: bool = False
    oci: bool = False
    docker_v2_format: bool = False
    backend: BackendConfig | None = None
    push_retry_count: int = 3
    push_retry_delay: float = 5.0
    parallel: int = 0  # layers converted at once (0: default_parallel(layers))
    builder_threads: int | None = None
    keep_blobs: bool = False
    backend_force_push: bool = False
    zran_spacing: int = DEFAULT_SPACING  # --oci-ref: compressed bytes between access points
    # --stream-push: a registry target gets each blob while it is built (_StreamedUpload).
    # Off by default: on a 2-CPU machine the build is CPU-bound, and the upload's CPU (ours
    # and a local registry's) then slows it, where a push after the build uses the core the
    # single-threaded merges leave idle (bench/results/convert-2026-12-05-ml-stream.md)
    stream_push: bool = False

    def validate(self) -> None:
        if self.fs_version != "6":
            raise UnsupportedError(f"--fs-version {self.fs_version}: only RAFS v6 is built here")
        if self.oci and self.docker_v2_format:
            raise ConfigError("--oci and --docker-v2-format exclude each other")
        if self.with_referrer and self.docker_v2_format:
            raise ConfigError("--with-referrer needs OCI manifests (a subject field)")
        if self.push_retry_count < 0 or self.push_retry_delay < 0:
            raise ConfigError("--push-retry-count and --push-retry-delay must not be negative")
        BuildOptions(
            chunk_size=self.chunk_size, compressor=self.compressor, digester=self.digester
        ).validate()


@dataclass
class LayerResult:
    index: int
    source_digest: str
    source_size: int
    diff_id: str
    blob_digest: str | None
    blob_size: int
    new_chunks: int
    deduped_chunks: int
    files: int
    pushed: bool
    seconds: float
    bootstrap: str = ""

    @classmethod
    def of_build(
        cls,
        i: int,
        desc: oci.Descriptor,
        res: BuildResult,
        blob: tuple[str | None, int],
        pushed: bool,
        t0: float,
        bootstrap: str,
    ) -> LayerResult:
        """Layer ``i`` (``desc``) built as ``res`` into ``blob`` (digest or None, size), begun
        at monotonic time ``t0``, its bootstrap written to ``bootstrap``."""
        return cls(
            index=i,
            source_digest=desc.digest,
            source_size=desc.size,
            diff_id=str(res.stats.get("diff_id", "")),
            blob_digest=blob[0],
            blob_size=blob[1],
            new_chunks=int(res.stats.get("new_chunks", 0)),
            deduped_chunks=int(res.stats.get("deduped_chunks", 0)),
            files=res.files,
            pushed=pushed,
            seconds=time.monotonic() - t0,
            bootstrap=bootstrap,
        )


@dataclass
class ManifestResult:
    platform: str
    source_digest: str
    digest: str
    media_type: str
    size: int
    config_digest: str
    bootstrap: str
    bootstrap_digest: str
    blobs: list[str]
    layers: list[LayerResult]
    source_size: int
    target_size: int
    pushed_bytes: int
    body: bytes = field(default=b"", repr=False)
    platform_doc: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def pushed(
        cls,
        sm: im.SourceManifest,
        platform: str,
        pushed: tuple[bytes, str, bytes, int],
        bootstrap: tuple[str, oci.Descriptor, bytes],
        blobs: list[oci.Descriptor],
        layers: list[LayerResult],
        platform_doc: dict[str, Any] | None = None,
    ) -> ManifestResult:
        """The result of a pushed Nydus manifest: ``pushed`` = (manifest body, its media type,
        config, bytes pushed), ``bootstrap`` = (local path, layer descriptor, gzipped layer);
        ``blobs`` = the data (or meta) blob layers."""
        body, mt, config, pushed_bytes = pushed
        path, boot_desc, gz = bootstrap
        return cls(
            platform=platform,
            source_digest=sm.digest,
            digest=oci.sha256_digest(body),
            media_type=mt,
            size=len(body),
            config_digest=oci.sha256_digest(config),
            bootstrap=path,
            bootstrap_digest=boot_desc.digest,
            blobs=[d.digest for d in blobs],
            layers=layers,
            source_size=sum(ld.size for ld in sm.layers) + sm.config.size,
            target_size=sum(d.size for d in blobs) + len(gz) + len(config),
            pushed_bytes=pushed_bytes,
            body=body,
            platform_doc=platform_doc,
        )


@dataclass
class ConvertResult:
    source: str
    target: str
    digest: str
    media_type: str
    manifests: list[ManifestResult]
    seconds: float
    backend: str

    @property
    def new_chunks(self) -> int:
        return sum(lr.new_chunks for m in self.manifests for lr in m.layers)

    @property
    def deduped_chunks(self) -> int:
        return sum(lr.deduped_chunks for m in self.manifests for lr in m.layers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "target": self.target,
            "digest": self.digest,
            "media_type": self.media_type,
            "seconds": round(self.seconds, 3),
            "backend": self.backend,
            "new_chunks": self.new_chunks,
            "deduped_chunks": self.deduped_chunks,
            "manifests": [],
        }
        for m in self.manifests:
            d = asdict(m)
            d.pop("body")
            d.pop("platform_doc")
            out["manifests"].append(d)
        return out

    def summary(self) -> str:
        src = sum(m.source_size for m in self.manifests)
        dst = sum(m.target_size for m in self.manifests)
        pushed = sum(m.pushed_bytes for m in self.manifests)
        layers = sum(len(m.layers) for m in self.manifests)
        lines = [
            f"converted {self.source} -> {self.target}",
            f"  target digest {self.digest} ({len(self.manifests)} platform(s), {layers} layers)",
            f"  source {human(src)}, target {human(dst)}, pushed {human(pushed)} "
            f"(blobs to {self.backend})",
            f"  chunks {self.new_chunks + self.deduped_chunks}: {self.new_chunks} stored, "
            f"{self.deduped_chunks} deduplicated",
            f"  time {self.seconds:.1f}s",
        ]
        return "\n".join(lines)


def retry(fn: Callable[[], T], what: str, count: int, delay: float) -> T:
    """``fn()`` with up to ``count`` more tries after a backend failure (not after auth,
    not-found, integrity or configuration errors, which a retry cannot fix)."""
    attempt = 0
    while True:
        try:
            return fn()
        except (RegistryAuthError, RegistryNotFound):
            raise
        except BackendError as e:
            if attempt >= count:
                raise
            attempt += 1
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, e, attempt, count, delay)
            time.sleep(delay)


@dataclass
class ChunkDictImage:
    """The image given as ``--chunk-dict``: its bootstrap (local copy) and where its blobs live."""

    path: str
    remote: Remote | None
    blob_ids: set[str]


def load_chunk_dict(
    spec: str, work_dir: str, make_remote: Callable[[str], Remote], platform: im.Platform | None
) -> ChunkDictImage:
    """``--chunk-dict``: ``REF``, ``bootstrap:registry:REF`` or ``bootstrap:local:PATH``."""
    if spec.startswith("bootstrap:local:"):
        path = spec[len("bootstrap:local:") :]
        with open_bootstrap(path) as md:
            return ChunkDictImage(path, None, {b.blob_id for b in md.blobs})
    ref = spec[len("bootstrap:registry:") :] if spec.startswith("bootstrap:registry:") else spec
    remote = make_remote(ref)
    try:
        body, mt, digest = remote.manifest()
    except RegistryNotFound as e:
        raise ConfigError(f"--chunk-dict {ref}: image not found ({e})") from None
    if oci.is_index(mt):
        _doc, entries = im.parse_index(body, digest)
        nydus = [e for e in entries if oci.is_manifest(e.descriptor.media_type)]
        want = platform or im.host_platform()
        hit = next(
            (
                e
                for e in nydus
                if e.platform
                and want.matches(e.platform)
                and (
                    e.descriptor.artifact_type == oci.ARTIFACT_TYPE_NYDUS_MANIFEST
                    or oci.PLATFORM_FEATURE_NYDUS
                    in (e.raw.get("platform") or {}).get("os.features", [])
                )
            ),
            None,
        )
        hit = hit or next((e for e in nydus if e.platform and want.matches(e.platform)), None)
        if hit is None:
            raise ConfigError(f"--chunk-dict {ref} has no {want} image")
        body, mt, digest = remote.manifest(hit.descriptor.digest)
    sm = im.parse_manifest(body, mt, digest, for_conversion=False)
    if not sm.layers or sm.layers[-1].annotations.get(oci.ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        raise ConfigError(f"--chunk-dict {ref} is not a Nydus image (no bootstrap layer)")
    data = remote.client.get_blob(remote.repo, sm.layers[-1].digest, max_size=1 << 30)
    boot = im.read_bootstrap_layer(data, f"bootstrap layer of {ref}")
    d = os.path.join(work_dir, "chunk-dict")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, oci.parse_digest(digest)[1] + ".boot")
    _write(path, boot)
    with open_bootstrap(path) as md:
        ids = {b.blob_id for b in md.blobs}
    return ChunkDictImage(path, remote, ids)


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _HashingFile:
    """The blob sink: writes to a file and hashes what passes (the blob's sha256); with a
    ``stream``, each write is flushed to the file and announced to it."""

    def __init__(
        self,
        path: str,
        on_write: Callable[[int], None] | None = None,
        stream: _StreamedUpload | None = None,
    ) -> None:
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.h = hashlib.sha256()
        self.size = 0
        self.on_write = on_write
        self.stream = stream

    def write(self, b: bytes, /) -> int:
        self.f.write(b)
        self.h.update(b)
        self.size += len(b)
        if self.stream is not None:
            self.f.flush()
            self.stream.wrote(len(b))
        if self.on_write is not None:
            self.on_write(len(b))
        return len(b)

    def close(self) -> None:
        self.f.close()

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


class _StreamedUpload:
    """Sends a layer blob to the target registry while the builder writes it.

    A thread of its own reads the blob file behind the sink (:class:`_HashingFile` announces
    every write) and PATCHes it in ``piece`` pieces into an upload session opened once the
    blob is larger than ``whole_max`` (a smaller blob is pushed whole, as before). The digest
    is only known at the end: :meth:`finish` waits for the last bytes and hands the session
    to :meth:`_ManifestJob.push`, which names the digest in the final PUT (or drops the
    session when the registry already has the blob). Any failure only ends the streaming:
    the blob is then pushed from its file as before, with retries; the registry keeps nothing
    of an upload that was never committed with its digest.
    """

    def __init__(self, store: RegistryStore, path: str, piece: int, whole_max: int) -> None:
        self.store, self.path = store, path
        self.piece, self.whole_max = max(1, piece), whole_max
        self._cond = threading.Condition()
        self._written = 0
        self._ended = False
        self._stopped = False
        self.upload: BlobUpload | None = None  # the open session, until finish() hands it over
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nydusify-stream", daemon=True)
        self._thread.start()

    def wrote(self, n: int) -> None:
        """``n`` more bytes are in the file (the sink's thread)."""
        with self._cond:
            self._written += n
            self._cond.notify()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _ready(self, sent: int) -> bool:
        w = self._written
        return self._stopped or self._ended or (w > self.whole_max and w - sent >= self.piece)

    def _run(self) -> None:
        try:
            with open(self.path, "rb") as f:
                sent = 0
                while True:
                    with self._cond:
                        self._cond.wait_for(functools.partial(self._ready, sent))
                        if self._stopped:
                            return
                        avail, ended = self._written - sent, self._ended
                    if self.upload is None:
                        if ended and self._written <= self.whole_max:
                            return  # small: pushed whole from the file
                        self.upload = self.store.start_upload()
                    while avail >= self.piece or (ended and avail > 0):
                        data = f.read(min(self.piece, avail))
                        if not data:
                            raise IntegrityError(f"{self.path} ended before its announced size")
                        self.upload.write(data)
                        sent += len(data)
                        avail -= len(data)
                        if self.stopped:
                            return
                    if ended:
                        return
        except BaseException as e:  # the blob is pushed from its file instead
            self.error = e

    def finish(self) -> BlobUpload | None:
        """After the last write: wait until every byte is sent; the session (the caller
        commits or aborts it), or None when nothing was streamed or the streaming failed."""
        with self._cond:
            self._ended = True
            self._cond.notify()
        self._thread.join()
        upload, self.upload = self.upload, None
        if upload is not None and self.error is not None:
            log.warning(
                "streamed upload of %s failed (%s): pushed from the file", self.path, self.error
            )
            upload.abort()
            return None
        return upload

    def cancel(self) -> None:
        """Stop streaming and drop the session (a failed or unneeded layer)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()
        upload, self.upload = self.upload, None
        if upload is not None:
            upload.abort()


class _ManifestJob:
    """Converts one platform manifest (see the module docstring)."""

    def __init__(
        self,
        source: Remote,
        target: Remote,
        store: BlobStore,
        opts: ConvertOptions,
        progress: Progress,
        work: str,
        cdict: ChunkDictImage | None,
    ) -> None:
        self.source, self.target, self.store = source, target, store
        self.opts, self.progress, self.work, self.cdict = opts, progress, work, cdict
        self.stop = threading.Event()
        self.streams = opts.stream_push and isinstance(store, RegistryStore)
        for sub in ("blobs", "layers", "bootstraps"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)

    def _push(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, what, self.opts.push_retry_count, self.opts.push_retry_delay)

    def layer(
        self, i: int, n: int, desc: oci.Descriptor, want_diff_id: str
    ) -> tuple[LayerResult, _Built, LayerMeta]:
        """Build layer ``i``: its blob is left in a temporary file (see :meth:`push`); the
        merge takes its tree (:class:`LayerMeta`), the rest of the build state is dropped."""
        t0 = time.monotonic()
        short = desc.digest[7:19]
        lp = self.progress.layer(f"layer {i + 1}/{n} {short}", desc.size)

        def on_bytes(k: int) -> None:
            if self.stop.is_set():
                raise Cancelled("stopped: another layer failed")
            self.progress.advance(lp, k)

        opts = self.opts
        bopts = BuildOptions(
            chunk_size=opts.chunk_size,
            compressor=opts.compressor,
            digester=opts.digester,
            chunk_dict_bootstrap=self.cdict.path if self.cdict else None,
            prefetch_paths=opts.prefetch_patterns,
            workers=opts.builder_threads,
            on_chunk=lambda _size, dedup: self.progress.chunk(lp, dedup),
        )
        blobs_dir = os.path.join(self.work, "blobs")
        tmp = os.path.join(blobs_dir, f".layer-{i}-{os.getpid()}")
        up = None  # the blob's upload while it is written (a registry target)
        if self.streams and isinstance(self.store, RegistryStore):
            open(tmp, "wb").close()
            up = _StreamedUpload(
                self.store, tmp, self.store.upload_piece, self.store.upload_whole_max
            )
        try:
            sink = _HashingFile(tmp, lambda k: self.progress.advance(lp, written=k), up)
            try:
                with self.source.open_blob(desc, on_bytes) as stream:
                    try:
                        res = build_from_tar(
                            cast(BinaryIO, stream), sink, bopts, spool_dir=blobs_dir
                        )
                    except FormatError as e:
                        # A corrupt stream can look like a bad tar before its digest is
                        # checked: read on, so that a digest mismatch is reported as what it is.
                        try:
                            stream.drain()
                        except IntegrityError as ie:
                            raise ie from e
                        raise FormatError(f"layer {desc.digest}: {e}") from None
                    stream.drain()
            finally:
                sink.close()
            diff_id = str(res.stats.get("diff_id", ""))
            if diff_id != want_diff_id:
                raise IntegrityError(
                    f"layer {desc.digest}: uncompressed digest {diff_id}, the config's diff_id "
                    f"is {want_diff_id}"
                )
            if res.blob is None:
                if up is not None:
                    up.cancel()
                    up = None
                os.unlink(tmp)
                tmp = ""
            # one name per layer: two layers may share a blob (same data) but not their trees
            boot_path = os.path.join(self.work, "layers", f"{i + 1}-{desc.digest[7:]}.boot")
            _write(boot_path, res.bootstrap)
            res.bootstrap = b""  # on disk now; the merge works on the tree
        except BaseException:
            if up is not None:
                up.cancel()
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
            raise
        blob = (sink.digest, sink.size) if tmp else (None, 0)
        lr = LayerResult.of_build(i, desc, res, blob, False, t0, boot_path)
        assert res.tree is not None
        meta = LayerMeta(
            res.tree, res.blobs, opts.chunk_size, opts.compressor, opts.digester, boot_path
        )
        # The build's buffers (decompressed pieces, chunks, compressed output: ~1 MiB each,
        # freed by several threads) stay resident in glibc's heaps otherwise: 25-50 MB here
        # that the next layer's build or the merges would add to.
        trim_heap()
        return lr, _Built(tmp, lp, up), meta

    def _commit_streamed(self, lr: LayerResult, stream: _StreamedUpload) -> bool:
        """Finish a streamed upload of ``lr``'s blob; False when it must be pushed from its
        file (nothing streamed, or the streaming or its final PUT failed)."""
        upload = stream.finish()
        if upload is None:
            return False
        digest = lr.blob_digest
        assert digest is not None
        try:
            if self.store.has(digest):  # streamed for nothing: the registry has it
                upload.abort()
                lr.pushed = False
            else:
                upload.commit(digest, lr.blob_size)
                lr.pushed = True
            return True
        except (BackendError, IntegrityError) as e:
            log.warning("streamed upload of blob %s failed (%s): pushed from the file", digest, e)
            upload.abort()
            return False

    def push(self, lr: LayerResult, b: _Built) -> None:
        """Push the blob a :meth:`layer` left in ``b.tmp`` (none when it is empty): commit
        the upload streamed while it was built, else from that file (identical layers give
        identical blobs, and may be built at the same time)."""
        t0 = time.monotonic()
        tmp, lp = b.tmp, b.progress
        if lr.blob_digest is not None:
            digest = lr.blob_digest
            force = self.opts.backend_force_push and self.opts.backend is not None
            self.progress.set_state(lp, "pushing")
            try:
                streamed = b.stream is not None and self._commit_streamed(lr, b.stream)
                if not streamed:
                    # the sink hashed the blob as it was written: not read twice to hash it
                    lr.pushed = self._push(
                        lambda: self.store.push_file(digest, tmp, force, written=lr.blob_size),
                        f"push of blob {digest}",
                    )
            finally:
                if self.opts.keep_blobs:
                    os.replace(tmp, os.path.join(self.work, "blobs", digest[7:]))
                else:
                    os.unlink(tmp)
        lr.seconds += time.monotonic() - t0
        blob_txt = (
            (
                f"blob {lr.blob_digest[:19]} {human(lr.blob_size)} "
                f"{'pushed' if lr.pushed else 'already there'}"
            )
            if lr.blob_digest
            else "no new data"
        )
        self.progress.finish_layer(
            lp,
            f"{lp.label}: {human(lr.source_size)} read, {lr.new_chunks + lr.deduped_chunks} "
            f"chunks ({lr.deduped_chunks} deduplicated), {blob_txt}",
        )

    def layers(self, sm: im.SourceManifest, diff_ids: list[str]) -> tuple[list[LayerResult], str]:
        """Convert every layer; returns them and the whole image's bootstrap.

        ``parallel`` layers build at a time (in :func:`build_order`); each blob is pushed as
        its layer is built (streamed while it is written, to a registry), and the prefix
        merges run (here, in layer order) as soon as their layers are built, while later layers
        still build. The first failure stops the rest; the lowest layer's error is raised.
        """
        n = len(sm.layers)
        par = self.opts.parallel or default_parallel(n)
        built: list[tuple[LayerResult, _Built] | None] = [None] * n
        metas: list[LayerMeta | None] = [None] * n  # built, not merged yet
        parent: str | None = None
        merged = 0
        merger = BootstrapMerger(
            MergeOptions(
                chunk_dict_bootstrap=self.cdict.path if self.cdict else None,
                prefetch_paths=self.opts.prefetch_patterns,
            )
        )
        with (
            ThreadPoolExecutor(par, thread_name_prefix="nydusify-layer") as builders,
            ThreadPoolExecutor(par, thread_name_prefix="nydusify-push") as pushers,
        ):
            order = build_order([d.size for d in sm.layers], par, self.streams)
            futs: dict[Future[Any], int] = {
                builders.submit(self.layer, i, n, sm.layers[i], diff_ids[i]): i for i in order
            }
            pending: set[Future[Any]] = set(futs)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        if f.exception() is not None:
                            raise _LayerFailed
                        i = futs[f]
                        if built[i] is None:  # a build, not a push
                            lr, bl, metas[i] = f.result()
                            built[i] = (lr, bl)
                            pushed = pushers.submit(self.push, lr, bl)
                            futs[pushed] = i
                            pending.add(pushed)
                    while merged < n and (meta := metas[merged]) is not None:
                        metas[merged] = None  # the merger owns its tree now
                        done_lr = built[merged]
                        assert done_lr is not None
                        parent = self.merge_one(merger, done_lr[0], meta)
                        merged += 1
            except BaseException as e:
                self.stop.set()
                for f in futs:
                    f.cancel()
                wait(futs)
                for b in built:  # blobs whose push never started
                    if b is not None and b[1].stream is not None:
                        b[1].stream.cancel()
                    if b is not None and b[1].tmp and os.path.exists(b[1].tmp):
                        os.unlink(b[1].tmp)
                if not isinstance(e, _LayerFailed):
                    raise
                failed = [f for f in futs if not f.cancelled() and f.exception() is not None]
                real = [f for f in failed if not isinstance(f.exception(), Cancelled)]
                exc = min(real or failed, key=lambda f: futs[f]).exception()
                assert exc is not None
                raise exc from None
        if parent is None:
            raise FormatError("the image has no layers")
        return [b[0] for b in built if b is not None], parent

    def merge_one(self, merger: BootstrapMerger, lr: LayerResult, meta: LayerMeta) -> str:
        """The image up to layer ``lr`` (``merger`` holds the image up to the one below, in
        memory) as ``bootstraps/<n>-<digest>``; returns its path. The bytes are those of
        ``merge_bootstraps([lr.bootstrap], parent_bootstrap=<the prefix below>)``."""
        digest = lr.blob_digest[7:] if lr.blob_digest else None
        merger.add(meta, digest, lr.blob_size if lr.blob_digest else None)
        path = os.path.join(self.work, "bootstraps", f"{lr.index + 1}-{lr.source_digest}")
        _write(path, merger.bootstrap().bootstrap)
        trim_heap()  # the bootstrap writer's per-inode records and image, freed
        return path


@dataclass
class _Built:
    """What a built layer leaves for its push: the blob file ("" when the layer made no
    blob), its progress line and its upload streamed while it was built (or None)."""

    tmp: str
    progress: LayerProgress
    stream: _StreamedUpload | None


def build_order(sizes: list[int], parallel: int, streamed: bool = False) -> list[int]:
    """The order layers (of these compressed ``sizes``, lowest first) start building.

    Largest first: the biggest layer (the critical path) starts at once, the small ones fill
    in beside it or after it, while its blob is pushed. One at a time with streamed pushes
    (``--stream-push``): lowest first, since no push waits for a build to end: the prefix
    merges (Python, one thread) of the lower layers run while the layers above them build,
    and only the top layer's merge is left after the last build."""
    if parallel <= 1 and streamed:
        return list(range(len(sizes)))
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])


def default_parallel(layers: int, cpus: int | None = None) -> int:
    """Layers built at once by default: max(1, min(4, layers, CPUs // 2)). Each builder
    already compresses on a pool of its own, and every layer in flight holds its tree and
    buffers: on a small machine one layer at a time is as fast and needs far less memory."""
    cpus = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(1, min(4, layers, cpus // 2))


def _docker_format(opts: ConvertOptions, source_is_docker: bool) -> bool:
    """Docker v2 schema 2 only when asked: OCI is upstream's default, and a Docker manifest
    cannot carry the Nydus blob media type (skopeo and docker reject it)."""
    return opts.docker_v2_format


def _convert_manifest(
    job: _ManifestJob, sm: im.SourceManifest, platform_doc: dict[str, Any] | None
) -> ManifestResult:
    src, opts = job.source, job.opts
    _raw, cfg = src.json_blob(sm.config, "config")
    rootfs = cfg.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(sm.layers):
        raise FormatError(
            f"config {sm.config.digest}: rootfs.diff_ids does not list one entry per layer "
            f"({len(diff_ids) if isinstance(diff_ids, list) else 'none'} for "
            f"{len(sm.layers)} layers)"
        )
    if not sm.layers:
        raise FormatError(f"manifest {sm.digest} has no layers")
    if platform_doc is None:
        platform_doc = {
            k: cfg[k]
            for k in ("architecture", "os", "variant")
            if isinstance(cfg.get(k), str) and cfg[k]
        } or None
    layers, final = job.layers(sm, [str(d) for d in diff_ids])
    own = {lr.blob_digest: lr.blob_size for lr in layers if lr.blob_digest}
    pushed_bytes = sum(lr.blob_size for lr in layers if lr.pushed)
    blob_descs: list[oci.Descriptor] = []
    seen: set[str] = set()
    with open_bootstrap(final) as md:
        table = list(md.blobs)
    for b in table:
        digest = "sha256:" + b.blob_id
        if digest in seen:
            continue
        seen.add(digest)
        size = own.get(digest)
        if size is None:
            cd = job.cdict
            if cd is None or b.blob_id not in cd.blob_ids:
                raise FormatError(f"merged bootstrap references unknown blob {b.blob_id}")
            size = b.compressed_size
            if cd.remote is not None:

                def copy_in(d: str = digest, s: int = size, r: Remote = cd.remote) -> bool:
                    return job.store.ensure_from(d, s, r)

                copied = job._push(copy_in, f"copy of chunk-dict blob {digest}")
                pushed_bytes += size if copied else 0
            elif not job.store.has(digest):
                raise ConfigError(f"chunk-dict blob {digest} is not in {job.store.describe()}")
        blob_descs.append(im.blob_descriptor(digest, size))
    docker = _docker_format(opts, sm.is_docker)
    if docker:
        blob_descs = [im.blob_descriptor(d.digest, d.size, docker=True) for d in blob_descs]
    gz, boot_diff = im.bootstrap_layer(final)  # read from the file in pieces
    in_manifest = job.store.in_manifest
    boot_desc = im.bootstrap_descriptor(
        gz,
        boot_diff,
        docker=docker,
        fs_version=opts.fs_version,
        reference_blob_ids=None if in_manifest else [d.digest[7:] for d in blob_descs],
    )
    listed = blob_descs if in_manifest else []
    config = im.nydus_config(cfg, [d.digest for d in listed] + [boot_diff])
    target = job.target
    reg = RegistryStore(target)
    if job._push(lambda: reg.push_bytes(boot_desc.digest, gz), "push of the bootstrap layer"):
        pushed_bytes += len(gz)
    cfg_digest = oci.sha256_digest(config)
    if job._push(lambda: reg.push_bytes(cfg_digest, config), "push of the config"):
        pushed_bytes += len(config)
    subject = sm.descriptor if opts.with_referrer else None
    body, mt = im.nydus_manifest(
        config,
        [*listed, boot_desc],
        docker=docker,
        nydus_config_type=opts.merge_platform,
        subject=subject,
    )
    platform = str(im.Platform.from_dict(platform_doc) or "")
    return ManifestResult.pushed(
        sm,
        platform,
        (body, mt, config, pushed_bytes),
        (final, boot_desc, gz),
        blob_descs,
        layers,
        platform_doc,
    )


def _copy_manifest_into(
    source: Remote, target: Remote, sm: im.SourceManifest, opts: ConvertOptions
) -> None:
    """Make the OCI manifest ``sm`` (and its blobs) exist in the target repository."""
    if source.same_repo(target):
        return
    reg = RegistryStore(target)
    for desc in [sm.config, *sm.layers]:

        def copy_in(d: oci.Descriptor = desc) -> bool:
            return reg.ensure_from(d.digest, d.size, source)

        retry(copy_in, f"copy of {desc.digest}", opts.push_retry_count, opts.push_retry_delay)
    retry(
        lambda: target.client.put_manifest(target.repo, sm.digest, sm.body, sm.media_type),
        f"push of manifest {sm.digest}",
        opts.push_retry_count,
        opts.push_retry_delay,
    )


def _check_single_platform(
    source: Remote, sm: im.SourceManifest, wanted: list[im.Platform]
) -> None:
    """Refuse an explicit ``--platform`` a single-manifest source is not built for (its
    config names the platform)."""
    _raw, cfg = source.json_blob(sm.config, "config")
    have = im.Platform.from_dict(cfg)
    if have is None:
        return  # the config names no platform: nothing to compare with
    for t in wanted:
        if not t.matches(have):
            raise ConfigError(
                f"--platform {t}: the source is a single-platform {have} image "
                "(no index); omit --platform or pick its platform"
            )


def convert(
    source: Remote,
    target: Remote,
    opts: ConvertOptions,
    progress: Progress | None = None,
    make_dict_remote: Callable[[str], Remote] | None = None,
) -> ConvertResult:
    """Convert ``source`` into ``target`` (see the module docstring)."""
    opts.validate()
    t0 = time.monotonic()
    progress = progress or Progress(enabled=False)
    if target.ref.digest:
        raise ConfigError(f"--target {target.ref}: give a tag, not a digest")
    try:
        body, mt, digest = source.manifest()
    except RegistryNotFound as e:
        raise RegistryNotFound(f"source image {source.ref} not found: {e}") from None
    store = make_store(target, opts.backend)

    def default_dict_remote(ref: str) -> Remote:
        r = parse_reference(ref)
        return target.at(r) if r.api_host == target.ref.api_host else Remote(r, target.opts)

    dict_remote = make_dict_remote or default_dict_remote
    os.makedirs(opts.work_dir, exist_ok=True)

    jobs: list[tuple[im.SourceManifest, dict[str, Any] | None, str]] = []
    index_doc: dict[str, Any] | None = None
    if oci.is_index(mt):
        index_doc, entries = im.parse_index(body, digest)
        chosen = im.select_platforms(entries, opts.platforms, opts.all_platforms)
        for ent in chosen:
            b, m, d = source.manifest(ent.descriptor.digest)
            sm = im.parse_manifest(b, m, d)
            raw_plat = ent.raw.get("platform")
            plat = raw_plat if isinstance(raw_plat, dict) else None
            # one safe directory per platform (names from the registry: Platform.slug)
            sub = ent.platform.slug if ent.platform else d[7:19]
            if any(os.path.basename(w) == sub for _s, _p, w in jobs):
                sub += "-" + d[7:19]
            work = opts.work_dir if len(chosen) == 1 else os.path.join(opts.work_dir, sub)
            jobs.append((sm, plat, work))
    elif oci.is_manifest(mt):
        sm = im.parse_manifest(body, mt, digest)
        if opts.platforms:
            _check_single_platform(source, sm, opts.platforms)
        jobs.append((sm, None, opts.work_dir))
    else:
        raise UnsupportedError(f"source {source.ref} has unsupported media type {mt!r}")

    results: list[ManifestResult] = []
    try:
        for sm, plat, work in jobs:
            platform = im.Platform.from_dict(plat)
            cdict = None
            if opts.chunk_dict:
                cdict = load_chunk_dict(opts.chunk_dict, work, dict_remote, platform)
            job = _ManifestJob(source, target, store, opts, progress, work, cdict)
            results.append(_convert_manifest(job, sm, plat))
    finally:
        progress.close()

    # Manifests last: children by digest, then the tagged manifest or index.
    tag = target.ref.tag or "latest"
    push = opts.push_retry_count, opts.push_retry_delay
    if index_doc is None and not opts.merge_platform:
        r = results[0]
        retry(
            lambda: target.client.put_manifest(target.repo, tag, r.body, r.media_type),
            "push of the manifest",
            *push,
        )
        top_digest, top_mt = r.digest, r.media_type
    else:
        docker = opts.docker_v2_format
        entries_out: list[dict[str, Any]] = []
        for (sm, _p, _w), r in zip(jobs, results, strict=True):
            plat = r.platform_doc
            if opts.merge_platform:
                _copy_manifest_into(source, target, sm, opts)
                entries_out.append(
                    im.index_entry(sm.descriptor, plat, nydus_marker=False, docker=docker)
                )

            def put_child(r: ManifestResult = r) -> str:
                return target.client.put_manifest(target.repo, r.digest, r.body, r.media_type)

            retry(put_child, f"push of manifest {r.digest}", *push)
            entries_out.append(
                im.index_entry(
                    oci.Descriptor(r.media_type, r.digest, r.size),
                    plat,
                    nydus_marker=opts.merge_platform,
                    docker=docker,
                )
            )
        ibody, imt = im.nydus_index(entries_out, docker=docker)
        retry(
            lambda: target.client.put_manifest(target.repo, tag, ibody, imt),
            "push of the index",
            *push,
        )
        top_digest, top_mt = oci.sha256_digest(ibody), imt
    return ConvertResult(
        source=str(source.ref),
        target=str(target.ref.with_tag(tag)),
        digest=top_digest,
        media_type=top_mt,
        manifests=results,
        seconds=time.monotonic() - t0,
        backend=store.describe(),
    )
