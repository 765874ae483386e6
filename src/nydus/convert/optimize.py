"""``nydusify optimize``: a Nydus image in a registry, rebuilt for a recorded access pattern.

Upstream's ``separated-blob-with-prefetch-files`` policy (nydus:contrib/nydusify/pkg/optimizer):
read the source Nydus image's bootstrap, build a *prefetch blob* holding the chunks of the listed
files (in list order: first access first) and a bootstrap whose prefetch table lists them and
whose chunk references for them point into that blob (:mod:`nydus.builder.optimize`), then push

* the source's data blobs (cross-repository mount or copy when the target is elsewhere),
* the prefetch blob, as one more Nydus blob layer,
* the new bootstrap layer, annotated ``containerd.io/snapshot/nydus-separated-blob-with-
  prefetch-files: <prefetch blob id>`` as upstream does, and
* a config whose ``diff_ids`` follow the layers, and the manifest, at ``--target``.

Only the listed files' chunks are read from the source, as merged ranged GETs of its blobs
(:class:`_RangeReader`), and verified against their digests before they are written again.
One platform (the host's, or ``--platform``); an index source picks its Nydus manifest.

Threading: one optimization at a time per call; the registry client's pool runs the range
fetches concurrently.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..builder.optimize import POLICY_SEPARATED, optimize_image
from ..errors import ConfigError, FormatError, UnsupportedError
from ..format import oci
from ..metadata import BlobInfo, ChunkInfo, open_bootstrap
from ..storage.blobfile import BlobReader
from . import image as im
from .remote import Remote
from .store import RegistryStore

__all__ = ["OptimizeOptions", "OptimizeReport", "optimize", "ANNOTATION_PREFETCH_BLOB"]

ANNOTATION_PREFETCH_BLOB = "containerd.io/snapshot/nydus-separated-blob-with-prefetch-files"
MAX_BOOTSTRAP_LAYER = 1 << 30
RANGE_GAP = 256 << 10  # chunks closer than this are fetched in one request
RANGE_MAX = 16 << 20  # largest merged request


@dataclass
class OptimizeOptions:
    prefetch_files: list[bytes]
    work_dir: str = "./tmp"
    policy: str = POLICY_SEPARATED
    platform: im.Platform | None = None
    workers: int | None = None

    def validate(self) -> None:
        if self.policy != POLICY_SEPARATED:
            raise ConfigError(f"--policy {self.policy!r}: only {POLICY_SEPARATED!r} is supported")
        if not self.prefetch_files:
            raise ConfigError("the prefetch file list is empty")


@dataclass
class OptimizeReport:
    source: str
    target: str
    manifest_digest: str = ""
    prefetch_blob: str = ""  # sha256 digest of the new blob ("" when no listed file has data)
    prefetch_blob_size: int = 0
    files: int = 0
    bytes: int = 0
    table: int = 0
    fetched: int = 0  # bytes of source blob ranges read
    requests: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        blob = (
            (
                f"prefetch blob {self.prefetch_blob[:19]} ({self.prefetch_blob_size} bytes, "
                f"{self.files} files, {self.bytes} bytes of data)"
            )
            if self.prefetch_blob
            else "no prefetch blob (no listed file has data)"
        )
        miss = f"; {len(self.missing)} listed paths not in the image" if self.missing else ""
        return (
            f"optimized {self.source} -> {self.target} ({self.manifest_digest}): {blob}, "
            f"prefetch table {self.table} entries; read {self.fetched} bytes of the source "
            f"in {self.requests} requests{miss}; {self.seconds:.1f}s"
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _RangeReader:
    """Chunk bytes of one source blob, fetched beforehand as merged ranged GETs."""

    def __init__(self, remote: Remote, info: BlobInfo) -> None:
        self.remote, self.info = remote, info
        self.digest = f"sha256:{info.blob_id}"
        self._starts: list[int] = []
        self._data: list[bytes] = []
        self.fetched = self.requests = 0
        self.reader = BlobReader(self.read_at, info)

    def load(self, chunks: list[ChunkInfo]) -> None:
        spans: list[tuple[int, int]] = []
        for c in sorted(chunks, key=lambda c: c.compressed_offset):
            lo, hi = c.compressed_offset, c.compressed_offset + c.compressed_size
            if spans and lo - spans[-1][1] <= RANGE_GAP and hi - spans[-1][0] <= RANGE_MAX:
                spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
            else:
                spans.append((lo, hi))
        got = self.remote.client.get_blob_ranges(self.remote.repo, self.digest, spans)
        for (lo, _hi), data in zip(spans, got, strict=True):
            self._starts.append(lo)
            self._data.append(data)
            self.fetched += len(data)
        self.requests += len(spans)

    def read_at(self, off: int, n: int) -> bytes:
        i = bisect.bisect_right(self._starts, off) - 1
        if i >= 0 and off + n <= self._starts[i] + len(self._data[i]):
            rel = off - self._starts[i]
            return self._data[i][rel : rel + n]
        self.requests += 1  # not planned (should not happen): one GET of its own
        data = self.remote.client.get_blob_range(self.remote.repo, self.digest, off, off + n)
        self.fetched += len(data)
        return data


def _nydus_manifest(source: Remote, platform: im.Platform | None) -> im.SourceManifest:
    body, mt, digest = source.manifest()
    if oci.is_index(mt):
        _doc, entries = im.parse_index(body, digest)
        images = [e for e in entries if oci.is_manifest(e.descriptor.media_type)]
        nydus = [
            e
            for e in images
            if e.descriptor.artifact_type == oci.ARTIFACT_TYPE_NYDUS_MANIFEST
            or oci.PLATFORM_FEATURE_NYDUS in (e.raw.get("platform") or {}).get("os.features", [])
        ] or images
        want = platform or im.host_platform()
        hit = next((e for e in nydus if e.platform and want.matches(e.platform)), None)
        if hit is None:
            raise ConfigError(f"{source.ref} has no Nydus manifest for {want}")
        body, mt, digest = source.manifest(hit.descriptor.digest)
    sm = im.parse_manifest(body, mt, digest, for_conversion=False)
    if not im.is_nydus_manifest(sm):
        raise UnsupportedError(f"{source.ref} is not a Nydus image (convert it first)")
    return sm


def optimize(
    source: Remote, target: Remote, opts: OptimizeOptions, log: Callable[[str], None] | None = None
) -> OptimizeReport:
    """See the module docstring."""
    opts.validate()
    say = log or (lambda _m: None)
    t0 = time.monotonic()
    rep = OptimizeReport(str(source.ref), str(target.ref))
    sm = _nydus_manifest(source, opts.platform)
    boot_desc = sm.layers[-1]
    if boot_desc.annotations.get(oci.ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        raise FormatError(f"{source.ref}: the last layer is not a Nydus bootstrap layer")
    blob_layers = [
        ld
        for ld in sm.layers[:-1]
        if ld.annotations.get(oci.ANNOTATION_NYDUS_BLOB) == "true"
        or ld.media_type == oci.MEDIA_TYPE_NYDUS_BLOB
    ]
    _raw, cfg = source.json_blob(sm.config, "config")
    gz = source.client.get_blob(source.repo, boot_desc.digest, max_size=MAX_BOOTSTRAP_LAYER)
    boot = im.read_bootstrap_layer(gz, f"bootstrap layer of {source.ref}")
    os.makedirs(opts.work_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="optimize-", dir=opts.work_dir)
    try:
        boot_path = os.path.join(work, "source.boot")
        with open(boot_path, "wb") as f:
            f.write(boot)
        md = open_bootstrap(boot_path)
        try:
            readers = {b.index: _RangeReader(source, b) for b in md.blobs}

            def plan(chunks: list[ChunkInfo]) -> None:
                by_blob: dict[int, list[ChunkInfo]] = {}
                for c in chunks:
                    by_blob.setdefault(c.blob_index, []).append(c)
                for i, cs in by_blob.items():
                    readers[i].load(cs)

            def read_chunk(c: ChunkInfo) -> bytes:
                return readers[c.blob_index].reader.read_chunk(c, verify=True)

            blob_path = os.path.join(work, "prefetch.blob")
            h = hashlib.sha256()
            size = 0
            with open(blob_path, "wb") as out:

                class _Sink:
                    def write(self, b: bytes, /) -> int:
                        nonlocal size
                        out.write(b)
                        h.update(b)
                        size += len(b)
                        return len(b)

                say(f"building the prefetch blob for {len(opts.prefetch_files)} listed paths")
                res = optimize_image(
                    md,
                    opts.prefetch_files,
                    read_chunk,
                    _Sink(),
                    opts.workers,
                    plan=plan,
                    blob_id=lambda: h.hexdigest(),
                )
        finally:
            md.close()
        rep.files, rep.bytes, rep.table, rep.missing = res.files, res.bytes, res.table, res.missing
        rep.fetched = sum(r.fetched for r in readers.values())
        rep.requests = sum(r.requests for r in readers.values())
        store = RegistryStore(target)
        for ld in blob_layers:
            store.ensure_from(ld.digest, ld.size, source)
        layers = list(blob_layers)
        ann = dict(boot_desc.annotations)
        if res.blob is not None:
            digest = "sha256:" + h.hexdigest()
            say(f"pushing the prefetch blob {digest} ({size} bytes)")
            store.push_file(digest, blob_path)
            layers.append(im.blob_descriptor(digest, size, docker=sm.is_docker))
            ann[ANNOTATION_PREFETCH_BLOB] = h.hexdigest()
            rep.prefetch_blob, rep.prefetch_blob_size = digest, size
        gz_new, diff_id = im.bootstrap_layer(res.bootstrap)
        ann[oci.ANNOTATION_UNCOMPRESSED] = diff_id
        mt = oci.MEDIA_TYPE_DOCKER_LAYER_GZIP if sm.is_docker else oci.MEDIA_TYPE_OCI_LAYER_GZIP
        new_boot = oci.Descriptor(mt, oci.sha256_digest(gz_new), len(gz_new), ann)
        store.push_bytes(new_boot.digest, gz_new)
        layers.append(new_boot)
        config = dict(cfg)
        rootfs = dict(config.get("rootfs") or {})
        rootfs["type"] = "layers"
        rootfs["diff_ids"] = [ld.digest for ld in layers[:-1]] + [diff_id]
        config["rootfs"] = rootfs
        config_bytes = json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode()
        store.push_bytes(oci.sha256_digest(config_bytes), config_bytes)
        body, mtype = im.nydus_manifest(
            config_bytes,
            layers,
            docker=sm.is_docker,
            nydus_config_type=sm.config.media_type == oci.MEDIA_TYPE_NYDUS_CONFIG,
        )
        rep.manifest_digest = target.client.put_manifest(target.repo, target.ref.ref, body, mtype)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep.seconds = time.monotonic() - t0
    return rep
