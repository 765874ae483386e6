"""Where converted data blobs go: the target registry, or a ``--backend-type`` store.

Every store answers ``has(digest)`` (so blobs already there are skipped) and
``push_file(digest, path)``; the registry store also copies blobs in from another repository
(``ensure_from``: a cross-repository mount on the same registry, else a streamed copy).

- :class:`RegistryStore`: ``/v2/<repo>/blobs/sha256:<hex>`` of the target repository.
- :class:`LocalFsStore` (``localfs``, config ``{"dir": ...}``): ``<dir>/<hex>``, written to a
  temporary name and renamed, so a reader never sees half a blob.
- :class:`ObjectStore` (``s3``/``oss``, upstream's config keys): object
  ``<object_prefix><hex>``; one PUT streamed from the file (S3 Signature V4 with
  ``UNSIGNED-PAYLOAD``, or the OSS header signature). The nydusd backends read the same keys.

S3 multipart uploads are not implemented: one PUT holds at most 5 GiB, far above a layer blob.

Threading: stores are shared by the converter's workers; each call is independent.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import hmac
import http.client
import os
import shutil
import ssl
import tempfile
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from ..config import BackendConfig, DaemonConfig, LocalFsConfig, OssConfig, S3Config
from ..errors import BackendError, ConfigError
from ..format import oci
from .remote import Remote

__all__ = ["BlobStore", "RegistryStore", "LocalFsStore", "ObjectStore", "make_store",
           "parse_backend_config"]

MAX_SINGLE_PUT = 5 << 30


def parse_backend_config(backend_type: str, config: Mapping[str, Any]) -> BackendConfig:
    """A ``--backend-type``/``--backend-config`` pair, checked with nydusd's config rules."""
    if backend_type not in ("localfs", "s3", "oss"):
        raise ConfigError(f"--backend-type {backend_type!r}: expected localfs, s3 or oss")
    cfg = DaemonConfig.from_json(
        {"device": {"backend": {"type": backend_type, "config": dict(config)}}}, environ={})
    return cfg.device.backend


class BlobStore(ABC):
    """A place for data blobs, addressed by sha256 digest."""

    kind = "?"
    in_manifest = True  # blobs listed as manifest layers (False: only the bootstrap is)

    @abstractmethod
    def has(self, digest: str) -> bool: ...

    @abstractmethod
    def push_file(self, digest: str, path: str, force: bool = False) -> bool:
        """Store the file as ``digest``; False when it was already there (``force``: store
        it anyway, upstream's ``--backend-force-push``)."""

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

    def push_file(self, digest: str, path: str, force: bool = False) -> bool:
        return self.target.client.push_blob(self.target.repo, digest, path,
                                            check_exists=not force)

    def push_bytes(self, digest: str, data: bytes) -> bool:
        return self.target.client.push_blob(self.target.repo, digest, data)

    def ensure_from(self, digest: str, size: int, source: Remote) -> bool:
        if self.has(digest):
            return False
        if source.same_registry(self.target):
            if source.repo != self.target.repo:
                self.target.client.mount_blob(self.target.repo, digest, source.repo)
            return False
        client = source.client
        self.target.client.push_blob(
            self.target.repo, digest,
            lambda: client.get_blob_stream(source.repo, digest, verify=False), size,
            check_exists=False)
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

    def push_file(self, digest: str, path: str, force: bool = False) -> bool:
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


def _hmac256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def s3_put_headers(url: str, headers: Mapping[str, str], *, method: str, access_key_id: str,
                   secret: str, region: str, now: _dt.datetime | None = None,
                   payload_hash: str = "UNSIGNED-PAYLOAD") -> dict[str, str]:
    """``headers`` signed with AWS Signature V4 (S3, path style), payload unsigned."""
    now = now or _dt.datetime.now(_dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    u = urllib.parse.urlsplit(url)
    out = {**headers, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    canon = {"host": u.netloc}
    for k, v in out.items():
        if k.lower() not in ("authorization", "user-agent", "content-length"):
            canon[k.lower()] = " ".join(str(v).strip().split())
    signed = ";".join(sorted(canon))
    canon_headers = "".join(f"{k}:{canon[k]}\n" for k in sorted(canon))
    path = urllib.parse.quote(urllib.parse.unquote(u.path or "/"), safe="/-_.~")
    query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True)))
    creq = "\n".join([method, path, query, canon_headers, signed, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                     hashlib.sha256(creq.encode()).hexdigest()])
    key = _hmac256(_hmac256(_hmac256(_hmac256(("AWS4" + secret).encode(), day), region), "s3"),
                   "aws4_request")
    sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, "
                            f"SignedHeaders={signed}, Signature={sig}")
    return out


def oss_headers(method: str, bucket: str, key: str, headers: Mapping[str, str], *,
                access_key_id: str, secret: str, date: str | None = None) -> dict[str, str]:
    """``headers`` plus ``Date`` and the OSS ``Authorization`` (HMAC-SHA1 over verb,
    Content-MD5, Content-Type, Date, the x-oss- headers and ``/bucket/key``)."""
    date = date or email.utils.formatdate(usegmt=True)
    lower = {k.lower(): v for k, v in headers.items()}
    parts = [method, lower.get("content-md5", ""), lower.get("content-type", ""), date]
    parts += [f"{k}:{v.strip()}" for k, v in sorted(lower.items()) if k.startswith("x-oss-")]
    parts.append(f"/{bucket}/{key}")
    mac = hmac.new(secret.encode(), "\n".join(parts).encode(), hashlib.sha1).digest()
    return {**headers, "Date": date,
            "Authorization": f"OSS {access_key_id}:{base64.b64encode(mac).decode()}"}


class ObjectStore(BlobStore):
    """``s3`` or ``oss``: one object per blob."""

    in_manifest = False

    def __init__(self, kind: str, cfg: OssConfig,
                 resolve: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self.cfg = cfg
        self.resolve = dict(resolve or {})  # host name -> address to connect to (tests)
        endpoint = cfg.endpoint or ("s3.amazonaws.com" if kind == "s3" else "")
        scheme = cfg.scheme or "https"
        if "://" in endpoint:
            scheme, endpoint = endpoint.split("://", 1)
        self.scheme, self.endpoint = scheme, endpoint.rstrip("/")
        self.retries = max(cfg.retry_limit, 2)

    def key(self, digest: str) -> str:
        return f"{self.cfg.object_prefix}{oci.parse_digest(digest)[1]}"

    def url(self, digest: str) -> str:
        key = self.key(digest)
        if self.kind == "s3":
            path = urllib.parse.quote(f"/{self.cfg.bucket_name}/{key}", safe="/-_.~")
            return f"{self.scheme}://{self.endpoint}{path}"
        return (f"{self.scheme}://{self.cfg.bucket_name}.{self.endpoint}/"
                f"{urllib.parse.quote(key, safe='/-_.~:')}")

    def _sign(self, method: str, digest: str, headers: Mapping[str, str]) -> dict[str, str]:
        c = self.cfg
        if not c.access_key_id:
            return dict(headers)
        if self.kind == "s3":
            assert isinstance(c, S3Config)
            return s3_put_headers(self.url(digest), headers, method=method,
                                  access_key_id=c.access_key_id, secret=c.access_key_secret,
                                  region=c.region or "us-east-1")
        return oss_headers(method, c.bucket_name, self.key(digest), headers,
                           access_key_id=c.access_key_id, secret=c.access_key_secret)

    def _conn(self) -> http.client.HTTPConnection:
        u = urllib.parse.urlsplit(self.url("sha256:" + "0" * 64))
        timeout = max(float(self.cfg.timeout), 60.0)
        host = u.hostname or ""
        if host in self.resolve:
            return http.client.HTTPConnection(self.resolve[host], u.port, timeout=timeout)
        if u.scheme == "https":
            ctx = ssl.create_default_context()
            for ca in self.cfg.ca_cert_files:
                ctx.load_verify_locations(cafile=ca)
            if self.cfg.skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(u.netloc, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(u.netloc, timeout=timeout)

    def _request(self, method: str, digest: str, headers: dict[str, str],
                 path: str | None = None) -> tuple[int, bytes]:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            conn = self._conn()
            try:
                target = urllib.parse.urlsplit(self.url(digest))
                hdrs = {"Host": target.netloc, **self._sign(method, digest, headers)}
                if path is None:
                    conn.request(method, target.path, headers=hdrs)
                else:
                    with open(path, "rb") as f:
                        conn.request(method, target.path, body=f, headers=hdrs)
                resp = conn.getresponse()
                body = resp.read(1 << 16) if method != "HEAD" else b""
                if resp.status >= 500 and attempt < self.retries:
                    last = BackendError(f"{self.kind}: {method} {self.key(digest)}: HTTP "
                                        f"{resp.status}")
                    time.sleep(0.2 * 2 ** attempt)
                    continue
                return resp.status, body
            except (OSError, http.client.HTTPException) as e:
                last = e
                if attempt < self.retries:
                    time.sleep(0.2 * 2 ** attempt)
                    continue
            finally:
                conn.close()
        raise BackendError(f"{self.kind}: {method} {self.key(digest)} failed: {last}")

    def has(self, digest: str) -> bool:
        status, _body = self._request("HEAD", digest, {})
        if status == 200:
            return True
        if status == 404:
            return False
        raise BackendError(f"{self.kind}: HEAD {self.key(digest)}: HTTP {status}")

    def push_file(self, digest: str, path: str, force: bool = False) -> bool:
        size = os.path.getsize(path)
        if size > MAX_SINGLE_PUT:
            raise BackendError(f"{self.kind}: blob {digest} is larger than 5 GiB")
        if not force and self.has(digest):
            return False
        headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        status, body = self._request("PUT", digest, headers, path)
        if status not in (200, 201, 204):
            detail = body[:300].decode("utf-8", "replace").strip()
            raise BackendError(f"{self.kind}: PUT {self.key(digest)}: HTTP {status} {detail}")
        return True

    def describe(self) -> str:
        return f"{self.kind} {self.cfg.bucket_name}/{self.cfg.object_prefix}"


def make_store(target: Remote, backend: BackendConfig | None) -> BlobStore:
    if backend is None:
        return RegistryStore(target)
    c = backend.config
    if isinstance(c, LocalFsConfig):
        return LocalFsStore(c)
    if isinstance(c, OssConfig):  # S3Config is an OssConfig
        return ObjectStore(backend.type, c)
    raise ConfigError(f"--backend-type {backend.type}: cannot push blobs there")
