"""Where converted data blobs go: the target registry, or a ``--backend-type`` store.

Every store answers ``has(digest)`` (so blobs already there are skipped) and
``push_file(digest, path)``; the registry store also copies blobs in from another repository
(``ensure_from``: a cross-repository mount on the same registry, else a streamed copy).

- :class:`RegistryStore`: ``/v2/<repo>/blobs/sha256:<hex>`` of the target repository; it can
  also open an upload whose digest is named at its end (``start_upload``), so that the
  converter sends a blob while the builder still writes it.
- :class:`LocalFsStore` (``localfs``, config ``{"dir": ...}``): ``<dir>/<hex>``, written to a
  temporary name and renamed, so a reader never sees half a blob.
- :class:`ObjectStore` (``s3``/``oss``, upstream's config keys): object
  ``<object_prefix><hex>``; one PUT streamed from the file, addressed and signed by the nydusd
  backend of that type (:mod:`nydus.storage.objectstore`), which reads the same keys.

S3 multipart uploads are not implemented: one PUT holds at most 5 GiB, far above a layer blob.

Threading: stores are shared by the converter's workers; each call is independent.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from ..config import BackendConfig, DaemonConfig, LocalFsConfig, OssConfig
from ..errors import BackendError, ConfigError, IntegrityError
from ..format import oci
from ..registry.client import BlobUpload
from ..storage.objectstore import make_object_backend
from .remote import Remote

__all__ = [
    "BlobStore",
    "RegistryStore",
    "LocalFsStore",
    "ObjectStore",
    "make_store",
    "parse_backend_config",
]

MAX_SINGLE_PUT = 5 << 30


def parse_backend_config(backend_type: str, config: Mapping[str, Any]) -> BackendConfig:
    """A ``--backend-type``/``--backend-config`` pair, checked with nydusd's config rules."""
    if backend_type not in ("localfs", "s3", "oss"):
        raise ConfigError(f"--backend-type {backend_type!r}: expected localfs, s3 or oss")
    cfg = DaemonConfig.from_json(
        {"device": {"backend": {"type": backend_type, "config": dict(config)}}}, environ={}
    )
    return cfg.device.backend


class BlobStore(ABC):
    """A place for data blobs, addressed by sha256 digest."""

    kind = "?"
    in_manifest = True  # blobs listed as manifest layers (False: only the bootstrap is)

    @abstractmethod
    def has(self, digest: str) -> bool: ...

    @abstractmethod
    def push_file(
        self, digest: str, path: str, force: bool = False, *, written: int | None = None
    ) -> bool:
        """Store the file as ``digest``; False when it was already there (``force``: store
        it anyway, upstream's ``--backend-force-push``). ``written``: the file's size when
        ``digest`` was computed as it was written; the data is then not hashed again (its
        size is checked; a registry checks the digest when the upload ends)."""

    def ensure_from(self, digest: str, size: int, source: Remote) -> bool:
        """Make sure ``digest`` is here, copying it from ``source``'s repository if it is
        not; True if bytes were copied."""
        if self.has(digest):
            return False
        tmp = tempfile.NamedTemporaryFile(prefix="nydusify-copy-", delete=False)  # noqa: SIM115
        try:
            with tmp:
                for piece in source.client.get_blob_stream(source.repo, digest):
                    tmp.write(piece)
            self.push_file(digest, tmp.name)
        finally:
            os.unlink(tmp.name)
        return True

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:  # noqa: B027 - optional
        pass


class RegistryStore(BlobStore):
    kind = "registry"

    def __init__(self, target: Remote) -> None:
        self.target = target

    def has(self, digest: str) -> bool:
        return self.target.client.has_blob(self.target.repo, digest)

    def push_file(
        self, digest: str, path: str, force: bool = False, *, written: int | None = None
    ) -> bool:
        return self.target.client.push_blob(
            self.target.repo,
            digest,
            path,
            written,
            check_exists=not force,
            digest_known=written is not None,
        )

    def push_bytes(self, digest: str, data: bytes) -> bool:
        return self.target.client.push_blob(self.target.repo, digest, data)

    def start_upload(self) -> BlobUpload:
        """An upload whose digest is named at its end (data sent while it is written)."""
        return self.target.client.start_blob_upload(self.target.repo)

    @property
    def upload_piece(self) -> int:
        """Bytes per PATCH of a chunked upload."""
        return self.target.client.chunk_size

    @property
    def upload_whole_max(self) -> int:
        """Blobs up to this size go in one PUT (no upload worth streaming)."""
        return self.target.client.monolithic_max

    def ensure_from(self, digest: str, size: int, source: Remote) -> bool:
        if self.has(digest):
            return False
        if source.same_registry(self.target):
            if source.repo != self.target.repo:
                self.target.client.mount_blob(self.target.repo, digest, source.repo)
            return False
        client = source.client
        self.target.client.push_blob(
            self.target.repo,
            digest,
            lambda: client.get_blob_stream(source.repo, digest, verify=False),
            size,
            check_exists=False,
        )
        return True

    def describe(self) -> str:
        return f"registry {self.target.host}/{self.target.repo}"


class LocalFsStore(BlobStore):
    kind = "localfs"
    in_manifest = False

    def __init__(self, cfg: LocalFsConfig) -> None:
        if not cfg.dir:
            raise ConfigError("--backend-config: localfs needs 'dir' to push blobs into")
        self.dir = cfg.dir
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"localfs dir {self.dir}: {e.strerror}") from e

    def path(self, digest: str) -> str:
        return os.path.join(self.dir, oci.parse_digest(digest)[1])

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.path(digest))

    def push_file(
        self, digest: str, path: str, force: bool = False, *, written: int | None = None
    ) -> bool:
        _check_written(digest, path, written)
        dst = self.path(digest)
        if not force and os.path.isfile(dst) and os.path.getsize(dst) == os.path.getsize(path):
            return False
        fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, dst)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return True

    def describe(self) -> str:
        return f"localfs {self.dir}"


class ObjectStore(BlobStore):
    """``s3`` or ``oss``: one object per blob, through the nydusd backend of that type (its
    addressing, signing and HTTP client)."""

    in_manifest = False

    def __init__(self, kind: str, cfg: OssConfig, resolve: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self.cfg = cfg
        # uploads take longer than chunk reads, and a converter can afford patience
        cfg = dataclasses.replace(
            cfg, timeout=max(cfg.timeout, 60), retry_limit=max(cfg.retry_limit, 2)
        )
        self.backend = make_object_backend(kind, cfg, resolve=resolve)

    def key(self, digest: str) -> str:
        return self.backend.key(oci.parse_digest(digest)[1])

    def has(self, digest: str) -> bool:
        return self.backend.has_blob(oci.parse_digest(digest)[1])

    def push_file(
        self, digest: str, path: str, force: bool = False, *, written: int | None = None
    ) -> bool:
        _check_written(digest, path, written)
        if os.path.getsize(path) > MAX_SINGLE_PUT:
            raise BackendError(f"{self.kind}: blob {digest} is larger than 5 GiB")
        if not force and self.has(digest):
            return False
        self.backend.put_file(oci.parse_digest(digest)[1], path)
        return True

    def describe(self) -> str:
        return f"{self.kind} {self.cfg.bucket_name}/{self.cfg.object_prefix}"

    def close(self) -> None:
        self.backend.close()


def _check_written(digest: str, path: str, written: int | None) -> None:
    if written is not None and (have := os.path.getsize(path)) != written:
        raise IntegrityError(f"blob {digest}: {path} has {have} bytes, {written} were written")


def make_store(target: Remote, backend: BackendConfig | None) -> BlobStore:
    if backend is None:
        return RegistryStore(target)
    c = backend.config
    if isinstance(c, LocalFsConfig):
        return LocalFsStore(c)
    if isinstance(c, OssConfig):  # S3Config is an OssConfig
        return ObjectStore(backend.type, c)
    raise ConfigError(f"--backend-type {backend.type}: cannot push blobs there")
