"""Which image a Nydus bootstrap layer belongs to: the reference nydusd fetches blobs from.

Under the CRI plugin every layer snapshot carries ``containerd.io/snapshot/cri.image-ref``.
Stock ``ctr image pull`` passes no such label: a layer snapshot knows only its chain ID
(``containerd.io/snapshot.ref``) and the namespace (the first part of containerd's backend key,
``<namespace>/<n>/<key>``). :class:`ContainerdImageResolver` asks containerd itself, over its own
socket: it lists the namespace's images (Images service), reads each one's manifest -- through
an index if needed -- and config (Content service), computes the chain IDs of the config's
``rootfs.diff_ids``, and answers the name of the most recently updated image whose layers
produce that chain ID.

Threading: a resolver may be shared; each lookup opens its own short-lived channel, and the
small result cache is guarded by a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc

from ..errors import BackendError, FormatError
from .api import CONTENT_SERVICE, IMAGES_SERVICE, NAMESPACE_HEADER, content_pb2, images_pb2
from .api import descriptor_pb2 as types_pb2
from .labels import CRI_IMAGE_REF
from .rpc import ServiceClient, rpc_error_text, unix_target

__all__ = [
    "ContainerdImageResolver",
    "ImageRefResolver",
    "chain_ids",
    "image_ref_from_labels",
    "namespace_of_key",
]

log = logging.getLogger(__name__)

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_MAX_JSON = 8 << 20
_MAX_MANIFESTS = 64


class ImageRefResolver(Protocol):
    def image_ref(self, namespace: str, chain_id: str) -> str | None:
        """The name of an image in ``namespace`` with a layer of chain ID ``chain_id``."""
        ...


def image_ref_from_labels(*label_sets: Mapping[str, str]) -> str | None:
    """The CRI image reference label from the first label set that has one."""
    for labels in label_sets:
        ref = labels.get(CRI_IMAGE_REF)
        if ref:
            return ref
    return None


def namespace_of_key(key: str) -> str | None:
    """The containerd namespace of a backend snapshot key ``<namespace>/<n>/<name>``."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit():
        return parts[0]
    return None


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain IDs of a layer stack: ``C0 = D0``, ``Cn = sha256(C(n-1) + " " + Dn)``."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


class ContainerdImageResolver:
    """Finds image references through containerd's Images and Content services."""

    def __init__(self, address: str | Path, timeout: float = 10.0) -> None:
        self.address = str(address)
        self.timeout = timeout
        self._cache: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def image_ref(self, namespace: str, chain_id: str) -> str | None:
        with self._lock:
            hit = self._cache.get((namespace, chain_id))
        if hit is not None:
            return hit
        try:
            ref = self._lookup(namespace, chain_id)
        except grpc.RpcError as e:
            raise BackendError(
                f"asking containerd at {self.address} for the image of layer {chain_id} "
                f"(namespace {namespace}): {rpc_error_text(e)}"
            ) from e
        if ref is not None:
            with self._lock:
                self._cache[(namespace, chain_id)] = ref
        return ref

    def _lookup(self, namespace: str, chain_id: str) -> str | None:
        md = [(NAMESPACE_HEADER, namespace)]
        with grpc.insecure_channel(unix_target(self.address)) as ch:
            images = ServiceClient(ch, IMAGES_SERVICE, md, self.timeout)
            content = ServiceClient(ch, CONTENT_SERVICE, md, self.timeout)
            resp = images.unary(
                "List", images_pb2.ListImagesRequest(), images_pb2.ListImagesResponse
            )
            ordered = sorted(
                resp.images, key=lambda i: (i.updated_at.seconds, i.updated_at.nanos), reverse=True
            )
            for img in ordered:
                try:
                    for manifest in self._manifests(content, img.target):
                        cfg_digest = manifest.get("config", {}).get("digest")
                        if not isinstance(cfg_digest, str):
                            continue
                        cfg = self._read_json(content, cfg_digest)
                        diff_ids = cfg.get("rootfs", {}).get("diff_ids", [])
                        if isinstance(diff_ids, list) and chain_id in chain_ids(
                            [str(d) for d in diff_ids]
                        ):
                            log.info("layer %s belongs to image %s", chain_id, img.name)
                            return str(img.name)
                except (FormatError, grpc.RpcError) as e:
                    # One unreadable image (content garbage-collected, foreign media type)
                    # must not hide the others.
                    log.debug("skipping image %s: %s", img.name, e)
        return None

    def _manifests(
        self, content: ServiceClient, target: types_pb2.Descriptor
    ) -> Iterator[dict[str, Any]]:
        todo = [(target.media_type, target.digest)]
        seen = 0
        while todo and seen < _MAX_MANIFESTS:
            media_type, digest = todo.pop(0)
            seen += 1
            doc = self._read_json(content, digest)
            mt = media_type or str(doc.get("mediaType", ""))
            if mt in _INDEX_TYPES or (not mt and "manifests" in doc):
                for m in doc.get("manifests", []):
                    if isinstance(m, dict) and isinstance(m.get("digest"), str):
                        todo.append((str(m.get("mediaType", "")), m["digest"]))
            elif mt in _MANIFEST_TYPES or "layers" in doc:
                yield doc

    def _read_json(self, content: ServiceClient, digest: str) -> dict[str, Any]:
        chunks: list[bytes] = []
        total = 0
        req = content_pb2.ReadContentRequest(digest=digest)
        for part in content.stream("Read", req, content_pb2.ReadContentResponse):
            total += len(part.data)
            if total > _MAX_JSON:
                raise FormatError(f"content {digest} is larger than {_MAX_JSON} bytes")
            chunks.append(part.data)
        try:
            doc = json.loads(b"".join(chunks))
        except ValueError as e:
            raise FormatError(f"content {digest} is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise FormatError(f"content {digest} is not a JSON object")
        return doc
