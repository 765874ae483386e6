"""Unpack an image into a remote snapshotter through containerd's API, as containerd's unpacker.

Why this exists: containerd 1.6's ``ctr image pull`` (Debian 12 ships 1.6.20) does not use the
unpacker that remote snapshotters rely on. It fetches *every* layer (``content.Fetch``), then
applies each one with ``rootfs.ApplyLayerWithOpts`` and **no labels**: the snapshotter never
learns that a layer is a Nydus blob, and containerd's diff service has no stream processor for
``application/vnd.oci.image.layer.nydus.blob.v1``, so the pull of a Nydus image fails. Only
``client.Pull(..., WithPullUnpack)`` (the CRI plugin, nerdctl, stargz's ``ctr-remote rpull``)
passes layer annotations as snapshot labels.

:class:`RemoteUnpacker` does that unpacker's job over containerd's gRPC API for an image whose
manifest and config are already in containerd's content store (stock
``ctr content fetch --metadata-only REF`` puts them there and creates the image record):

1. read the image's manifest (through an index, for this platform) and config;
2. under a lease, for each layer bottom up: ``Stat(chainID)`` (done if it exists); else
   ``Prepare("extract-<random> <chainID>", parent chainID, labels)`` where the labels are the
   layer's ``containerd.io/snapshot/*`` annotations, ``containerd.io/snapshot.ref = chainID``
   and, like the CRI plugin, ``cri.image-ref``/``cri.layer-digest``/``cri.manifest-digest``;
   ``ALREADY_EXISTS`` means the snapshotter took the layer (a Nydus blob: nothing downloaded);
   otherwise the layer is fetched with the caller's ``fetch_layer``, checked against its digest
   and diff ID, extracted into the returned mounts and committed as ``chainID``;
3. label the config ``containerd.io/gc.ref.snapshot.<snapshotter> = <top chainID>`` so
   containerd's garbage collector keeps the snapshots, as the unpacker does.

:meth:`RemoteUnpacker.pull` first does the metadata part itself: it writes the manifest (and
index) and config from an :class:`ImageSource` into containerd's content store (``Content.Write``,
with the ``containerd.io/gc.ref.content.*`` labels containerd's fetch sets) and creates or
updates the image record, then unpacks. (Stock ``ctr content fetch --metadata-only`` is no
substitute: for an image that is a plain manifest, not an index, it fetches every layer too.)

After that, stock ``ctr run --snapshotter nydus REF ...`` finds the image unpacked and prepares
the container's snapshot directly. The command line is ``nydus-pull``
(:mod:`nydus.cli.pull`).

Layers are applied by the one safe extractor, :func:`nydus.builder.extract.extract_layer`
(containerd's applier semantics: whiteouts, opaque directories, hard links, devices; every path
resolved inside the snapshot, nothing followed out of it). A layer is spooled to a temporary
file while its digest is checked, never held whole in memory; its diff ID is checked while it
is applied, and a failed apply removes the active snapshot. Extraction mounts overlayfs, so
unpacking needs root, as containerd's does.

Threading: one unpacker per call site; it opens one containerd client per call.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from ...builder.extract import extract_layer as apply_layer
from ...errors import BackendError, FormatError, IntegrityError, NotFoundError, UnsupportedError
from ...format.oci import is_index
from ...format.safejson import parse_json_object
from ...kernel_mount import umount
from ..containerd.client import ContainerdClient, snapshot_exists
from ..containerd.proto import (
    CONTENT_SERVICE,
    IMAGES_SERVICE,
    SNAPSHOTS_SERVICE,
    content_pb2,
    descriptor_pb2,
    images_pb2,
    mount_pb2,
    snapshots_pb2,
)
from ..containerd.rpc import ServiceClient, rpc_code, rpc_error_text
from ..snapshots.imageref import chain_ids
from ..snapshots.labels import CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, unpack_labels

if TYPE_CHECKING:
    from ...registry import RegistryClient

__all__ = [
    "ImageSource",
    "LayerFetcher",
    "RegistrySource",
    "RemoteUnpacker",
    "UnpackResult",
    "extract_layer",
]

log = logging.getLogger(__name__)

LayerFetcher = Callable[[Mapping[str, Any]], bytes | Iterable[bytes]]
"""A layer blob given its OCI descriptor (``digest``, ``size``, ...): its bytes, or its
bytes piece by piece (the unpacker spools them to a temporary file and checks the digest)."""


class ImageSource(Protocol):
    """Where :meth:`RemoteUnpacker.pull` gets an image's manifests and blobs."""

    def manifest(self, reference: str) -> tuple[bytes, str]:
        """``(body, media_type)`` of the manifest or index named by a tag or digest."""
        ...

    def blob(self, digest: str) -> bytes:
        """A blob's bytes (the caller checks the digest)."""
        ...


class RegistrySource:
    """An :class:`ImageSource` over a :class:`~nydus.registry.RegistryClient` repository."""

    def __init__(self, client: RegistryClient, repository: str) -> None:
        self.client = client
        self.repository = repository

    def manifest(self, reference: str) -> tuple[bytes, str]:
        body, media_type, _ = self.client.get_manifest(self.repository, reference)
        return body, media_type

    def blob(self, digest: str) -> bytes:
        return self.client.get_blob(self.repository, digest, max_size=4 << 30)

    def blob_stream(self, digest: str) -> Iterator[bytes]:
        """A (layer) blob piece by piece; the caller checks the digest."""
        return self.client.get_blob_stream(self.repository, digest)


_MAX_JSON = 8 << 20


@dataclass
class UnpackResult:
    image: str
    chain_id: str
    skipped: list[str] = field(default_factory=list)  # chain IDs the snapshotter took over
    applied: list[str] = field(default_factory=list)  # chain IDs unpacked here
    existing: list[str] = field(default_factory=list)  # chain IDs already there


class RemoteUnpacker:
    """See the module docstring."""

    def __init__(
        self,
        address: str | os.PathLike[str],
        namespace: str,
        snapshotter: str = "nydus",
        *,
        platform: tuple[str, str] = ("linux", "amd64"),
        cri_labels: bool = True,
        timeout: float = 120.0,
    ) -> None:
        self.address = os.fspath(address)
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.platform = platform
        self.cri_labels = cri_labels
        self.timeout = timeout

    def unpack(self, image_name: str, fetch_layer: LayerFetcher) -> UnpackResult:
        try:
            return self._unpack(image_name, fetch_layer)
        except grpc.RpcError as e:
            raise BackendError(
                f"unpacking {image_name} through containerd at {self.address}: {rpc_error_text(e)}"
            ) from e

    def pull(self, image_name: str, reference: str, source: ImageSource) -> UnpackResult:
        """Store ``reference``'s manifest(s) and config as image ``image_name``, then unpack.

        Only the layers the snapshotter does not take over are fetched from ``source``.
        """
        try:
            self._store_metadata(image_name, reference, source)
        except grpc.RpcError as e:
            raise BackendError(
                f"storing {image_name} in containerd at {self.address}: {rpc_error_text(e)}"
            ) from e
        stream = getattr(source, "blob_stream", None)
        if callable(stream):
            return self.unpack(image_name, lambda desc: stream(str(desc["digest"])))
        return self.unpack(image_name, lambda desc: source.blob(str(desc["digest"])))

    def _write_content(
        self, ctd: ContainerdClient, lease: str, data: bytes, labels: Mapping[str, str]
    ) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT,
            ref=f"nydus-unpack-{digest}",
            total=len(data),
            expected=digest,
            offset=0,
            data=data,
            labels=dict(labels),
        )
        content = ctd.service(CONTENT_SERVICE, self.namespace, lease)
        try:
            for _ in content.bidi("Write", [req], content_pb2.WriteContentResponse):
                pass
        except grpc.RpcError as e:
            if rpc_code(e) != grpc.StatusCode.ALREADY_EXISTS:
                raise
            if labels:
                ctd.set_labels(self.namespace, digest, labels, lease)
        return digest

    def _store_metadata(self, image_name: str, reference: str, source: ImageSource) -> None:
        body, media_type = source.manifest(reference)
        top_digest = "sha256:" + hashlib.sha256(body).hexdigest()
        docs: list[tuple[bytes, dict[str, str]]] = []  # written children first
        manifest_body, manifest_doc = body, parse_json_object(body, reference)
        index_labels: dict[str, str] = {}
        if is_index(media_type) or "manifests" in manifest_doc:
            m = self._pick(manifest_doc, top_digest)
            manifest_body, _ = source.manifest(str(m["digest"]))
            if "sha256:" + hashlib.sha256(manifest_body).hexdigest() != m["digest"]:
                raise IntegrityError(f"manifest {m['digest']} does not match its digest")
            manifest_doc = parse_json_object(manifest_body, str(m["digest"]))
            index_labels = {
                f"containerd.io/gc.ref.content.m.{i}": str(d["digest"])
                for i, d in enumerate(parse_json_object(body, reference).get("manifests", []))
            }
        config_digest = str((manifest_doc.get("config") or {}).get("digest"))
        config = source.blob(config_digest)
        if "sha256:" + hashlib.sha256(config).hexdigest() != config_digest:
            raise IntegrityError(f"config {config_digest} does not match its digest")
        manifest_labels = {"containerd.io/gc.ref.content.config": config_digest}
        for i, layer in enumerate(manifest_doc.get("layers") or []):
            manifest_labels[f"containerd.io/gc.ref.content.l.{i}"] = str(layer.get("digest"))
        docs.append((config, {}))
        docs.append((manifest_body, manifest_labels))
        if manifest_body is not body:
            docs.append((body, index_labels))

        with (
            ContainerdClient(self.address, self.timeout) as ctd,
            ctd.lease(self.namespace, "nydus-unpack-") as lease_id,
        ):
            for data, labels in docs:
                self._write_content(ctd, lease_id, data, labels)
            images = ctd.service(IMAGES_SERVICE, self.namespace, lease_id)
            image = images_pb2.Image(
                name=image_name,
                target=descriptor_pb2.Descriptor(
                    media_type=media_type, digest=top_digest, size=len(body)
                ),
            )
            try:
                images.unary(
                    "Create",
                    images_pb2.CreateImageRequest(image=image),
                    images_pb2.CreateImageResponse,
                )
            except grpc.RpcError as e:
                if rpc_code(e) != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                images.unary(
                    "Update",
                    images_pb2.UpdateImageRequest(
                        image=image, update_mask=field_mask_pb2.FieldMask(paths=["target"])
                    ),
                    images_pb2.UpdateImageResponse,
                )

    def _pick(self, index: Mapping[str, Any], digest: str) -> Mapping[str, Any]:
        want_os, want_arch = self.platform
        for m in index.get("manifests", []):
            p = m.get("platform") or {}
            if p.get("os", want_os) == want_os and p.get("architecture", want_arch) == want_arch:
                return dict(m)
        raise NotFoundError(f"index {digest} has no manifest for {want_os}/{want_arch}")

    # -- containerd reads ---------------------------------------------------------------------

    def _read_json(self, ctd: ContainerdClient, digest: str) -> dict[str, Any]:
        data = ctd.read_content(self.namespace, digest, _MAX_JSON)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"content {digest} does not match its digest")
        return parse_json_object(data, digest)

    def _manifest(
        self, ctd: ContainerdClient, media_type: str, digest: str
    ) -> tuple[str, dict[str, Any]]:
        doc = self._read_json(ctd, digest)
        if is_index(media_type) or "manifests" in doc:
            m = self._pick(doc, digest)
            return self._manifest(ctd, str(m.get("mediaType", "")), str(m["digest"]))
        return digest, doc

    # -- the unpack ---------------------------------------------------------------------------

    def _unpack(self, image_name: str, fetch_layer: LayerFetcher) -> UnpackResult:
        with ContainerdClient(self.address, self.timeout) as ctd:
            images = ctd.service(IMAGES_SERVICE, self.namespace)
            try:
                img = images.unary(
                    "Get", images_pb2.GetImageRequest(name=image_name), images_pb2.GetImageResponse
                ).image
            except grpc.RpcError as e:
                if rpc_code(e) == grpc.StatusCode.NOT_FOUND:
                    raise NotFoundError(
                        f"containerd has no image {image_name!r} in namespace {self.namespace} "
                        f"(fetch its metadata first: ctr content fetch --metadata-only REF)"
                    ) from e
                raise
            manifest_digest, manifest = self._manifest(
                ctd, img.target.media_type, img.target.digest
            )
            config_desc = manifest.get("config") or {}
            config = self._read_json(ctd, str(config_desc.get("digest")))
            layers = manifest.get("layers") or []
            diff_ids = [str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or []]
            if len(layers) != len(diff_ids) or not layers:
                raise FormatError(
                    f"{image_name}: {len(layers)} layers but {len(diff_ids)} diff IDs in config"
                )
            chains = chain_ids(diff_ids)
            with ctd.lease(self.namespace, "nydus-unpack-") as lease_id:
                snaps = ctd.service(SNAPSHOTS_SERVICE, self.namespace, lease_id)
                result = UnpackResult(image_name, chains[-1])
                for i, desc in enumerate(layers):
                    labels = unpack_labels(desc.get("annotations") or {}, chains[i])
                    if self.cri_labels:
                        labels[CRI_IMAGE_REF] = image_name
                        labels[CRI_LAYER_DIGEST] = str(desc.get("digest"))
                        labels[CRI_MANIFEST_DIGEST] = manifest_digest
                    parent = chains[i - 1] if i else ""
                    self._layer(
                        snaps, desc, diff_ids[i], chains[i], parent, labels, fetch_layer, result
                    )
                ctd.set_labels(
                    self.namespace, str(config_desc.get("digest")), {self._gc_label: chains[-1]}
                )
        log.info(
            "unpacked %s: %d layer(s) taken by %s, %d applied, %d already there",
            image_name,
            len(result.skipped),
            self.snapshotter,
            len(result.applied),
            len(result.existing),
        )
        return result

    @property
    def _gc_label(self) -> str:
        return f"containerd.io/gc.ref.snapshot.{self.snapshotter}"

    def _layer(
        self,
        snaps: ServiceClient,
        desc: Mapping[str, Any],
        diff_id: str,
        chain: str,
        parent: str,
        labels: dict[str, str],
        fetch_layer: LayerFetcher,
        result: UnpackResult,
    ) -> None:
        if snapshot_exists(snaps, self.snapshotter, chain):
            result.existing.append(chain)
            return
        key = f"extract-{secrets.token_hex(6)} {chain}"
        try:
            resp = snaps.unary(
                "Prepare",
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=labels
                ),
                snapshots_pb2.PrepareSnapshotResponse,
            )
        except grpc.RpcError as e:
            if rpc_code(e) == grpc.StatusCode.ALREADY_EXISTS and snapshot_exists(
                snaps, self.snapshotter, chain
            ):
                result.skipped.append(chain)
                return
            raise
        try:
            with (
                _spooled(fetch_layer(desc), str(desc.get("digest"))) as data,
                mounted(list(resp.mounts)) as root,
            ):
                extract_layer(data, root, diff_id)
            snaps.unary(
                "Commit",
                snapshots_pb2.CommitSnapshotRequest(
                    snapshotter=self.snapshotter, name=chain, key=key, labels=labels
                ),
                empty_pb2.Empty,
            )
        except BaseException:
            with contextlib.suppress(grpc.RpcError):
                snaps.unary(
                    "Remove",
                    snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key),
                    empty_pb2.Empty,
                )
            raise
        result.applied.append(chain)


@contextlib.contextmanager
def mounted(mounts: Sequence[mount_pb2.Mount]) -> Iterator[Path]:
    """The directory where ``mounts`` (a Prepare answer) can be written."""
    if len(mounts) != 1:
        raise UnsupportedError(f"expected one mount, got {len(mounts)}")
    m = mounts[0]
    if m.type == "bind" and "rw" in m.options:
        yield Path(m.source)
        return
    if m.type != "overlay":
        raise UnsupportedError(f"cannot unpack into a {m.type!r} mount")
    with tempfile.TemporaryDirectory(prefix="nydus-unpack-") as tmp:
        target = Path(tmp)
        proc = subprocess.run(
            ["mount", "-t", "overlay", m.source or "overlay", "-o", ",".join(m.options), tmp],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise OSError(f"mount overlay on {tmp} failed: {proc.stderr.strip()}")
        try:
            yield target
        finally:
            umount(target)


@contextlib.contextmanager
def _spooled(data: bytes | Iterable[bytes], digest: str) -> Iterator[BinaryIO]:
    """The layer as a file, its digest checked: bytes as they are, pieces written to an
    anonymous temporary file as they come (a layer is never held whole in memory)."""
    h = hashlib.sha256()
    if isinstance(data, bytes | bytearray):
        f: BinaryIO = io.BytesIO(data)
    else:
        f = tempfile.TemporaryFile(prefix="nydus-layer-")  # noqa: SIM115 - closed below
    try:
        if isinstance(data, bytes | bytearray):
            h.update(data)
        else:
            for piece in data:
                h.update(piece)
                f.write(piece)
            f.seek(0)
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise IntegrityError(f"layer {digest}: fetched data has {got}")
        yield f
    finally:
        f.close()


def extract_layer(data: bytes | BinaryIO, root: str | os.PathLike[str], diff_id: str) -> None:
    """Apply a (gzip/zstd/plain) layer onto a snapshot's ``root`` with the one safe
    extractor, :func:`nydus.builder.extract.extract_layer`, checking its diff ID as it is
    read (an IntegrityError after the apply: the caller removes the snapshot)."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    apply_layer(stream, root, diff_id=diff_id)
