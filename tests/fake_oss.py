"""A fake Alibaba Cloud OSS server for tests: one bucket, kept in memory, on loopback.

Addressing is virtual-host style, as OSS wants: the ``Host`` header must be
``<bucket>.<endpoint>`` (tests map that name to 127.0.0.1 with the backends' ``resolve``), and
the object key is the path. Every request's header signature is checked from the OSS spec::

    Authorization: OSS <id>:base64(hmac-sha1(secret,
        VERB\\nContent-MD5\\nContent-Type\\nDate\\n<x-oss-* headers, sorted>/<bucket>/<key>))

``PUT`` stores an object; ``HEAD`` and ``GET`` (with ``Range: bytes=a-b``) serve it. A request
with a wrong signature or host answers 403 ``SignatureDoesNotMatch`` and is listed in ``bad``;
a missing object answers 404 ``NoSuchKey``.

Use it as a context manager (or call :meth:`FakeOss.stop`); ``tests/`` is on ``sys.path``, so
tests ``from fake_oss import FakeOss``. The server's threads share ``objects`` under a lock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import threading
from typing import Any

__all__ = ["FakeOss"]


class FakeOss:
    """``PUT``/``HEAD``/``GET`` of the objects of bucket ``bucket``, each request signed with
    ``access_key_id``/``secret``. ``objects`` (key to bytes) may be filled up front."""

    def __init__(
        self,
        bucket: str,
        access_key_id: str,
        secret: str,
        objects: dict[str, bytes] | None = None,
    ) -> None:
        self.bucket = bucket
        self.objects: dict[str, bytes] = dict(objects or {})
        self.bad: list[str] = []  # requests refused: "<verb> <path> <host>"
        self.puts = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _signed(self) -> bool:
                key = self.path.lstrip("/")
                h = {k.lower(): v for k, v in self.headers.items()}
                oss = "".join(
                    f"{k}:{v.strip()}\n" for k, v in sorted(h.items()) if k.startswith("x-oss-")
                )
                text = (
                    f"{self.command}\n{h.get('content-md5', '')}\n"
                    f"{h.get('content-type', '')}\n{h.get('date', '')}\n{oss}/{bucket}/{key}"
                )
                mac = hmac.new(secret.encode(), text.encode(), hashlib.sha1).digest()
                ok = h.get("authorization") == (
                    f"OSS {access_key_id}:{base64.b64encode(mac).decode()}"
                ) and h.get("host", "").startswith(f"{bucket}.")
                if not ok:
                    with owner._lock:
                        owner.bad.append(f"{self.command} {self.path} {h.get('host')}")
                    self._send(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
                return ok

            def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self._signed():
                    with owner._lock:
                        owner.objects[self.path.lstrip("/")] = body
                        owner.puts += 1
                    self._send(200, b"")

            def do_GET(self) -> None:
                if not self._signed():
                    return
                with owner._lock:
                    data = owner.objects.get(self.path.lstrip("/"))
                if data is None:
                    self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
                    return
                rng = self.headers.get("Range")
                if rng and self.command == "GET":
                    a, b = rng.removeprefix("bytes=").split("-")
                    self._send(
                        206,
                        data[int(a) : int(b) + 1],
                        {"Content-Range": f"bytes {a}-{b}/{len(data)}"},
                    )
                    return
                self._send(200, data)

            do_HEAD = do_GET

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.port: int = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()

    def __enter__(self) -> FakeOss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
