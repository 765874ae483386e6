"""The Nydus side of the content store: lazy data blobs and the hooks that make them work.

With ``--content-store``, containerd keeps its content in this snapshotter
(:mod:`.service`), and :class:`NydusContentHooks` does three things there:

1. **Commit of a manifest** (OCI or Docker media type; only small JSON is parsed): each layer
   annotated ``containerd.io/snapshot/nydus-blob: "true"`` is recorded as a lazy entry of the
   store (digest and size; :mod:`.store`), and the manifest is marked as a Nydus
   manifest (``<content>/nydus-manifests/<alg>/<hex>``, an empty file). containerd's fetch then
   asks ``Info`` of each layer before downloading it; the lazy entry answers with its size, so
   containerd's metadata layer commits the layer as shared content and **downloads nothing**.
2. **Read of a Nydus manifest**: before the bytes are served, the image's blob layers, and
   its bootstrap layer when its blob is stored here (applied by the snapshotter from this
   store), are registered with containerd (:class:`~.remotelayers.RemoteLayerRegistrar`), so
   that the unpack that is about to start finds them and skips them (blocking until done).
3. **Read of a lazy entry** (``ctr content get``, an export, a push): the real bytes are
   fetched from the registry of an image that lists the blob and stored as a blob (checked
   against the digest first) by :class:`LazyBlobFetcher`; without a source, the read fails
   with FAILED_PRECONDITION and says why. Wrong bytes are never served.

``List`` and ``Delete`` include lazy entries, so containerd's garbage collector removes them
with the images that listed them.

Threading: the hooks are called from gRPC worker threads; they keep no state but the files.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from ...errors import NydusError
from ...format.safejson import parse_json_object_or_none
from ...registry import RegistryClient
from ...registry.reference import parse_reference
from ..containerd.client import ContainerdClient
from ..containerd.errdefs import SnapshotInvalidArgument, SnapshotPreconditionFailed
from ..containerd.proto import CONTENT_SERVICE, content_pb2
from ..containerd.rpc import rpc_code, rpc_error_text
from ..snapshots.labels import is_nydus_blob
from .remotelayers import LocalLayers, RemoteLayerRegistrar, image_uses
from .service import ContentService
from .store import ContentStore, LazyEntry, parse_digest

__all__ = ["LazyBlobFetcher", "NydusContentHooks", "nydus_blob_layers", "nydus_content_service"]

log = logging.getLogger(__name__)

_MAX_MANIFEST = 4 << 20
_SOURCE_LABEL = "containerd.io/distribution.source."


def nydus_blob_layers(manifest: bytes) -> list[tuple[str, int, str]]:
    """``(digest, size, media type)`` of the Nydus blob layers a manifest lists."""
    if b"nydus-blob" not in manifest:  # most content: no JSON parsing at all
        return []
    doc = parse_json_object_or_none(manifest, _MAX_MANIFEST)
    if doc is None or not isinstance(doc.get("layers"), list) or "config" not in doc:
        return []
    out = []
    for layer in doc["layers"]:
        if not isinstance(layer, dict):
            continue
        ann = layer.get("annotations")
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(ann, dict) or not is_nydus_blob({str(k): str(v) for k, v in ann.items()}):
            continue
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            continue
        try:
            parse_digest(digest)
        except SnapshotInvalidArgument:
            continue
        out.append((digest, size, str(layer.get("mediaType", ""))))
    return out


@dataclass
class LazyBlobFetcher:
    """The bytes of a lazy entry from the registry of an image that lists it.

    The registry and repository come from the names of containerd's images whose manifest
    (recorded in the lazy entry) lists the blob; containerd's
    ``containerd.io/distribution.source.<host>`` labels are the fallback (containerd drops the
    port from that host, so they only help for registries on the default port).
    """

    address: str  # containerd's socket
    read_blob: Callable[[str], bytes | None]
    scheme: str = ""
    docker_config: Path | None = None
    timeout: float = 10.0

    def sources(self, entry: LazyEntry) -> list[tuple[str, str]]:
        """``(registry host, repository)`` pairs to fetch ``entry`` from, best first."""
        manifest = str(entry.meta.get("manifest", ""))
        named: list[tuple[str, str]] = []
        labelled: list[tuple[str, str]] = []
        with ContainerdClient(self.address, self.timeout) as ctd:
            for ns in ctd.namespaces():
                if manifest:
                    for img in ctd.images(ns):
                        if image_uses(self.read_blob, img.target, manifest):
                            with contextlib.suppress(NydusError):
                                ref = parse_reference(img.name)
                                named.append((ref.api_host, ref.repository))
                try:
                    info = (
                        ctd.service(CONTENT_SERVICE, ns)
                        .unary(
                            "Info",
                            content_pb2.InfoRequest(digest=entry.digest),
                            content_pb2.InfoResponse,
                        )
                        .info
                    )
                except grpc.RpcError as e:
                    if rpc_code(e) == grpc.StatusCode.NOT_FOUND:
                        continue
                    raise
                for key, value in info.labels.items():
                    if key.startswith(_SOURCE_LABEL):
                        host = key[len(_SOURCE_LABEL) :]
                        labelled += [(host, repo) for repo in value.split(",") if repo]
        return list(dict.fromkeys(named + labelled))

    def open(self, entry: LazyEntry) -> Iterable[bytes]:
        try:
            sources = self.sources(entry)
        except grpc.RpcError as e:
            raise SnapshotPreconditionFailed(
                f"content {entry.digest} is a lazy Nydus blob; asking containerd where it came "
                f"from failed: {rpc_error_text(e)}"
            ) from e
        if not sources:
            raise SnapshotPreconditionFailed(
                f"content {entry.digest} is a lazy Nydus blob (its bytes stay in the registry) "
                "and no image in containerd says which registry it came from"
            )
        host, repo = sources[0]
        client = RegistryClient(host, scheme=self.scheme, docker_config=self.docker_config)
        log.info("fetching lazy blob %s from %s/%s", entry.digest, host, repo)
        return client.get_blob_stream(repo, entry.digest)


class NydusContentHooks:
    """:class:`~.service.ContentHooks` for Nydus images (see the module docstring)."""

    def __init__(
        self,
        store: ContentStore,
        registrar: RemoteLayerRegistrar | None = None,
        fetcher: LazyBlobFetcher | None = None,
    ) -> None:
        self.store = store
        self.registrar = registrar
        self.fetcher = fetcher
        self.marks = store.root / "nydus-manifests"

    def _mark(self, digest: str) -> Path:
        alg, hexpart = parse_digest(digest)
        return self.marks / alg / hexpart

    def is_nydus_manifest(self, digest: str) -> bool:
        return self._mark(digest).exists()

    def committed(self, digest: str, ref: str) -> None:
        data = self.store.read_small(digest, _MAX_MANIFEST)
        if data is None:
            return
        layers = nydus_blob_layers(data)
        if not layers:
            return
        added = sum(
            self.store.put_lazy(d, size, {"media_type": mt, "manifest": digest})
            for d, size, mt in layers
        )
        mark = self._mark(digest)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        log.info(
            "manifest %s (ref %s): %d Nydus data blob(s), %d recorded as lazy content",
            digest,
            ref,
            len(layers),
            added,
        )

    def deleted(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._mark(digest))

    def before_read(self, digest: str) -> None:
        if self.registrar is not None and self.is_nydus_manifest(digest):
            self.registrar.ensure(digest)

    def lazy_source(self, entry: LazyEntry) -> Iterable[bytes]:
        if self.fetcher is None:
            raise SnapshotPreconditionFailed(
                f"content {entry.digest} is a lazy Nydus blob (its bytes stay in the registry) "
                "and this snapshotter does not fetch them"
            )
        return self.fetcher.open(entry)

    def recorded(self) -> Sequence[str]:
        """Digests of the Nydus manifests marked so far (for tests and diagnostics)."""
        out = []
        for alg_dir in sorted(self.marks.glob("*")):
            out += [f"{alg_dir.name}:{p.name}" for p in sorted(alg_dir.iterdir())]
        return out


def nydus_content_service(
    content_dir: Path,
    containerd_address: str | os.PathLike[str],
    plugin_name: Callable[[], str],
    *,
    scheme: str = "",
    docker_config: Path | None = None,
) -> tuple[ContentService, LocalLayers]:
    """The Content service over ``content_dir`` with the Nydus hooks (``--content-store``),
    and the stored layers it learns of (the snapshotter's ``layer_blobs``).

    ``plugin_name`` says under which name containerd knows this snapshotter (for the remote
    layers it registers); ``scheme`` and ``docker_config`` are for fetching lazy blobs.
    """
    store = ContentStore(content_dir)
    address = os.fspath(containerd_address)

    def read_blob(digest: str) -> bytes | None:
        return store.read_small(digest, _MAX_MANIFEST)

    local = LocalLayers(store)
    registrar = RemoteLayerRegistrar(address, read_blob, plugin_name, local=local)
    fetcher = LazyBlobFetcher(address, read_blob, scheme, docker_config)
    return ContentService(store, NydusContentHooks(store, registrar, fetcher)), local
