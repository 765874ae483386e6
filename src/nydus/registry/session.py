"""The request engine under :class:`~nydus.registry.client.RegistryClient`.

Owns the policy above one HTTP exchange (the transport, :mod:`nydus.http`): the scheme
(fixed, auto-detected, or HTTPS falling back to HTTP with ``skip_verify``), which
``Authorization`` to send (``auth.py``), following and caching redirects, and retrying:

- Auth: the first request to a host goes anonymous (or with ``registry_token``); a 401 teaches
  the host's challenge, and the request is repeated with Basic credentials or a bearer token
  for the operation's scopes (``repository:<repo>:pull`` or ``pull,push``). Later requests get
  the header up front; an expired token (401) is fetched again once.
- Redirects (30x on GET/HEAD, for example to object storage) are followed up to 10 hops;
  ``Authorization`` goes only to the registry's own scheme+host+port; loops are errors. The
  final URL of a blob GET is cached per (repo, digest) for ``redirect_cache_ttl`` seconds and
  forgotten when it fails.
- Retries: GET/HEAD/PUT (and DELETE) are retried up to ``retry_limit`` times on connection
  failures, timeouts, bad body framing (shorter/longer than ``Content-Length``) and on
  408/500/502/503/504, with exponential backoff and jitter; 429 and 503 honour
  ``Retry-After`` (capped at ``max_retry_after``). POST/PATCH are not repeated.

Threading: shared by many threads; the transport pool, token cache, redirect cache and scheme
are locked.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from nydus.config import ProxyConfig
from nydus.errors import BackendError, ConfigError, NydusError, RegistryAuthError, RegistryNotFound
from nydus.http import (
    Attempts,
    Request,
    Response,
    RetryPolicy,
    TLSError,
    Transport,
    TransportError,
    make_transport,
    parse_retry_after,
)
from nydus.registry.auth import DEFAULT_DOCKER_CONFIG, Authenticator, Credentials
from nydus.registry.auth import docker_config_credentials as _docker_creds
from nydus.registry.reference import registry_api_host

from ..credentials import redact_url
from ..format.safejson import parse_json

__all__ = ["RegistrySession", "RegistryOptions", "RegistryHTTPError", "ClientStats"]

log = logging.getLogger("nydus.registry")

T = TypeVar("T")
Scopes = tuple[str, ...]

MAX_MANIFEST_SIZE = 8 << 20
MAX_REDIRECTS = 10
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")


class RegistryHTTPError(BackendError):
    """The registry answered with an unexpected status (``status``, registry error ``code``)."""

    def __init__(self, message: str, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class RegistryOptions:
    """How a :class:`RegistrySession` talks to its registry (one place for every knob).

    ``scheme=''`` auto-detects (HTTPS first, then plain HTTP). With ``skip_verify``, a server
    that speaks plain HTTP on an ``https`` host is used over HTTP, as upstream does. ``auth`` is
    base64 ``user:password``; ``registry_token`` is a bearer token sent as is. Without either,
    ``docker_config`` (a path; None to disable) is consulted lazily. ``transport`` replaces the
    HTTP stack (for tests); ``proxy`` (a :class:`~nydus.config.ProxyConfig` or its URL) routes
    through a forward proxy with fallback.
    """

    scheme: str = "https"
    auth: str | None = None
    registry_token: str | None = None
    skip_verify: bool = False
    ca_cert_files: Sequence[str] = ()
    timeout: float = 5.0
    connect_timeout: float = 5.0
    retry_limit: int = 3
    retry_backoff: float = 0.2
    max_backoff: float = 5.0
    max_retry_after: float = 30.0
    proxy: ProxyConfig | str | None = None
    docker_config: str | os.PathLike[str] | None = DEFAULT_DOCKER_CONFIG
    transport: Transport | None = None
    redirect_cache_ttl: float = 60.0
    max_workers: int = 8
    chunk_size: int = 8 << 20
    monolithic_max: int = 16 << 20
    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)

    def __post_init__(self) -> None:
        if self.scheme not in ("https", "http", ""):
            raise ConfigError(f"registry scheme must be https, http or empty, not {self.scheme!r}")
        if self.retry_limit < 0 or self.chunk_size <= 0 or self.max_workers <= 0:
            raise ConfigError("retry_limit, chunk_size and max_workers must be positive")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            limit=self.retry_limit,
            statuses=_RETRY_STATUSES,
            backoff=self.retry_backoff,
            max_backoff=self.max_backoff,
            max_retry_after=self.max_retry_after,
            sleep=self.sleep,
        )

    def make_transport(self) -> Transport:
        if self.transport is not None:
            return self.transport
        proxy = ProxyConfig(self.proxy) if isinstance(self.proxy, str) else self.proxy
        return make_transport(self, proxy)


class ClientStats:
    """Counters kept by a client (thread-safe): requests, retries, redirects, blob bytes."""

    FIELDS = (
        "requests",
        "retries",
        "auth_retries",
        "redirects",
        "redirect_cache_hits",
        "range_ignored",
        "blob_bytes",
        "uploaded_bytes",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c = dict.fromkeys(self.FIELDS, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._c[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def __getattr__(self, name: str) -> int:
        if name in ClientStats.FIELDS:
            with self._lock:
                return self._c[name]
        raise AttributeError(name)


def _error_detail(resp: Response) -> tuple[str, str]:
    """(" (CODE: message)", CODE) from a registry error body, read best-effort."""
    try:
        raw = resp.read(8192)
    except TransportError:
        return "", ""
    try:
        doc = parse_json(raw, "registry error body")
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs and isinstance(errs[0], dict):
            code = " ".join(str(errs[0].get("code", "")).split())[:100]
            msg = " ".join(str(errs[0].get("message", "")).split())[:200]
            return f" ({code}: {msg})", code
    except NydusError:
        pass
    text = raw.decode("utf-8", "replace").strip()
    return (f" ({text[:200]})" if text else ""), ""


class RegistrySession:
    """Configuration and request engine for one registry host (see the module docstring).

    ``host`` is ``host[:port]`` (``docker.io`` means ``registry-1.docker.io``); a
    ``http://``/``https://`` prefix on it overrides the scheme. ``options`` (or keyword
    overrides of its fields) say how to talk to it: :class:`RegistryOptions`.
    """

    def __init__(
        self, host: str, options: RegistryOptions | None = None, /, **overrides: Any
    ) -> None:
        if "://" in host:
            parts = urlsplit(host)
            overrides["scheme"], host = parts.scheme, parts.netloc
        opts = dataclasses.replace(options or RegistryOptions(), **overrides)
        host = host.strip().rstrip("/")
        if not host or "/" in host:
            raise ConfigError(f"registry host must be host[:port], not {host!r}")
        self.options = opts
        self.host = registry_api_host(host)
        self._scheme: str | None = opts.scheme or None
        self._skip_verify = opts.skip_verify
        self._scheme_lock = threading.Lock()
        self._retry = opts.retry_policy()
        self._redirect_ttl = opts.redirect_cache_ttl
        self._max_workers = opts.max_workers
        self.chunk_size = opts.chunk_size
        self.monolithic_max = opts.monolithic_max
        self._clock = opts.clock
        self.stats = ClientStats()
        self._transport = opts.make_transport()
        creds: Credentials | None = None
        if opts.auth:
            creds = Credentials.from_auth(opts.auth)
        if opts.registry_token:
            base = creds or Credentials()
            creds = Credentials(
                base.username, base.password, base.identity_token, opts.registry_token
            )
        cfg = opts.docker_config

        def load() -> Credentials | None:
            return _docker_creds(self.host, cfg) if cfg is not None else None

        self._auth = Authenticator(
            self._send_plain, credentials=creds, load_credentials=load, clock=opts.clock
        )
        self._redirects: dict[tuple[str, str], tuple[str, float]] = {}
        self._redirect_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> RegistrySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- URLs and scheme ------------------------------------------------------------------

    @property
    def scheme(self) -> str:
        """The scheme in use (resolving auto-detection on first use)."""
        with self._scheme_lock:
            if self._scheme is None:
                self._scheme = self._detect_scheme()
            return self._scheme

    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def _detect_scheme(self) -> str:
        errors = []
        for candidate in ("https", "http"):
            try:
                with self._transport.handle(Request("GET", f"{candidate}://{self.host}/v2/")):
                    pass
                log.info("registry %s: using %s", self.host, candidate)
                return candidate
            except TransportError as e:
                errors.append(f"{candidate}: {e}")
        raise TransportError(
            f"registry {self.host} answers neither HTTPS nor HTTP: " + "; ".join(errors)
        )

    def _fallback_to_http(self) -> bool:
        with self._scheme_lock:
            if self._scheme == "https" and self._skip_verify:
                log.warning("registry %s speaks plain HTTP; using http (skip_verify)", self.host)
                self._scheme = "http"
                return True
        return False

    def _is_registry_url(self, url: str) -> bool:
        p = urlsplit(url)
        return p.netloc.lower() == self.host.lower() and p.scheme == self.scheme

    def _url(self, path: str) -> str:
        return path if "://" in path else self.base_url() + path

    @staticmethod
    def _repo_path(repo: str, kind: str, ref: str = "") -> str:
        if not repo or repo.startswith("/") or ".." in repo.split("/"):
            raise ConfigError(f"bad repository name {repo!r}")
        tail = f"/{quote(ref, safe=':@')}" if ref else "/"
        return f"/v2/{repo}/{kind}{tail}"

    @staticmethod
    def pull_scope(repo: str) -> Scopes:
        return (f"repository:{repo}:pull",)

    @staticmethod
    def push_scope(repo: str) -> Scopes:
        return (f"repository:{repo}:pull,push",)

    # --- the request engine ---------------------------------------------------------------

    def _send_plain(self, request: Request) -> Response:
        """One request with transient-failure retries and no auth (token server calls)."""
        budget = self._budget()
        while True:
            try:
                resp = self._transport.handle(request)
            except TransportError as e:
                if e.retryable and budget.take():
                    self._wait(budget, None, str(e))
                    continue
                raise
            if resp.status in _RETRY_STATUSES and budget.take():
                ra = parse_retry_after(resp.headers.get("retry-after"))
                resp.close()
                self._wait(budget, ra, f"HTTP {resp.status} from {request.url}")
                continue
            return resp

    def _budget(self) -> Attempts:
        return self._retry.attempts()

    def _wait(self, budget: Attempts, retry_after: float | None, why: str) -> None:
        self.stats.add("retries")
        budget.wait(retry_after, why)

    def _redirect_get(self, key: tuple[str, str]) -> str | None:
        with self._redirect_lock:
            hit = self._redirects.get(key)
            if hit is None:
                return None
            if self._clock() >= hit[1]:
                del self._redirects[key]
                return None
            return hit[0]

    def _redirect_put(self, key: tuple[str, str], url: str | None) -> None:
        with self._redirect_lock:
            if url is None:
                self._redirects.pop(key, None)
            elif self._redirect_ttl > 0:
                self._redirects[key] = (url, self._clock() + self._redirect_ttl)

    def _send_following(
        self,
        method: str,
        url: str,
        scopes: Scopes,
        headers: dict[str, str],
        body: bytes | bytearray | None,
        redirect_key: tuple[str, str] | None,
    ) -> tuple[Response, str | None]:
        """Send, following redirects for GET/HEAD; returns (response, Authorization sent)."""
        cache_key = redirect_key if method == "GET" else None
        if cache_key is not None:
            cached = self._redirect_get(cache_key)
            if cached is not None:
                self.stats.add("redirect_cache_hits")
                try:
                    resp = self._transport.handle(Request(method, cached, dict(headers), body))
                except TransportError as e:
                    log.info(
                        "cached redirect for %s failed (%s); asking the registry",
                        redact_url(url),
                        e,
                    )
                    self._redirect_put(cache_key, None)
                else:
                    if resp.status < 300:
                        return resp, None
                    resp.close()
                    self._redirect_put(cache_key, None)
        cur = url
        seen: list[str] = []
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            sent = None
            if self._is_registry_url(cur):
                sent = self._auth.authorization(self.host, scopes)
                if sent:
                    h["Authorization"] = sent
            self.stats.add("requests")
            resp = self._transport.handle(Request(method, cur, h, body))
            if resp.status not in _REDIRECT_STATUSES or method not in ("GET", "HEAD"):
                if cache_key is not None and cur != url and resp.status in (200, 206):
                    self._redirect_put(cache_key, cur)
                return resp, sent
            loc = resp.headers.get("location")
            resp.close()
            if not loc:
                raise RegistryHTTPError(
                    f"{method} {cur}: HTTP {resp.status} redirect without Location", resp.status
                )
            nxt = urljoin(cur, loc)
            seen.append(cur)
            self.stats.add("redirects")
            if nxt in seen:
                chain = " -> ".join([*seen, nxt])
                raise BackendError(f"{method} {url}: redirect loop: {chain}")
            cur = nxt
        raise BackendError(f"{method} {url}: more than {MAX_REDIRECTS} redirects")

    def _open(
        self,
        method: str,
        path: str,
        scopes: Scopes,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | bytearray | None = None,
        redirect_key: tuple[str, str] | None = None,
        budget: Attempts,
    ) -> Response:
        """Send with auth, redirects and status-level retries; returns an open response."""
        idempotent = method in _IDEMPOTENT
        auth_tries = 0
        while True:
            url = self._url(path)
            try:
                resp, sent = self._send_following(
                    method, url, scopes, headers or {}, body, redirect_key
                )
            except TLSError as e:
                if e.plain_http and self._fallback_to_http():
                    continue
                raise
            except TransportError as e:
                self._retry_or_raise(e, budget, retry=idempotent)
                continue
            status = resp.status
            if status == 401 and self._is_registry_url(resp.url or url):
                www = resp.headers.get_all("www-authenticate")
                detail, _ = _error_detail(resp)
                resp.close()
                if auth_tries < 2 and self._auth.handle_unauthorized(self.host, scopes, www, sent):
                    auth_tries += 1
                    self.stats.add("auth_retries")
                    continue
                how = "with the credentials given" if sent else "without credentials"
                raise RegistryAuthError(f"{method} {url}: unauthorized {how}{detail}")
            if status in _RETRY_STATUSES:
                ra = parse_retry_after(resp.headers.get("retry-after"))
                detail, code = _error_detail(resp)
                resp.close()
                if (idempotent or status == 429) and budget.take():
                    self._wait(budget, ra, f"{method} {url}: HTTP {status}{detail}")
                    continue
                raise RegistryHTTPError(
                    f"{method} {url}: HTTP {status}{detail}"
                    + (f" (gave up after {budget.used + 1} attempts)" if budget.used else ""),
                    status,
                    code,
                )
            return resp

    def _retry_or_raise(
        self,
        e: TransportError,
        budget: Attempts,
        *,
        retry: bool = True,
        forget: tuple[str, str] | None = None,
    ) -> None:
        """After ``e``: wait for another attempt when ``retry``, ``e`` and the budget allow one
        (dropping the cached redirect ``forget``); otherwise raise it, saying how many tries."""
        if not (retry and e.retryable and budget.take()):
            if not budget.used:
                raise e
            raise TransportError(
                f"{e} (gave up after {budget.used + 1} attempts)", retryable=e.retryable
            ) from e
        if forget is not None:
            self._redirect_put(forget, None)
        self._wait(budget, None, str(e))

    def _execute(
        self,
        method: str,
        path: str,
        scopes: Scopes,
        handle: Callable[[Response], T],
        *,
        headers: dict[str, str] | None = None,
        body: bytes | bytearray | None = None,
        redirect_key: tuple[str, str] | None = None,
    ) -> T:
        """:meth:`_open`, then ``handle(response)``; body-read failures are retried too."""
        budget = self._budget()
        while True:
            resp = self._open(
                method,
                path,
                scopes,
                headers=headers,
                body=body,
                redirect_key=redirect_key,
                budget=budget,
            )
            try:
                return handle(resp)
            except TransportError as e:
                self._retry_or_raise(e, budget, retry=method in _IDEMPOTENT, forget=redirect_key)
                continue
            finally:
                resp.close()

    def _status_error(self, resp: Response, what: str) -> BackendError:
        detail, code = _error_detail(resp)
        if resp.status == 404:
            return RegistryNotFound(f"{what} not found on {self.host}{detail}")
        if resp.status in (401, 403):
            return RegistryAuthError(
                f"{what}: access denied by {self.host} (HTTP {resp.status}){detail}"
            )
        return RegistryHTTPError(
            f"{what}: unexpected HTTP {resp.status} from {self.host}{detail}", resp.status, code
        )
