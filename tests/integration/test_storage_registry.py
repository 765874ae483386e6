"""The registry backend against Debian's docker-registry (tests/registry.py): every variant
(plain, basic auth, token auth, TLS), bytes counted through a proxy for one 4 KiB read of a
1 GiB image, a chunk corrupted in the registry's storage, registry faults that must not
corrupt the cache, and processes killed with SIGKILL while they fill a shared cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_storage_localfs import Built, build_image_dir, sample_files  # type: ignore

import registry as harness  # type: ignore[import-not-found]
from nydus.config import DaemonConfig
from nydus.errors import IntegrityError
from nydus.metadata import BlobInfo
from nydus.storage import BlobDevice, open_device
from nydus.storage.chunkmap import ChunkMap
from registry import Fault, FaultProxy, RegistryServer, basic_auth  # type: ignore

# The harness's pytest fixtures, made visible to this module.
fault_proxy = harness.fault_proxy
registry_any = harness.registry_any
registry_basic = harness.registry_basic
registry_plain = harness.registry_plain
registry_tls = harness.registry_tls
registry_token = harness.registry_token
test_ca = harness.test_ca

REPO = "storage/test"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def publish(img: Built, server: RegistryServer, repo: str = REPO) -> list[BlobInfo]:
    """Push the blob and return the blob table with the blob's registry digest as its id.

    Our builder (like upstream 2.2) leaves the chunk digest array out of the blob id, so the
    id is not the sha256 of the blob file; a converter publishes the blob under its file
    digest and records that. The storage layer only sees blob ids.
    """
    digest = file_digest(img.blob_path)
    server.client().push_blob(repo, f"sha256:{digest}", str(img.blob_path))
    return [dataclasses.replace(b, blob_id=digest) for b in img.md.blobs]


def reg_config(
    server: RegistryServer | FaultProxy, work_dir: Path | None, *, repo: str = REPO, **top: Any
) -> DaemonConfig:
    kind = server.upstream.kind if isinstance(server, FaultProxy) else server.kind
    rc: dict[str, Any] = {"scheme": server.scheme, "host": server.host, "repo": repo, "timeout": 10}
    if kind in ("basic", "token"):
        rc["auth"] = basic_auth()
    if kind == "tls":
        real = server.upstream if isinstance(server, FaultProxy) else server
        assert real.ca is not None
        rc["ca_cert_files"] = [str(real.ca.cert_pem)]
    rc.update(top.pop("registry", {}))
    cache: dict[str, Any] = {"type": "dummycache"}
    if work_dir is not None:
        cache = {"type": "blobcache", "config": {"work_dir": str(work_dir)}}
    return DaemonConfig.from_json(
        {"device": {"backend": {"type": "registry", "config": rc}, "cache": cache}, **top},
        environ={},
    )


def expected_space(img: Built) -> bytes:
    info = img.md.blobs[0]
    buf = bytearray(info.uncompressed_size)
    for path, data in img.files.items():
        for c in img.chunks(path):
            buf[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size] = data[
                c.file_offset : c.file_offset + c.uncompressed_size
            ]
    return bytes(buf)


def assert_cache_consistent(img: Built, blob_id: str, work_dir: Path) -> int:
    """Every chunk marked ready holds exactly its bytes; returns how many are ready."""
    info = img.md.blobs[0]
    m = ChunkMap(str(work_dir / f"{blob_id}.blob.data.chunk_map"), info.chunk_count)
    assert not m.rebuilt
    ready = set(m.ready_indices())
    m.close()
    space = expected_space(img)
    data = (work_dir / f"{blob_id}.blob.data").read_bytes()
    assert len(data) == info.uncompressed_size
    for path in img.files:
        for c in img.chunks(path):
            if c.index in ready:
                lo, hi = c.uncompressed_offset, c.uncompressed_offset + c.uncompressed_size
                assert data[lo:hi] == space[lo:hi], f"chunk {c.index} is marked ready but wrong"
    return len(ready)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image_dir(tmp_path_factory.mktemp("small"), sample_files(11), chunk_size=0x40000)


@pytest.fixture(scope="module")
def small_raw(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image_dir(
        tmp_path_factory.mktemp("small-raw"),
        sample_files(12),
        compressor="none",
        chunk_size=0x40000,
    )


# ------------------------------------------------------------------------ variants


def test_generated_image_through_every_registry_variant(
    registry_any: RegistryServer, small: Built, tmp_path: Path
) -> None:
    repo = f"storage/{registry_any.kind}"
    blobs = publish(small, registry_any, repo)
    for wd in (tmp_path / "cache", None):
        cfg = reg_config(registry_any, wd, repo=repo, digest_validate=True)
        with open_device(blobs, cfg, id=registry_any.kind) as dev:
            for path, data in small.files.items():
                got = small.read(dev, path)
                assert hashlib.md5(got).hexdigest() == hashlib.md5(data).hexdigest(), path
            assert dev.metrics_backend()["backend_type"] == "registry"
    # a wrong password is refused, not retried forever
    if registry_any.kind in ("basic", "token"):
        cfg = reg_config(
            registry_any, None, repo=repo, registry={"auth": basic_auth(password="wrong")}
        )
        with open_device(blobs, cfg) as dev, pytest.raises(Exception, match=r"(?i)auth|401|denied"):
            small.read(dev, "/small")


def test_registry_auth_hot_reload(registry_basic: RegistryServer, small: Built) -> None:
    blobs = publish(small, registry_basic, "storage/reload")
    cfg = reg_config(
        registry_basic, None, repo="storage/reload", registry={"auth": basic_auth(password="stale")}
    )
    with open_device(blobs, cfg) as dev:
        with pytest.raises(Exception, match=r"(?i)auth|401|denied"):
            small.read(dev, "/small")
        dev.update_registry_auth(basic_auth())
        assert small.read(dev, "/small") == small.files["/small"]


def test_blob_redirected_host(registry_plain: RegistryServer, small: Built) -> None:
    """Blob requests go to ``blob_redirected_host``; ``host`` is never contacted for blobs."""
    blobs = publish(small, registry_plain)
    cfg = reg_config(
        registry_plain,
        None,
        registry={
            "host": "127.0.0.1:9",
            "blob_redirected_host": registry_plain.host,
            "retry_limit": 1,
        },
    )
    with open_device(blobs, cfg) as dev:
        assert small.read(dev, "/etc/config.txt") == small.files["/etc/config.txt"]


# ------------------------------------------------------------------------ amplification bound


def big_files(total: int = 1 << 30, n: int = 8) -> dict[str, bytes]:
    """``total`` bytes of incompressible, never-repeating chunks, cheaply made."""
    import random

    base = random.Random(99).randbytes(1 << 20)
    out = {}
    per = total // n
    for f in range(n):
        parts = []
        for i in range(0, per, 4096):
            parts.append(
                (f * per + i).to_bytes(8, "little") + base[i % (1 << 20) + 8 : i % (1 << 20) + 4096]
            )
        out[f"/data/file{f}"] = b"".join(parts)
    return out


@pytest.fixture(scope="module")
def gib(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    root = tmp_path_factory.mktemp("gib")
    yield build_image_dir(root, big_files(), compressor="none", chunk_size=0x40000)
    shutil.rmtree(root, ignore_errors=True)  # a 1 GiB image: not kept past the module


def _data_bytes(proxy: FaultProxy, info: BlobInfo) -> tuple[int, int, int]:
    """(data requests, data bytes, all bytes) of blob GETs seen by the proxy."""
    n = data = total = 0
    for r in proxy.records:
        if r.method != "GET" or "/blobs/sha256:" not in r.path:
            continue
        total += r.body_bytes
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.range or "")
        assert m, f"unranged blob GET {r}"
        if int(m.group(1)) < info.ci_offset:
            n += 1
            data += r.body_bytes
    return n, data, total


@pytest.mark.parametrize("amplify", [1 << 20, 0x80000])
def test_one_4k_read_of_a_1gib_image_fetches_at_most_amplify_plus_one_chunk(
    gib: Built,
    registry_plain: RegistryServer,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    amplify: int,
) -> None:
    blobs = publish(gib, registry_plain)
    info = blobs[0]
    assert info.uncompressed_size >= 1 << 30
    path = "/data/file3"
    off = 77 * 1000 * 1000 + 123  # somewhere in the middle of the image
    chunks = [
        c for c in gib.chunks(path) if c.file_offset <= off < c.file_offset + c.uncompressed_size
    ]
    assert len(chunks) == 1 and off + 4096 <= chunks[0].file_offset + 0x40000
    c = chunks[0]
    # the FUSE path: read_chunks
    cfg = reg_config(fault_proxy, tmp_path / "a", amplify_io=amplify)
    # the digests of amplified chunks come from the bootstrap, as in the daemon
    with open_device(blobs, cfg, chunk_lookup=gib.md.chunk_record) as dev:
        data = dev.read_chunks([c])[0]
        lo = off - c.file_offset
        assert data[lo : lo + 4096] == gib.files[path][off : off + 4096]
    n, data_bytes, total = _data_bytes(fault_proxy, info)
    assert n == 1
    assert c.compressed_size < data_bytes <= amplify + info.chunk_size  # and it did amplify
    # the ci array (and its header) once, and the ToC that vouches for it
    assert total - data_bytes == info.ci_compressed_size + 4096 + info.toc_size
    # the EROFS blob-device path: read_range in the uncompressed address space
    fault_proxy.clear()
    cfg = reg_config(fault_proxy, tmp_path / "b", amplify_io=amplify)
    with open_device(blobs, cfg, chunk_lookup=gib.md.chunk_record) as dev:
        uoff = c.uncompressed_offset + lo
        assert dev.read_range(0, uoff, 4096) == gib.files[path][off : off + 4096]
    n, data_bytes, _ = _data_bytes(fault_proxy, info)
    assert n == 1 and data_bytes <= amplify + info.chunk_size


# ------------------------------------------------------------------------ corruption


def test_chunk_corrupted_in_registry_storage_is_detected(
    registry_plain: RegistryServer, small_raw: Built, tmp_path: Path
) -> None:
    repo = "storage/corrupt"
    blobs = publish(small_raw, registry_plain, repo)
    victim = small_raw.chunks("/bin/tool")[3]
    stored = registry_plain.blob_path(f"sha256:{blobs[0].blob_id}")
    raw = bytearray(stored.read_bytes())
    raw[victim.compressed_offset + 1000] ^= 0x5A
    stored.write_bytes(bytes(raw))
    wd = tmp_path / "c"
    with open_device(blobs, reg_config(registry_plain, wd, repo=repo, digest_validate=True)) as dev:
        with pytest.raises(IntegrityError, match="digest mismatch"):
            small_raw.read(dev, "/bin/tool")
        for path in ("/etc/config.txt", "/lib/libx.so", "/small"):
            assert small_raw.read(dev, path) == small_raw.files[path]
        with pytest.raises(IntegrityError):
            dev.read_chunks([victim])
    assert_cache_consistent(small_raw, blobs[0].blob_id, wd)
    m = ChunkMap(str(wd / f"{blobs[0].blob_id}.blob.data.chunk_map"), blobs[0].chunk_count)
    assert not m.is_ready(victim.index)
    m.close()
    # without digest_validate too: chunks from the backend are always verified
    with (
        open_device(blobs, reg_config(registry_plain, None, repo=repo)) as dev,
        pytest.raises(IntegrityError, match="digest mismatch"),
    ):
        small_raw.read(dev, "/bin/tool")


FAULTS = {
    "5xx-burst": [Fault("status", path="/blobs/sha256:", method="GET", status=503, times=2)],
    "429": [
        Fault(
            "status",
            path="/blobs/sha256:",
            method="GET",
            status=429,
            times=1,
            headers={"Retry-After": "1"},
        )
    ],
    "reset": [Fault("reset", path="/blobs/sha256:", method="GET", after=5000, times=2)],
    "short": [Fault("short", path="/blobs/sha256:", method="GET", after=5000, times=2)],
    "long": [Fault("long", path="/blobs/sha256:", method="GET", times=2)],
    "range-ignored": [Fault("ignore_range", path="/blobs/sha256:", method="GET", times=2)],
    "bad-range": [Fault("bad_range", path="/blobs/sha256:", method="GET", times=1)],
    "redirect": [Fault("redirect", path="/blobs/sha256:", method="GET", times=None)],
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_registry_faults_never_corrupt_the_cache(
    fault: str,
    small: Built,
    registry_plain: RegistryServer,
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    blobs = publish(small, registry_plain)
    fault_proxy.add(*[dataclasses.replace(f) for f in FAULTS[fault]])
    wd = tmp_path / "c"
    with open_device(blobs, reg_config(fault_proxy, wd)) as dev:
        for path, data in small.files.items():
            assert small.read(dev, path) == data, path
    assert assert_cache_consistent(small, blobs[0].blob_id, wd) == blobs[0].chunk_count


# ------------------------------------------------------------------------ processes


FILLER = r"""
import dataclasses, sys, time, json
from nydus.config import DaemonConfig
from nydus.metadata import open_bootstrap
from nydus.storage import open_device
boot, blob_id, cfg, mode = sys.argv[1:5]
md = open_bootstrap(boot)
blobs = [dataclasses.replace(b, blob_id=blob_id) for b in md.blobs]
dev = open_device(blobs, DaemonConfig.from_json(cfg, environ={}))
if mode == "prefetch":
    dev.prefetch_all()
    print("started", flush=True)
    time.sleep(600)
else:
    import hashlib
    want = json.loads(sys.argv[5])
    for path, md5 in want.items():
        nid = md.resolve(path)
        data = b"".join(dev.read_chunks(md.chunks(nid)))
        if hashlib.md5(data).hexdigest() != md5:
            print("MISMATCH", path, flush=True)
            sys.exit(1)
    dev.close()
    print("ok", flush=True)
"""


def test_sigkill_mid_download_leaves_a_consistent_shared_cache(
    registry_plain: RegistryServer, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    img = build_image_dir(tmp_path / "img", sample_files(21, scale=6), chunk_size=0x40000)
    blobs = publish(img, registry_plain)
    info = blobs[0]
    wd = tmp_path / "shared-cache"
    boot = tmp_path / "img" / "boot"
    # A slow prefetcher: 3 MB/s, so SIGKILL lands while chunks are being written.
    slow = reg_config(
        fault_proxy,
        wd,
        fs_prefetch={
            "enable": True,
            "threads_count": 3,
            "merging_size": 0x40000,
            "bandwidth_rate": 3_000_000,
        },
    )
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    py = [sys.executable, "-c", FILLER, str(boot), info.blob_id]
    filler = subprocess.Popen([*py, slow.to_json(), "prefetch"], stdout=subprocess.PIPE, env=env)
    cmap_path = wd / f"{info.blob_id}.blob.data.chunk_map"
    try:
        deadline = time.monotonic() + 60
        ready = 0
        while time.monotonic() < deadline:
            if cmap_path.exists() and cmap_path.stat().st_size > 4096:
                m = ChunkMap(str(cmap_path), info.chunk_count)
                ready = m.count_ready()
                m.close()
                if ready >= 8:
                    break
            assert filler.poll() is None, "filler died"
            time.sleep(0.01)
        os.kill(filler.pid, signal.SIGKILL)
    finally:
        filler.kill()
        filler.wait()
    assert 8 <= ready < info.chunk_count, "the kill did not land mid-download"
    before = assert_cache_consistent(img, info.blob_id, wd)
    assert before < info.chunk_count
    m = ChunkMap(str(cmap_path), info.chunk_count)
    ready_set = set(m.ready_indices())
    m.close()
    not_ready_bytes = sum(
        {
            c.index: c.compressed_size
            for p in img.files
            for c in img.chunks(p)
            if c.index not in ready_set
        }.values()
    )
    # Restart: only what was not ready is fetched, and all bytes come out right.
    fault_proxy.clear()
    want = {p: hashlib.md5(d).hexdigest() for p, d in img.files.items()}
    fast = reg_config(fault_proxy, wd, digest_validate=True)
    r = subprocess.run(
        [*py, fast.to_json(), "read", json.dumps(want)], capture_output=True, env=env, timeout=120
    )
    assert r.returncode == 0 and r.stdout.strip() == b"ok", r.stdout + r.stderr
    _, data_bytes, _ = _data_bytes(fault_proxy, info)
    assert data_bytes <= not_ready_bytes
    assert assert_cache_consistent(img, info.blob_id, wd) == info.chunk_count
    with open_device(blobs, reg_config(fault_proxy, wd)) as dev:
        assert dev.is_blob_ready(0)
        assert Path(dev.cache_file(0) or "").read_bytes() == expected_space(img)
    # Several processes filling one fresh cache at once: all correct, cache complete.
    wd2 = tmp_path / "shared-2"
    both = reg_config(fault_proxy, wd2, digest_validate=True)
    readers = [
        subprocess.Popen(
            [*py, both.to_json(), "read", json.dumps(want)], stdout=subprocess.PIPE, env=env
        )
        for _ in range(3)
    ]
    for p in readers:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == b"ok", out
    assert assert_cache_consistent(img, info.blob_id, wd2) == info.chunk_count


def test_device_close_is_clean(
    small: Built, registry_plain: RegistryServer, tmp_path: Path
) -> None:
    blobs = publish(small, registry_plain)
    dev: BlobDevice = open_device(blobs, reg_config(registry_plain, tmp_path / "c"))
    small.read(dev, "/small")
    dev.close()
    dev.close()  # idempotent
