"""``registry`` backend: blobs are OCI registry blobs ``/v2/<repo>/blobs/sha256:<blob_id>``.

Built on :class:`nydus.registry.RegistryClient`, which owns auth (Basic, bearer tokens,
``~/.docker/config.json``), TLS, redirects (cached per blob), ``Range`` checking, retries and
the ``proxy`` setting (Dragonfly dfdaemon, fallback, ping). This module maps upstream's config
keys onto it (nydus-reference.md §1.2):

``scheme`` (empty = auto-detect), ``host``, ``repo``, ``auth`` (base64 ``user:pass``; the
``IMAGE_PULL_AUTH`` override is applied by :mod:`nydus.config`), ``registry_token``,
``skip_verify``, ``ca_cert_files``, ``timeout``, ``connect_timeout``, ``retry_limit``,
``proxy{url, ping_url, fallback, check_interval, use_http}``, and ``blob_redirected_host`` /
``blob_url_scheme`` (blob requests go to that host/scheme, with the same credentials).

``retry_limit``: upstream's default 0 means "no retries"; here 0 means
:data:`~nydus.http.DEFAULT_RETRIES`, as for every network backend
(:func:`~nydus.http.effective_retries`). A positive value is used as is.

Thread-safe (the client is).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..config import RegistryConfig
from ..http import effective_retries
from ..registry import RegistryClient, RegistryOptions
from .backend import BlobBackend

__all__ = ["RegistryBackend", "registry_options"]


def registry_options(cfg: RegistryConfig) -> RegistryOptions:
    """:class:`RegistryOptions` for a ``registry`` backend config."""
    return RegistryOptions(
        scheme=cfg.scheme,
        auth=cfg.auth or None,
        registry_token=cfg.registry_token or None,
        skip_verify=cfg.skip_verify,
        ca_cert_files=tuple(cfg.ca_cert_files),
        timeout=float(cfg.timeout),
        connect_timeout=float(cfg.connect_timeout),
        retry_limit=effective_retries(cfg.retry_limit),
        proxy=cfg.proxy if cfg.proxy.url else None,
    )


class RegistryBackend(BlobBackend):
    type = "registry"

    def __init__(self, cfg: RegistryConfig, id: str = "", **client_overrides: Any) -> None:
        super().__init__(id)
        self.repo = cfg.repo
        self._overrides = client_overrides
        self._retired: list[RegistryClient] = []
        self._make_clients(cfg)

    def _make_clients(self, cfg: RegistryConfig) -> None:
        self.cfg = cfg
        opts = dataclasses.replace(registry_options(cfg), **self._overrides)
        client = RegistryClient(cfg.host, opts)
        blob_client = client
        if cfg.blob_redirected_host or cfg.blob_url_scheme:
            bopts = dataclasses.replace(opts, scheme=cfg.blob_url_scheme or opts.scheme)
            blob_client = RegistryClient(cfg.blob_redirected_host or cfg.host, bopts)
        self.client, self.blob_client = client, blob_client

    def update_auth(self, auth: str) -> None:
        """Hot-reload credentials (nydusd's ``PUT /api/v1/config`` ``registry_auth``).

        New clients take over; requests already running finish on the old ones, which are
        closed with the backend."""
        self._retired += [self.client, self.blob_client]
        self._make_clients(dataclasses.replace(self.cfg, auth=auth or None))

    @staticmethod
    def digest(blob_id: str) -> str:
        return blob_id if ":" in blob_id else f"sha256:{blob_id}"

    def _blob_size(self, blob_id: str) -> int:
        return self.blob_client.blob_size(self.repo, self.digest(blob_id))

    def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        return self.blob_client.get_blob_range(
            self.repo, self.digest(blob_id), offset, offset + size
        )

    def _read_ranges(self, blob_id: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return self.blob_client.get_blob_ranges(
            self.repo, self.digest(blob_id), [(off, off + size) for off, size in ranges]
        )

    def close(self) -> None:
        super().close()
        for c in {id(c): c for c in (self.client, self.blob_client, *self._retired)}.values():
            c.close()
