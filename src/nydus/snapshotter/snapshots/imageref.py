"""Which image a Nydus bootstrap layer belongs to: the reference nydusd fetches blobs from.

Under the CRI plugin every layer snapshot carries ``containerd.io/snapshot/cri.image-ref``.
Stock ``ctr image pull`` passes no such label: a layer snapshot knows only its chain ID
(``containerd.io/snapshot.ref``) and the namespace (the first part of containerd's backend key,
``<namespace>/<n>/<key>``). :class:`ContainerdImageResolver` asks containerd itself, over its own
socket: it lists the namespace's images (Images service), reads each one's manifest -- through
an index if needed -- and config (Content service), computes the chain IDs of the config's
``rootfs.diff_ids``, and answers the name of the most recently updated image whose layers
produce that chain ID. :meth:`ContainerdImageResolver.layer` answers more: which layer of which
manifest it is, with the layer descriptor's annotations, so that a snapshot prepared by stock
``ctr image pull`` (which passes no labels) can be given the labels containerd's unpacker would
have passed (:meth:`LayerMatch.snapshot_labels`).

Manifests and configs are read from ``local_blob`` first (the snapshotter's own content store,
when containerd uses it: then no call goes back to containerd) and from containerd's Content
service otherwise. What a manifest says is cached by its digest (immutable); lookups that found
nothing are remembered for a couple of seconds, so a burst of layers of an image that is not
there costs one image listing each.

Threading: a resolver may be shared; each lookup opens its own short-lived client of containerd
(:class:`~..containerd.client.ContainerdClient`), and the caches are guarded by a lock.

"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from ...errors import BackendError, FormatError
from ...format.oci import is_index, is_manifest
from ...format.safejson import parse_json_object
from ..containerd.client import ContainerdClient
from ..containerd.proto import descriptor_pb2
from ..containerd.rpc import rpc_error_text
from .labels import CRI_IMAGE_REF, unpack_labels

__all__ = [
    "ContainerdImageResolver",
    "ImageRefResolver",
    "LayerMatch",
    "LayerResolver",
    "chain_ids",
    "image_ref_from_labels",
    "namespace_of_key",
]

log = logging.getLogger(__name__)

_MAX_JSON = 8 << 20
_MAX_MANIFESTS = 64
_NEGATIVE_TTL = 2.0  # seconds a "no image has this layer" answer is reused
_CACHE_SIZE = 4096


class ImageRefResolver(Protocol):
    def image_ref(self, namespace: str, chain_id: str) -> str | None:
        """The name of an image in ``namespace`` with a layer of chain ID ``chain_id``."""
        ...


@dataclass(frozen=True)
class LayerMatch:
    """Layer ``index`` of manifest ``manifest`` of image ``image`` (see :meth:`layer`)."""

    image: str
    manifest: str
    index: int
    chain_ids: tuple[str, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def chain_id(self) -> str:
        return self.chain_ids[self.index]

    @property
    def parent(self) -> str:
        return self.chain_ids[self.index - 1] if self.index else ""

    def snapshot_labels(self) -> dict[str, str]:
        """The labels containerd's unpacker passes to ``Prepare`` for this layer."""
        return unpack_labels(self.annotations, self.chain_id)


class LayerResolver(Protocol):
    def layer(self, namespace: str, chain_id: str) -> LayerMatch | None:
        """The layer of an image in ``namespace`` whose chain ID is ``chain_id``."""
        ...


@dataclass(frozen=True)
class _Manifest:
    config: str
    chain_ids: tuple[str, ...]
    annotations: tuple[Mapping[str, str], ...]


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
    """Finds images and layers through containerd's Images and Content services."""

    def __init__(
        self,
        address: str | Path,
        timeout: float = 10.0,
        local_blob: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self.address = str(address)
        self.timeout = timeout
        self.local_blob = local_blob
        self._found: OrderedDict[tuple[str, str], LayerMatch] = OrderedDict()
        self._missing: dict[tuple[str, str], float] = {}
        self._manifests: OrderedDict[str, _Manifest] = OrderedDict()
        self._lock = threading.Lock()

    def image_ref(self, namespace: str, chain_id: str) -> str | None:
        m = self.layer(namespace, chain_id)
        return m.image if m is not None else None

    def layer(self, namespace: str, chain_id: str) -> LayerMatch | None:
        key = (namespace, chain_id)
        now = time.monotonic()
        with self._lock:
            hit = self._found.get(key)
            if hit is not None:
                self._found.move_to_end(key)
                return hit
            if self._missing.get(key, 0.0) > now:
                return None
        try:
            match = self._lookup(namespace, chain_id)
        except grpc.RpcError as e:
            raise BackendError(
                f"asking containerd at {self.address} for the image of layer {chain_id} "
                f"(namespace {namespace}): {rpc_error_text(e)}"
            ) from e
        with self._lock:
            if match is None:
                self._missing = {k: t for k, t in self._missing.items() if t > now}
                self._missing[key] = now + _NEGATIVE_TTL
            else:
                self._found[key] = match
                while len(self._found) > _CACHE_SIZE:
                    self._found.popitem(last=False)
        return match

    def _lookup(self, namespace: str, chain_id: str) -> LayerMatch | None:
        with ContainerdClient(self.address, self.timeout) as ctd:
            ordered = sorted(
                ctd.images(namespace),
                key=lambda i: (i.updated_at.seconds, i.updated_at.nanos),
                reverse=True,
            )
            for img in ordered:
                try:
                    for digest in self._manifests_of(ctd, namespace, img.target):
                        m = self._describe(ctd, namespace, digest)
                        if m is not None and chain_id in m.chain_ids:
                            log.debug("layer %s belongs to image %s", chain_id, img.name)
                            return LayerMatch(
                                str(img.name),
                                digest,
                                m.chain_ids.index(chain_id),
                                m.chain_ids,
                                m.annotations[m.chain_ids.index(chain_id)],
                            )
                except (FormatError, grpc.RpcError) as e:
                    # One unreadable image (content garbage-collected, foreign media type)
                    # must not hide the others.
                    log.debug("skipping image %s: %s", img.name, e)
        return None

    def _manifests_of(
        self, ctd: ContainerdClient, namespace: str, target: descriptor_pb2.Descriptor
    ) -> Iterator[str]:
        """Digests of the image manifests under ``target`` (itself, or an index's entries)."""
        todo = [(target.media_type, target.digest)]
        seen = 0
        while todo and seen < _MAX_MANIFESTS:
            media_type, digest = todo.pop(0)
            seen += 1
            with self._lock:
                known = digest in self._manifests
            if known:
                yield digest
                continue
            doc = self._read_json(ctd, namespace, digest)
            mt = media_type or str(doc.get("mediaType", ""))
            if is_index(mt) or (not mt and "manifests" in doc):
                for m in doc.get("manifests", []):
                    if isinstance(m, dict) and isinstance(m.get("digest"), str):
                        todo.append((str(m.get("mediaType", "")), m["digest"]))
            elif is_manifest(mt) or "layers" in doc:
                yield digest

    def _describe(self, ctd: ContainerdClient, namespace: str, digest: str) -> _Manifest | None:
        with self._lock:
            hit = self._manifests.get(digest)
        if hit is not None:
            return hit
        manifest = self._read_json(ctd, namespace, digest)
        cfg_digest = (manifest.get("config") or {}).get("digest")
        if not isinstance(cfg_digest, str):
            return None
        cfg = self._read_json(ctd, namespace, cfg_digest)
        diff_ids = (cfg.get("rootfs") or {}).get("diff_ids")
        layers = manifest.get("layers")
        if not isinstance(diff_ids, list) or not isinstance(layers, list):
            return None
        annotations = []
        for layer in layers[: len(diff_ids)]:
            ann = layer.get("annotations") if isinstance(layer, dict) else None
            annotations.append(
                {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}
            )
        annotations += [{}] * (len(diff_ids) - len(annotations))
        m = _Manifest(cfg_digest, tuple(chain_ids([str(d) for d in diff_ids])), tuple(annotations))
        with self._lock:
            self._manifests[digest] = m
            while len(self._manifests) > _CACHE_SIZE:
                self._manifests.popitem(last=False)
        return m

    def _read_json(self, ctd: ContainerdClient, namespace: str, digest: str) -> dict[str, Any]:
        data = self.local_blob(digest) if self.local_blob is not None else None
        if data is None:
            data = ctd.read_content(namespace, digest, _MAX_JSON)
        return parse_json_object(data, f"content {digest}")
