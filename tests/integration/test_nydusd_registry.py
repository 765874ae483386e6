"""nydusd lazily serving an image from a real registry (Debian's docker-registry behind the
counting proxy of tests/registry.py): the mount comes up without downloading the blob, and
``cat`` of one file fetches only that file's chunks (plus amplification), as both
``/api/v1/metrics/backend`` and the proxy's request log show.

About the blob's name in the registry: our builder, like upstream, names a blob by the sha256
of its bytes *minus* the chunk digest array, so the file's registry digest differs from the
blob id the bootstrap asks for. The test pushes the blob normally and then also files it under
``sha256:<blob id>`` in the registry's storage (data and repository link), which is what a
converter that publishes blobs under their ids gives the daemon.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_nydusd import Nydusd, create_image

import registry as harness
from nydus.format import oci
from nydus.metadata import open_bootstrap
from registry import FaultProxy, RegistryServer

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(
        shutil.which("docker-registry") is None, reason="docker-registry not installed"
    ),
]

registry_plain = harness.registry_plain
fault_proxy = harness.fault_proxy

REPO = "nydus/lazy"
MiB = 1 << 20


def _publish_under_blob_id(reg: RegistryServer, blob_file: Path, blob_id: str) -> str:
    data = blob_file.read_bytes()
    real = oci.sha256_digest(data)
    with reg.client() as c:
        c.push_blob(REPO, real, data)
    want = f"sha256:{blob_id}"
    dst = reg.blob_path(want)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reg.blob_path(real), dst)
    link = (
        reg.storage
        / "docker/registry/v2/repositories"
        / REPO
        / "_layers"
        / "sha256"
        / blob_id
        / "link"
    )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_text(want)
    return want


def _nydusd_over_proxy(
    tmp_path: Path, proxy: FaultProxy, driver: str, config: dict[str, Any], *args: str
) -> Nydusd:
    """A nydusd (not started yet) mounting ``tmp_path/boot`` on ``tmp_path/mnt``, its blobs read
    from the registry through ``proxy`` into a blob cache; ``config`` adds top-level keys."""
    backend = {"scheme": "http", "host": proxy.host, "repo": REPO}
    cfg_path = tmp_path / "registry.json"
    cfg_path.write_text(
        json.dumps(
            {
                "device": {
                    "backend": {"type": "registry", "config": backend},
                    "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}},
                },
                "mode": "direct",
                **config,
            }
        )
    )
    mnt, sock = tmp_path / "mnt", tmp_path / "api.sock"
    mnt.mkdir()
    argv: list[str | os.PathLike[str]] = ["--config", cfg_path, "--mountpoint", mnt]
    argv += ["--bootstrap", tmp_path / "boot", "--apisock", sock, "--fs-driver", driver, *args]
    return Nydusd(argv, mnt, cwd=tmp_path, apisock=sock)


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_cat_fetches_only_that_files_chunks(
    registry_plain: RegistryServer, fault_proxy: FaultProxy, tmp_path: Path, driver: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    for i in range(8):  # 8 x 3 MiB of incompressible data, 1 MiB chunks
        (src / f"big{i}").write_bytes(rng.randbytes(3 * MiB))
    (src / "small").write_bytes(b"hello registry\n")
    blobs = create_image(tmp_path, src)
    with open_bootstrap(tmp_path / "boot") as md:
        [blob] = md.blobs
        target = md.resolve("/big5")
        chunks = md.chunks(target)
        file_bytes = sum(c.compressed_size for c in chunks)
    digest = _publish_under_blob_id(registry_plain, blobs / blob.blob_id, blob.blob_id)
    fault_proxy.clear()
    nydusd = _nydusd_over_proxy(
        tmp_path, fault_proxy, driver, {"digest_validate": True, "amplify_io": 0}
    )
    mnt = nydusd.mountpoint
    with nydusd.start() as d:
        assert d.client.info()["backend_collection"]["/"]["fs_driver"] == driver
        assert sorted(os.listdir(mnt)) == [*(f"big{i}" for i in range(8)), "small"]
        assert fault_proxy.blob_bytes(digest) == 0  # mounted and listed: no data fetched
        data = (mnt / "big5").read_bytes()
        assert data == (src / "big5").read_bytes()
        served = fault_proxy.blob_bytes(digest)
        backend = d.client.metrics("backend")
        d.check_alive()
        blob_size = (blobs / blob.blob_id).stat().st_size
        print(
            f"blob {blob_size} B, file chunks {file_bytes} B, proxy served {served} B, "
            f"backend read {backend['read_amount_total']} B in {backend['read_count']} reads"
        )
        meta_allowance = blob.ci_compressed_size + blob.toc_size + 64 * 1024
        # the file's chunks were fetched, and hardly anything else
        assert served >= file_bytes
        assert served <= file_bytes + meta_allowance, (served, file_bytes, meta_allowance)
        assert served < blob_size / 4
        assert backend["backend_type"] == "registry"
        assert backend["read_errors"] == 0
        assert file_bytes <= backend["read_amount_total"] <= file_bytes + meta_allowance
        gets = [r for r in fault_proxy.records if r.method == "GET" and digest in r.path]
        assert gets and all(r.range for r in gets)  # ranged GETs only, never the whole blob
        # a second read is served by the kernel page cache / blob cache: nothing more fetched
        assert (mnt / "big5").read_bytes() == data
        assert fault_proxy.blob_bytes(digest) == served
        assert (mnt / "small").read_text() == "hello registry\n"


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_prefetch_files_fetch_in_background(
    registry_plain: RegistryServer, fault_proxy: FaultProxy, tmp_path: Path, driver: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(9)
    for i in range(4):
        (src / f"big{i}").write_bytes(rng.randbytes(3 * MiB))
    blobs = create_image(tmp_path, src)
    with open_bootstrap(tmp_path / "boot") as md:
        [blob] = md.blobs
        want = sum(c.compressed_size for c in md.chunks(md.resolve("/big2")))
    digest = _publish_under_blob_id(registry_plain, blobs / blob.blob_id, blob.blob_id)
    fault_proxy.clear()
    prefetch = {"fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": 2}}
    nydusd = _nydusd_over_proxy(
        tmp_path, fault_proxy, driver, prefetch, "--prefetch-files", "/big2"
    )
    mnt = nydusd.mountpoint
    with nydusd as d:
        d.start()
        import time

        deadline = time.time() + 30
        while fault_proxy.blob_bytes(digest) < want and time.time() < deadline:
            time.sleep(0.1)
        fetched = fault_proxy.blob_bytes(digest)
        assert want <= fetched < 2 * want  # big2 (and not the whole blob) without any read
        # the bytes are on the wire before the chunks are verified and counted: wait for both
        cache = d.client.metrics("blobcache")
        while cache["prefetch_data_amount"] < want and time.time() < deadline:
            time.sleep(0.1)
            cache = d.client.metrics("blobcache")
        assert cache["prefetch_data_amount"] >= want
        assert (mnt / "big2").read_bytes() == (src / "big2").read_bytes()
        # served from the blob cache: at most the blob's chunk-info table is fetched now
        # (the storage reads it for its amplification plan on the first foreground miss)
        meta = blob.ci_compressed_size + blob.toc_size + 4096 + 512
        assert fault_proxy.blob_bytes(digest) - fetched <= meta
