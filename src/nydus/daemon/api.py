"""nydusd's HTTP API on a unix socket (``--apisock``), upstream's routes (nydus-reference.md §4).

Responses are JSON; errors are ``{"code": ..., "message": ...}`` with a 4xx status for bad
requests (malformed or too deeply nested JSON, unknown keys, bad paths, wrong method:
400/404/405/409/411/413/431) and 5xx only for server-side failures. No request can take the
daemon down: every handler runs inside one exception barrier. The socket file is created mode
0600 (owner only).

Input is bounded: the request line and headers together at most :data:`MAX_HEADER` bytes, a
body at most :data:`MAX_BODY` bytes with a valid ``Content-Length`` (required for a JSON
body), the whole request read within :data:`REQUEST_DEADLINE` seconds (a client that stalls or
trickles is disconnected), one request per connection, and at most :data:`MAX_CONNECTIONS`
connections at once (more get ``503`` at once).

Threading contract: one thread per connection (``ThreadingMixIn``); handlers call the daemon's
verbs, which serialize themselves (mounts load their image outside the daemon's lock, so a slow
mount never stalls other requests).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import socketserver
import stat
import threading
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .. import errors
from ..config import FsDriver
from ..format.safejson import parse_json_object
from ..metadata import parse_bootstrap_digest
from .logsetup import LEVELS
from .nydusd import ImageSource, Nydusd
from .prometheus import render_prometheus
from .state import StateError

__all__ = ["ApiServer", "ApiError", "set_log_level"]

log = logging.getLogger("nydus.api")

MAX_BODY = 1 << 20
#: Request line plus headers.
MAX_HEADER = 64 << 10
#: Seconds a client has to send its whole request (line, headers, body).
REQUEST_DEADLINE = 30.0
#: Seconds a read may wait for the next bytes from a client.
IDLE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
_CONTENT_LENGTH_RE = re.compile(r"[0-9]{1,19}")
_LEVELS = {**LEVELS, "off": logging.CRITICAL + 10}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def set_log_level(level: str) -> None:
    lv = _LEVELS.get(str(level).lower())
    if lv is None:
        raise ApiError(
            400,
            "InvalidArgument",
            f"log_level: expected one of {', '.join(sorted(_LEVELS))}, got {level!r}",
        )
    logging.getLogger().setLevel(lv)
    logging.getLogger("nydus").setLevel(lv)


#: (error class, status, code): the first class an error is an instance of answers it
_STATUS_OF: list[tuple[type[Exception] | tuple[type[Exception], ...], int, str]] = [
    (StateError, 409, "InvalidState"),
    (errors.NotFoundError, 404, "NotFound"),
    (errors.UnsupportedError, 501, "Unsupported"),
    ((errors.ConfigError, errors.FormatError), 400, "InvalidArgument"),
    (errors.IntegrityError, 422, "IntegrityError"),  # the input does not match its digest
    (errors.BackendError, 502, "BackendError"),
]


def _error_of(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    for cls, status, code in _STATUS_OF:
        if isinstance(e, cls):
            return ApiError(status, code, str(e))
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.EBUSY):
        return ApiError(409, "Conflict", e.strerror or str(e))
    if isinstance(e, OSError) and e.errno in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
        return ApiError(400, "InvalidArgument", e.strerror or str(e))
    if isinstance(e, errors.NydusError):
        return ApiError(500, "InternalError", str(e))
    log.error("API handler failed", exc_info=e)
    return ApiError(500, "InternalError", f"{type(e).__name__}: {e}")


class _Request:
    def __init__(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        body: bytes,
        has_length: bool = True,
    ) -> None:
        self.method, self.path, self.query, self.body = method, path, query, body
        self.has_length = has_length

    def arg(self, name: str, required: bool = False) -> str | None:
        v = self.query.get(name)
        if not v or not v[0]:
            if required:
                raise ApiError(400, "InvalidArgument", f"query parameter {name!r} is required")
            return None
        return v[0]

    def json(self, allowed: Collection[str] | None = None) -> dict[str, Any]:
        """The body as a JSON object; with ``allowed``, a key outside it is a 400."""
        if not self.body:
            if not self.has_length:
                raise ApiError(
                    411, "LengthRequired", "a JSON body with a Content-Length header is required"
                )
            raise ApiError(400, "InvalidArgument", "a JSON body is required")
        try:
            body = parse_json_object(self.body, "the request body")
        except errors.FormatError as e:
            raise ApiError(400, "InvalidArgument", str(e)) from None
        unknown = set(body) - set(allowed) if allowed is not None else set()
        if unknown:
            raise ApiError(400, "InvalidArgument", f"unknown keys: {', '.join(sorted(unknown))}")
        return body


_Reply = tuple[int, Any]  # (status, JSON-able object | str for text/plain | None)


_MOUNT_KEYS = {"source", "fs_type", "config", "prefetch_files", "fs_driver", "bootstrap_digest"}


class _Routes:
    def __init__(
        self,
        daemon: Nydusd,
        on_sendfd: Callable[[], None] | None,
        on_takeover: Callable[[], None] | None,
    ) -> None:
        self.d = daemon
        self.on_sendfd, self.on_takeover = on_sendfd, on_takeover
        self.table: dict[str, dict[str, Callable[[_Request], _Reply]]] = {
            "/api/v1/daemon": {"GET": self.get_daemon, "PUT": self.put_daemon},
            "/api/v2/daemon": {"GET": self.get_daemon, "PUT": self.put_daemon},
            "/api/v1/daemon/backend": {"GET": self.get_backend},
            "/api/v1/daemon/events": {"GET": self.get_events},
            "/api/v1/daemon/start": {"PUT": self.put_start},
            "/api/v1/daemon/exit": {"PUT": self.put_exit},
            "/api/v1/daemon/fuse/sendfd": {"PUT": self.put_sendfd},
            "/api/v1/daemon/fuse/takeover": {"PUT": self.put_takeover},
            "/api/v1/mount": {
                "POST": self.post_mount,
                "PUT": self.put_mount,
                "DELETE": self.delete_mount,
            },
            "/api/v1/metrics": {"GET": self.get_metrics},
            "/api/v1/metrics/files": {"GET": self.get_files},
            "/api/v1/metrics/pattern": {"GET": self.get_pattern},
            "/api/v1/metrics/backend": {"GET": self.get_backend_metrics},
            "/api/v1/metrics/blobcache": {"GET": self.get_blobcache},
            "/api/v1/metrics/inflight": {"GET": self.get_inflight},
            "/api/v1/metrics/prometheus": {"GET": self.get_prometheus},
            "/metrics": {"GET": self.get_prometheus},
            "/api/v1/config": {"GET": self.get_config, "PUT": self.put_config},
            "/api/v2/blobs": {
                "GET": self.unsupported_v2,
                "PUT": self.unsupported_v2,
                "DELETE": self.unsupported_v2,
            },
        }

    def handle(self, req: _Request) -> _Reply:
        methods = self.table.get(req.path.rstrip("/") or "/")
        if methods is None:
            raise ApiError(404, "NotFound", f"no such endpoint: {req.path}")
        fn = methods.get(req.method)
        if fn is None:
            raise ApiError(
                405,
                "MethodNotAllowed",
                f"{req.method} not allowed on {req.path} (allowed: {', '.join(sorted(methods))})",
            )
        return fn(req)

    # -- daemon ---------------------------------------------------------------------------

    def get_daemon(self, req: _Request) -> _Reply:
        return 200, self.d.info()

    def put_daemon(self, req: _Request) -> _Reply:
        body = req.json(allowed={"log_level"})
        if "log_level" in body:
            set_log_level(body["log_level"])
            log.info("log level set to %s", body["log_level"])
        return 204, None

    def get_backend(self, req: _Request) -> _Reply:
        return 200, self.d.image(req.arg("mountpoint")).describe()

    def get_events(self, req: _Request) -> _Reply:
        return 200, self.d.events.export()

    def put_start(self, req: _Request) -> _Reply:
        self.d.start()
        return 204, None

    def put_exit(self, req: _Request) -> _Reply:
        self.d.request_exit("API request")
        return 204, None

    def put_sendfd(self, req: _Request) -> _Reply:
        if self.on_sendfd is None:
            raise ApiError(501, "Unsupported", "no supervisor configured (--supervisor)")
        self.on_sendfd()
        return 204, None

    def put_takeover(self, req: _Request) -> _Reply:
        if self.on_takeover is None:
            raise ApiError(501, "Unsupported", "takeover needs --upgrade and --supervisor")
        self.on_takeover()
        return 204, None

    # -- mounts ---------------------------------------------------------------------------

    def _mount_args(self, req: _Request) -> tuple[str, ImageSource]:
        path = req.arg("mountpoint", required=True)
        assert path is not None
        body = req.json(allowed=_MOUNT_KEYS)
        fs_type = body.get("fs_type", "rafs")
        if fs_type != "rafs":
            raise ApiError(
                400 if fs_type != "passthrough_fs" else 501,
                "InvalidArgument" if fs_type != "passthrough_fs" else "Unsupported",
                f"fs_type {fs_type!r} is not supported (only 'rafs')",
            )
        source = body.get("source")
        if not isinstance(source, str) or not source:
            raise ApiError(400, "InvalidArgument", "'source' (bootstrap path) is required")
        config = body.get("config")
        if not isinstance(config, (str, dict)) or not config:
            raise ApiError(
                400, "InvalidArgument", "'config' (nydusd config as a JSON string) is required"
            )
        pf = body.get("prefetch_files")
        files: list[str] | None = None
        if isinstance(pf, str):
            files = [p for p in pf.split() if p]
        elif isinstance(pf, list) and all(isinstance(p, str) for p in pf):
            files = list(pf)
        elif pf is not None:
            raise ApiError(400, "InvalidArgument", "'prefetch_files' must be a list of paths")
        return path, ImageSource(source, config, files, self._bootstrap_digest(req))

    @staticmethod
    def _bootstrap_digest(req: _Request) -> str | None:
        """Extension (not upstream): ``bootstrap_digest`` "sha256:HEX", the digest the
        bootstrap must have; a mismatch refuses the mount (IntegrityError)."""
        digest = req.json().get("bootstrap_digest")
        if digest is None:
            return None
        if not isinstance(digest, str):
            raise ApiError(400, "InvalidArgument", "'bootstrap_digest' must be a string")
        return parse_bootstrap_digest(digest)

    def post_mount(self, req: _Request) -> _Reply:
        driver = req.json().get("fs_driver")  # extension
        try:
            fs_driver = None if driver is None else FsDriver(driver)
        except ValueError:
            raise ApiError(
                400, "InvalidArgument", f"fs_driver {driver!r}: expected 'fusedev' or 'erofs'"
            ) from None
        self.d.mount(*self._mount_args(req), fs_driver=fs_driver)
        return 204, None

    def put_mount(self, req: _Request) -> _Reply:
        self.d.remount(*self._mount_args(req))
        return 204, None

    def delete_mount(self, req: _Request) -> _Reply:
        path = req.arg("mountpoint", required=True)
        assert path is not None
        self.d.umount(path)
        return 204, None

    # -- metrics --------------------------------------------------------------------------

    def get_metrics(self, req: _Request) -> _Reply:
        return 200, self.d.metrics_fs(req.arg("id"))

    def get_files(self, req: _Request) -> _Reply:
        latest = (req.arg("latest") or "").lower() in ("true", "1", "yes")
        return 200, self.d.metrics_files(req.arg("id"), latest)

    def get_pattern(self, req: _Request) -> _Reply:
        return 200, self.d.metrics_pattern(req.arg("id"))

    def get_backend_metrics(self, req: _Request) -> _Reply:
        return 200, self.d.metrics_backend(req.arg("id"))

    def get_blobcache(self, req: _Request) -> _Reply:
        return 200, self.d.metrics_blobcache(req.arg("id"))

    def get_inflight(self, req: _Request) -> _Reply:
        return 200, {"values": self.d.metrics_inflight()}

    def get_prometheus(self, req: _Request) -> _Reply:
        return 200, render_prometheus(self.d)

    def get_config(self, req: _Request) -> _Reply:
        return 200, self.d.config_of(req.arg("id"))

    def put_config(self, req: _Request) -> _Reply:
        req.json()
        raise ApiError(501, "Unsupported", "hot config update (registry_auth) is not supported")

    def unsupported_v2(self, req: _Request) -> _Reply:
        raise ApiError(
            501,
            "Unsupported",
            "fscache blob objects (/api/v2/blobs) are not supported on this kernel",
        )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nydusd-py"
    routes: _Routes  # set on the subclass per server

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def _serve(self) -> None:
        try:
            status, obj = self._run()
        except BaseException as e:
            err = _error_of(e)
            status, obj = err.status, {"code": err.code, "message": err.message}
            if status >= 500:
                log.error("API %s %s: %s", self.command, self.path, err.message)
            else:
                log.info("API %s %s: %d %s", self.command, self.path, status, err.message)
        self._send(status, obj)

    def _content_length(self) -> int | None:
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        if len(set(values)) != 1 or not _CONTENT_LENGTH_RE.fullmatch(values[0].strip()):
            self.close_connection = True
            raise ApiError(400, "InvalidArgument", "bad Content-Length")
        n = int(values[0])
        if n > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "PayloadTooLarge", f"body larger than {MAX_BODY} bytes")
        return n

    def _run(self) -> _Reply:
        self.close_connection = True  # one request per connection: nothing left to misparse
        length = self._content_length()
        body = b""
        if length is None and "Transfer-Encoding" in self.headers:
            raise ApiError(411, "LengthRequired", "chunked bodies are not supported")
        if length:
            body = self.rfile.read(length)
            if len(body) != length:
                raise ApiError(
                    400, "InvalidArgument", f"body ended after {len(body)} of {length} bytes"
                )
        self.server.request_read(self.connection)  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        return self.routes.handle(
            _Request(self.command, url.path, query, body, has_length=length is not None)
        )

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(IDLE_TIMEOUT)

    def parse_request(self) -> bool:
        # the request line was read by the stock code (at most 64 KiB); cap the headers too
        real = self.rfile
        line = getattr(self, "raw_requestline", b"")
        self.rfile = _HeaderBudget(real, MAX_HEADER - len(line))  # type: ignore[assignment]
        try:
            return super().parse_request()
        except _HeadersTooLarge:
            self.close_connection = True
            self.send_error(431, f"request headers larger than {MAX_HEADER} bytes")
            return False
        finally:
            self.rfile = real

    def _send(self, status: int, obj: Any) -> None:
        if status == 204 or obj is None:
            data, ctype = b"", "application/json"
        elif isinstance(obj, str):
            data, ctype = obj.encode(), "text/plain; version=0.0.4"
        else:
            data, ctype = json.dumps(obj).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data and self.command != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    do_GET = _serve
    do_PUT = _serve
    do_POST = _serve
    do_DELETE = _serve
    do_PATCH = _serve
    do_HEAD = _serve


class _HeadersTooLarge(Exception):
    pass


class _HeaderBudget:
    """Wraps the request's input while headers are parsed: at most ``budget`` bytes."""

    def __init__(self, raw: Any, budget: int) -> None:
        self._raw, self._left = raw, budget

    def readline(self, limit: int = -1) -> bytes:
        if self._left <= 0:
            raise _HeadersTooLarge
        want = self._left + 1 if limit is None or limit < 0 else min(limit, self._left + 1)
        line: bytes = self._raw.readline(want)
        if len(line) > self._left:
            raise _HeadersTooLarge
        self._left -= len(line)
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 128

    def __init__(self, path: str, handler: type[_Handler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._watchdogs: dict[int, threading.Timer] = {}
        self._watch_guard = threading.Lock()
        super().__init__(path, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                body = b'{"code": "Busy", "message": "too many API connections"}'
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                    b"application/json\r\nConnection: close\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
            self.shutdown_request(request)
            return
        # a client gets REQUEST_DEADLINE seconds to send its request, however it trickles
        timer = threading.Timer(REQUEST_DEADLINE, _cut, args=(request,))
        timer.daemon = True
        with self._watch_guard:
            self._watchdogs[id(request)] = timer
        timer.start()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def request_read(self, request: Any) -> None:
        """The handler has the whole request: no deadline for the verb itself."""
        with self._watch_guard:
            timer = self._watchdogs.pop(id(request), None)
        if timer is not None:
            timer.cancel()

    def _done(self, request: Any) -> None:
        self.request_read(request)
        self._slots.release()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def server_bind(self) -> None:
        # mode 0600 from the start: fchmod on an unbound unix socket sets the inode mode that
        # bind(2) gives the socket file
        os.fchmod(self.socket.fileno(), 0o600)
        super().server_bind()
        os.chmod(str(self.server_address), 0o600)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("API connection failed")


class ApiServer:
    """Serves the API of ``daemon`` on the unix socket ``path`` in a background thread."""

    def __init__(
        self,
        daemon: Nydusd,
        path: str,
        *,
        on_sendfd: Callable[[], None] | None = None,
        on_takeover: Callable[[], None] | None = None,
    ) -> None:
        self.path = os.path.abspath(path)
        routes = _Routes(daemon, on_sendfd, on_takeover)
        handler = type("Handler", (_Handler,), {"routes": routes})
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise errors.ConfigError(f"API socket path {self.path} exists and is not a socket")
            if not _stale_socket(self.path):
                raise errors.ConfigError(f"API socket {self.path} is in use by another process")
            os.unlink(self.path)
        parent = os.path.dirname(self.path)
        if parent and not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)  # a directory of our own: owner only
        self._server = _Server(self.path, handler)
        st = os.lstat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name="nydusd-api",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()
        log.info("API server listening on %s", self.path)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        # Only remove the socket file if it is still ours: a successor daemon may already
        # have bound the same path (restart or recovery) while this one was shutting down.
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)


def _cut(request: socket.socket) -> None:
    """Disconnect a client that did not send its request in time."""
    log.info("API client too slow: disconnected after %.0fs", REQUEST_DEADLINE)
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_RDWR)


def _stale_socket(path: str) -> bool:
    """True if ``path`` is a socket nobody listens on (left by a crashed daemon)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
        return False
    except OSError:
        return True
    finally:
        s.close()
