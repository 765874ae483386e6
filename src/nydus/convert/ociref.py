"""``nydusify convert --oci-ref``: a zran reference image of an OCI image whose layers stay
where they are (nydus-reference.md; upstream ``nydus-snapshotter/pkg/converter``).

Each gzip layer is read once, streaming, into ``nydus-image create -t targz-ref``'s outputs:
a layer bootstrap and a small meta blob (builder/targz_ref.py). The bootstraps are merged;
only the artifact is pushed: the meta blobs (media type ``nydus.blob.v1``, annotations
``nydus-blob: true`` and ``nydus-ref: <layer digest>``, as upstream's ``MergeLayers``), the
bootstrap layer (``nydus-bootstrap: true``), the config (diff_ids: the meta blobs', then the
bootstrap's) and the manifest. The original layers are referenced by the bootstrap's blob
table (blob id = layer digest): in the same repository they are already there; from another
repository of the same registry they are cross-repository mounted; only from another
registry are they copied (counted in ``pushed_bytes``).

Single-threaded: the layers are converted one after another.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import BinaryIO, cast

from ..builder.build import BuildOptions
from ..builder.merge import MergeOptions, merge_bootstraps
from ..builder.targz_ref import build_targz_ref
from ..errors import ConfigError, FormatError, IntegrityError, UnsupportedError
from ..format import oci
from . import image as im
from .converter import ConvertOptions, ConvertResult, LayerResult, ManifestResult, retry
from .progress import Progress, human
from .remote import Remote
from .store import RegistryStore

__all__ = ["convert_oci_ref"]


def _source_manifest(source: Remote, opts: ConvertOptions) -> im.SourceManifest:
    body, mt, digest = source.manifest()
    if oci.is_index(mt):
        _doc, entries = im.parse_index(body, digest)
        chosen = im.select_platforms(entries, opts.platforms, False)
        if len(chosen) != 1:
            raise UnsupportedError("--oci-ref converts one platform: pick it with --platform")
        body, mt, digest = source.manifest(chosen[0].descriptor.digest)
    elif not oci.is_manifest(mt):
        raise UnsupportedError(f"source {source.ref} has unsupported media type {mt!r}")
    return im.parse_manifest(body, mt, digest)


def convert_oci_ref(
    source: Remote, target: Remote, opts: ConvertOptions, progress: Progress | None = None
) -> ConvertResult:
    """Push the zran reference image of ``source`` to ``target`` (see the module docstring)."""
    if opts.backend is not None or opts.chunk_dict or opts.merge_platform or opts.all_platforms:
        raise ConfigError(
            "--oci-ref takes no --backend-type, --chunk-dict, --merge-platform or --all-platforms"
        )
    if opts.docker_v2_format:
        raise ConfigError("--oci-ref writes an OCI manifest (the meta blobs' media type)")
    if target.ref.digest:
        raise ConfigError(f"--target {target.ref}: give a tag, not a digest")
    opts.validate()
    t0 = time.monotonic()
    progress = progress or Progress(enabled=False)
    push = opts.push_retry_count, opts.push_retry_delay
    sm = _source_manifest(source, opts)
    _raw, cfg = source.json_blob(sm.config, "config")
    rootfs = cfg.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not sm.layers or not isinstance(diff_ids, list) or len(diff_ids) != len(sm.layers):
        raise FormatError(f"config {sm.config.digest}: rootfs.diff_ids does not match the layers")
    work = os.path.join(opts.work_dir, "oci-ref")
    os.makedirs(work, exist_ok=True)
    reg = RegistryStore(target)
    layers: list[LayerResult] = []
    metas: list[oci.Descriptor] = []
    pushed = 0
    try:
        for i, desc in enumerate(sm.layers):
            lr, meta_desc, n = _layer(source, reg, opts, progress, work, i, desc, str(diff_ids[i]))
            layers.append(lr)
            pushed += n
            if meta_desc is not None:
                metas.append(meta_desc)
    finally:
        progress.close()
    boot = merge_bootstraps(
        [lr.bootstrap for lr in layers], MergeOptions(prefetch_paths=opts.prefetch_patterns)
    ).bootstrap
    final = os.path.join(work, "image.boot")
    with open(final, "wb") as f:
        f.write(boot)
    gz, boot_diff = im.bootstrap_layer(boot)
    boot_desc = im.bootstrap_descriptor(gz, boot_diff, docker=False, fs_version="6")
    config = im.nydus_config(cfg, [d.digest for d in metas] + [boot_diff])
    cfg_digest = oci.sha256_digest(config)
    for digest, data in ((boot_desc.digest, gz), (cfg_digest, config)):
        if retry(partial(reg.push_bytes, digest, data), f"push of {digest}", *push):
            pushed += len(data)
    subject = sm.descriptor if opts.with_referrer else None
    body, mt = im.nydus_manifest(config, [*metas, boot_desc], docker=False, subject=subject)
    tag = target.ref.tag or "latest"
    put = target.client.put_manifest
    retry(lambda: put(target.repo, tag, body, mt), "push of the manifest", *push)
    pushed += len(body)
    platform = str(im.Platform.from_dict(cfg) or "")
    mr = ManifestResult.pushed(
        sm, platform, (body, mt, config, pushed), (final, boot_desc, gz), metas, layers
    )
    return ConvertResult(
        str(source.ref), str(target.ref.with_tag(tag)), mr.digest, mt, [mr],
        time.monotonic() - t0, reg.describe(),
    )  # fmt: skip


def _layer(
    source: Remote,
    reg: RegistryStore,
    opts: ConvertOptions,
    progress: Progress,
    work: str,
    i: int,
    desc: oci.Descriptor,
    want_diff_id: str,
) -> tuple[LayerResult, oci.Descriptor | None, int]:
    """Index layer ``i``, push its meta blob, make the layer itself exist in the target."""
    if "gzip" not in desc.media_type:
        raise UnsupportedError(f"layer {desc.digest} is {desc.media_type}: --oci-ref needs gzip")
    t0 = time.monotonic()
    lp = progress.layer(f"layer {i + 1} {desc.digest[7:19]}", desc.size)
    bopts = BuildOptions(chunk_size=opts.chunk_size, digester=opts.digester)
    with source.open_blob(desc, lambda k: progress.advance(lp, k)) as stream:
        res, meta_blob = build_targz_ref(
            cast(BinaryIO, stream), bopts, spacing=opts.zran_spacing, inline_bootstrap=True
        )
        stream.drain()
    diff_id = str(res.stats.get("diff_id", ""))
    if diff_id != want_diff_id:
        raise IntegrityError(f"layer {desc.digest}: diff_id {diff_id}, config {want_diff_id}")
    boot_path = os.path.join(work, f"{i + 1}-{desc.digest[7:]}.boot")
    with open(boot_path, "wb") as f:
        f.write(res.bootstrap)
    push = opts.push_retry_count, opts.push_retry_delay
    copied = retry(lambda: reg.ensure_from(desc.digest, desc.size, source), desc.digest, *push)
    pushed = desc.size if copied else 0
    meta_desc = None
    if meta_blob:
        meta_digest = oci.sha256_digest(meta_blob)
        meta_desc = im.blob_descriptor(meta_digest, len(meta_blob))
        meta_desc.annotations[oci.ANNOTATION_NYDUS_REF] = desc.digest
        if retry(lambda: reg.push_bytes(meta_digest, meta_blob), f"push of {meta_digest}", *push):
            pushed += len(meta_blob)
    progress.finish_layer(
        lp, f"{lp.label}: {human(desc.size)} indexed, meta blob {human(len(meta_blob))}"
    )
    blob = (meta_desc.digest if meta_desc else None, len(meta_blob))
    lr = LayerResult.of_build(i, desc, res, blob, bool(meta_blob), t0, boot_path)
    return lr, meta_desc, pushed
