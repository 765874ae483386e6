"""RegistryClient policy with a MockTransport: retries, ranges, redirects, digests, uploads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from nydus.errors import (
    BackendError,
    ConfigError,
    IntegrityError,
    RegistryAuthError,
    RegistryNotFound,
)
from nydus.format import oci
from nydus.http import ProxyTransport
from nydus.registry import (
    MockTransport,
    RegistryClient,
    RegistryHTTPError,
    Request,
    Response,
    TransportError,
)

BLOB = bytes(range(256)) * 40
DIGEST = oci.sha256_digest(BLOB)
BLOB_PATH = f"/v2/r/blobs/{DIGEST}"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def client(
    handler: Callable[[Request], Response], **kw: object
) -> tuple[RegistryClient, MockTransport, Clock]:
    clock = Clock()
    t = MockTransport(handler)
    opts: dict[str, object] = {
        "scheme": "https",
        "docker_config": None,
        "transport": t,
        "clock": clock,
        "sleep": clock.sleep,
        "retry_limit": 3,
    }
    opts.update(kw)
    return RegistryClient("reg.example", **opts), t, clock  # type: ignore[arg-type]


def ranged(req: Request, data: bytes = BLOB) -> Response:
    m = req.headers.get("Range", "")
    a, b = m[len("bytes=") :].split("-")
    s, e = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
    return Response.from_bytes(
        206, data[s : e + 1], {"Content-Range": f"bytes {s}-{e}/{len(data)}"}
    )


def test_retry_after_and_backoff() -> None:
    answers = [
        Response.from_bytes(429, b"", {"Retry-After": "7"}),
        Response.from_bytes(503, b"", {"Retry-After": "999"}),
        Response.from_bytes(500),
    ]
    c, _t, clock = client(lambda r: answers.pop(0) if answers else ranged(r), max_retry_after=30)
    assert c.get_blob_range("r", DIGEST, 0, 10) == BLOB[:10]
    assert clock.sleeps[:2] == [7, 30]
    assert 0 < clock.sleeps[2] <= 0.2 * 4  # exponential backoff with jitter
    assert c.stats.retries == 3


def test_statuses_exhaust_and_post_not_retried() -> None:
    c, t, _ = client(lambda r: Response.from_bytes(502, b'{"errors":[{"code":"X","message":"m"}]}'))
    with pytest.raises(RegistryHTTPError, match=r"HTTP 502 \(X: m\).*4 attempts") as ei:
        c.get_manifest("r", "v1")
    assert ei.value.status == 502 and len(t.requests) == 4
    c, t, _ = client(lambda r: Response.from_bytes(500))
    with pytest.raises(RegistryHTTPError):
        c.mount_blob("r", DIGEST, "other")
    assert len(t.requests) == 1
    c, t, _ = client(lambda r: Response.from_bytes(403, b"denied"))
    with pytest.raises(RegistryAuthError, match="access denied"):
        c.get_blob_range("r", DIGEST, 0, 1)
    c, t, _ = client(lambda r: Response.from_bytes(404))
    with pytest.raises(RegistryNotFound):
        c.list_tags("r")
    assert not c.has_blob("r", DIGEST)


def test_range_answers_checked() -> None:
    def bad_cr(r: Request) -> Response:
        return Response.from_bytes(206, BLOB[1:11], {"Content-Range": f"bytes 1-10/{len(BLOB)}"})

    c, t, _ = client(bad_cr, retry_limit=1)
    with pytest.raises(TransportError, match="Content-Range"):
        c.get_blob_range("r", DIGEST, 0, 10)
    assert len(t.requests) == 2

    def wrong_len(r: Request) -> Response:
        return Response.from_bytes(206, BLOB[:9], {"Content-Range": f"bytes 0-9/{len(BLOB)}"})

    c, t, _ = client(wrong_len, retry_limit=0)
    with pytest.raises(TransportError):
        c.get_blob_range("r", DIGEST, 0, 10)

    c, t, _ = client(lambda r: Response.from_bytes(200, BLOB))  # Range ignored
    assert c.get_blob_range("r", DIGEST, 100, 300) == BLOB[100:300]
    assert c.stats.range_ignored == 1
    with pytest.raises(BackendError, match="beyond the end"):
        c.get_blob_range("r", DIGEST, 100, len(BLOB) + 1)

    c, t, _ = client(ranged)
    n = len(BLOB)
    with pytest.raises(BackendError, match="beyond the end"):
        c.get_blob_range("r", DIGEST, n - 5, n + 5)  # the server clips: that is not retried
    assert len(t.requests) == 1
    assert c.get_blob_ranges("r", DIGEST, [(0, 5), (n - 5, n)]) == [BLOB[:5], BLOB[-5:]]
    assert c.get_blob_range("r", DIGEST, 5, 5) == b""
    for bad in ((-1, 3), (5, 4)):
        with pytest.raises(ConfigError):
            c.get_blob_range("r", DIGEST, *bad)
    with pytest.raises(ConfigError):
        c.blob_size("r", "sha256:nothex")


def test_redirects_auth_and_cache() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(r: Request) -> Response:
        seen.append((r.url, r.headers.get("Authorization")))
        u = urlsplit(r.url)
        if u.netloc == "reg.example" and u.path == BLOB_PATH:
            return Response.from_bytes(307, b"", {"Location": "/same-host/blob"})
        if u.path == "/same-host/blob":
            return Response.from_bytes(302, b"", {"Location": "https://s3.example/b?sig=1"})
        if u.netloc == "s3.example":
            return ranged(r)
        return Response.from_bytes(404)

    c, _t, clock = client(handler, registry_token="tok", redirect_cache_ttl=10)
    assert c.get_blob_range("r", DIGEST, 0, 4) == BLOB[:4]
    assert seen == [
        (f"https://reg.example{BLOB_PATH}", "Bearer tok"),
        ("https://reg.example/same-host/blob", "Bearer tok"),
        ("https://s3.example/b?sig=1", None),
    ]
    seen.clear()
    assert c.get_blob_range("r", DIGEST, 4, 8) == BLOB[4:8]
    assert seen == [("https://s3.example/b?sig=1", None)]  # cached
    clock.now += 11
    seen.clear()
    c.get_blob_range("r", DIGEST, 0, 1)
    assert len(seen) == 3  # expired: through the registry again


def test_cached_redirect_failure_falls_back() -> None:
    state = {"expired": False}

    def handler(r: Request) -> Response:
        u = urlsplit(r.url)
        if u.netloc == "reg.example":
            return Response.from_bytes(307, b"", {"Location": f"https://s3.example/{len(r.url)}"})
        if state["expired"]:
            state["expired"] = False
            return Response.from_bytes(403, b"expired")
        return ranged(r)

    c, t, _ = client(handler)
    c.get_blob_range("r", DIGEST, 0, 1)
    state["expired"] = True
    assert c.get_blob_range("r", DIGEST, 1, 2) == BLOB[1:2]
    assert [urlsplit(r.url).netloc for r in t.requests] == [
        "reg.example",
        "s3.example",
        "s3.example",
        "reg.example",
        "s3.example",
    ]


def test_redirect_loops_and_limits() -> None:
    def loop(r: Request) -> Response:
        nxt = "/b" if r.url.endswith("/a") else "/a"
        return Response.from_bytes(302, b"", {"Location": nxt})

    c, t, _ = client(loop)
    with pytest.raises(BackendError, match="redirect loop"):
        c.get_blob_range("r", DIGEST, 0, 1)
    assert len(t.requests) == 3

    def endless(r: Request) -> Response:
        return Response.from_bytes(302, b"", {"Location": r.url + "x"})

    c, t, _ = client(endless)
    with pytest.raises(BackendError, match="more than 10 redirects"):
        c.blob_size("r", DIGEST)


def test_manifest_digests_checked() -> None:
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST, "layers": []}
    ).encode()
    good = oci.sha256_digest(body)
    header = {"Content-Type": oci.MEDIA_TYPE_OCI_MANIFEST, "Docker-Content-Digest": good}
    c, t, _ = client(lambda r: Response.from_bytes(200, body, header))
    assert c.get_manifest("r", "v1") == (body, oci.MEDIA_TYPE_OCI_MANIFEST, good)
    assert c.get_manifest("r", good)[2] == good
    assert t.requests[0].headers["Accept"].startswith(oci.MEDIA_TYPE_OCI_INDEX)
    with pytest.raises(IntegrityError):
        c.get_manifest("r", oci.sha256_digest(b"other"))
    lying = {**header, "Docker-Content-Digest": oci.sha256_digest(b"x")}
    c, t, _ = client(lambda r: Response.from_bytes(200, body, lying))
    with pytest.raises(IntegrityError):
        c.get_manifest("r", "v1")
    c, t, _ = client(lambda r: Response.from_bytes(200, b"<html>", {"Content-Type": "text/html"}))
    assert c.get_manifest("r", "v1")[1] == "text/html"  # the registry's word, unchecked
    c, t, _ = client(lambda r: Response.from_bytes(200, b"x" * (9 << 20)))
    with pytest.raises(TransportError, match="limit"):
        c.get_manifest("r", "v1")


class FakeUploads:
    """Just enough of the upload protocol to check what the client sends."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}
        self.blobs: dict[str, bytes] = {}
        self.log: list[str] = []

    def __call__(self, r: Request) -> Response:
        u = urlsplit(r.url)
        self.log.append(f"{r.method} {u.path}")
        if r.method == "HEAD":
            d = u.path.rsplit("/", 1)[1]
            return Response.from_bytes(200 if d in self.blobs else 404)
        if r.method == "POST":
            uid = str(len(self.data))
            self.data[uid] = bytearray()
            return Response.from_bytes(202, b"", {"Location": f"/up/{uid}?_state=s"})
        uid = u.path.rsplit("/", 1)[1]
        buf = self.data[uid]
        if r.method == "PATCH":
            start, end = (int(x) for x in r.headers["Content-Range"].split("-"))
            assert start == len(buf) and end - start + 1 == len(r.body_bytes())
            buf += r.body_bytes()
            return Response.from_bytes(
                202, b"", {"Location": f"/up/{uid}?_state=t", "Range": f"0-{len(buf) - 1}"}
            )
        if r.method == "PUT":
            buf += r.body_bytes()
            digest = parse_qs(u.query)["digest"][0]
            if oci.sha256_digest(bytes(buf)) != digest:
                return Response.from_bytes(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            self.blobs[digest] = bytes(buf)
            return Response.from_bytes(201, b"", {"Docker-Content-Digest": digest})
        return Response.from_bytes(405)


def test_uploads_monolithic_and_chunked() -> None:
    fake = FakeUploads()
    c, _t, _ = client(fake, chunk_size=1000, monolithic_max=5000)
    small = BLOB[:4000]
    assert c.push_blob("r", oci.sha256_digest(small), small)
    assert fake.log == [
        f"HEAD /v2/r/blobs/{oci.sha256_digest(small)}",
        "POST /v2/r/blobs/uploads/",
        "PUT /up/0",
    ]
    fake.log.clear()
    assert c.push_blob("r", DIGEST, iter([BLOB[:3333], BLOB[3333:]]))  # unknown size: chunked
    assert fake.blobs[DIGEST] == BLOB
    assert fake.log.count("PATCH /up/1") == len(BLOB) // 1000 + 1
    assert not c.push_blob("r", DIGEST, BLOB)  # exists
    with pytest.raises(IntegrityError, match="size given"):
        c.push_blob("r", DIGEST, BLOB, size=3)
    other = hashlib.sha256(b"x").hexdigest()
    n_before = len(fake.log)
    with pytest.raises(IntegrityError, match="digest"):
        c.push_blob("r", f"sha256:{other}", iter([BLOB]))
    assert not any(line.startswith("PUT") for line in fake.log[n_before:])  # never finished


def test_bearer_flow_through_client() -> None:
    calls: list[str] = []

    def handler(r: Request) -> Response:
        u = urlsplit(r.url)
        calls.append(f"{r.method} {u.netloc}{u.path} {r.headers.get('Authorization')}")
        if u.netloc == "auth.example":
            return Response.from_bytes(200, b'{"token": "T", "expires_in": 300}')
        if r.headers.get("Authorization") != "Bearer T":
            return Response.from_bytes(
                401, b"", {"WWW-Authenticate": 'Bearer realm="https://auth.example/t",service="s"'}
            )
        return (
            Response.from_bytes(200, b"", {"Content-Length": "5"})
            if r.method == "HEAD"
            else ranged(r)
        )

    c, _t, _ = client(handler, auth="dTpw")  # u:p
    assert c.blob_size("r", DIGEST) == 5
    assert c.get_blob_range("r", DIGEST, 0, 3) == BLOB[:3]
    assert calls[0].endswith(" None") and calls[1].startswith("POST auth.example/t")
    assert calls[2].endswith("Bearer T") and len(calls) == 4


def test_fallback_proxy_transport() -> None:
    clock = Clock()
    proxy_ok = {"v": False}
    hits: list[str] = []

    def proxied(r: Request) -> Response:
        hits.append("proxy")
        if not proxy_ok["v"]:
            raise TransportError("proxy down")
        return Response.from_bytes(200, b"p")

    def direct(r: Request) -> Response:
        hits.append("ping" if r.url == "http://proxy/ping" else "direct")
        return Response.from_bytes(200 if proxy_ok["v"] else 503, b"d")

    ft = ProxyTransport(
        MockTransport(proxied),
        MockTransport(direct),
        ping_url="http://proxy/ping",
        check_interval=5,
        clock=clock,
    )
    assert ft.handle(Request("GET", "http://x/")).read() == b"d"
    assert ft.handle(Request("GET", "http://x/")).read() == b"d"
    assert hits == ["proxy", "direct", "direct"]  # proxy marked down: not tried again yet
    proxy_ok["v"] = True
    clock.now += 6
    hits.clear()
    assert ft.handle(Request("GET", "http://x/")).read() == b"p"
    assert hits == ["ping", "proxy"]
    nofb = ProxyTransport(MockTransport(proxied), MockTransport(direct), fallback=False)
    proxy_ok["v"] = False
    with pytest.raises(TransportError):
        nofb.handle(Request("GET", "http://x/"))


def test_bad_arguments() -> None:
    for kw in ({"scheme": "ftp"}, {"retry_limit": -1}):
        with pytest.raises(ConfigError):
            RegistryClient("h", docker_config=None, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RegistryClient("h/path", docker_config=None)
    with pytest.raises(ConfigError):
        RegistryClient("h", auth="not base64!", docker_config=None)
    with pytest.raises(ConfigError, match="CA certificate"):
        RegistryClient("h", ca_cert_files=["/nonexistent/ca.pem"], docker_config=None)
    c = RegistryClient("http://127.0.0.1:1", docker_config=None)
    assert c.scheme == "http" and c.host == "127.0.0.1:1"
    assert RegistryClient("docker.io", docker_config=None).host == "registry-1.docker.io"
    with pytest.raises(ConfigError):
        c.get_manifest("../etc", "v1")


def test_upload_with_known_digest_is_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nydusify hashes a blob as it writes it: ``digest_known`` sends the file without reading
    it through sha256 again; the size is still checked, and a wrong digest is refused by the
    registry's check on the final PUT."""
    fake = FakeUploads()
    c, _t, _ = client(fake, chunk_size=1000, monolithic_max=5000)
    hashed: list[int] = []
    real_new = oci.hashlib.new  # the upload's check (oci.BlobCheck) hashes

    class Counting:
        def __init__(self, algo: str) -> None:
            self.h = real_new(algo)
            self.name = self.h.name

        def update(self, b: bytes) -> None:
            hashed.append(len(b))
            self.h.update(b)

        def hexdigest(self) -> str:
            return self.h.hexdigest()

    monkeypatch.setattr(oci.hashlib, "new", Counting)
    path = tmp_path / "blob"
    path.write_bytes(BLOB)
    assert c.push_blob("r", DIGEST, str(path), len(BLOB), digest_known=True)  # chunked
    assert fake.blobs[DIGEST] == BLOB and hashed == []
    small = tmp_path / "small"
    small.write_bytes(BLOB[:4000])
    sd = oci.sha256_digest(BLOB[:4000])
    assert c.push_blob("r", sd, str(small), 4000, digest_known=True)  # monolithic
    assert fake.blobs[sd] == BLOB[:4000] and hashed == []
    # the default still hashes (the fake registry is one store: no check that it exists)
    assert c.push_blob("r", DIGEST, str(path), len(BLOB), check_exists=False)
    assert sum(hashed) == len(BLOB)
    with pytest.raises(IntegrityError, match="size given"):
        c.push_blob("r", DIGEST, str(path), 3, digest_known=True, check_exists=False)
    wrong = "sha256:" + hashlib.sha256(b"x").hexdigest()
    with pytest.raises(RegistryHTTPError):
        c.push_blob("r", wrong, str(small), 4000, digest_known=True)
    assert wrong not in fake.blobs
