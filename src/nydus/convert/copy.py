"""``nydusify copy``: copy an image (a Nydus image with every blob it needs) elsewhere.

To a registry: every blob of every selected manifest (config, layers, and for a Nydus image
also the blobs its bootstrap's blob table names that the manifest does not list, e.g. from a
chunk dictionary) is copied unless the target has it (a cross-repository mount on the same
registry, else streamed through: never held whole), then the manifests are pushed unchanged
(same digests), children first and the tagged one last. An index whose platforms are all
selected is pushed as is; otherwise a new index lists the selected ones.

To ``file://PATH``: an OCI image layout in one tar (``oci-layout``, ``index.json`` naming the
tag, ``blobs/sha256/...``), written to a temporary file and renamed when complete.

Single-threaded.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from typing import IO, cast

from ..errors import ConfigError, FormatError, NydusError
from ..format import oci
from ..metadata import open_bootstrap
from . import image as im
from .progress import human
from .remote import Remote
from .store import RegistryStore

__all__ = ["CopyOptions", "CopyResult", "copy_image"]


@dataclass
class CopyOptions:
    platforms: list[im.Platform] | None = None
    all_platforms: bool = False


@dataclass
class CopyResult:
    source: str
    target: str
    digest: str
    manifests: int = 0
    blobs: int = 0
    blobs_copied: int = 0
    bytes_copied: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        out = [
            f"copied {self.source} -> {self.target}",
            f"  digest {self.digest}: {self.manifests} manifest(s), {self.blobs} blob(s), "
            f"{self.blobs_copied} copied ({human(self.bytes_copied)}), "
            f"{self.blobs - self.blobs_copied} already there or mounted",
            f"  time {self.seconds:.1f}s",
        ]
        out += [f"  note: {s}" for s in self.skipped]
        return "\n".join(out)


@dataclass
class _Plan:
    """What to copy: manifests (children first, the top one last) and blobs."""

    manifests: list[tuple[bytes, str, str]] = field(default_factory=list)
    blobs: dict[str, int] = field(default_factory=dict)
    top: tuple[bytes, str, str] | None = None
    skipped: list[str] = field(default_factory=list)


def _blobs_of(source: Remote, sm: im.SourceManifest, plan: _Plan) -> None:
    for desc in [sm.config, *sm.layers]:
        plan.blobs.setdefault(desc.digest, desc.size)
    if not sm.layers or sm.layers[-1].annotations.get(oci.ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        return
    gz = source.client.get_blob(source.repo, sm.layers[-1].digest, max_size=1 << 30)
    with open_bootstrap(im.read_bootstrap_layer(gz)) as md:
        for b in md.blobs:
            d = f"sha256:{b.blob_id}"
            if d in plan.blobs:
                continue
            if source.client.has_blob(source.repo, d):
                plan.blobs[d] = b.compressed_size
            else:
                plan.skipped.append(
                    f"blob {b.blob_id} is not in {source.ref.repository} "
                    f"(a storage backend blob?): not copied"
                )


def _plan(source: Remote, opts: CopyOptions) -> _Plan:
    plan = _Plan()
    body, mt, digest = source.manifest()
    if oci.is_manifest(mt):
        _blobs_of(source, im.parse_manifest(body, mt, digest, for_conversion=False), plan)
        plan.top = (body, mt, digest)
        return plan
    if not oci.is_index(mt):
        raise FormatError(f"{source.ref}: unsupported media type {mt!r}")
    doc, entries = im.parse_index(body, digest)
    if opts.all_platforms or not opts.platforms:
        chosen = (
            entries
            if opts.all_platforms
            else [
                e for e in entries if e.platform is None or im.host_platform().matches(e.platform)
            ]
        )
    else:
        chosen = [
            e
            for e in entries
            if e.platform is not None and any(p.matches(e.platform) for p in opts.platforms)
        ]
    if not chosen:
        raise ConfigError(f"{source.ref}: no manifest for the selected platform(s)")
    for e in chosen:
        b, m, d = source.manifest(e.descriptor.digest)
        if oci.is_manifest(m):
            _blobs_of(source, im.parse_manifest(b, m, d, for_conversion=False), plan)
        plan.manifests.append((b, m, d))
    if len(chosen) == len(entries):
        plan.top = (body, mt, digest)
    else:
        new = dict(doc)
        new["manifests"] = [e.raw for e in chosen]
        nb = json.dumps(new, indent=2).encode()
        plan.top = (nb, mt, oci.sha256_digest(nb))
    return plan


def copy_image(source: Remote, target: Remote | str, opts: CopyOptions) -> CopyResult:
    """Copy ``source`` to a registry reference or (a path) an OCI layout tarball."""
    t0 = time.monotonic()
    plan = _plan(source, opts)
    assert plan.top is not None
    if isinstance(target, str):
        res = _to_tarball(source, target, plan)
    else:
        res = _to_registry(source, target, plan)
    res.seconds = time.monotonic() - t0
    res.skipped = plan.skipped
    return res


def _to_registry(source: Remote, target: Remote, plan: _Plan) -> CopyResult:
    if target.ref.digest:
        raise ConfigError(f"--target {target.ref}: give a tag, not a digest")
    store = RegistryStore(target)
    res = CopyResult(str(source.ref), str(target.ref), "")
    for digest, size in plan.blobs.items():
        res.blobs += 1
        if store.ensure_from(digest, size, source):
            res.blobs_copied += 1
            res.bytes_copied += size
    for body, mt, digest in plan.manifests:
        target.client.put_manifest(target.repo, digest, body, mt)
        res.manifests += 1
    assert plan.top is not None
    body, mt, digest = plan.top
    target.client.put_manifest(target.repo, target.ref.tag or "latest", body, mt)
    res.manifests += 1
    res.digest = digest
    return res


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
    tf.addfile(ti, io.BytesIO(data))


def _to_tarball(source: Remote, path: str, plan: _Plan) -> CopyResult:
    assert plan.top is not None
    tag = source.ref.tag or "latest"
    res = CopyResult(str(source.ref), f"file://{path}", plan.top[2])
    tmp = f"{path}.part-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            for digest, size in plan.blobs.items():
                ti = tarfile.TarInfo(f"blobs/sha256/{oci.parse_digest(digest)[1]}")
                ti.size, ti.mode, ti.mtime = size, 0o644, 0
                desc = oci.Descriptor("application/octet-stream", digest, size)
                with source.open_blob(desc) as stream:
                    tf.addfile(ti, cast(IO[bytes], stream))
                    stream.drain()
                res.blobs += 1
                res.blobs_copied += 1
                res.bytes_copied += size
            seen: set[str] = set()
            for body, _mt, digest in [*plan.manifests, plan.top]:
                if digest not in seen:
                    seen.add(digest)
                    _add_bytes(tf, f"blobs/sha256/{digest[7:]}", body)
                    res.manifests += 1
            body, mt, digest = plan.top
            index = {
                "schemaVersion": 2,
                "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
                "manifests": [
                    {
                        "mediaType": mt,
                        "digest": digest,
                        "size": len(body),
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            }
            _add_bytes(tf, "index.json", json.dumps(index, indent=2).encode())
        os.replace(tmp, path)
    except (NydusError, OSError, tarfile.TarError):
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return res
