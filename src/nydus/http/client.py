"""A retrying HTTP client for the blob backends (``s3``, ``oss``, ``http-proxy``).

Built on a :class:`~nydus.http.transport.Transport` (by default :func:`make_transport`: a
pooled :class:`~nydus.http.transport.HTTPTransport`, behind a
:class:`~nydus.http.proxy.ProxyTransport` when the ``proxy`` setting has a URL). Adds what the
backends need above one exchange:

- Retries (:class:`~nydus.http.retry.RetryPolicy`, ``retry_limit`` extra attempts): transport
  failures (connection errors, resets, timeouts, short or long bodies, wrong ``Content-Range``)
  and 429/5xx answers, with backoff or ``Retry-After``. Other statuses raise :class:`HttpError`
  at once.
- Redirects (301/302/303/307/308) up to 5 hops; more is a loop and an error. ``headers`` may be
  a function of (method, url), called for every hop and attempt (request signing).
- Ranges (:func:`~nydus.http.ranges.read_range`): exact bytes or an error.

Thread-safe: the transport's pool hands each connection to one thread at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import urljoin

from ..config import ConnectionConfig, ProxyConfig
from ..credentials import redact_url
from ..errors import BackendError
from .proxy import ProxyTransport
from .ranges import range_header, read_range
from .retry import RetryPolicy, effective_retries, parse_retry_after
from .transport import HTTPTransport, Request, Response, Transport, TransportError

__all__ = ["HttpClient", "HttpConfig", "HttpError", "TransportSettings", "make_transport"]

T = TypeVar("T")
HeadersFn = Callable[[str, str], Mapping[str, str]]
Body = bytes | Callable[[], Iterable[bytes]] | None

_RETRY_STATUS = frozenset({429, 500, 502, 503, 504, 507, 509})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class HttpError(BackendError):
    """A request answered with an unexpected status (``status``)."""

    def __init__(self, msg: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.retry_after = retry_after


@dataclass
class HttpConfig:
    """The connection settings every network backend config has (upstream's key names)."""

    timeout: float = 5.0
    connect_timeout: float = 5.0
    skip_verify: bool = False
    ca_cert_files: list[str] = field(default_factory=list)
    retry_limit: int = 0
    proxy: ProxyConfig | None = None
    user_agent: str = "nydus-py"
    resolve: dict[str, str] = field(default_factory=dict)  # host -> address (a test seam)

    @classmethod
    def of(cls, cfg: ConnectionConfig, resolve: Mapping[str, str] | None = None) -> HttpConfig:
        """The settings of a backend config's connection keys (0 retries: the default)."""
        return cls(
            timeout=cfg.timeout,
            connect_timeout=cfg.connect_timeout,
            skip_verify=cfg.skip_verify,
            ca_cert_files=list(cfg.ca_cert_files),
            retry_limit=effective_retries(cfg.retry_limit),
            proxy=cfg.proxy if cfg.proxy.url else None,
            resolve=dict(resolve or {}),
        )


class TransportSettings(Protocol):
    """The connection settings a transport is made of (:class:`HttpConfig` and the registry's
    options have them)."""

    @property
    def skip_verify(self) -> bool: ...
    @property
    def ca_cert_files(self) -> Sequence[str]: ...
    @property
    def timeout(self) -> float: ...
    @property
    def connect_timeout(self) -> float: ...


def make_transport(
    settings: TransportSettings,
    proxy: ProxyConfig | None = None,
    *,
    unix_socket: str | None = None,
    resolve: Mapping[str, str] | None = None,
) -> Transport:
    """The transport for one client with ``settings``: direct, or through ``proxy`` with
    fallback."""

    def make(proxy_url: str | None = None, use_http: bool = False) -> HTTPTransport:
        return HTTPTransport(
            skip_verify=settings.skip_verify,
            ca_cert_files=settings.ca_cert_files,
            timeout=float(settings.timeout),
            connect_timeout=float(settings.connect_timeout),
            proxy=proxy_url,
            proxy_use_http=use_http,
            unix_socket=unix_socket,
            resolve=resolve,
        )

    if proxy is None or not proxy.url or unix_socket is not None:
        return make()
    return ProxyTransport(
        make(proxy.url, proxy.use_http),
        make(),
        fallback=proxy.fallback,
        ping_url=proxy.ping_url or None,
        check_interval=float(proxy.check_interval),
    )


class HttpClient:
    """Pooled, retrying HTTP client. ``unix_socket`` sends every request over that socket."""

    def __init__(
        self,
        cfg: HttpConfig,
        *,
        unix_socket: str | None = None,
        name: str = "http",
        transport: Transport | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = name
        self.unix_socket = unix_socket
        self.retry = RetryPolicy(limit=cfg.retry_limit, statuses=_RETRY_STATUS)
        self.transport = transport or make_transport(
            cfg, cfg.proxy, unix_socket=unix_socket, resolve=cfg.resolve
        )
        self.proxy = self.transport if isinstance(self.transport, ProxyTransport) else None

    def close(self) -> None:
        self.transport.close()

    def call(
        self,
        method: str,
        url: str,
        handle: Callable[[Response], T],
        *,
        headers: HeadersFn | Mapping[str, str] | None = None,
        body: Body = None,
        ok: tuple[int, ...] = (200,),
        what: str = "",
    ) -> T:
        """Send ``method url`` with retries and redirects and return ``handle(response)``; an
        answer outside ``ok`` raises :class:`HttpError`. A streamed ``body`` is a function
        that returns a fresh iterable of chunks for every attempt."""
        attempts = self.retry.attempts()
        while True:
            retry_after = None
            try:
                with self._follow(method, url, headers, body) as resp:
                    if resp.status in ok:
                        return handle(resp)
                    err = self._status_error(method, resp, what)
                if err.status not in self.retry.statuses or not attempts.take():
                    raise err
                retry_after = err.retry_after
                why = str(err)
            except TransportError as e:
                if not e.retryable or not attempts.take():
                    raise TransportError(f"{self.name}: {e}", retryable=e.retryable) from e
                why = str(e)
            attempts.wait(retry_after, f"{method} {redact_url(url)}: {why}")

    def _status_error(self, method: str, resp: Response, what: str) -> HttpError:
        try:
            detail = resp.read(4096)[:200].decode("utf-8", "replace").strip()
        except TransportError:
            detail = ""
        ra = None
        if resp.status in (429, 503):
            ra = parse_retry_after(resp.headers.get("retry-after"))
        label = f"{self.name}: {what or method + ' ' + resp.url}"
        return HttpError(
            f"{label}: HTTP {resp.status}" + (f": {detail}" if detail else ""), resp.status, ra
        )

    def _follow(
        self, method: str, url: str, headers: HeadersFn | Mapping[str, str] | None, body: Body
    ) -> Response:
        seen: list[str] = []
        cur = url
        for _ in range(_MAX_REDIRECTS + 1):
            hdrs = dict(headers(method, cur) if callable(headers) else headers or {})
            hdrs.setdefault("User-Agent", self.cfg.user_agent)
            data = body() if callable(body) else body
            resp = self.transport.handle(Request(method, cur, hdrs, data))
            loc = resp.headers.get("location")
            if resp.status not in _REDIRECT_STATUS or self.unix_socket or not loc:
                return resp
            resp.close()
            seen.append(cur)
            cur = urljoin(cur, loc)
            if cur in seen:
                raise BackendError(f"{self.name}: redirect loop at {cur}")
        raise BackendError(f"{self.name}: more than {_MAX_REDIRECTS} redirects from {url}")

    def get_range(
        self,
        url: str,
        start: int,
        end: int,
        *,
        headers: HeadersFn | Mapping[str, str] | None = None,
        what: str = "",
    ) -> bytes:
        """Bytes ``[start, end)`` of the resource, exactly, or an error."""
        if end <= start:
            return b""

        def hdrs(method: str, u: str) -> Mapping[str, str]:
            base = headers(method, u) if callable(headers) else dict(headers or {})
            return {**base, **range_header(start, end)}

        return self.call(
            "GET",
            url,
            lambda r: read_range(r, start, end, what or url, bare_200=True)[0],
            headers=hdrs,
            ok=(200, 206),
            what=what,
        )

    def head_size(
        self, url: str, *, headers: HeadersFn | Mapping[str, str] | None = None, what: str = ""
    ) -> int:
        def size(resp: Response) -> int:
            if resp.content_length is None:
                raise BackendError(f"{self.name}: {what or url}: no valid Content-Length in HEAD")
            return resp.content_length

        return self.call("HEAD", url, size, headers=headers, ok=(200, 204), what=what)
