"""RegistryClient against Debian's docker-registry (4 variants), skopeo, and a fault proxy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import registry as harness
from nydus.config import ProxyConfig
from nydus.errors import BackendError, IntegrityError, RegistryAuthError, RegistryNotFound
from nydus.format import oci
from nydus.registry import RegistryClient, RegistryHTTPError, TLSError, TransportError
from registry import (
    SERVICE,
    USER,
    CertPair,
    Fault,
    FaultProxy,
    RegistryServer,
    basic_auth,
    free_port,
    issue_cert,
    make_manifest,
    os_env_without_proxy,
    push_image,
    random_blob,
    write_oci_layout,
)

# The harness's pytest fixtures, made visible to this module.
fault_proxy = harness.fault_proxy
registry_any = harness.registry_any
registry_basic = harness.registry_basic
registry_plain = harness.registry_plain
registry_tls = harness.registry_tls
registry_token = harness.registry_token
test_ca = harness.test_ca

BLOB = random_blob(1_500_000, seed=7)
BLOB_DIGEST = oci.sha256_digest(BLOB)
SMALL = random_blob(20_000, seed=8)


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (scripts/setup.sh installs it)")
    return subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=60, env=os_env_without_proxy()
    )


@pytest.fixture(scope="module")
def seeded(registry_plain: RegistryServer) -> RegistryServer:
    """registry_plain with ``fault/img:v1`` = [BLOB, SMALL]."""
    with registry_plain.client() as c:
        push_image(c, "fault/img", "v1", [BLOB, SMALL])
    return registry_plain


# --- round trips on every variant ---------------------------------------------------------


def test_push_read_back_and_skopeo(registry_any: RegistryServer) -> None:
    repo = f"rt/{registry_any.kind}"
    with registry_any.client(chunk_size=256 << 10, monolithic_max=512 << 10) as c:
        c.ping()
        digest, manifest = push_image(c, repo, "v1", [BLOB, SMALL])  # BLOB: chunked PATCHes
        assert c.stats.uploaded_bytes >= len(BLOB) + len(SMALL)
        assert not c.push_blob(repo, BLOB_DIGEST, BLOB)  # already there: skipped
        body, mt, dg = c.get_manifest(repo, "v1")
        assert (body, mt, dg) == (manifest, oci.MEDIA_TYPE_OCI_MANIFEST, digest)
        assert c.get_manifest(repo, digest)[0] == manifest
        desc = c.head_manifest(repo, "v1")
        assert (desc.digest, desc.size, desc.media_type) == (digest, len(manifest), mt)
        assert c.blob_size(repo, BLOB_DIGEST) == len(BLOB)
        assert c.has_blob(repo, BLOB_DIGEST)
        assert not c.has_blob(repo, oci.sha256_digest(b"nope"))
        assert c.get_blob_range(repo, BLOB_DIGEST, 0, 1) == BLOB[:1]
        assert c.get_blob_range(repo, BLOB_DIGEST, 1000, 70_000) == BLOB[1000:70_000]
        tail = len(BLOB) - 10
        assert c.get_blob_range(repo, BLOB_DIGEST, tail, len(BLOB)) == BLOB[tail:]
        ranges = [(i * 37_000, i * 37_000 + 4096) for i in range(30)]
        assert c.get_blob_ranges(repo, BLOB_DIGEST, ranges) == [BLOB[s:e] for s, e in ranges]
        assert b"".join(c.get_blob_stream(repo, BLOB_DIGEST, chunk_size=100_000)) == BLOB
        assert c.list_tags(repo) == ["v1"]
        with pytest.raises(BackendError, match="beyond the end"):
            c.get_blob_range(repo, BLOB_DIGEST, tail, len(BLOB) + 5)
    proc = skopeo("inspect", *registry_any.skopeo_args(), f"docker://{registry_any.host}/{repo}:v1")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["Digest"] == digest
    assert info["Layers"] == [BLOB_DIGEST, oci.sha256_digest(SMALL)]


def test_read_image_pushed_by_skopeo(registry_any: RegistryServer, tmp_path: Path) -> None:
    layer = random_blob(300_000, seed=registry_any.kind.__len__())
    digest = write_oci_layout(tmp_path / "layout", "t1", [layer])
    dest_flags = [a.replace("--", "--dest-", 1) for a in registry_any.skopeo_args()]
    proc = skopeo(
        "copy",
        "--insecure-policy",
        "--preserve-digests",
        *dest_flags,
        f"oci:{tmp_path / 'layout'}:t1",
        f"docker://{registry_any.host}/skopeo/{registry_any.kind}:t1",
    )
    assert proc.returncode == 0, proc.stderr
    with registry_any.client() as c:
        body, mt, dg = c.get_manifest(f"skopeo/{registry_any.kind}", "t1")
        assert dg == digest and mt == oci.MEDIA_TYPE_OCI_MANIFEST
        layer_desc = json.loads(body)["layers"][0]
        got = c.get_blob(f"skopeo/{registry_any.kind}", layer_desc["digest"])
        assert got == layer


def test_docker_manifest_and_indexes(registry_plain: RegistryServer) -> None:
    with registry_plain.client() as c:
        d_digest, d_body = push_image(c, "mt/img", "docker", [SMALL], docker=True)
        body, mt, dg = c.get_manifest("mt/img", "docker")
        assert mt == oci.MEDIA_TYPE_DOCKER_MANIFEST and dg == d_digest
        for index_mt, child_mt in (
            (oci.MEDIA_TYPE_OCI_INDEX, oci.MEDIA_TYPE_DOCKER_MANIFEST),
            (oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST, oci.MEDIA_TYPE_DOCKER_MANIFEST),
        ):
            index = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": index_mt,
                    "manifests": [
                        {
                            "mediaType": child_mt,
                            "digest": d_digest,
                            "size": len(d_body),
                            "platform": {"architecture": "amd64", "os": "linux"},
                        }
                    ],
                }
            ).encode()
            tag = "list" if "docker" in index_mt else "index"
            idx_digest = c.put_manifest("mt/img", tag, index, index_mt)
            body, mt, dg = c.get_manifest("mt/img", tag)
            assert (body, mt, dg) == (index, index_mt, idx_digest)
            assert oci.is_index(mt)
        assert sorted(c.list_tags("mt/img", page_size=1)) == ["docker", "index", "list"]
        with pytest.raises(RegistryNotFound):
            c.get_manifest("mt/img", "missing")
        with pytest.raises(RegistryNotFound):
            c.blob_size("mt/img", oci.sha256_digest(b"missing"))


def test_mount_and_mount_fallback(
    registry_token: RegistryServer, registry_plain: RegistryServer
) -> None:
    with registry_token.client() as c:
        push_image(c, "mount/src", "v1", [SMALL])
        assert c.mount_blob("mount/dst", oci.sha256_digest(SMALL), "mount/src") is True
        assert c.get_blob("mount/dst", oci.sha256_digest(SMALL)) == SMALL
    proxy = FaultProxy(registry_plain)
    try:
        with proxy.client() as c:
            push_image(c, "mount/src", "v1", [BLOB])
            proxy.add(Fault("strip_query", method="POST", path=r"mount="))
            assert c.mount_blob("mount/copy", BLOB_DIGEST, "mount/src") is False
            assert c.get_blob("mount/copy", BLOB_DIGEST) == BLOB
    finally:
        proxy.stop()


def test_blob_corrupted_in_registry_storage(registry_plain: RegistryServer) -> None:
    blob = random_blob(50_000, seed=99)
    digest = oci.sha256_digest(blob)
    with registry_plain.client() as c:
        c.push_blob("corrupt/img", digest, blob)
        path = registry_plain.blob_path(digest)
        data = bytearray(path.read_bytes())
        data[1234] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(IntegrityError):
            b"".join(c.get_blob_stream("corrupt/img", digest))
        assert c.get_blob_range("corrupt/img", digest, 1234, 1235) != blob[1234:1235]


def test_push_rejects_wrong_digest_and_size(registry_plain: RegistryServer, tmp_path: Path) -> None:
    with registry_plain.client(chunk_size=64 << 10, monolithic_max=100 << 10) as c:
        with pytest.raises(IntegrityError):
            c.push_blob("bad/img", oci.sha256_digest(b"other"), SMALL)
        f = tmp_path / "blob"
        f.write_bytes(BLOB)
        with pytest.raises(IntegrityError):
            c.push_blob("bad/img", oci.sha256_digest(b"other"), f)
        assert not c.has_blob("bad/img", oci.sha256_digest(b"other"))
        with f.open("rb") as fh:  # a file object, chunked, then an iterable of unknown size
            assert c.push_blob("bad/img", BLOB_DIGEST, fh)
        it = (BLOB[i : i + 10_000] for i in range(0, len(BLOB), 10_000))
        assert c.push_blob("bad/img2", BLOB_DIGEST, it)
        assert c.get_blob("bad/img2", BLOB_DIGEST) == BLOB


# --- auth ---------------------------------------------------------------------------------


def test_basic_auth_errors(registry_basic: RegistryServer) -> None:
    with (
        registry_basic.client(auth=None) as c,
        pytest.raises(RegistryAuthError, match="none were configured"),
    ):
        c.ping()
    with (
        registry_basic.client(auth=basic_auth(USER, "wrong")) as c,
        pytest.raises(RegistryAuthError, match="unauthorized"),
    ):
        c.ping()


def test_token_flows(registry_token: RegistryServer, tmp_path: Path) -> None:
    ts = registry_token.token_server
    assert ts is not None
    with registry_token.client() as c:
        push_image(c, "tok/img", "v1", [SMALL])
    before = (ts.posts, ts.gets)
    with registry_token.client() as c:  # POST with grant_type=password
        assert c.get_blob("tok/img", oci.sha256_digest(SMALL)) == SMALL
        assert (ts.posts - before[0], ts.gets - before[1]) == (1, 0)
        for _ in range(5):  # cached token, no new fetches
            c.get_blob_range("tok/img", oci.sha256_digest(SMALL), 0, 10)
        assert ts.posts - before[0] == 1
    ts.post_enabled = False
    try:
        before = (ts.posts, ts.gets)
        with registry_token.client() as c:  # POST refused: GET fallback with Basic
            assert c.get_blob("tok/img", oci.sha256_digest(SMALL)) == SMALL
        assert (ts.posts - before[0], ts.gets - before[1]) == (1, 1)
    finally:
        ts.post_enabled = True
    # wrong password: both POST and GET refused
    with (
        registry_token.client(auth=basic_auth(USER, "nope")) as c,
        pytest.raises(RegistryAuthError, match="refused credentials"),
    ):
        c.get_manifest("tok/img", "v1")
    # no credentials and no anonymous access
    with registry_token.client(auth=None) as c, pytest.raises(RegistryAuthError):
        c.get_manifest("tok/img", "v1")
    # anonymous pull allowed: reads work, pushes do not
    ts.anonymous_pull = True
    try:
        with registry_token.client(auth=None) as c:
            assert c.get_manifest("tok/img", "v1")[1] == oci.MEDIA_TYPE_OCI_MANIFEST
            with pytest.raises(RegistryAuthError):
                c.push_blob("tok/img", oci.sha256_digest(b"x"), b"x")
    finally:
        ts.anonymous_pull = False
    # a bearer token given as registry_token
    tok = ts.sign(USER, SERVICE, [{"type": "repository", "name": "tok/img", "actions": ["pull"]}])
    with registry_token.client(auth=None, registry_token=tok) as c:
        assert c.get_manifest("tok/img", "v1")[1] == oci.MEDIA_TYPE_OCI_MANIFEST
    # docker config: auths[host].auth, then identitytoken (refresh_token grant)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {f"http://{registry_token.host}": {"auth": basic_auth()}}}))
    with registry_token.client(auth=None, docker_config=str(cfg)) as c:
        assert c.get_manifest("tok/img", "v1")[1] == oci.MEDIA_TYPE_OCI_MANIFEST
    ts.refresh_tokens["idtok-123"] = USER
    cfg.write_text(json.dumps({"auths": {registry_token.host: {"identitytoken": "idtok-123"}}}))
    with registry_token.client(auth=None, docker_config=str(cfg)) as c:
        digest = oci.sha256_digest(b"pushed with an identity token")
        assert c.push_blob("tok/img", digest, b"pushed with an identity token")


def test_token_expired_401_refetch(registry_token: RegistryServer) -> None:
    ts = registry_token.token_server
    assert ts is not None
    with registry_token.client() as c:
        push_image(c, "tok/exp", "v1", [SMALL])
    proxy = FaultProxy(registry_token)
    try:
        with proxy.client() as c:
            digest = oci.sha256_digest(SMALL)
            assert c.get_blob_range("tok/exp", digest, 0, 100) == SMALL[:100]
            assert proxy.blob_bytes(digest) == 100
            issued = ts.issued
            challenge = (
                f'Bearer realm="{ts.realm}",service="{SERVICE}",'
                f'scope="repository:tok/exp:pull",error="invalid_token"'
            )
            proxy.add(
                Fault("status", status=401, path="/blobs/", headers={"WWW-Authenticate": challenge})
            )
            assert c.get_blob_range("tok/exp", digest, 100, 200) == SMALL[100:200]
            assert ts.issued == issued + 1  # the rejected token was replaced once
            proxy.add(
                Fault(
                    "status",
                    status=401,
                    path="/blobs/",
                    times=None,
                    headers={"WWW-Authenticate": challenge},
                )
            )
            with pytest.raises(RegistryAuthError):
                c.get_blob_range("tok/exp", digest, 0, 10)
    finally:
        proxy.stop()


def test_token_concurrent_first_use(registry_token: RegistryServer) -> None:
    ts = registry_token.token_server
    assert ts is not None
    with registry_token.client() as c:
        push_image(c, "tok/conc", "v1", [BLOB])
    issued = ts.issued
    with registry_token.client() as c:
        errors: list[BaseException] = []

        def reader(i: int) -> None:
            try:
                s = i * 10_000
                assert c.get_blob_range("tok/conc", BLOB_DIGEST, s, s + 999) == BLOB[s : s + 999]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert ts.issued - issued == 1  # one token for the pull scope, shared by 16 threads


# --- TLS ----------------------------------------------------------------------------------


def test_tls_verification(
    registry_tls: RegistryServer, test_ca: CertPair, registry_plain: RegistryServer, tmp_path: Path
) -> None:
    with (
        RegistryClient(registry_tls.host, docker_config=None) as c,
        pytest.raises(TLSError, match="verification failed"),
    ):
        c.ping()
    with RegistryClient(registry_tls.host, docker_config=None, skip_verify=True) as c:
        c.ping()
    with RegistryClient(
        registry_tls.host, scheme="", docker_config=None, ca_cert_files=[str(test_ca.cert_pem)]
    ) as c:
        c.ping()
        assert c.scheme == "https"
    with RegistryClient(registry_plain.host, scheme="", docker_config=None) as c:
        c.ping()
        assert c.scheme == "http"
    with RegistryClient(registry_plain.host, skip_verify=True, docker_config=None) as c:
        c.ping()  # https refused by a plain-HTTP server: skip_verify allows falling back
        assert c.scheme == "http"
    with (
        RegistryClient(registry_plain.host, docker_config=None, retry_backoff=0.01) as c,
        pytest.raises(TLSError, match="plain HTTP"),
    ):
        c.ping()
    wrong = issue_cert(test_ca, tmp_path, "wrong", ["wrong.example"])
    proxy = FaultProxy(registry_plain, tls=wrong)
    try:
        t0 = time.monotonic()
        with (
            RegistryClient(
                proxy.host, ca_cert_files=[str(test_ca.cert_pem)], docker_config=None
            ) as c,
            pytest.raises(TLSError, match="mismatch"),
        ):
            c.ping()
        assert time.monotonic() - t0 < 3  # not retried
    finally:
        proxy.stop()


# --- faults -------------------------------------------------------------------------------


def test_fault_statuses(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    with fault_proxy.client(retry_limit=3) as c:
        fault_proxy.add(Fault("status", status=503, path="/blobs/", times=3))
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 0, 4096) == BLOB[:4096]
        assert c.stats.retries == 3
        fault_proxy.add(Fault("status", status=500, path="/manifests/", times=None))
        with pytest.raises(RegistryHTTPError, match=r"HTTP 500.*gave up after 4 attempts"):
            c.get_manifest("fault/img", "v1")
        fault_proxy.clear()
        fault_proxy.add(Fault("status", status=500, method="POST", times=1))
        with pytest.raises(RegistryHTTPError):  # uploads of one-shot data are not repeated
            c.push_blob("fault/up", oci.sha256_digest(b"abc"), iter([b"abc"]), 3)
        fault_proxy.add(Fault("status", status=502, method="PATCH", times=1))
        with c.__class__(
            fault_proxy.host,
            scheme="http",
            docker_config=None,
            retry_backoff=0.01,
            monolithic_max=0,
            chunk_size=1 << 20,
        ) as c2:
            assert c2.push_blob("fault/up", BLOB_DIGEST, BLOB)  # bytes: upload restarted
            assert c2.get_blob("fault/up", BLOB_DIGEST) == BLOB
        fault_proxy.add(Fault("status", status=404, path="/blobs/", times=1))
        with pytest.raises(RegistryNotFound):
            c.get_blob_range("fault/img", BLOB_DIGEST, 0, 10)


def test_fault_429_retry_after(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Fault("status", status=429, path="/blobs/", headers={"Retry-After": "1"}))
    with fault_proxy.client() as c:
        t0 = time.monotonic()
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 10, 20) == BLOB[10:20]
        assert time.monotonic() - t0 >= 0.95


@pytest.mark.parametrize(
    "fault",
    [
        Fault("reset", path="/blobs/", after=1000),
        Fault("short", path="/blobs/", after=1000),
        Fault("long", path="/blobs/"),
        Fault("bad_range", path="/blobs/"),
    ],
    ids=lambda f: f.action,
)
def test_fault_bodies_are_retried(
    seeded: RegistryServer, fault_proxy: FaultProxy, fault: Fault
) -> None:
    fault_proxy.add(fault)
    with fault_proxy.client() as c:
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 5000, 25_000) == BLOB[5000:25_000]
        assert c.stats.retries == 1
    fault_proxy.add(Fault(fault.action, path="/blobs/", after=fault.after, times=None))
    with fault_proxy.client(retry_limit=2) as c, pytest.raises(TransportError, match="gave up"):
        c.get_blob_range("fault/img", BLOB_DIGEST, 5000, 25_000)


def test_fault_stream_resumes(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Fault("reset", path="/blobs/", after=300_000, method="GET"))
    with fault_proxy.client() as c:
        pieces = c.get_blob_stream("fault/img", BLOB_DIGEST, chunk_size=100_000)
        assert b"".join(pieces) == BLOB
    ranges = [r.range for r in fault_proxy.records if "/blobs/" in r.path and r.method == "GET"]
    assert ranges[0] is None  # then a resume from where the reset cut it (not from 0)
    assert ranges[1] is not None and re.fullmatch(r"bytes=[1-9][0-9]*-", ranges[1])


def test_fault_range_ignored(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Fault("ignore_range", path="/blobs/", times=None))
    with fault_proxy.client() as c:
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 7, 9000) == BLOB[7:9000]
        ranges = [(0, 10), (100_000, 100_500), (len(BLOB) - 3, len(BLOB))]
        assert c.get_blob_ranges("fault/img", BLOB_DIGEST, ranges) == [BLOB[s:e] for s, e in ranges]
        assert c.stats.range_ignored == 4


def test_fault_timeout_retried(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Fault("delay", path="/blobs/", seconds=1.0))
    with fault_proxy.client(timeout=0.3) as c:
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 0, 100) == BLOB[:100]
        assert c.stats.retries == 1


def test_redirects(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Fault("redirect", path="/blobs/", method="GET", times=None))
    with fault_proxy.client(registry_token="not-a-real-token") as c:
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 0, 100) == BLOB[:100]
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 100, 200) == BLOB[100:200]
        assert b"".join(c.get_blob_stream("fault/img", BLOB_DIGEST)) == BLOB
        assert c.stats.redirect_cache_hits == 2
    registry_gets = [
        r for r in fault_proxy.records if r.path.startswith("/v2/") and "/blobs/" in r.path
    ]
    object_gets = [r for r in fault_proxy.records if r.path.startswith("/objects/")]
    assert len(registry_gets) == 1 and len(object_gets) == 3
    assert registry_gets[0].authorization == "Bearer not-a-real-token"
    assert all(r.authorization is None for r in object_gets)  # dropped for another host
    assert fault_proxy.blob_bytes(BLOB_DIGEST) == 200 + len(BLOB)
    fault_proxy.clear()
    fault_proxy.add(Fault("redirect", path="/blobs/", method="GET", times=None))
    with fault_proxy.client(redirect_cache_ttl=0) as c:
        for i in range(3):
            c.get_blob_range("fault/img", BLOB_DIGEST, i, i + 1)
        assert fault_proxy.count("GET", r"^/v2/.*/blobs/") == 3


def test_redirect_loop(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    fault_proxy.add(Fault("loop", path="/blobs/", times=None))
    with fault_proxy.client() as c, pytest.raises(BackendError, match="redirect loop"):
        c.get_blob_range("fault/img", BLOB_DIGEST, 0, 10)
    assert fault_proxy.count() <= 4


def test_proxy_settings_and_fallback(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    with RegistryClient(
        seeded.host, scheme="http", docker_config=None, proxy=ProxyConfig(fault_proxy.url)
    ) as c:
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 0, 10) == BLOB[:10]
    assert fault_proxy.count("GET", "/blobs/") == 1  # went through the proxy
    dead = f"http://127.0.0.1:{free_port()}"
    with RegistryClient(
        seeded.host, scheme="http", docker_config=None, proxy=ProxyConfig(dead)
    ) as c:
        assert c.get_blob_range("fault/img", BLOB_DIGEST, 0, 10) == BLOB[:10]
    with (
        RegistryClient(
            seeded.host,
            scheme="http",
            docker_config=None,
            retry_limit=0,
            proxy=ProxyConfig(dead, fallback=False),
        ) as c,
        pytest.raises(TransportError, match="cannot connect"),
    ):
        c.get_blob_range("fault/img", BLOB_DIGEST, 0, 10)


def test_concurrent_readers_share_pooled_connections(
    seeded: RegistryServer, fault_proxy: FaultProxy
) -> None:
    with fault_proxy.client(max_workers=4) as c:
        ranges = [(i * 20_000, i * 20_000 + 8192) for i in range(60)]
        results: list[list[bytes]] = []
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                results.append(c.get_blob_ranges("fault/img", BLOB_DIGEST, ranges))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert all(r == [BLOB[s:e] for s, e in ranges] for r in results)
        opened = c._transport.opened  # type: ignore[attr-defined]
        assert opened <= 8, opened  # 240 requests over a handful of kept-alive connections
    assert fault_proxy.blob_bytes(BLOB_DIGEST) == 4 * 60 * 8192
    assert fault_proxy.count("GET", "/blobs/") == 240


def test_not_found_and_unreachable() -> None:
    port = free_port()
    with (
        RegistryClient(
            f"127.0.0.1:{port}",
            scheme="http",
            docker_config=None,
            retry_limit=1,
            retry_backoff=0.01,
        ) as c,
        pytest.raises(TransportError, match=r"cannot connect.*gave up after 2"),
    ):
        c.ping()


def test_manifest_bytes_checked(seeded: RegistryServer, fault_proxy: FaultProxy) -> None:
    _, mt, digest = seeded.client().get_manifest("fault/img", "v1")
    other, _ = make_manifest(b"{}", [SMALL])
    fault_proxy.add(
        Fault(
            "status",
            status=200,
            path="/manifests/",
            times=None,
            body=other,
            headers={"Content-Type": mt, "Docker-Content-Digest": digest},
        )
    )
    with fault_proxy.client() as c:
        with pytest.raises(IntegrityError):
            c.get_manifest("fault/img", digest)
        with pytest.raises(IntegrityError):
            c.get_manifest("fault/img", "v1")
