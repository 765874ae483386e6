"""nydusify's blob stores: localfs and an OSS server faked here (virtual-host addressing, the
header signature checked from the OSS spec on every request), read back through the storage
layer's OSS backend to prove both sides use the same object keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydus.config import LocalFsConfig, OssConfig
from nydus.convert.store import LocalFsStore, ObjectStore, make_store
from nydus.errors import BackendError, ConfigError
from nydus.storage.objectstore import OssBackend

AK, SK, BUCKET, PREFIX = "ak-id", "sk-secret", "bkt", "nydus/"


class FakeOss:
    """PUT/HEAD/GET of objects in one bucket, each request's signature verified."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.bad: list[str] = []
        self.puts = 0
        owner = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _ok(self) -> bool:
                key = self.path.lstrip("/")
                h = {k.lower(): v for k, v in self.headers.items()}
                oss = "".join(f"{k}:{v.strip()}\n" for k, v in sorted(h.items())
                              if k.startswith("x-oss-"))
                text = (f"{self.command}\n{h.get('content-md5', '')}\n"
                        f"{h.get('content-type', '')}\n{h.get('date', '')}\n{oss}"
                        f"/{BUCKET}/{key}")
                mac = base64.b64encode(hmac.new(SK.encode(), text.encode(),
                                                hashlib.sha1).digest()).decode()
                ok = (h.get("authorization") == f"OSS {AK}:{mac}"
                      and h.get("host", "").startswith(f"{BUCKET}."))
                if not ok:
                    owner.bad.append(f"{self.command} {self.path} {h.get('host')}")
                    self._send(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
                return ok

            def _send(self, status: int, body: bytes, extra: dict[str, str] | None = None,
                      length: int | None = None) -> None:
                self.send_response(status)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_PUT(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                if self._ok():
                    owner.objects[self.path.lstrip("/")] = body
                    owner.puts += 1
                    self._send(200, b"")

            def do_GET(self) -> None:
                if not self._ok():
                    return
                data = owner.objects.get(self.path.lstrip("/"))
                if data is None:
                    self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
                    return
                rng = self.headers.get("Range")
                if rng and self.command == "GET":
                    a, b = rng.removeprefix("bytes=").split("-")
                    self._send(206, data[int(a): int(b) + 1],
                               {"Content-Range": f"bytes {a}-{b}/{len(data)}"})
                    return
                self._send(200, data, length=len(data))

            do_HEAD = do_GET

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def oss() -> Iterator[FakeOss]:
    s = FakeOss()
    yield s
    s.stop()


def test_oss_store_put_skip_and_read_back(oss: FakeOss, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    endpoint = f"oss.test:{oss.port}"
    cfg = OssConfig(scheme="http", endpoint=endpoint, bucket_name=BUCKET, object_prefix=PREFIX,
                    access_key_id=AK, access_key_secret=SK)
    resolve = {f"{BUCKET}.oss.test": "127.0.0.1"}
    store = ObjectStore("oss", cfg, resolve)
    assert not store.has(digest)
    assert store.push_file(digest, str(blob)) is True
    assert store.has(digest)
    assert store.push_file(digest, str(blob)) is False  # already there
    assert store.push_file(digest, str(blob), force=True) is True
    assert oss.puts == 2 and oss.bad == []
    assert list(oss.objects) == [PREFIX + digest[7:]]
    be = OssBackend(cfg, resolve=resolve)
    try:
        assert be.read(digest[7:], 1000, 5000) == data[1000:6000]
    finally:
        be.close()
    wrong = ObjectStore("oss", OssConfig(**{**cfg.__dict__, "access_key_secret": "nope"}),
                        resolve)
    with pytest.raises(BackendError, match="403"):
        wrong.push_file(digest, str(blob))


def test_localfs_store(tmp_path: Path) -> None:
    data = b"blob data" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    src = tmp_path / "src"
    src.write_bytes(data)
    store = make_store(None, _localfs(tmp_path / "dir"))  # type: ignore[arg-type]
    assert isinstance(store, LocalFsStore) and not store.in_manifest
    assert not store.has(digest)
    assert store.push_file(digest, str(src)) is True
    assert (tmp_path / "dir" / digest[7:]).read_bytes() == data
    assert store.push_file(digest, str(src)) is False
    assert [p.name for p in (tmp_path / "dir").iterdir()] == [digest[7:]]  # no temp left
    with pytest.raises(ConfigError):
        LocalFsStore(LocalFsConfig(blob_file="/x"))


def _localfs(d: Path) -> Any:
    from nydus.convert.store import parse_backend_config

    return parse_backend_config("localfs", {"dir": str(d)})
