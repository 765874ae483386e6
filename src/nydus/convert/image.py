"""Image documents for nydusify: reading source manifests/indexes, writing Nydus ones.

Reading: :func:`parse_manifest` (Docker v2 schema 2 or OCI, layers checked for media types the
converter can read), :func:`parse_index` and :func:`select_platforms` (``--platform``,
``--all-platforms``, default: this machine's platform).

Writing, following upstream's converted layout (nydus-reference.md §1.5): data blobs as
``application/vnd.oci.image.layer.nydus.blob.v1`` layers annotated
``containerd.io/snapshot/nydus-blob``; the last layer a gzip tar holding ``image/image.boot``
annotated ``nydus-bootstrap`` and ``nydus-fs-version``; the config with ``rootfs.diff_ids``
rewritten and a "Nydus Bootstrap Layer" history entry; ``--merge-platform`` entries marked
with ``artifactType`` and ``platform.os.features``; ``--with-referrer`` as ``subject``.
Everything here is deterministic (no clocks): the same input gives the same bytes, so a
conversion is reproducible.

Pure functions, no I/O but :func:`bootstrap_layer` reading the bootstrap file it is given;
safe from any thread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform as _platform
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, FormatError, UnsupportedError
from ..format import oci
from ..format.safejson import parse_json_object
from ..metadata import MAX_BOOTSTRAP_SIZE

__all__ = [
    "Platform",
    "SourceManifest",
    "parse_manifest",
    "parse_index",
    "select_platforms",
    "host_platform",
    "bootstrap_layer",
    "read_bootstrap_layer",
    "nydus_config",
    "nydus_manifest",
    "nydus_index",
    "blob_descriptor",
    "bootstrap_descriptor",
    "LAYER_MEDIA_TYPES",
    "is_nydus_manifest",
]

#: Source layer media types the converter reads (the builder sniffs the compression).
LAYER_MEDIA_TYPES = frozenset(
    {
        oci.MEDIA_TYPE_OCI_LAYER,
        oci.MEDIA_TYPE_OCI_LAYER_GZIP,
        oci.MEDIA_TYPE_OCI_LAYER_ZSTD,
        oci.MEDIA_TYPE_DOCKER_LAYER_GZIP,
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        oci.MEDIA_TYPE_DOCKER_FOREIGN_LAYER_GZIP,
    }
)
CONFIG_MEDIA_TYPES = frozenset(
    {oci.MEDIA_TYPE_OCI_CONFIG, oci.MEDIA_TYPE_DOCKER_CONFIG, oci.MEDIA_TYPE_NYDUS_CONFIG}
)
HISTORY_CREATED_BY = "Nydus Converter"
HISTORY_COMMENT = "Nydus Bootstrap Layer"


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ConfigError(f"platform {text!r} is not OS/ARCH[/VARIANT]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Platform | None:
        if not d:
            return None
        os_, arch = d.get("os"), d.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            return None
        v = d.get("variant")
        return cls(os_, arch, v if isinstance(v, str) else "")

    def matches(self, other: Platform) -> bool:
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or not other.variant or self.variant == other.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @property
    def slug(self) -> str:
        """A safe directory name for this platform (it comes from a registry: ``..``, ``/``
        or control characters never reach a path)."""
        text = re.sub(r"[^A-Za-z0-9._-]", "_", str(self).replace("/", "-"))
        return text if text and text[0].isalnum() else "p" + text


def host_platform() -> Platform:
    machine = _platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)
    variant = "v7" if machine == "armv7l" else ""
    return Platform("linux", arch, variant)


@dataclass
class SourceManifest:
    """A single-platform image manifest as read from the source."""

    body: bytes
    media_type: str
    digest: str
    config: oci.Descriptor
    layers: list[oci.Descriptor]
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def descriptor(self) -> oci.Descriptor:
        return oci.Descriptor(self.media_type, self.digest, len(self.body))

    @property
    def is_docker(self) -> bool:
        return self.media_type == oci.MEDIA_TYPE_DOCKER_MANIFEST


def is_nydus_manifest(m: SourceManifest) -> bool:
    return bool(m.layers) and (
        m.layers[-1].annotations.get(oci.ANNOTATION_NYDUS_BOOTSTRAP) == "true"
        or any(ld.media_type == oci.MEDIA_TYPE_NYDUS_BLOB for ld in m.layers)
    )


def parse_manifest(
    body: bytes, media_type: str, digest: str, *, for_conversion: bool = True
) -> SourceManifest:
    """A Docker v2 schema 2 or OCI image manifest. With ``for_conversion`` every layer must
    have a media type the converter reads (else :class:`UnsupportedError`)."""
    if media_type in (
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ):
        raise UnsupportedError(f"manifest {digest}: Docker schema 1 images are not supported")
    if not oci.is_manifest(media_type):
        raise UnsupportedError(f"manifest {digest} has unsupported media type {media_type!r}")
    doc = parse_json_object(body, f"manifest {digest}")
    if doc.get("schemaVersion") != 2:
        raise UnsupportedError(f"manifest {digest}: schemaVersion {doc.get('schemaVersion')!r}")
    try:
        config = oci.Descriptor.from_dict(doc.get("config"))
        layers_raw = doc.get("layers")
        if not isinstance(layers_raw, list):
            raise FormatError("no layers list")
        layers = [oci.Descriptor.from_dict(x) for x in layers_raw]
    except FormatError as e:
        raise FormatError(f"manifest {digest}: {e}") from None
    m = SourceManifest(body, media_type, digest, config, layers, doc)
    if for_conversion:
        if config.media_type not in CONFIG_MEDIA_TYPES:
            raise UnsupportedError(
                f"manifest {digest}: config media type {config.media_type!r} is not an image config"
            )
        if is_nydus_manifest(m):
            raise UnsupportedError(f"manifest {digest} is already a Nydus image")
        for ld in layers:
            if ld.media_type not in LAYER_MEDIA_TYPES:
                raise UnsupportedError(
                    f"manifest {digest}: layer {ld.digest} has unsupported media type "
                    f"{ld.media_type!r}"
                )
            if ld.digest.split(":", 1)[0] != "sha256":
                raise UnsupportedError(f"layer {ld.digest}: only sha256 digests are supported")
    return m


@dataclass
class IndexEntry:
    descriptor: oci.Descriptor
    platform: Platform | None
    raw: dict[str, Any]


def parse_index(body: bytes, digest: str) -> tuple[dict[str, Any], list[IndexEntry]]:
    doc = parse_json_object(body, f"index {digest}")
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise FormatError(f"index {digest} has no manifests list")
    out = []
    for raw in items:
        try:
            d = oci.Descriptor.from_dict(raw)
        except FormatError as e:
            raise FormatError(f"index {digest}: {e}") from None
        out.append(IndexEntry(d, Platform.from_dict(raw.get("platform")), raw))
    return doc, out


def select_platforms(
    entries: list[IndexEntry], wanted: list[Platform] | None, all_platforms: bool
) -> list[IndexEntry]:
    """The image manifests to convert, in index order. Attestations (``unknown/unknown``)
    and entries that are not image manifests are never selected."""
    images = [
        e
        for e in entries
        if oci.is_manifest(e.descriptor.media_type)
        and not (e.platform and e.platform.os == "unknown")
        and e.descriptor.artifact_type != oci.ARTIFACT_TYPE_NYDUS_MANIFEST
        and oci.PLATFORM_FEATURE_NYDUS not in (e.raw.get("platform") or {}).get("os.features", [])
    ]
    if all_platforms:
        if not images:
            raise UnsupportedError("the index lists no image manifest")
        return images
    targets = wanted or [host_platform()]
    out: list[IndexEntry] = []
    for t in targets:
        hit = next((e for e in images if e.platform is not None and t.matches(e.platform)), None)
        if hit is None:
            have = ", ".join(str(e.platform) for e in images if e.platform) or "none"
            raise ConfigError(f"the source has no {t} image (it has: {have})")
        if hit not in out:
            out.append(hit)
    return out


# --- writing ------------------------------------------------------------------------------


def bootstrap_layer(bootstrap: bytes | str) -> tuple[bytes, str]:
    """The bootstrap layer: ``(tar.gz bytes, diff_id)``; reproducible (mtime 0, root-owned).

    ``bootstrap`` is the bootstrap's bytes or the path of its file. The tar is hashed and
    compressed as it is written (never held whole): the same bytes as ``gzip.compress(tar,
    6, mtime=0)``, i.e. zlib's one-shot gzip at level 6, which does not depend on how its
    input is split."""
    out = _GzipSink()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:  # type: ignore[call-overload]
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        f = tarfile.TarInfo(oci.BOOTSTRAP_FILE_IN_LAYER)
        f.mode, f.mtime = 0o644, 0
        if isinstance(bootstrap, str):
            with open(bootstrap, "rb") as src:
                f.size = os.fstat(src.fileno()).st_size
                tf.addfile(f, src)
        else:
            f.size = len(bootstrap)
            tf.addfile(f, io.BytesIO(bootstrap))
    return out.finish(), "sha256:" + out.sha.hexdigest()


class _GzipSink:
    """A write-only file for :mod:`tarfile`: sha256 of what passes (the diff_id) and its
    gzip (level 6, zlib's header: mtime 0), kept compressed."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        self._parts: list[bytes] = []
        self._pos = 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self._pos += len(b)
        if piece := self._z.compress(b):
            self._parts.append(piece)
        return len(b)

    def tell(self) -> int:
        return self._pos

    def finish(self) -> bytes:
        self._parts.append(self._z.flush())
        return b"".join(self._parts)


#: A bootstrap layer holds one file (and maybe its directory); stop looking after this many.
_MAX_BOOTSTRAP_LAYER_ENTRIES = 64


def read_bootstrap_layer(data: bytes, what: str = "bootstrap layer") -> bytes:
    """``image/image.boot`` (or upstream's older ``image.boot``) from a bootstrap layer."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for count, m in enumerate(tf):
                if count >= _MAX_BOOTSTRAP_LAYER_ENTRIES:
                    break
                name = m.name.lstrip("./")
                if name in (oci.BOOTSTRAP_FILE_IN_LAYER, "image.boot") and m.isreg():
                    if m.size > MAX_BOOTSTRAP_SIZE:
                        raise FormatError(
                            f"{what}: {name} is {m.size} bytes, over the "
                            f"{MAX_BOOTSTRAP_SIZE >> 20} MiB bootstrap limit"
                        )
                    f = tf.extractfile(m)
                    assert f is not None
                    return f.read(MAX_BOOTSTRAP_SIZE)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FormatError(f"{what} is not a valid tar.gz: {e}") from None
    raise FormatError(f"{what} holds no {oci.BOOTSTRAP_FILE_IN_LAYER}")


def blob_descriptor(digest: str, size: int, *, docker: bool = False) -> oci.Descriptor:
    """A data blob layer. In a Docker v2 manifest the Nydus media type is not allowed (docker
    and skopeo refuse the manifest), so the layer is typed as a Docker layer there; the
    ``nydus-blob`` annotation is what the snapshotter goes by either way."""
    mt = oci.MEDIA_TYPE_DOCKER_LAYER_GZIP if docker else oci.MEDIA_TYPE_NYDUS_BLOB
    return oci.Descriptor(
        mt,
        digest,
        size,
        {
            oci.ANNOTATION_UNCOMPRESSED: digest,
            oci.ANNOTATION_NYDUS_BLOB: "true",
        },
    )


def bootstrap_descriptor(
    data: bytes,
    diff_id: str,
    *,
    docker: bool,
    fs_version: str,
    reference_blob_ids: list[str] | None = None,
) -> oci.Descriptor:
    ann = {
        oci.ANNOTATION_UNCOMPRESSED: diff_id,
        oci.ANNOTATION_NYDUS_FS_VERSION: fs_version,
        oci.ANNOTATION_NYDUS_BOOTSTRAP: "true",
    }
    if reference_blob_ids is not None:
        ann[oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS] = json.dumps(
            reference_blob_ids, separators=(",", ":")
        )
    mt = oci.MEDIA_TYPE_DOCKER_LAYER_GZIP if docker else oci.MEDIA_TYPE_OCI_LAYER_GZIP
    return oci.Descriptor(mt, oci.sha256_digest(data), len(data), ann)


def nydus_config(source: dict[str, Any], diff_ids: list[str]) -> bytes:
    """The source config with ``rootfs.diff_ids`` replaced and a history entry appended.
    Key order of the source is kept; no timestamp is added."""
    cfg = dict(source)
    rootfs = dict(cfg.get("rootfs") or {})
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = list(diff_ids)
    cfg["rootfs"] = rootfs
    history = cfg.get("history")
    history = list(history) if isinstance(history, list) else []
    history.append({"created_by": HISTORY_CREATED_BY, "comment": HISTORY_COMMENT})
    cfg["history"] = history
    return json.dumps(cfg, separators=(",", ":"), ensure_ascii=False).encode()


def nydus_manifest(
    config: bytes,
    layers: list[oci.Descriptor],
    *,
    docker: bool,
    nydus_config_type: bool = False,
    subject: oci.Descriptor | None = None,
    annotations: dict[str, str] | None = None,
) -> tuple[bytes, str]:
    """``(manifest bytes, media type)``."""
    if docker:
        mt, cmt = oci.MEDIA_TYPE_DOCKER_MANIFEST, oci.MEDIA_TYPE_DOCKER_CONFIG
    else:
        mt, cmt = oci.MEDIA_TYPE_OCI_MANIFEST, oci.MEDIA_TYPE_OCI_CONFIG
    if nydus_config_type:
        cmt = oci.MEDIA_TYPE_NYDUS_CONFIG
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt,
        "config": oci.Descriptor(cmt, oci.sha256_digest(config), len(config)).to_dict(),
        "layers": [d.to_dict() for d in layers],
    }
    if subject is not None:
        doc["subject"] = oci.Descriptor(subject.media_type, subject.digest, subject.size).to_dict()
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, indent=2).encode(), mt


def nydus_index(
    entries: list[dict[str, Any]], *, docker: bool, annotations: dict[str, str] | None = None
) -> tuple[bytes, str]:
    mt = oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST if docker else oci.MEDIA_TYPE_OCI_INDEX
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt, "manifests": entries}
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, indent=2).encode(), mt


def index_entry(
    desc: oci.Descriptor, platform: dict[str, Any] | None, *, nydus_marker: bool, docker: bool
) -> dict[str, Any]:
    d = oci.Descriptor(desc.media_type, desc.digest, desc.size).to_dict()
    plat = dict(platform) if platform else None
    if nydus_marker:
        plat = plat or {}
        features = [f for f in plat.get("os.features", []) if f != oci.PLATFORM_FEATURE_NYDUS]
        plat["os.features"] = [*features, oci.PLATFORM_FEATURE_NYDUS]
        if not docker:
            d["artifactType"] = oci.ARTIFACT_TYPE_NYDUS_MANIFEST
    if plat is not None:
        d["platform"] = plat
    return d
