"""``nydusify check``: validate a Nydus image and compare its file tree with its source's.

For each Nydus manifest checked (the host's platform, ``--platform``, or every Nydus manifest
of an index with ``multi_platform``):

1. **manifest**: data layers are ``nydus.blob.v1`` layers annotated ``nydus-blob``; the last
   layer is a gzip tar annotated ``nydus-bootstrap`` and ``nydus-fs-version``; the config's
   ``diff_ids`` list one entry per layer (a blob's is its digest, the bootstrap layer's the
   sha256 of its tar);
2. **bootstrap**: ``image/image.boot`` opens as RAFS; its blob table and the manifest agree
   (ids and sizes; with a backend, the ``nydus-reference-blob-ids`` annotation); every blob's
   chunk table (ToC, ci array, digest array) is verified;
3. **rootfs** (with a source): the OCI layers are applied with whiteouts
   (:class:`~nydus.convert.rootfs.OciRootfs`) and compared file by file with the bootstrap's
   tree, every file's data read through our storage reader and verified chunk by chunk.

Blobs are downloaded once into a scratch directory under ``work_dir`` (digest-checked) and
read locally; with a backend (``localfs``/``s3``/``oss``) they are read through
:func:`nydus.storage.create_backend`. Nothing is written to any registry.

Single-threaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import BackendConfig
from ..errors import FormatError, IntegrityError, NydusError
from ..format import oci
from ..format.safejson import parse_json
from ..metadata import BlobInfo, ChunkInfo, RafsMetadata, open_bootstrap
from ..metadata.model import check_blob_id
from ..storage import create_backend
from ..storage.blobfile import BlobReader, open_local_blob
from . import image as im
from .remote import Remote
from .rootfs import Difference, OciRootfs, compare, nydus_rootfs

__all__ = ["CheckOptions", "CheckReport", "PlatformReport", "check"]


@dataclass
class CheckOptions:
    work_dir: str = "./tmp"
    platforms: list[im.Platform] | None = None
    multi_platform: bool = False
    backend: BackendConfig | None = None
    max_differences: int = 1000


@dataclass
class PlatformReport:
    platform: str
    target_digest: str
    source_digest: str = ""
    problems: list[str] = field(default_factory=list)
    differences: list[Difference] = field(default_factory=list)
    paths_compared: int = 0
    files_read: int = 0
    blobs: int = 0
    rafs_version: int = 0
    implied_dirs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.differences

    def count_file(self, _path: bytes) -> None:
        self.files_read += 1


@dataclass
class CheckReport:
    target: str
    source: str
    platforms: list[PlatformReport]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.platforms) and all(p.ok for p in self.platforms)

    def text(self) -> str:
        lines = []
        for p in self.platforms:
            head = f"{self.target} [{p.platform or 'single'}] {p.target_digest}"
            lines.append(f"{'OK' if p.ok else 'FAILED'}: {head}")
            lines.append(
                f"  RAFS v{p.rafs_version}, {p.blobs} blob(s); manifest and bootstrap "
                f"{'valid' if not p.problems else 'INVALID'}"
            )
            lines += [f"  problem: {x}" for x in p.problems]
            if self.source:
                lines.append(
                    f"  rootfs vs {self.source} ({p.source_digest}): {p.paths_compared} "
                    f"paths, {p.files_read} files read, {len(p.differences)} "
                    f"difference(s)"
                    + (
                        f"; {p.implied_dirs} implied directories' attributes not compared"
                        if p.implied_dirs
                        else ""
                    )
                )
                lines += [f"  diff: {d}" for d in p.differences]
        lines.append(f"check {'passed' if self.ok else 'FAILED'} in {self.seconds:.1f}s")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "platforms": [
                {
                    "platform": p.platform,
                    "target_digest": p.target_digest,
                    "source_digest": p.source_digest,
                    "ok": p.ok,
                    "problems": p.problems,
                    "differences": [str(d) for d in p.differences],
                    "paths_compared": p.paths_compared,
                    "files_read": p.files_read,
                }
                for p in self.platforms
            ],
        }


def _nydus_entry(e: im.IndexEntry) -> bool:
    feats = (e.raw.get("platform") or {}).get("os.features") or []
    return (
        e.descriptor.artifact_type == oci.ARTIFACT_TYPE_NYDUS_MANIFEST
        or oci.PLATFORM_FEATURE_NYDUS in feats
    )


def _targets(target: Remote, opts: CheckOptions) -> list[tuple[im.SourceManifest, str]]:
    body, mt, digest = target.manifest()
    if oci.is_manifest(mt):
        return [(im.parse_manifest(body, mt, digest, for_conversion=False), "")]
    if not oci.is_index(mt):
        raise FormatError(f"target {target.ref} has unsupported media type {mt!r}")
    _doc, entries = im.parse_index(body, digest)
    images = [e for e in entries if oci.is_manifest(e.descriptor.media_type)]
    marked = [e for e in images if _nydus_entry(e)]
    pool = marked or images  # a plain index of Nydus manifests has no markers
    if opts.multi_platform:
        chosen = pool
    else:
        wanted = opts.platforms or [im.host_platform()]
        chosen = []
        for w in wanted:
            hit = next((e for e in pool if e.platform and w.matches(e.platform)), None)
            if hit is None:
                raise FormatError(f"target {target.ref} has no Nydus manifest for {w}")
            chosen.append(hit)
    out = []
    for e in chosen:
        b, m, d = target.manifest(e.descriptor.digest)
        out.append((im.parse_manifest(b, m, d, for_conversion=False), str(e.platform or "")))
    return out


def _validate(
    sm: im.SourceManifest, cfg: dict[str, Any], boot_gz: bytes, md: RafsMetadata, backend: bool
) -> list[str]:
    problems: list[str] = []
    if not sm.layers:
        return ["manifest has no layers"]
    boot = sm.layers[-1]
    ann = boot.annotations
    if ann.get(oci.ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        problems.append(f"last layer lacks the {oci.ANNOTATION_NYDUS_BOOTSTRAP} annotation")
    if ann.get(oci.ANNOTATION_NYDUS_FS_VERSION) != str(md.version):
        problems.append(
            f"{oci.ANNOTATION_NYDUS_FS_VERSION} is "
            f"{ann.get(oci.ANNOTATION_NYDUS_FS_VERSION)!r}, the bootstrap is "
            f"RAFS v{md.version}"
        )
    if boot.media_type not in (oci.MEDIA_TYPE_OCI_LAYER_GZIP, oci.MEDIA_TYPE_DOCKER_LAYER_GZIP):
        problems.append(f"bootstrap layer has media type {boot.media_type!r}")
    blobs = sm.layers[:-1]
    blob_types = {oci.MEDIA_TYPE_NYDUS_BLOB}
    if sm.is_docker:
        blob_types.add(oci.MEDIA_TYPE_DOCKER_LAYER_GZIP)
    for ld in blobs:
        if ld.media_type not in blob_types:
            problems.append(f"layer {ld.digest} has media type {ld.media_type!r}")
        if ld.annotations.get(oci.ANNOTATION_NYDUS_BLOB) != "true":
            problems.append(f"layer {ld.digest} lacks the {oci.ANNOTATION_NYDUS_BLOB} annotation")
    rootfs = cfg.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    try:
        tar_digest = "sha256:" + hashlib.sha256(gzip.decompress(boot_gz)).hexdigest()
    except (OSError, EOFError) as e:
        problems.append(f"bootstrap layer is not gzip: {e}")
        tar_digest = ""
    want = [ld.digest for ld in blobs] + [tar_digest]
    if not isinstance(diff_ids, list) or diff_ids != want:
        problems.append(f"config rootfs.diff_ids {diff_ids!r} should be {want!r}")
    # a zran blob is listed by its meta blob (the layer it references: annotation nydus-ref)
    table = {f"sha256:{b.meta_blob_id or b.blob_id}": b for b in md.blobs}
    listed = {ld.digest: ld for ld in blobs}
    for d, b in table.items():
        ref = listed[d].annotations.get(oci.ANNOTATION_NYDUS_REF) if d in listed else None
        if b.meta_blob_id and ref != f"sha256:{b.blob_id}":
            problems.append(f"meta blob {d}: {oci.ANNOTATION_NYDUS_REF} is {ref!r}")
    if backend or not blobs:
        ids = ann.get(oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS)
        if blobs:
            problems.append("blobs are listed in the manifest of a backend image")
        elif ids is not None:
            try:
                refs = parse_json(ids, f"annotation {oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS}")
            except FormatError:
                refs = None
            if not isinstance(refs, list) or sorted(refs) != sorted(b.blob_id for b in md.blobs):
                problems.append(
                    f"{oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS} does not match "
                    f"the bootstrap's blob table"
                )
        elif md.blobs and not backend:
            problems.append("the bootstrap references blobs that the manifest does not list")
    else:
        for d, b in table.items():
            if d not in listed:
                problems.append(f"bootstrap blob {b.blob_id} is not a manifest layer")
            elif listed[d].size != (b.meta_blob_size if b.meta_blob_id else b.compressed_size):
                problems.append(
                    f"blob {b.blob_id}: manifest size {listed[d].size}, bootstrap "
                    f"{b.compressed_size}"
                )
        for d in listed:
            if d not in table:
                problems.append(f"manifest layer {d} is not in the bootstrap's blob table")
    return problems


class _Blobs:
    """Chunk readers for a bootstrap's blobs: downloaded from the registry, or a backend."""

    def __init__(
        self, target: Remote, blobs: list[BlobInfo], backend: BackendConfig | None, scratch: str
    ) -> None:
        self.readers: dict[int, BlobReader] = {}
        self._closers: list[Callable[[], None]] = []
        be = create_backend(backend) if backend is not None else None
        if be is not None:
            self._closers.append(be.close)
        try:
            for b in blobs:
                if be is not None:

                    def read_at(off: int, n: int, bid: str = b.blob_id) -> bytes:
                        return be.read(bid, off, n)

                    def meta_at(off: int, n: int, bid: str = b.meta_blob_id) -> bytes:
                        return be.read(bid, off, n)

                    m = b.meta_blob_id
                    meta = BlobReader(meta_at, b, be.blob_size(m)) if m else None
                    self.readers[b.index] = BlobReader(read_at, b, be.blob_size(b.blob_id), meta)
                    continue
                for bid in filter(None, (b.blob_id, b.meta_blob_id)):  # zran: its meta blob too
                    path = os.path.join(scratch, check_blob_id(bid))
                    if not os.path.exists(path):
                        tmp = path + ".part"
                        with open(tmp, "wb") as f:
                            for piece in target.client.get_blob_stream(
                                target.repo, f"sha256:{bid}"
                            ):
                                f.write(piece)
                        os.replace(tmp, path)
                path = os.path.join(scratch, b.blob_id)
                reader, close = open_local_blob(path, b)
                self.readers[b.index] = reader
                self._closers.append(close)
        except BaseException:
            self.close()
            raise

    def verify_trailers(self) -> list[str]:
        problems = []
        for i, r in sorted(self.readers.items()):
            try:
                t = r.trailer()
                if len(t.ci) != r.info.chunk_count:
                    problems.append(
                        f"blob {r.info.blob_id}: {len(t.ci)} chunk infos, table "
                        f"says {r.info.chunk_count}"
                    )
            except NydusError as e:
                problems.append(f"blob {i} {r.info.blob_id}: {e}")
        return problems

    def read_chunk(self, c: ChunkInfo) -> bytes:
        return self.readers[c.blob_index].read_chunk(c, verify=True)

    def close(self) -> None:
        for c in self._closers:
            c()
        self._closers.clear()


def _source_manifest(source: Remote, platform: str) -> im.SourceManifest:
    body, mt, digest = source.manifest()
    if oci.is_index(mt):
        _doc, entries = im.parse_index(body, digest)
        want = [im.Platform.parse(platform)] if platform else None
        chosen = im.select_platforms(entries, want, False)
        body, mt, digest = source.manifest(chosen[0].descriptor.digest)
    return im.parse_manifest(body, mt, digest)


def _looks_nydus(sm: im.SourceManifest) -> bool:
    """True if the manifest marks any layer as a Nydus blob or bootstrap."""
    marks = (oci.ANNOTATION_NYDUS_BLOB, oci.ANNOTATION_NYDUS_BOOTSTRAP)
    return any(
        ld.media_type == oci.MEDIA_TYPE_NYDUS_BLOB
        or any(ld.annotations.get(k) == "true" for k in marks)
        for ld in sm.layers
    )


def _oci_tree(source: Remote, sm: im.SourceManifest) -> OciRootfs:
    tree = OciRootfs()
    for ld in sm.layers:
        with source.open_blob(ld) as stream:
            tree.apply(stream)  # type: ignore[arg-type]
            stream.drain()
    return tree


def check(source: Remote | None, target: Remote, opts: CheckOptions) -> CheckReport:
    """Check ``target`` (and compare with ``source`` when given); never raises for a
    mismatch, only for what makes checking impossible (not found, unreadable)."""
    t0 = time.monotonic()
    os.makedirs(opts.work_dir, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="check-", dir=opts.work_dir)
    reports: list[PlatformReport] = []
    try:
        for sm, plat in _targets(target, opts):
            rep = PlatformReport(plat, sm.digest)
            reports.append(rep)
            _raw, cfg = target.json_blob(sm.config, "config")
            if not sm.layers:
                rep.problems.append("manifest has no layers")
                continue
            gz = target.client.get_blob(target.repo, sm.layers[-1].digest, max_size=1 << 30)
            try:
                boot = im.read_bootstrap_layer(gz)
            except FormatError:
                if not _looks_nydus(sm):
                    raise FormatError(
                        f"{target.ref} is not a Nydus image: no layer is a Nydus blob or "
                        "bootstrap (a plain OCI image? --target takes the converted image)"
                    ) from None
                raise
            try:
                md = open_bootstrap(boot)
            except NydusError as e:
                rep.problems.append(f"bootstrap does not open: {e}")
                continue
            rep.rafs_version, rep.blobs = md.version, len(md.blobs)
            rep.problems += _validate(sm, cfg, gz, md, opts.backend is not None)
            try:
                blobs = _Blobs(target, md.blobs, opts.backend, scratch)
            except (IntegrityError, FormatError) as e:
                rep.problems.append(f"a data blob is damaged: {e}")
                md.close()
                continue
            try:
                rep.problems += blobs.verify_trailers()
                if source is None:
                    # still read every file once: chunk digests are verified on the way
                    try:
                        nydus_rootfs(md, blobs.read_chunk)
                    except (IntegrityError, FormatError) as e:
                        rep.problems.append(f"reading the image failed: {e}")
                    continue
                src = _source_manifest(
                    source,
                    plat
                    or str(
                        im.Platform.from_dict(
                            {
                                "os": cfg.get("os"),
                                "architecture": cfg.get("architecture"),
                                "variant": cfg.get("variant", ""),
                            }
                        )
                        or ""
                    ),
                )
                rep.source_digest = src.digest
                oci_tree = _oci_tree(source, src)
                try:
                    ny = nydus_rootfs(md, blobs.read_chunk, rep.count_file)
                except (IntegrityError, FormatError) as e:
                    rep.problems.append(f"reading the image failed: {e}")
                    continue
                rep.differences, rep.paths_compared, rep.implied_dirs = compare(
                    oci_tree.root, ny, opts.max_differences
                )
            finally:
                blobs.close()
                md.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return CheckReport(
        str(target.ref), str(source.ref) if source else "", reports, time.monotonic() - t0
    )
