"""HTTP transports: the injectable seam between request policy and sockets.

Owns one request/response exchange and nothing above it: no auth, no redirects, no retries
(those are the clients' policy). A transport takes a :class:`Request` (absolute URL) and
returns a :class:`Response` whose body is read incrementally and whose length is checked:

- :class:`HTTPTransport` speaks HTTP/1.1 over ``http.client`` with a keep-alive pool per
  ``(scheme, host, port)``, separate connect and read timeouts, TLS from the system CAs plus
  ``ca_cert_files`` (or no verification with ``skip_verify``), an optional forward proxy
  (absolute-URI requests for ``http``, ``CONNECT`` tunnels for ``https``), or a unix socket
  that carries every request (``unix_socket``).
- :class:`MockTransport` calls a function: for unit tests, in the spirit of httpx.

Body checks: a body that ends before its ``Content-Length`` raises :class:`TransportError`;
bytes found after the declared end (already on the socket) raise it too, and the connection
is dropped; connections go back to the pool only after a complete, clean body. Every
failure is a :class:`TransportError` (a :class:`~nydus.errors.BackendError`) whose
``retryable`` says whether repeating an idempotent request may help.

Threading: transports are shared by all threads of a client; the pool is guarded by a lock and
a connection is used by one request at a time. A :class:`Response` belongs to one thread.
"""

from __future__ import annotations

import http.client
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

from nydus.errors import BackendError, ConfigError

__all__ = [
    "Headers",
    "Request",
    "Response",
    "Transport",
    "TransportError",
    "TLSError",
    "HTTPTransport",
    "MockTransport",
    "make_ssl_context",
]

log = logging.getLogger("nydus.http")

RequestBody = bytes | bytearray | Iterable[bytes] | None


class TransportError(BackendError):
    """A connection, TLS, timeout or framing failure: no trustworthy HTTP answer was had."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class TLSError(TransportError):
    """TLS handshake or certificate verification failed (not retryable).

    ``plain_http`` is true when the server seems to speak plain HTTP on that port.
    """

    def __init__(self, message: str, *, plain_http: bool = False) -> None:
        super().__init__(message, retryable=False)
        self.plain_http = plain_http


class Headers:
    """Case-insensitive, multi-valued HTTP header list (order kept)."""

    def __init__(self, items: Iterable[tuple[str, str]] | Mapping[str, str] | None = None) -> None:
        pairs = items.items() if isinstance(items, Mapping) else (items or ())
        self._items: list[tuple[str, str]] = [(k, v) for k, v in pairs]

    def get(self, name: str, default: str | None = None) -> str | None:
        low = name.lower()
        for k, v in self._items:
            if k.lower() == low:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self._items if k.lower() == low]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass
class Request:
    """One HTTP request. ``url`` is absolute; ``body`` is bytes, an iterable of chunks, or None.

    An iterable body needs a ``Content-Length`` header (uploads always know their size).
    """

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: RequestBody = None

    def body_bytes(self) -> bytes:
        """The whole body as bytes (consumes an iterable body)."""
        if self.body is None:
            return b""
        if isinstance(self.body, bytes | bytearray | memoryview):
            return bytes(self.body)
        return b"".join(self.body)


class _Body(Protocol):
    def read(self, amt: int) -> bytes: ...
    def close(self) -> None: ...


class _BytesBody:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def read(self, amt: int) -> bytes:
        end = len(self._data) if amt < 0 else min(len(self._data), self._pos + amt)
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def close(self) -> None:
        self._pos = len(self._data)


class Response:
    """Status, headers and a length-checked body stream. Close it (or use ``with``)."""

    def __init__(self, status: int, reason: str, headers: Headers, url: str, body: _Body) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.url = url
        self._body = body
        self._closed = False

    @classmethod
    def from_bytes(
        cls,
        status: int,
        body: bytes = b"",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        *,
        url: str = "",
        reason: str = "",
    ) -> Response:
        """A canned response (for :class:`MockTransport` handlers)."""
        h = Headers(headers)
        if "content-length" not in h:
            h = Headers([*h.items(), ("Content-Length", str(len(body)))])
        return cls(
            status, reason or http.client.responses.get(status, ""), h, url, _BytesBody(body)
        )

    @property
    def content_length(self) -> int | None:
        v = self.headers.get("content-length")
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    def read(self, amt: int = -1) -> bytes:
        """Up to ``amt`` bytes (all remaining if negative); ``b""`` at the end.

        Fewer than ``amt`` bytes are returned only at the end of the body.
        """
        if self._closed:
            return b""
        return self._body.read(amt)

    def read_all(self, limit: int | None = None) -> bytes:
        """The rest of the body; :class:`TransportError` if it exceeds ``limit`` bytes."""
        if limit is None:
            return self.read(-1)
        cl = self.content_length
        if cl is not None and cl > limit:
            self.close()
            raise TransportError(
                f"response body of {cl} bytes exceeds the limit of {limit}", retryable=False
            )
        data = self.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise TransportError(
                f"response body exceeds the limit of {limit} bytes", retryable=False
            )
        return data

    def iter_bytes(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yield the body in pieces of up to ``chunk_size`` bytes."""
        while True:
            data = self.read(chunk_size)
            if not data:
                return
            yield data

    def close(self) -> None:
        """Release the body. An unfinished body drops its connection instead of draining it."""
        if not self._closed:
            self._closed = True
            self._body.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Transport(Protocol):
    """Sends one request and returns the response with its body unread."""

    def handle(self, request: Request) -> Response: ...

    def close(self) -> None: ...


# --- TLS ----------------------------------------------------------------------------------


def make_ssl_context(
    *, skip_verify: bool = False, ca_cert_files: Sequence[str] = ()
) -> ssl.SSLContext:
    """A client context: system CAs plus ``ca_cert_files``; no checks at all with skip_verify.

    An unreadable or malformed CA file is a :class:`~nydus.errors.ConfigError`.
    """
    ctx = ssl.create_default_context()
    for path in ca_cert_files:
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load CA certificate {path}: {e}") from None
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- HTTPTransport ------------------------------------------------------------------------


class _HTTPConnection(http.client.HTTPConnection):
    """Connect with ``connect_timeout`` (to ``address``, or over the ``unix`` socket; TLS with
    ``context``), then use ``read_timeout`` for every socket read."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout: float,
        read_timeout: float,
        *,
        context: ssl.SSLContext | None = None,
        address: str | None = None,
        unix: str | None = None,
    ) -> None:
        super().__init__(host, port, timeout=connect_timeout)
        self.read_timeout = read_timeout
        self._context = context
        self._address = address or host
        self._unix = unix

    def _open_socket(self) -> socket.socket:
        if self._unix is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self._unix)
            except BaseException:
                s.close()
                raise
            return s
        s = socket.create_connection((self._address, self.port), self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def connect(self) -> None:
        self.sock = self._open_socket()
        tunnel_host = getattr(self, "_tunnel_host", None)
        if tunnel_host:
            self._tunnel()  # type: ignore[attr-defined]
        if self._context is not None:
            name = tunnel_host or self.host
            self.sock = self._context.wrap_socket(self.sock, server_hostname=name)
        self.sock.settimeout(self.read_timeout)


_PoolKey = tuple[str, str, int]


def _split_url(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TransportError(f"unsupported URL scheme in {url!r}", retryable=False)
    host = parts.hostname
    if not host:
        raise TransportError(f"no host in URL {url!r}", retryable=False)
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise TransportError(f"bad port in URL {url!r}", retryable=False) from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, target


def _socket_readable(sock: socket.socket | None) -> bool:
    """True if the idle socket has data or EOF pending (so it must not be reused)."""
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        r, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(r)


# A reused keep-alive connection the server closed meanwhile fails with one of these.
_DROPPED = (ConnectionResetError, BrokenPipeError, http.client.BadStatusLine)
# OpenSSL's reasons when a TLS handshake meets a server speaking plain HTTP.
_PLAIN_HTTP_REASONS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
)


class _Pool:
    def __init__(self, max_idle: int) -> None:
        self._lock = threading.Lock()
        self._idle: dict[_PoolKey, list[_HTTPConnection]] = {}
        self._max_idle = max_idle
        self.opened = 0

    def count_open(self) -> None:
        with self._lock:
            self.opened += 1

    def get(self, key: _PoolKey) -> _HTTPConnection | None:
        while True:
            with self._lock:
                conns = self._idle.get(key)
                if not conns:
                    return None
                conn = conns.pop()
            if _socket_readable(conn.sock):
                conn.close()  # closed by the server, or junk left on it
                continue
            return conn

    def put(self, key: _PoolKey, conn: _HTTPConnection) -> None:
        with self._lock:
            conns = self._idle.setdefault(key, [])
            if len(conns) < self._max_idle:
                conns.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            all_conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in all_conns:
            c.close()


class _HTTPBody:
    """Body of an http.client response with our own Content-Length accounting."""

    def __init__(
        self,
        pool: _Pool,
        key: _PoolKey,
        conn: _HTTPConnection,
        resp: http.client.HTTPResponse,
        url: str,
        no_body: bool,
    ) -> None:
        self._pool = pool
        self._key = key
        self._conn: _HTTPConnection | None = conn
        self._resp = resp
        self._url = url
        self._total = None if resp.chunked else resp.length
        self._remaining = 0 if no_body else self._total
        self._got = 0
        self._done = False
        if no_body or self._remaining == 0:
            self._finish()

    def read(self, amt: int) -> bytes:
        if self._done:
            return b""
        try:
            if self._remaining is not None:
                n = self._remaining if amt < 0 else min(amt, self._remaining)
                fp = self._resp.fp
                data = fp.read(n) if fp is not None else b""
                self._got += len(data)
                self._remaining -= len(data)
                if len(data) < n:
                    self._abort()
                    raise TransportError(
                        f"body of {self._url} ended after {self._got} of {self._total} bytes"
                        " (shorter than Content-Length)"
                    )
                if self._remaining == 0:
                    self._finish()
                return data
            data = self._resp.read(None if amt < 0 else amt)
            self._got += len(data)
            if amt < 0 or not data or self._resp.isclosed():
                self._finish()
            return data
        except TransportError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            self._abort()
            if isinstance(e, http.client.IncompleteRead):
                raise TransportError(f"body of {self._url} cut short: {e}") from e
            what = "timed out" if isinstance(e, TimeoutError) else f"connection lost ({e!r})"
            raise TransportError(
                f"{what} reading the body of {self._url} after {self._got} bytes"
            ) from e

    def _finish(self) -> None:
        self._done = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        extra = self._total is not None and self._extra_bytes_pending(conn)
        will_close = bool(self._resp.will_close)
        self._resp.close()
        if extra:
            conn.close()
            raise TransportError(
                f"body of {self._url} is longer than its Content-Length ({self._total})"
            )
        if will_close or conn.sock is None:
            conn.close()
        else:
            self._pool.put(self._key, conn)

    def _extra_bytes_pending(self, conn: _HTTPConnection) -> bool:
        fp, sock = self._resp.fp, conn.sock
        if fp is None or sock is None:
            return False
        old = sock.gettimeout()
        try:
            sock.settimeout(0)
            try:
                return bool(fp.peek(1))
            finally:
                sock.settimeout(old)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except (OSError, ValueError):
            # The socket is unusable; don't blame the body, just don't reuse the connection.
            self._resp.will_close = True
            return False

    def _abort(self) -> None:
        self._done = True
        conn, self._conn = self._conn, None
        self._resp.close()
        if conn is not None:
            conn.close()

    def close(self) -> None:
        if not self._done:
            self._abort()


class HTTPTransport:
    """HTTP/1.1 with keep-alive pooling, TLS and an optional forward proxy or unix socket.

    ``proxy`` is ``http(s)://host:port`` of a forward proxy (for example Dragonfly's dfdaemon);
    with ``proxy_use_http`` https URLs are sent to it as plain http (upstream ``use_http``).
    ``unix_socket`` sends every request over that socket (the URL's host is ignored).
    ``resolve`` maps host names to the addresses to connect to (a test seam).
    ``opened`` counts the connections made (tests check pooling with it).
    """

    def __init__(
        self,
        *,
        skip_verify: bool = False,
        ca_cert_files: Sequence[str] = (),
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        proxy: str | None = None,
        proxy_use_http: bool = False,
        unix_socket: str | None = None,
        resolve: Mapping[str, str] | None = None,
        max_idle_per_host: int = 16,
    ) -> None:
        # the default context (the system's CAs: ~40 ms) is made on the first TLS connection
        self._ctx: ssl.SSLContext | None = ssl_context or (
            make_ssl_context(skip_verify=skip_verify, ca_cert_files=ca_cert_files)
            if ca_cert_files
            else None
        )
        self._skip_verify = skip_verify
        self._ctx_lock = threading.Lock()
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._proxy: tuple[str, int, bool] | None = None
        if proxy:
            try:
                pscheme, phost, pport, _ = _split_url(
                    proxy if "://" in proxy else f"http://{proxy}"
                )
            except TransportError:
                raise ConfigError(f"proxy.url: invalid URL {proxy!r}") from None
            self._proxy = (phost, pport, pscheme == "https")
        self._proxy_use_http = proxy_use_http
        self._unix = unix_socket
        self._resolve = dict(resolve or {})
        self._pool = _Pool(max_idle_per_host)

    @property
    def opened(self) -> int:
        return self._pool.opened

    def close(self) -> None:
        self._pool.close()

    def _tls(self) -> ssl.SSLContext:
        with self._ctx_lock:
            if self._ctx is None:
                self._ctx = make_ssl_context(skip_verify=self._skip_verify)
            return self._ctx

    def _new_conn(self, scheme: str, host: str, port: int) -> _HTTPConnection:
        self._pool.count_open()
        t, c = self._timeout, self._connect_timeout
        ctx = self._tls() if scheme == "https" else None
        if self._unix is not None:
            return _HTTPConnection("localhost", 80, c, t, unix=self._unix)
        if self._proxy is not None:
            phost, pport, tls_proxy = self._proxy
            if scheme == "https":  # a CONNECT tunnel, then TLS with the origin
                conn = _HTTPConnection(phost, pport, c, t, context=ctx)
                conn.set_tunnel(host, port)
                return conn
            return _HTTPConnection(phost, pport, c, t, context=self._tls() if tls_proxy else None)
        return _HTTPConnection(host, port, c, t, context=ctx, address=self._resolve.get(host))

    def handle(self, request: Request) -> Response:
        url = request.url
        if self._proxy is not None and self._proxy_use_http and url.startswith("https://"):
            url = "http://" + url[len("https://") :]
        scheme, host, port, target = _split_url(url)
        if self._proxy is not None and scheme == "http":
            target = url  # absolute-URI form for a forward proxy
        key: _PoolKey = (scheme, host, port)
        if self._unix is not None:
            key = ("unix", self._unix, 0)
        replayable = request.body is None or isinstance(request.body, bytes | bytearray)
        while True:
            conn = self._pool.get(key)
            reused = conn is not None
            if conn is None:
                conn = self._new_conn(scheme, host, port)
                self._connect(conn, scheme, host, port)
            try:
                headers = dict(request.headers)
                if self._unix is not None:
                    headers.setdefault("Host", "localhost")
                conn.request(request.method, target, body=request.body, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                dropped = isinstance(e, _DROPPED)
                if dropped and reused and replayable:
                    continue  # the server dropped an idle keep-alive connection: try a fresh one
                if isinstance(e, TimeoutError):
                    what = f"timed out waiting for the answer ({self._timeout}s)"
                elif isinstance(e, ssl.SSLError):
                    what = f"TLS error: {e}"
                else:
                    what = f"connection lost: {e!r}" if dropped else repr(e)
                raise TransportError(f"{request.method} {url}: {what}") from e
            no_body = (
                request.method == "HEAD" or resp.status in (204, 304) or (100 <= resp.status < 200)
            )
            headers_out = Headers(resp.getheaders())
            body = _HTTPBody(self._pool, key, conn, resp, url, no_body)
            return Response(resp.status, resp.reason, headers_out, request.url, body)

    def _connect(self, conn: _HTTPConnection, scheme: str, host: str, port: int) -> None:
        where = f"unix:{self._unix}" if self._unix is not None else f"{scheme}://{host}:{port}"
        try:
            conn.connect()
        except OSError as e:
            conn.close()
            raise self._connect_error(e, where, host) from e

    def _connect_error(self, e: OSError, where: str, host: str) -> TransportError:
        if isinstance(e, ssl.SSLCertVerificationError):
            return TLSError(
                f"TLS certificate verification failed for {where}: {e.verify_message or e}"
                " (set ca_cert_files or skip_verify)"
            )
        if isinstance(e, ssl.SSLError):
            plain = e.reason in _PLAIN_HTTP_REASONS
            hint = " (the server seems to speak plain HTTP)" if plain else ""
            return TLSError(f"TLS handshake with {where} failed: {e}{hint}", plain_http=plain)
        if isinstance(e, socket.gaierror):
            return TransportError(f"cannot resolve {host}: {e}", retryable=False)
        if isinstance(e, TimeoutError):
            return TransportError(f"timed out connecting to {where} ({self._connect_timeout}s)")
        if self._proxy is not None and "Tunnel connection failed" in str(e):
            return TransportError(f"proxy refused CONNECT to {where}: {e}")
        return TransportError(f"cannot connect to {where}: {e}")


# --- mock ---------------------------------------------------------------------------------


class MockTransport:
    """Calls ``handler(request)`` for every request (the request body is materialized)."""

    def __init__(self, handler: Callable[[Request], Response]) -> None:
        self._handler = handler
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def handle(self, request: Request) -> Response:
        req = Request(request.method, request.url, dict(request.headers), request.body_bytes())
        with self._lock:
            self.requests.append(req)
        resp = self._handler(req)
        if not resp.url:
            resp.url = request.url
        return resp

    def close(self) -> None:
        pass
