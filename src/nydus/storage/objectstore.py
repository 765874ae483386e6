"""``s3`` and ``oss`` backends: blobs as objects ``<object_prefix><blob_id>`` in a bucket.

Addressing follows upstream: S3 uses path style, ``<scheme>://<endpoint>/<bucket>/<key>``
(``endpoint`` defaults to ``s3.amazonaws.com``), signed with AWS Signature Version 4 over the
host, range, ``x-amz-date`` and ``x-amz-content-sha256`` headers (empty payload hash, as
upstream). OSS uses virtual-host style, ``<scheme>://<bucket>.<endpoint>/<key>``, signed with
the OSS header signature (HMAC-SHA1 over verb, empty MD5 and type, ``Date`` and
``/<bucket>/<key>``). Without an access key id requests are sent unsigned (public buckets).
Both are written from the public specifications with the standard library; signatures are
computed per attempt, so retries carry fresh dates.

Thread-safe.
"""

from __future__ import annotations

import base64
import datetime as _dt
import email.utils
import hashlib
import hmac
import os
import urllib.parse
from collections.abc import Iterator, Mapping

from ..config import OssConfig, S3Config
from ..http import HttpClient, HttpConfig
from ..http.client import HeadersFn
from .backend import BlobBackend

__all__ = ["S3Backend", "OssBackend", "sigv4_headers", "oss_authorization", "make_object_backend"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"  # the payload hash of a streamed upload
S3_DEFAULT_ENDPOINT = "s3.amazonaws.com"


def _split_endpoint(endpoint: str, scheme: str) -> tuple[str, str]:
    """Upstream configs sometimes put the scheme into ``endpoint``; honour it."""
    if "://" in endpoint:
        s, rest = endpoint.split("://", 1)
        return s, rest.rstrip("/")
    return scheme or "https", endpoint.rstrip("/")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(
    method: str,
    url: str,
    headers: Mapping[str, str],
    *,
    access_key_id: str,
    secret: str,
    region: str,
    service: str = "s3",
    now: _dt.datetime | None = None,
    payload_hash: str = EMPTY_SHA256,
) -> dict[str, str]:
    """``headers`` plus ``x-amz-date``, ``x-amz-content-sha256`` and ``Authorization``."""
    now = now or _dt.datetime.now(_dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = now.strftime("%Y%m%d")
    u = urllib.parse.urlsplit(url)
    host = u.netloc
    out = {**headers, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    canon = {"host": host}
    for k, v in out.items():
        lk = k.lower()
        if lk in ("authorization", "user-agent", "content-length"):
            continue
        canon[lk] = " ".join(v.strip().split())
    signed = ";".join(sorted(canon))
    canon_headers = "".join(f"{k}:{canon[k]}\n" for k in sorted(canon))
    path = urllib.parse.quote(urllib.parse.unquote(u.path or "/"), safe="/-_.~")
    query = "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
        for k, v in sorted(urllib.parse.parse_qsl(u.query, keep_blank_values=True))
    )
    creq = "\n".join([method, path, query, canon_headers, signed, payload_hash])
    scope = f"{day}/{region}/{service}/aws4_request"
    sts = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()]
    )
    key = _hmac(
        _hmac(_hmac(_hmac(("AWS4" + secret).encode(), day), region), service), "aws4_request"
    )
    sig = hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={sig}"
    )
    return out


def oss_authorization(
    method: str,
    resource: str,
    date: str,
    *,
    access_key_id: str,
    secret: str,
    oss_headers: Mapping[str, str] | None = None,
) -> str:
    """The OSS ``Authorization`` header value; ``oss_headers`` are the request's headers
    (``Content-MD5``, ``Content-Type`` and the ``x-oss-`` ones are signed)."""
    lower = {k.lower(): v for k, v in (oss_headers or {}).items()}
    parts = [method, lower.get("content-md5", ""), lower.get("content-type", ""), date]
    canon = sorted(
        (k.lower(), v.strip())
        for k, v in (oss_headers or {}).items()
        if k.lower().startswith("x-oss-")
    )
    parts.extend(f"{k}:{v}" for k, v in canon)
    parts.append(resource)
    mac = hmac.new(secret.encode(), "\n".join(parts).encode(), hashlib.sha1).digest()
    return f"OSS {access_key_id}:{base64.b64encode(mac).decode()}"


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            yield piece


class _ObjectBackend(BlobBackend):
    max_parallel = 8
    #: The endpoint when the config names none.
    default_endpoint = ""

    def __init__(
        self, cfg: OssConfig, id: str = "", resolve: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(id)
        self.cfg = cfg
        self.scheme, self.endpoint = _split_endpoint(
            cfg.endpoint or self.default_endpoint, cfg.scheme
        )
        self.http = HttpClient(HttpConfig.of(cfg, resolve), name=self.type)

    def key(self, blob_id: str) -> str:
        return f"{self.cfg.object_prefix}{blob_id}"

    def url(self, blob_id: str) -> str:
        raise NotImplementedError

    def sign(self, method: str, url: str, headers: Mapping[str, str]) -> dict[str, str]:
        """``headers`` and the signature's (called only with an access key id)."""
        raise NotImplementedError

    def _signer(self, extra: Mapping[str, str] | None = None) -> HeadersFn:
        def headers(method: str, url: str) -> Mapping[str, str]:
            plain = dict(extra or {})
            return self.sign(method, url, plain) if self.cfg.access_key_id else plain

        return headers

    def has_blob(self, blob_id: str) -> bool:
        """True if the object exists (HEAD; 404 is False)."""
        return self.http.call(
            "HEAD",
            self.url(blob_id),
            lambda r: r.status == 200,
            headers=self._signer(),
            ok=(200, 404),
            what=f"HEAD {self.key(blob_id)}",
        )

    def put_file(self, blob_id: str, path: str) -> None:
        """Upload the file as the object, in one streamed PUT (retried from the start)."""
        extra = {
            "Content-Length": str(os.path.getsize(path)),
            "Content-Type": "application/octet-stream",
        }
        self.http.call(
            "PUT",
            self.url(blob_id),
            lambda r: None,
            headers=self._signer(extra),
            body=lambda: _file_chunks(path),
            ok=(200, 201, 204),
            what=f"PUT {self.key(blob_id)}",
        )

    def _blob_size(self, blob_id: str) -> int:
        return self.http.head_size(
            self.url(blob_id), headers=self._signer(), what=f"size of {self.key(blob_id)}"
        )

    def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        return self.http.get_range(
            self.url(blob_id),
            offset,
            offset + size,
            headers=self._signer(),
            what=f"read {self.key(blob_id)}",
        )

    def close(self) -> None:
        super().close()
        self.http.close()


class S3Backend(_ObjectBackend):
    type = "s3"
    default_endpoint = S3_DEFAULT_ENDPOINT

    def __init__(
        self, cfg: S3Config, id: str = "", resolve: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(cfg, id, resolve)
        self.region = cfg.region

    def url(self, blob_id: str) -> str:
        path = urllib.parse.quote(f"/{self.cfg.bucket_name}/{self.key(blob_id)}", safe="/-_.~")
        return f"{self.scheme}://{self.endpoint}{path}"

    def sign(self, method: str, url: str, headers: Mapping[str, str]) -> dict[str, str]:
        return sigv4_headers(
            method,
            url,
            headers,
            access_key_id=self.cfg.access_key_id,
            secret=self.cfg.access_key_secret,
            region=self.region,
            payload_hash=UNSIGNED_PAYLOAD if method == "PUT" else EMPTY_SHA256,
        )


class OssBackend(_ObjectBackend):
    type = "oss"

    def url(self, blob_id: str) -> str:
        key = urllib.parse.quote(self.key(blob_id), safe="/-_.~:")
        return f"{self.scheme}://{self.cfg.bucket_name}.{self.endpoint}/{key}"

    def sign(self, method: str, url: str, headers: Mapping[str, str]) -> dict[str, str]:
        date = email.utils.formatdate(usegmt=True)
        resource = f"/{self.cfg.bucket_name}/{self.key_of_url(url)}"
        auth = oss_authorization(
            method,
            resource,
            date,
            access_key_id=self.cfg.access_key_id,
            secret=self.cfg.access_key_secret,
            oss_headers=headers,
        )
        return {**headers, "Date": date, "Authorization": auth}

    @staticmethod
    def key_of_url(url: str) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(url).path.lstrip("/"))


def make_object_backend(
    kind: str, cfg: OssConfig, id: str = "", resolve: Mapping[str, str] | None = None
) -> S3Backend | OssBackend:
    """The ``s3`` or ``oss`` backend for ``cfg`` (an :class:`S3Config` for ``s3``)."""
    if kind == "s3":
        assert isinstance(cfg, S3Config)
        return S3Backend(cfg, id, resolve)
    return OssBackend(cfg, id, resolve)
