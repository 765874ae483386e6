"""A small HTTP/1.1 client for the network backends, on ``http.client``.

What the backends need and ``urllib`` does not give: connection pooling per host, separate
connect and read timeouts, TLS with extra CA files or no verification (``skip_verify``),
HTTP over a unix socket (``http-proxy`` with a socket path), a forward proxy with health
checks and fallback (the Dragonfly hook, :mod:`nydus.storage.proxy`), retries, and strict
``Range`` handling.

Retry policy (``retry_limit`` extra attempts, upstream's key; upstream's default 0 means no
retries, here 0 means :data:`DEFAULT_RETRIES`, because a lazily loaded file system should ride
out one 503 or reset; see :func:`effective_retries`): connection errors, resets,
timeouts, truncated bodies and 5xx answers are retried with exponential backoff (0.1 s,
doubling, at most 5 s, with jitter); 429 waits for ``Retry-After`` (seconds or an HTTP date,
at most 30 s) or the backoff. A request that fails on a *reused* keep-alive connection before
any answer is retried once on a fresh connection without counting, because a server may
close an idle connection at any time. Redirects (301/302/303/307/308) are followed up to 5
hops; more is a loop and an error.

Ranges: a ``206`` must carry a ``Content-Range`` that matches the request; a ``200`` (a server
that ignores ``Range``) is accepted by skipping to the start and reading only what was asked,
then dropping the connection. A body shorter than promised is retried; one longer than the
range is an error. Nothing partial is ever returned.

Thread-safe: the pool hands each connection to one thread at a time.
"""

from __future__ import annotations

import email.utils
import http.client
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..config import ProxyConfig
from ..credentials import redact_url
from ..errors import BackendError

__all__ = ["HttpClient", "HttpError", "HttpResponse", "TransportConfig", "parse_content_range",
           "DEFAULT_RETRIES", "effective_retries"]

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 3


def effective_retries(retry_limit: int) -> int:
    """Retries for a configured ``retry_limit`` (0, the default, means DEFAULT_RETRIES)."""
    return retry_limit if retry_limit > 0 else DEFAULT_RETRIES


_RETRY_STATUS = frozenset({500, 502, 503, 504, 507, 509})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_MAX_IDLE = 16
_BACKOFF0 = 0.1
_BACKOFF_MAX = 5.0
_RETRY_AFTER_MAX = 30.0

_NET_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError, TimeoutError, socket.timeout, ssl.SSLError
    http.client.HTTPException,  # RemoteDisconnected, IncompleteRead, BadStatusLine
)

_PING_ERRORS: tuple[type[BaseException], ...] = (*_NET_ERRORS, BackendError)

HeadersFn = Callable[[str, str], Mapping[str, str]]


class HttpError(BackendError):
    """A request answered with an unexpected status (``status``) or not answered (0)."""

    def __init__(self, msg: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.retry_after = retry_after


@dataclass
class TransportConfig:
    timeout: float = 5.0
    connect_timeout: float = 5.0
    skip_verify: bool = False
    ca_cert_files: list[str] = field(default_factory=list)
    retry_limit: int = 0
    proxy: ProxyConfig | None = None
    user_agent: str = "nydus-py"
    resolve: dict[str, str] = field(default_factory=dict)  # host -> address (a test seam)


@dataclass
class HttpResponse:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` as (start, end_exclusive, total or None)."""
    if not value:
        return None
    try:
        unit, rest = value.strip().split(None, 1)
        if unit.lower() != "bytes":
            return None
        span, total = rest.split("/", 1)
        a, b = span.split("-", 1)
        return int(a), int(b) + 1, None if total.strip() == "*" else int(total)
    except ValueError:
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _HTTPConn(http.client.HTTPConnection):
    def __init__(self, host: str, port: int | None, timeout: float, connect_timeout: float,
                 unix: str | None = None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._connect_timeout = connect_timeout
        self._unix = unix
        self._resolve: Mapping[str, str] = {}
        self.reused = False

    def connect(self) -> None:
        if self._unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self._connect_timeout)
            try:
                s.connect(self._unix)
            except BaseException:
                s.close()
                raise
            self.sock = s
        else:
            addr = self._resolve.get(self.host, self.host)
            self.sock = socket.create_connection((addr, self.port), self._connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if getattr(self, "_tunnel_host", None):
                self._tunnel()  # type: ignore[attr-defined]
        self.sock.settimeout(self.timeout)


class _HTTPSConn(_HTTPConn):
    default_port = 443

    def __init__(self, host: str, port: int | None, timeout: float, connect_timeout: float,
                 context: ssl.SSLContext, server_name: str | None = None) -> None:
        super().__init__(host, port, timeout, connect_timeout)
        self._context = context
        self._server_name = server_name

    def connect(self) -> None:
        super().connect()
        name = getattr(self, "_tunnel_host", None) or self._server_name or self.host
        assert self.sock is not None
        self.sock = self._context.wrap_socket(self.sock, server_hostname=name)


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # path + query

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        netloc = host if self.port == default else f"{host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.path}"


def _target(url: str) -> _Target:
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise BackendError(f"unsupported URL {url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return _Target(u.scheme, u.hostname, port, path)


class HttpClient:
    """Pooled, retrying HTTP client. ``unix_socket`` sends every request over that socket."""

    def __init__(self, cfg: TransportConfig, *, unix_socket: str | None = None,
                 name: str = "http") -> None:
        self.cfg = cfg
        self.name = name
        self.unix_socket = unix_socket
        self._ctx = self._ssl_context(cfg)
        self._idle: dict[tuple[object, ...], list[_HTTPConn]] = {}
        self._lock = threading.Lock()
        self.proxy = None
        if cfg.proxy is not None and cfg.proxy.url:
            from .proxy import ProxyHealth

            self.proxy = ProxyHealth(cfg.proxy, self._ping)

    @staticmethod
    def _ssl_context(cfg: TransportConfig) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        for f in cfg.ca_cert_files:
            try:
                ctx.load_verify_locations(cafile=f)
            except (OSError, ssl.SSLError) as e:
                raise BackendError(f"cannot load CA file {f}: {e}") from e
        if cfg.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # ------------------------------------------------------------------ pool

    def _key(self, t: _Target, via: _Target | None) -> tuple[object, ...]:
        if self.unix_socket:
            return ("unix", self.unix_socket)
        if via is not None:
            return ("proxy", via.scheme, via.host, via.port, t.scheme,
                    t.host if t.scheme == "https" else "", t.port if t.scheme == "https" else 0)
        return (t.scheme, t.host, t.port)

    def _get_conn(self, t: _Target, via: _Target | None) -> _HTTPConn:
        conn = self._get_conn0(t, via)
        conn._resolve = self.cfg.resolve
        return conn

    def _get_conn0(self, t: _Target, via: _Target | None) -> _HTTPConn:
        key = self._key(t, via)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                conn = idle.pop()
                conn.reused = True
                return conn
        timeout, ctimeout = float(self.cfg.timeout), float(self.cfg.connect_timeout)
        if self.unix_socket:
            return _HTTPConn("localhost", None, timeout, ctimeout, unix=self.unix_socket)
        if via is not None:
            if t.scheme == "https":
                # CONNECT tunnel, then TLS with the origin's name
                tls = _HTTPSConn(via.host, via.port, timeout, ctimeout, self._ctx,
                                 server_name=t.host)
                tls.set_tunnel(t.host, t.port)
                return tls
            if via.scheme == "https":
                return _HTTPSConn(via.host, via.port, timeout, ctimeout, self._ctx)
            return _HTTPConn(via.host, via.port, timeout, ctimeout)
        if t.scheme == "https":
            return _HTTPSConn(t.host, t.port, timeout, ctimeout, self._ctx)
        return _HTTPConn(t.host, t.port, timeout, ctimeout)

    def _put_conn(self, t: _Target, via: _Target | None, conn: _HTTPConn) -> None:
        key = self._key(t, via)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < _MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        with self._lock:
            conns = [c for lst in self._idle.values() for c in lst]
            self._idle.clear()
        for c in conns:
            c.close()

    # ------------------------------------------------------------------ one exchange

    def _exchange(
        self, method: str, t: _Target, headers: Mapping[str, str], body: bytes | None,
        via: _Target | None, read_body: Callable[[http.client.HTTPResponse], bytes] | None,
    ) -> HttpResponse:
        """Send one request and read the answer; connection-level errors propagate."""
        free_retry = True
        while True:
            conn = self._get_conn(t, via)
            path = t.url if (via is not None and t.scheme == "http") else t.path
            hdrs = {"User-Agent": self.cfg.user_agent, **headers}
            if self.unix_socket:
                hdrs.setdefault("Host", "localhost")
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
            except _NET_ERRORS:
                conn.close()
                if conn.reused and free_retry:
                    free_retry = False
                    continue  # stale keep-alive connection
                raise
            try:
                if method == "HEAD":
                    data = resp.read()  # empty; marks the response complete for reuse
                elif read_body is not None and 200 <= resp.status < 300:
                    data = read_body(resp)
                else:
                    data = resp.read(1 << 16)  # error bodies: keep a little for the message
                keep = not resp.will_close and resp.isclosed()
            except BaseException:
                conn.close()
                raise
            if keep:
                self._put_conn(t, via, conn)
            else:
                conn.close()
            return HttpResponse(resp.status, resp.headers, data, t.url)

    # ------------------------------------------------------------------ public

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: HeadersFn | Mapping[str, str] | None = None,
        body: bytes | None = None,
        ok: tuple[int, ...] = (200,),
        read_body: Callable[[http.client.HTTPResponse], bytes] | None = None,
        what: str = "",
    ) -> HttpResponse:
        """Send ``method url`` with retries and redirects; an answer outside ``ok`` raises
        :class:`HttpError`. ``headers`` may be a function of (method, url), called for every
        attempt (request signing)."""
        attempts = self.cfg.retry_limit + 1
        delay = _BACKOFF0
        last: BackendError | None = None
        for attempt in range(attempts):
            try:
                resp = self._follow(method, url, headers, body, read_body)
            except HttpError as e:
                last = e
                if attempt + 1 >= attempts or not self._retryable(e):
                    break
                wait = e.retry_after if e.retry_after is not None else delay
                log.info("%s %s: %s; retry %d/%d in %.2fs", method, redact_url(url), e,
                         attempt + 1, attempts - 1, wait)
                time.sleep(min(wait, _RETRY_AFTER_MAX))
                delay = min(delay * 2, _BACKOFF_MAX) * (0.75 + random.random() / 2)
                continue
            if resp.status in ok:
                return resp
            err = self._status_error(method, resp, what)
            last = err
            if attempt + 1 >= attempts or not self._retryable(err):
                break
            wait = err.retry_after if err.retry_after is not None else delay
            log.info("%s %s: HTTP %d; retry %d/%d in %.2fs", method, redact_url(url),
                     resp.status, attempt + 1, attempts - 1, wait)
            time.sleep(min(wait, _RETRY_AFTER_MAX))
            delay = min(delay * 2, _BACKOFF_MAX) * (0.75 + random.random() / 2)
        assert last is not None
        raise last

    @staticmethod
    def _retryable(e: HttpError) -> bool:
        return e.status == 0 or e.status in _RETRY_STATUS or e.status == 429

    def _status_error(self, method: str, resp: HttpResponse, what: str) -> HttpError:
        detail = resp.body[:200].decode("utf-8", "replace").strip()
        ra = _retry_after(resp.header("Retry-After")) if resp.status in (429, 503) else None
        label = f"{self.name}: {what or method + ' ' + resp.url}"
        msg = f"{label}: HTTP {resp.status}" + (f": {detail}" if detail else "")
        return HttpError(msg, resp.status, ra)

    def _follow(
        self, method: str, url: str, headers: HeadersFn | Mapping[str, str] | None,
        body: bytes | None, read_body: Callable[[http.client.HTTPResponse], bytes] | None,
    ) -> HttpResponse:
        seen: list[str] = []
        cur = url
        for _ in range(_MAX_REDIRECTS + 1):
            hdrs = headers(method, cur) if callable(headers) else dict(headers or {})
            resp = self._send(method, cur, hdrs, body, read_body)
            if resp.status not in _REDIRECT_STATUS or self.unix_socket:
                return resp
            loc = resp.header("Location")
            if not loc:
                return resp
            seen.append(cur)
            cur = urllib.parse.urljoin(cur, loc)
            if cur in seen:
                raise BackendError(f"{self.name}: redirect loop at {cur}")
            if method == "POST" and resp.status == 303:
                method, body = "GET", None
        raise BackendError(f"{self.name}: more than {_MAX_REDIRECTS} redirects from {url}")

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None,
        read_body: Callable[[http.client.HTTPResponse], bytes] | None,
    ) -> HttpResponse:
        t = _target(url) if not self.unix_socket else _Target("http", "localhost", 80,
                                                              _unix_path(url))
        proxy = self.proxy
        if proxy is not None and not self.unix_socket and proxy.healthy():
            proxy.touch()
            pt = t
            if proxy.cfg.use_http and t.scheme == "https":
                pt = _Target("http", t.host, 80 if t.port == 443 else t.port, t.path)
            try:
                resp = self._exchange(method, pt, headers, body, proxy.target, read_body)
                if not proxy.cfg.fallback or resp.status < 500:
                    return resp
                log.warning("proxy %s answered %d; falling back to %s", proxy.cfg.url,
                            resp.status, t.netloc)
            except _NET_ERRORS as e:
                if not proxy.cfg.fallback:
                    raise HttpError(f"{self.name}: proxy {proxy.cfg.url}: {e!r}") from e
                log.warning("proxy %s failed (%r); falling back to %s", proxy.cfg.url, e,
                            t.netloc)
            proxy.note_failure()
        try:
            return self._exchange(method, t, headers, body, None, read_body)
        except ssl.SSLCertVerificationError as e:
            raise BackendError(f"{self.name}: TLS verification of {t.netloc} failed: "
                               f"{e.verify_message}") from e
        except _NET_ERRORS as e:
            raise HttpError(f"{self.name}: {method} {t.url}: {e!r}") from e

    def _ping(self, url: str) -> bool:
        """Health check for the proxy: any answer below 500 counts as alive."""
        try:
            t = _target(url)
            conn = (_HTTPSConn(t.host, t.port, 2.0, 2.0, self._ctx) if t.scheme == "https"
                    else _HTTPConn(t.host, t.port, 2.0, 2.0))
            try:
                conn.request("GET", t.path, headers={"User-Agent": self.cfg.user_agent})
                return conn.getresponse().status < 500
            finally:
                conn.close()
        except _PING_ERRORS:
            return False

    # ------------------------------------------------------------------ helpers

    def get_range(
        self, url: str, start: int, end: int, *,
        headers: HeadersFn | Mapping[str, str] | None = None, what: str = "",
    ) -> bytes:
        """Bytes ``[start, end)`` of the resource, exactly, or an error."""
        want = end - start
        if want <= 0:
            return b""

        def hdrs(method: str, u: str) -> Mapping[str, str]:
            base = headers(method, u) if callable(headers) else dict(headers or {})
            return {**base, "Range": f"bytes={start}-{end - 1}"}

        def read_body(resp: http.client.HTTPResponse) -> bytes:
            if resp.status == 206:
                cr = parse_content_range(resp.getheader("Content-Range"))
                if cr is None or cr[0] != start or cr[1] != end:
                    raise http.client.HTTPException(
                        f"Content-Range {resp.getheader('Content-Range')!r} does not match "
                        f"bytes {start}-{end - 1}"
                    )
                data = resp.read(want + 1)
                if len(data) != want:
                    raise http.client.IncompleteRead(data[:want], want - len(data))
                return data
            if resp.length == want:
                # a proxy that answers a range with 200 and just the range (upstream's
                # http-proxy test server does); with start == 0 both readings agree
                data = resp.read(want)
                if len(data) != want:
                    raise http.client.IncompleteRead(data, want - len(data))
                return data
            # 200: the whole resource; skip to start, take what we need, drop the rest
            skipped = 0
            while skipped < start:
                piece = resp.read(min(start - skipped, 1 << 20))
                if not piece:
                    raise http.client.IncompleteRead(b"", start - skipped)
                skipped += len(piece)
            data = resp.read(want)
            if len(data) != want:
                raise http.client.IncompleteRead(data, want - len(data))
            return data  # the unread rest makes _exchange drop the connection

        resp = self._request_range(url, hdrs, read_body, what)
        return resp.body

    def _request_range(
        self, url: str, hdrs: HeadersFn,
        read_body: Callable[[http.client.HTTPResponse], bytes], what: str,
    ) -> HttpResponse:
        # Body-level failures (short body, bad Content-Range) surface as HTTPException from
        # read_body inside _exchange, which _send turns into a retryable HttpError(0).
        return self.request("GET", url, headers=hdrs, ok=(200, 206), read_body=read_body,
                            what=what)

    def head_size(self, url: str, *, headers: HeadersFn | Mapping[str, str] | None = None,
                  what: str = "") -> int:
        resp = self.request("HEAD", url, headers=headers, ok=(200, 204), what=what)
        cl = resp.header("Content-Length")
        if cl is None or not cl.strip().isdigit():
            raise BackendError(f"{self.name}: {what or url}: no valid Content-Length in HEAD")
        return int(cl)


def _unix_path(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return (u.path or "/") + (f"?{u.query}" if u.query else "")
