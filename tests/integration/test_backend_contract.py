"""One contract, every storage backend: localfs, registry (Debian's docker-registry), s3 (moto's
server, signed), oss (tests/fake_oss.py, signed) and http-proxy (a small range server).

Each backend must read a whole blob, ranges at its start, middle and end (one by one and many at
once), refuse ranges past the end with an error (never short or padded bytes), report a missing
blob as missing, and serve many threads at once with exact bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import random
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import registry as harness  # type: ignore[import-not-found]
from fake_oss import FakeOss
from moto_s3 import moto_server
from nydus.config import HttpProxyConfig, LocalFsConfig, OssConfig, RegistryConfig, S3Config
from nydus.errors import BackendError, NotFoundError, NydusError, RegistryNotFound
from nydus.storage.backend import BlobBackend
from nydus.storage.httpproxy import HttpProxyBackend
from nydus.storage.localfs import LocalFsBackend
from nydus.storage.objectstore import OssBackend, S3Backend
from nydus.storage.registry import RegistryBackend

registry_plain = harness.registry_plain

DATA = random.Random(13).randbytes(1_500_000)
BLOB_ID = hashlib.sha256(DATA).hexdigest()
MISSING = "00" * 32
PREFIX = "contract/"
BACKENDS = ["localfs", "registry", "s3", "oss", "http-proxy"]


class RangeServer:
    """Serves ``blobs`` at ``/<id>`` like nydus-backend-proxy: HEAD, GET, 206 or 416."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = blobs.get(self.path.strip("/"))
                if data is None:
                    return self.reply(404, b"no such blob")
                m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
                if m is None:
                    return self.reply(200, data)
                a, b = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
                if a >= len(data):
                    return self.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                self.reply(206, data[a : b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"})

            do_HEAD = do_GET

            def reply(self, status: int, body: bytes, hdrs: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (hdrs or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


@contextlib.contextmanager
def _open(kind: str, tmp: Path, request: pytest.FixtureRequest) -> Iterator[BlobBackend]:
    """The backend ``kind`` holding ``DATA`` as ``BLOB_ID`` (one retry, so errors come fast)."""
    conn: dict[str, Any] = {"retry_limit": 1, "timeout": 10}
    if kind == "localfs":
        (tmp / BLOB_ID).write_bytes(DATA)
        yield LocalFsBackend(LocalFsConfig(dir=str(tmp)), id="contract")
    elif kind == "registry":
        server = request.getfixturevalue("registry_plain")
        server.client().push_blob("contract/blobs", f"sha256:{BLOB_ID}", DATA)
        yield RegistryBackend(
            RegistryConfig(scheme=server.scheme, host=server.host, repo="contract/blobs", **conn),
            id="contract",
        )
    elif kind == "s3":
        with moto_server("contract") as m:
            m.s3().create_bucket(Bucket="contract")
            m.s3().put_object(Bucket="contract", Key=PREFIX + BLOB_ID, Body=DATA)
            yield S3Backend(
                S3Config(
                    scheme="http",
                    endpoint=m.endpoint,
                    region="us-east-1",
                    bucket_name="contract",
                    object_prefix=PREFIX,
                    access_key_id=m.key_id,
                    access_key_secret=m.secret,
                    **conn,
                ),
                id="contract",
            )
    elif kind == "oss":
        with FakeOss("contract", "ak", "sk") as oss:
            oss.objects[PREFIX + BLOB_ID] = DATA
            cfg = OssConfig(
                scheme="http",
                endpoint=f"oss.test:{oss.port}",
                bucket_name="contract",
                object_prefix=PREFIX,
                access_key_id="ak",
                access_key_secret="sk",
                **conn,
            )
            yield OssBackend(cfg, id="contract", resolve={"contract.oss.test": "127.0.0.1"})
    else:
        srv = RangeServer({BLOB_ID: DATA})
        try:
            yield HttpProxyBackend(HttpProxyConfig(addr=srv.url, **conn), id="contract")
        finally:
            srv.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobBackend]:
    with _open(request.param, tmp_path, request) as be:
        try:
            yield be
        finally:
            be.close()


def test_whole_blob(backend: BlobBackend) -> None:
    assert backend.blob_size(BLOB_ID) == len(DATA)
    assert backend.read(BLOB_ID, 0, len(DATA)) == DATA


def test_ranges_at_start_middle_end(backend: BlobBackend) -> None:
    n = len(DATA)
    ranges = [(0, 1), (0, 4096), (n // 2 - 7, 100_003), (n - 4096, 4096), (n - 1, 1)]
    for off, size in ranges:
        assert backend.read(BLOB_ID, off, size) == DATA[off : off + size], (off, size)
    assert backend.read_ranges(BLOB_ID, ranges) == [DATA[o : o + s] for o, s in ranges]
    assert backend.read(BLOB_ID, 100, 0) == b""


@pytest.mark.parametrize("off,size", [(len(DATA) - 10, 11), (len(DATA), 1), (len(DATA) + 5, 10)])
def test_out_of_range_is_an_error(backend: BlobBackend, off: int, size: int) -> None:
    with pytest.raises(NydusError):
        backend.read(BLOB_ID, off, size)
    assert backend.read(BLOB_ID, 0, 10) == DATA[:10]  # the backend is still usable


def _is_missing(e: NydusError) -> bool:
    return isinstance(e, NotFoundError | RegistryNotFound) or getattr(e, "status", 0) == 404


@pytest.mark.parametrize("op", ["size", "read"])
def test_missing_blob(backend: BlobBackend, op: str) -> None:
    call: Callable[[], object] = (
        (lambda: backend.blob_size(MISSING))
        if op == "size"
        else (lambda: backend.read(MISSING, 0, 10))
    )
    with pytest.raises(NydusError) as ei:
        call()
    assert _is_missing(ei.value), repr(ei.value)


def test_concurrent_reads(backend: BlobBackend) -> None:
    rnd = random.Random(5)
    jobs = []
    for _ in range(64):
        off = rnd.randrange(len(DATA))
        jobs.append((off, rnd.randint(1, min(200_000, len(DATA) - off))))

    def one(job: tuple[int, int]) -> bool:
        off, size = job
        return backend.read(BLOB_ID, off, size) == DATA[off : off + size]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(one, jobs))
    assert backend.metrics.export()["read_errors"] == 0


def test_errors_are_backend_errors(backend: BlobBackend) -> None:
    """Bad arguments are refused before any request."""
    with pytest.raises(BackendError):
        backend.read(BLOB_ID, -1, 10)
