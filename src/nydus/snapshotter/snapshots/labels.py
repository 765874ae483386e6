"""Snapshot label keys the snapshotter reads (containerd's and nydus-snapshotter's names).

containerd passes a layer descriptor's annotations whose keys start with
``containerd.io/snapshot/`` to ``Prepare`` as labels, plus ``containerd.io/snapshot.ref`` (the
layer's chain ID) while it unpacks an image; the CRI plugin adds the ``cri.*`` ones.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "CRI_IMAGE_LAYERS",
    "CRI_IMAGE_REF",
    "CRI_LAYER_DIGEST",
    "CRI_MANIFEST_DIGEST",
    "NYDUS_BLOB",
    "NYDUS_BOOTSTRAP",
    "NYDUS_FS_VERSION",
    "SNAPSHOT_REF",
    "is_nydus_blob",
    "is_nydus_bootstrap",
    "unpack_labels",
]

#: The chain ID a read-only layer snapshot is being prepared for (containerd's unpacker).
SNAPSHOT_REF = "containerd.io/snapshot.ref"

NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"

CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

#: Layer annotations with this prefix are passed on as snapshot labels.
_INHERITED_PREFIX = "containerd.io/snapshot/"


def _true(labels: Mapping[str, str], key: str) -> bool:
    return key in labels and labels[key].strip().lower() not in ("false", "0")


def is_nydus_blob(labels: Mapping[str, str]) -> bool:
    """A Nydus data-blob layer: containerd must not download it."""
    return _true(labels, NYDUS_BLOB)


def is_nydus_bootstrap(labels: Mapping[str, str]) -> bool:
    """The Nydus bootstrap (meta) layer: unpacked normally, holds ``image/image.boot``."""
    return _true(labels, NYDUS_BOOTSTRAP)


def unpack_labels(annotations: Mapping[str, object], chain_id: str) -> dict[str, str]:
    """The labels containerd's unpacker passes to ``Prepare`` for a layer: its annotations under
    ``containerd.io/snapshot/`` and ``containerd.io/snapshot.ref = chain_id``."""
    out = {str(k): str(v) for k, v in annotations.items() if str(k).startswith(_INHERITED_PREFIX)}
    out[SNAPSHOT_REF] = chain_id
    return out
