"""``http-proxy`` backend: blobs served by a plain HTTP server (``HEAD`` for the size, ``GET``
with ``Range`` for data), over TCP (``addr`` is an ``http(s)://`` URL) or a unix socket
(``addr`` is an absolute socket path).

The blob URL is ``<addr><path>/<blob_id>`` (``path`` defaults to ``/``). Upstream ignores
``path`` *and* the blob id over a unix socket (every request goes to ``/``), which serves only
single-blob images; here the blob id is always in the URL, so one socket can serve many blobs.
Thread-safe.
"""

from __future__ import annotations

import posixpath
import urllib.parse

from ..config import HttpProxyConfig
from ..http import HttpClient, HttpConfig
from .backend import BlobBackend

__all__ = ["HttpProxyBackend"]


class HttpProxyBackend(BlobBackend):
    type = "http-proxy"
    max_parallel = 8

    def __init__(self, cfg: HttpProxyConfig, id: str = "") -> None:
        super().__init__(id)
        self.cfg = cfg
        unix = cfg.addr if cfg.addr.startswith("/") else None
        self.http = HttpClient(HttpConfig.of(cfg), unix_socket=unix, name="http-proxy")
        self.base = "http://localhost" if unix else cfg.addr.rstrip("/")

    def url(self, blob_id: str) -> str:
        path = posixpath.join("/" + self.cfg.path.strip("/"), blob_id)
        return self.base + urllib.parse.quote(path, safe="/-_.~:")

    def _blob_size(self, blob_id: str) -> int:
        return self.http.head_size(self.url(blob_id), what=f"size of blob {blob_id}")

    def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        return self.http.get_range(
            self.url(blob_id), offset, offset + size, what=f"read blob {blob_id}"
        )

    def close(self) -> None:
        super().close()
        self.http.close()
