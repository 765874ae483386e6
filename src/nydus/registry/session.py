"""The request engine under :class:`~nydus.registry.client.RegistryClient`.

Owns the policy above one HTTP exchange (the transport, see ``transport.py``): the scheme
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

import email.utils
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote, urljoin, urlsplit

from nydus.errors import BackendError, ConfigError, NydusError, RegistryAuthError, RegistryNotFound
from nydus.registry.auth import DEFAULT_DOCKER_CONFIG, Authenticator, Credentials
from nydus.registry.auth import docker_config_credentials as _docker_creds
from nydus.registry.reference import registry_api_host
from nydus.registry.transport import (
    FallbackProxyTransport,
    HTTPTransport,
    Request,
    Response,
    TLSError,
    Transport,
    TransportError,
)

__all__ = ["RegistrySession", "RegistryHTTPError", "ProxySettings", "ClientStats"]

from ..credentials import redact_url
from ..format.safejson import parse_json

log = logging.getLogger("nydus.registry")

T = TypeVar("T")
Scopes = tuple[str, ...]

MAX_MANIFEST_SIZE = 8 << 20
MAX_REDIRECTS = 10
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
_IDEMPOTENT = ("GET", "HEAD", "PUT", "DELETE", "OPTIONS")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class RegistryHTTPError(BackendError):
    """The registry answered with an unexpected status (``status``, registry error ``code``)."""

    def __init__(self, message: str, status: int, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ProxySettings:
    """Upstream's ``proxy`` backend keys: a forward HTTP proxy (e.g. Dragonfly dfdaemon)."""

    url: str
    ping_url: str = ""
    fallback: bool = True
    check_interval: float = 5.0
    use_http: bool = False


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


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CONTENT_RANGE_RE.match(value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)), total


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
    ``http://``/``https://`` prefix on it overrides ``scheme``. ``scheme=''`` auto-detects
    (HTTPS first, then plain HTTP). With ``skip_verify``, a server that speaks plain HTTP
    on an ``https`` host is used over HTTP, as upstream does. ``auth`` is base64
    ``user:password``; ``registry_token`` is a bearer token sent as is. Without either,
    ``docker_config`` (a path, default ``~/.docker/config.json``; None to disable) is consulted
    lazily. ``transport`` replaces the HTTP stack (for tests); ``proxy`` wraps it with a
    forward proxy and fallback.
    """

    def __init__(
        self,
        host: str,
        *,
        scheme: str = "https",
        auth: str | None = None,
        registry_token: str | None = None,
        skip_verify: bool = False,
        ca_cert_files: Sequence[str] = (),
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        retry_limit: int = 3,
        retry_backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_retry_after: float = 30.0,
        proxy: ProxySettings | str | None = None,
        docker_config: str | os.PathLike[str] | None = DEFAULT_DOCKER_CONFIG,
        transport: Transport | None = None,
        redirect_cache_ttl: float = 60.0,
        max_workers: int = 8,
        chunk_size: int = 8 << 20,
        monolithic_max: int = 16 << 20,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if "://" in host:
            parts = urlsplit(host)
            scheme, host = parts.scheme, parts.netloc
        host = host.strip().rstrip("/")
        if not host or "/" in host:
            raise ConfigError(f"registry host must be host[:port], not {host!r}")
        if scheme not in ("https", "http", ""):
            raise ConfigError(f"registry scheme must be https, http or empty, not {scheme!r}")
        if retry_limit < 0 or chunk_size <= 0 or max_workers <= 0:
            raise ConfigError("retry_limit, chunk_size and max_workers must be positive")
        self.host = registry_api_host(host)
        self._scheme: str | None = scheme or None
        self._skip_verify = skip_verify
        self._scheme_lock = threading.Lock()
        self._retry_limit = retry_limit
        self._backoff = retry_backoff
        self._max_backoff = max_backoff
        self._max_retry_after = max_retry_after
        self._redirect_ttl = redirect_cache_ttl
        self._max_workers = max_workers
        self.chunk_size = chunk_size
        self.monolithic_max = monolithic_max
        self._clock = clock
        self._sleep = sleep
        self.stats = ClientStats()
        self._transport = transport or self._make_transport(
            skip_verify, ca_cert_files, timeout, connect_timeout, proxy
        )
        creds: Credentials | None = None
        if auth:
            creds = Credentials.from_auth(auth)
        if registry_token:
            base = creds or Credentials()
            creds = Credentials(base.username, base.password, base.identity_token, registry_token)
        cfg = docker_config

        def load() -> Credentials | None:
            return _docker_creds(self.host, cfg) if cfg is not None else None

        self._auth = Authenticator(
            self._send_plain, credentials=creds, load_credentials=load, clock=clock
        )
        self._redirects: dict[tuple[str, str], tuple[str, float]] = {}
        self._redirect_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @staticmethod
    def _make_transport(
        skip_verify: bool,
        ca_cert_files: Sequence[str],
        timeout: float,
        connect_timeout: float,
        proxy: ProxySettings | str | None,
    ) -> Transport:
        def make(proxy_url: str | None = None, use_http: bool = False) -> HTTPTransport:
            return HTTPTransport(
                skip_verify=skip_verify,
                ca_cert_files=ca_cert_files,
                timeout=timeout,
                connect_timeout=connect_timeout,
                proxy=proxy_url,
                proxy_use_http=use_http,
            )

        if proxy is None or (isinstance(proxy, ProxySettings) and not proxy.url):
            return make()
        ps = ProxySettings(proxy) if isinstance(proxy, str) else proxy
        return FallbackProxyTransport(
            make(ps.url, ps.use_http),
            make(),
            fallback=ps.fallback,
            ping_url=ps.ping_url or None,
            check_interval=ps.check_interval,
        )

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

    @property
    def authenticator(self) -> Authenticator:
        return self._auth

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
        budget = _Budget(self._retry_limit)
        while True:
            try:
                resp = self._transport.handle(request)
            except TransportError as e:
                if e.retryable and budget.take():
                    self._wait(budget.used, None, str(e))
                    continue
                raise
            if resp.status in _RETRY_STATUSES and budget.take():
                ra = _retry_after(resp.headers.get("retry-after"))
                resp.close()
                self._wait(budget.used, ra, f"HTTP {resp.status} from {request.url}")
                continue
            return resp

    def _wait(self, attempt: int, retry_after: float | None, why: str) -> None:
        self.stats.add("retries")
        if retry_after is not None:
            delay = min(retry_after, self._max_retry_after)
        else:
            delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2
        log.info("retry %d in %.2fs: %s", attempt, delay, why)
        if delay > 0:
            self._sleep(delay)

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
        body: bytes | None,
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
                    log.info("cached redirect for %s failed (%s); asking the registry",
                             redact_url(url), e)
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
        body: bytes | None = None,
        redirect_key: tuple[str, str] | None = None,
        budget: _Budget,
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
                if e.retryable and idempotent and budget.take():
                    self._wait(budget.used, None, str(e))
                    continue
                raise self._gave_up(e, budget) from e
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
                ra = _retry_after(resp.headers.get("retry-after"))
                detail, code = _error_detail(resp)
                resp.close()
                if (idempotent or status == 429) and budget.take():
                    self._wait(budget.used, ra, f"{method} {url}: HTTP {status}{detail}")
                    continue
                raise RegistryHTTPError(
                    f"{method} {url}: HTTP {status}{detail}"
                    + (f" (gave up after {budget.used + 1} attempts)" if budget.used else ""),
                    status,
                    code,
                )
            return resp

    def _gave_up(self, e: TransportError, budget: _Budget) -> TransportError:
        if not budget.used:
            return e
        return TransportError(
            f"{e} (gave up after {budget.used + 1} attempts)", retryable=e.retryable
        )

    def _execute(
        self,
        method: str,
        path: str,
        scopes: Scopes,
        handle: Callable[[Response], T],
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        redirect_key: tuple[str, str] | None = None,
    ) -> T:
        """:meth:`_open`, then ``handle(response)``; body-read failures are retried too."""
        budget = _Budget(self._retry_limit)
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
                if e.retryable and method in _IDEMPOTENT and budget.take():
                    if redirect_key is not None:
                        self._redirect_put(redirect_key, None)
                    self._wait(budget.used, None, str(e))
                    continue
                raise self._gave_up(e, budget) from e
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
