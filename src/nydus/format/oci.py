"""OCI / Docker v2 image format vocabulary: media types, annotations and small helpers.

Owns the string constants shared by the registry client, the converter and the snapshotter
(OCI image-spec, Docker schema 2, and the Nydus additions used by upstream nydusify and
nydus-snapshotter), plus digest helpers and a tolerant reader for the media type of a manifest
body. No I/O; pure functions and constants, safe from any thread.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from nydus.errors import FormatError, IntegrityError, NydusError

__all__ = [
    "MEDIA_TYPE_OCI_MANIFEST",
    "MEDIA_TYPE_OCI_INDEX",
    "MEDIA_TYPE_OCI_CONFIG",
    "MEDIA_TYPE_OCI_LAYER",
    "MEDIA_TYPE_OCI_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER_ZSTD",
    "MEDIA_TYPE_OCI_EMPTY",
    "MEDIA_TYPE_DOCKER_MANIFEST",
    "MEDIA_TYPE_DOCKER_MANIFEST_LIST",
    "MEDIA_TYPE_DOCKER_CONFIG",
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP",
    "MEDIA_TYPE_NYDUS_BLOB",
    "MEDIA_TYPE_NYDUS_CONFIG",
    "ARTIFACT_TYPE_NYDUS_MANIFEST",
    "PLATFORM_FEATURE_NYDUS",
    "BOOTSTRAP_FILE_IN_LAYER",
    "ANNOTATION_NYDUS_BLOB",
    "ANNOTATION_NYDUS_BOOTSTRAP",
    "ANNOTATION_NYDUS_FS_VERSION",
    "ANNOTATION_NYDUS_BLOB_DIGEST",
    "ANNOTATION_NYDUS_BLOB_SIZE",
    "ANNOTATION_NYDUS_SOURCE_CHAINID",
    "ANNOTATION_NYDUS_ENCRYPTED_BLOB",
    "ANNOTATION_NYDUS_SOURCE_DIGEST",
    "ANNOTATION_NYDUS_TARGET_DIGEST",
    "ANNOTATION_NYDUS_REFERENCE_BLOB_IDS",
    "ANNOTATION_NYDUS_REF",
    "ANNOTATION_NYDUS_CACHE",
    "ANNOTATION_UNCOMPRESSED",
    "MANIFEST_MEDIA_TYPES",
    "INDEX_MEDIA_TYPES",
    "ALL_MANIFEST_MEDIA_TYPES",
    "is_index",
    "is_manifest",
    "sha256_digest",
    "parse_digest",
    "DIGEST_HEX_LENGTHS",
    "compute_digest",
    "BlobCheck",
    "manifest_media_type",
    "Descriptor",
]

# --- OCI image-spec -----------------------------------------------------------------------
from .safejson import parse_json_object

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_OCI_EMPTY = "application/vnd.oci.empty.v1+json"

# --- Docker image manifest v2, schema 2 ---------------------------------------------------
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# --- Nydus (upstream nydusify / nydus-snapshotter converter constants) ---------------------
MEDIA_TYPE_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
#: Config media type of a nydus manifest merged into an OCI index next to the OCI one.
MEDIA_TYPE_NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"
#: ``artifactType`` of the nydus manifest's entry in a merged index.
ARTIFACT_TYPE_NYDUS_MANIFEST = "application/vnd.nydus.image.manifest.v1+json"
#: Older marker of the same thing: ``platform.os.features`` of the index entry.
PLATFORM_FEATURE_NYDUS = "nydus.remoteimage.v1"
#: Path of the bootstrap inside the bootstrap layer's tar.gz.
BOOTSTRAP_FILE_IN_LAYER = "image/image.boot"

ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
ANNOTATION_NYDUS_BLOB_DIGEST = "containerd.io/snapshot/nydus-blob-digest"
ANNOTATION_NYDUS_BLOB_SIZE = "containerd.io/snapshot/nydus-blob-size"
ANNOTATION_NYDUS_SOURCE_CHAINID = "containerd.io/snapshot/nydus-source-chainid"
ANNOTATION_NYDUS_ENCRYPTED_BLOB = "containerd.io/snapshot/nydus-encrypted-blob"
ANNOTATION_NYDUS_SOURCE_DIGEST = "containerd.io/snapshot/nydus-source-digest"
ANNOTATION_NYDUS_TARGET_DIGEST = "containerd.io/snapshot/nydus-target-digest"
ANNOTATION_NYDUS_REFERENCE_BLOB_IDS = "containerd.io/snapshot/nydus-reference-blob-ids"
ANNOTATION_NYDUS_REF = "containerd.io/snapshot/nydus-ref"
#: Manifest annotation marking a nydus build-cache image.
ANNOTATION_NYDUS_CACHE = "containerd.io/snapshot/nydus-cache"
ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"

# --- groups -------------------------------------------------------------------------------
MANIFEST_MEDIA_TYPES: tuple[str, ...] = (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
INDEX_MEDIA_TYPES: tuple[str, ...] = (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST)
#: What a client accepts by default when it GETs a manifest, most preferred first.
ALL_MANIFEST_MEDIA_TYPES: tuple[str, ...] = (
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST_LIST,
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST,
)


def is_index(media_type: str) -> bool:
    """True for an OCI image index or a Docker manifest list."""
    return media_type in INDEX_MEDIA_TYPES


def is_manifest(media_type: str) -> bool:
    """True for an OCI image manifest or a Docker v2 schema 2 manifest."""
    return media_type in MANIFEST_MEDIA_TYPES


_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
#: Supported digest algorithms and the length of their hex part.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


def parse_digest(digest: str, *, error: type[NydusError] = FormatError) -> tuple[str, str]:
    """Split ``algo:hex`` and check it (sha256/sha384/sha512, lower-case hex of the right
    length); raises ``error`` if malformed."""
    m = _DIGEST_RE.match(digest)
    if not m:
        raise error(f"malformed digest {digest[:200]!r}")
    algo, hexpart = m.group(1), m.group(2)
    want = DIGEST_HEX_LENGTHS.get(algo)
    if want is None:
        raise error(f"unsupported digest algorithm {algo[:80]!r} in {digest[:200]!r}")
    if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise error(f"malformed {algo} digest {digest[:200]!r}")
    return algo, hexpart


def sha256_digest(data: bytes | bytearray | memoryview) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compute_digest(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    """``<algorithm>:<hex>`` of ``data`` for sha256/sha384/sha512."""
    if algorithm not in DIGEST_HEX_LENGTHS:
        raise FormatError(f"unsupported digest algorithm {algorithm!r}")
    return f"{algorithm}:" + hashlib.new(algorithm, data).hexdigest()


class BlobCheck:
    """The check of a blob's bytes, fed piece by piece, against the digest and size of its
    descriptor: longer is an IntegrityError at once, shorter or another digest at :meth:`finish`.
    A size of None is not checked; ``digest_known`` (the writer hashed these bytes as it wrote
    them) checks the size only. One per pass over the bytes, in one thread."""

    def __init__(self, digest: str, size: int | None, *, digest_known: bool = False) -> None:
        self.digest = digest
        self.size = size
        self.count = 0
        algo = parse_digest(digest)[0]
        self._hash = None if digest_known else hashlib.new(algo)

    def update(self, piece: bytes | bytearray) -> None:
        if self._hash is not None:
            self._hash.update(piece)
        self.count += len(piece)
        if self.size is not None and self.count > self.size:
            raise IntegrityError(f"blob {self.digest}: data is longer than {self.size} bytes")

    def finish(self) -> None:
        if self.size is not None and self.count != self.size:
            raise IntegrityError(
                f"blob {self.digest}: got {self.count} bytes, the descriptor says {self.size}"
            )
        if self._hash is None:
            return  # digest_known
        got = f"{self._hash.name}:{self._hash.hexdigest()}"
        if got != self.digest:
            raise IntegrityError(f"blob {self.digest}: content has digest {got}")


def manifest_media_type(body: bytes, header: str | None = None) -> str:
    """The media type of a manifest body.

    ``header`` is the HTTP Content-Type (parameters ignored); when it is missing or generic
    (``application/json``, ``text/plain``, ``application/octet-stream``) the body's
    ``mediaType`` field decides, and a body without one is guessed from its shape
    (``manifests`` → OCI index, ``layers`` → OCI manifest), as registries and containerd do.
    """
    if header:
        mt = header.split(";", 1)[0].strip().lower()
        if mt and mt not in ("application/json", "text/plain", "application/octet-stream"):
            return mt
    doc = parse_json_object(body, "manifest")
    field_mt = doc.get("mediaType")
    if isinstance(field_mt, str) and field_mt:
        return field_mt
    if "manifests" in doc:
        return MEDIA_TYPE_OCI_INDEX
    if "layers" in doc:
        return MEDIA_TYPE_OCI_MANIFEST
    raise FormatError("cannot tell the media type of the manifest")


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (the subset this project reads and writes)."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str = ""
    platform: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = dict(self.platform)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Descriptor:
        """From a JSON descriptor; raises :class:`FormatError` when a field is missing/bad."""
        if not isinstance(d, dict):
            raise FormatError("descriptor is not a JSON object")
        mt, dg, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mt, str) or not isinstance(dg, str):
            raise FormatError("descriptor lacks mediaType or digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"descriptor {dg} has a bad size {size!r}")
        parse_digest(dg)
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
        ):
            raise FormatError(f"descriptor {dg} has bad annotations")
        at = d.get("artifactType") or ""
        plat = d.get("platform")
        return cls(
            mt,
            dg,
            size,
            dict(ann),
            at if isinstance(at, str) else "",
            plat if isinstance(plat, dict) else None,
        )
