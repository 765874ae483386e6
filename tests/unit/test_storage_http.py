"""The HTTP transport and the http-proxy backend against an in-process server that lies and
fails on purpose: 5xx bursts, 429 + Retry-After, resets mid-body, short and long bodies, Range
ignored, wrong Content-Range, redirect loops, 404; TCP, unix sockets, TLS; and the Dragonfly
``proxy`` setting with fallback and health checks."""

from __future__ import annotations

import http.server
import os
import random
import re
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from nydus.config import HttpProxyConfig, ProxyConfig
from nydus.errors import BackendError
from nydus.http import HttpClient, HttpConfig, parse_content_range
from nydus.storage.httpproxy import HttpProxyBackend

BLOB_ID = "ab" * 32
BLOB = random.Random(1).randbytes(300_000)


@dataclass
class Rule:
    action: str
    times: int = 1
    method: str | None = "GET"
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    after: int = 0


class Server:
    """Serves ``BLOB`` at ``/blobs/<id>`` (HEAD, GET with Range); ``rules`` inject faults."""

    def __init__(self, *, unix: str | None = None, tls: Any = None) -> None:
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.lock = threading.Lock()
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def address_string(self) -> str:
                return "client"

            def do_GET(self) -> None:
                owner.handle(self)

            do_HEAD = do_GET

        if unix:

            class US(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
                daemon_threads = True

            self.srv: socketserver.BaseServer = US(unix, H)
            self.srv.handle_error = lambda *a: None  # type: ignore[method-assign]
            self.url = ""
        else:
            srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
            srv.daemon_threads = True
            srv.handle_error = lambda *a: None  # type: ignore[method-assign]
            if tls is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(str(tls.cert_pem), str(tls.key_pem))
                srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
            self.srv = srv
            scheme = "https" if tls is not None else "http"
            self.url = f"{scheme}://127.0.0.1:{srv.server_address[1]}"
        self.thread = threading.Thread(target=self.srv.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()

    def count(self, method: str = "GET") -> int:
        with self.lock:
            return sum(1 for m, _, _ in self.log if m == method)

    def _rule(self, method: str) -> Rule | None:
        with self.lock:
            for r in self.rules:
                if r.times > 0 and (r.method is None or r.method == method):
                    r.times -= 1
                    return r
        return None

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = h.path
        if path.startswith("http://"):
            path = urlsplit(path).path
        rng = h.headers.get("Range")
        with self.lock:
            self.log.append((h.command, path, rng))
        rule = self._rule(h.command)
        if not path.endswith("/" + BLOB_ID):
            return self.reply(h, 404, b"no such blob")
        if rule and rule.action == "status":
            return self.reply(h, rule.status, b"nope", rule.headers)
        if rule and rule.action == "loop":
            return self.reply(h, 302, b"", {"Location": path})
        start, end = 0, len(BLOB)
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng or "")
        ranged = m is not None and not (rule and rule.action in ("ignore_range", "range_200"))
        if m:
            start, end = int(m.group(1)), min(int(m.group(2)) + 1, len(BLOB))
        body = BLOB[start:end] if (ranged or (rule and rule.action == "range_200")) else BLOB
        hdrs = {}
        status = 200
        if ranged:
            status = 206
            off = 1 if rule and rule.action == "bad_range" else 0
            hdrs["Content-Range"] = f"bytes {start + off}-{end - 1 + off}/{len(BLOB)}"
        if rule and rule.action == "reset":
            h.send_response(status)
            for k, v in hdrs.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: rule.after])
            h.wfile.flush()
            h.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            h.close_connection = True
            h.connection.close()
            return None
        if rule and rule.action == "short":
            h.send_response(status)
            for k, v in hdrs.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.close_connection = True
            return None
        if rule and rule.action == "long":
            return self.reply(h, status, body, hdrs, extra=b"GARBAGE-AFTER-BODY")
        return self.reply(h, status, body, hdrs)

    @staticmethod
    def reply(
        h: http.server.BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        extra: bytes = b"",
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body + extra)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def backend(url: str, **kw: Any) -> HttpProxyBackend:
    cfg = HttpProxyConfig(addr=url, path="/blobs", **kw)
    return HttpProxyBackend(cfg, id="t")


# ------------------------------------------------------------------------ basics


def test_size_and_ranges_over_tcp(server: Server) -> None:
    be = backend(server.url)
    try:
        assert be.blob_size(BLOB_ID) == len(BLOB)
        assert be.read(BLOB_ID, 1000, 5000) == BLOB[1000:6000]
        rs = [(0, 10), (299_990, 10), (5, 100_000)]
        assert be.read_ranges(BLOB_ID, rs) == [BLOB[o : o + s] for o, s in rs]
        assert server.log[1] == ("GET", f"/blobs/{BLOB_ID}", "bytes=1000-5999")
        m = be.metrics.export()
        assert m["backend_type"] == "http-proxy" and m["read_count"] == 4  # one per range
        assert m["read_amount_total"] == 5000 + 100_020
    finally:
        be.close()


def test_a_plain_http_backend_makes_no_tls_context(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the system CAs costs ~40 ms of each nydusd start: only a TLS connection does."""
    made: list[int] = []
    real = ssl.create_default_context

    def counted(*a: Any, **k: Any) -> ssl.SSLContext:
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    be = backend(server.url)
    try:
        assert be.read(BLOB_ID, 0, 10) == BLOB[:10]
        assert made == []
    finally:
        be.close()


def test_unix_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "proxy.sock")
    s = Server(unix=sock)
    be = HttpProxyBackend(HttpProxyConfig(addr=sock), id="u")
    try:
        assert be.blob_size(BLOB_ID) == len(BLOB)
        assert be.read(BLOB_ID, 7, 70_000) == BLOB[7:70_007]
        assert s.log[-1][1] == f"/{BLOB_ID}"
    finally:
        be.close()
        s.stop()


# ------------------------------------------------------------------------ failures


def test_5xx_burst_is_retried(server: Server) -> None:
    server.rules.append(Rule("status", times=2, status=503))
    be = backend(server.url, retry_limit=3)
    assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
    assert server.count() == 3
    be.close()


def test_retry_limit_is_honoured(server: Server) -> None:
    server.rules.append(Rule("status", times=10, status=502))
    be = backend(server.url, retry_limit=2)
    with pytest.raises(BackendError, match="HTTP 502"):
        be.read(BLOB_ID, 0, 100)
    assert server.count() == 3
    assert be.metrics.export()["read_errors"] == 1
    be.close()


def test_default_retry_limit_still_retries(server: Server) -> None:
    server.rules.append(Rule("status", times=1, status=500))
    be = backend(server.url)  # retry_limit 0 -> DEFAULT_RETRIES
    assert be.read(BLOB_ID, 0, 10) == BLOB[:10]
    be.close()


def test_429_honours_retry_after(server: Server) -> None:
    server.rules.append(Rule("status", status=429, headers={"Retry-After": "1"}))
    be = backend(server.url)
    t0 = time.monotonic()
    assert be.read(BLOB_ID, 0, 10) == BLOB[:10]
    assert time.monotonic() - t0 >= 0.9
    be.close()


def test_404_is_not_retried(server: Server) -> None:
    be = backend(server.url, retry_limit=5)
    with pytest.raises(BackendError, match="HTTP 404"):
        be.read("cd" * 32, 0, 10)
    assert server.count() == 1
    be.close()


@pytest.mark.parametrize("action", ["reset", "short"])
def test_broken_bodies_are_retried(server: Server, action: str) -> None:
    server.rules.append(Rule(action, after=1000))
    be = backend(server.url)
    assert be.read(BLOB_ID, 0, 50_000) == BLOB[:50_000]
    assert server.count() == 2
    be.close()


def test_body_longer_than_content_length_never_leaks(server: Server) -> None:
    server.rules.append(Rule("long"))
    be = backend(server.url)
    for off in (0, 100, 200):  # the garbage sits on the kept-alive connection
        assert be.read(BLOB_ID, off, 50) == BLOB[off : off + 50]
    be.close()


def test_range_ignored_is_sliced(server: Server) -> None:
    server.rules.append(Rule("ignore_range", times=2))
    be = backend(server.url)
    assert be.read(BLOB_ID, 123_456, 1000) == BLOB[123_456:124_456]
    assert be.read(BLOB_ID, 10, 10) == BLOB[10:20]
    assert be.read(BLOB_ID, 20, 10) == BLOB[20:30]  # the connection was not reused dirty
    be.close()


def test_200_with_just_the_range_is_accepted(server: Server) -> None:
    """Upstream's own http-proxy test server answers ranges with 200 and the range body."""
    server.rules.append(Rule("range_200"))
    be = backend(server.url)
    assert be.read(BLOB_ID, 5000, 777) == BLOB[5000:5777]
    be.close()


def test_wrong_content_range_is_an_error(server: Server) -> None:
    server.rules.append(Rule("bad_range", times=10))
    be = backend(server.url, retry_limit=1)
    with pytest.raises(BackendError, match="Content-Range"):
        be.read(BLOB_ID, 100, 100)
    be.close()


def test_redirect_loop_is_an_error(server: Server) -> None:
    server.rules.append(Rule("loop", times=100))
    be = backend(server.url)
    with pytest.raises(BackendError, match="redirect"):
        be.read(BLOB_ID, 0, 10)
    assert server.count() <= 6 * 4
    be.close()


def test_connection_refused_is_a_backend_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = backend(f"http://127.0.0.1:{port}", retry_limit=1)
    with pytest.raises(BackendError):
        be.read(BLOB_ID, 0, 10)
    be.close()


def test_read_timeout(server: Server) -> None:
    gate = threading.Event()
    orig = server.handle

    def slow(h: http.server.BaseHTTPRequestHandler) -> None:
        gate.wait(5)
        orig(h)

    server.handle = slow  # type: ignore[method-assign]
    be = backend(server.url, timeout=1, retry_limit=1)
    t0 = time.monotonic()
    with pytest.raises(BackendError):
        be.read(BLOB_ID, 0, 10)
    gate.set()
    assert time.monotonic() - t0 < 4.5
    be.close()


def test_parse_content_range() -> None:
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range("bytes 5-5/*") == (5, 6, None)
    assert parse_content_range("items 0-1/2") is None
    assert parse_content_range("bytes x-1/2") is None
    assert parse_content_range(None) is None


# ------------------------------------------------------------------------ TLS


def test_tls_with_ca_file_wrong_name_and_skip_verify(tmp_path: Path) -> None:
    from registry import issue_cert, make_ca  # type: ignore[import-not-found]

    ca = make_ca(tmp_path)
    good = issue_cert(ca, tmp_path, "good", ["127.0.0.1"])
    s = Server(tls=good)
    try:
        be = backend(s.url, ca_cert_files=[str(ca.cert_pem)])
        assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
        be.close()
        be = backend(s.url)  # system CAs do not know our CA
        with pytest.raises(BackendError, match="TLS"):
            be.read(BLOB_ID, 0, 100)
        be.close()
        be = backend(s.url, skip_verify=True)
        assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
        be.close()
    finally:
        s.stop()
    wrong = issue_cert(ca, tmp_path, "wrong", ["registry.example"])
    s = Server(tls=wrong)
    try:
        be = backend(s.url, ca_cert_files=[str(ca.cert_pem)])
        with pytest.raises(BackendError, match="TLS"):
            be.read(BLOB_ID, 0, 100)
        be.close()
    finally:
        s.stop()


# ------------------------------------------------------------------------ Dragonfly proxy


class ForwardProxy:
    """A forward proxy (absolute-URI requests), like dfdaemon: forwards GET/HEAD to the
    origin and counts what it saw. ``fail`` makes it answer 500."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.fail = False
        self.ping_status = 200
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/server/ping":
                    return Server.reply(self, owner.ping_status, b"pong")
                owner.seen.append(self.path)
                if owner.fail or not self.path.startswith("http://"):
                    return Server.reply(self, 500, b"proxy failure")
                u = urlsplit(self.path)
                import http.client as hc

                c = hc.HTTPConnection(u.hostname, u.port, timeout=5)
                hdrs = {k: v for k, v in self.headers.items() if k.lower() == "range"}
                c.request(self.command, u.path, headers=hdrs)
                r = c.getresponse()
                body = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() in ("content-range", "content-length"):
                        self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                c.close()
                return None

            do_HEAD = do_GET

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.srv.handle_error = lambda *a: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def test_requests_go_through_a_healthy_proxy(server: Server) -> None:
    px = ForwardProxy()
    try:
        be = backend(server.url, proxy=ProxyConfig(url=px.url))
        assert be.read(BLOB_ID, 10, 1000) == BLOB[10:1010]
        assert px.seen == [f"{server.url}/blobs/{BLOB_ID}"]
        be.close()
    finally:
        px.stop()


def test_proxy_failure_falls_back_to_the_origin(server: Server) -> None:
    px = ForwardProxy()
    px.fail = True
    try:
        be = backend(server.url, proxy=ProxyConfig(url=px.url))
        assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
        assert len(px.seen) == 1 and server.count() == 1
        be.close()
        be = backend(server.url, proxy=ProxyConfig(url=px.url, fallback=False), retry_limit=1)
        with pytest.raises(BackendError, match="HTTP 500"):
            be.read(BLOB_ID, 0, 100)
        be.close()
    finally:
        px.stop()
    # a dead proxy (nothing listening)
    be = backend(server.url, proxy=ProxyConfig(url=px.url))
    assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
    be.close()


def test_unhealthy_proxy_is_skipped_until_its_ping_recovers(server: Server) -> None:
    px = ForwardProxy()
    px.ping_status = 503
    try:
        be = backend(
            server.url,
            proxy=ProxyConfig(url=px.url, ping_url=px.url + "/server/ping", check_interval=1),
        )
        proxy = be.http.proxy
        assert proxy is not None
        deadline = time.monotonic() + 5
        while proxy.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not proxy.healthy()
        assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
        assert px.seen == []  # went straight to the origin
        px.ping_status = 200
        deadline = time.monotonic() + 5
        while not proxy.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert be.read(BLOB_ID, 0, 100) == BLOB[:100]
        assert len(px.seen) == 1
        be.close()
    finally:
        px.stop()


def test_use_http_rewrites_https_for_the_proxy() -> None:
    px = ForwardProxy()
    origin = Server()
    try:
        port = origin.url.rsplit(":", 1)[1]
        client = HttpClient(HttpConfig(proxy=ProxyConfig(url=px.url, use_http=True)))
        data = client.get_range(f"https://127.0.0.1:{port}/blobs/{BLOB_ID}", 0, 10)
        assert data == BLOB[:10]
        assert px.seen == [f"http://127.0.0.1:{port}/blobs/{BLOB_ID}"]
        client.close()
    finally:
        px.stop()
        origin.stop()


def test_env_is_not_consulted_for_proxies(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    be = backend(server.url)
    assert be.read(BLOB_ID, 0, 10) == BLOB[:10]
    be.close()
    assert os.environ["http_proxy"]
