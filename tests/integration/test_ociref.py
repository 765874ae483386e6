"""``nydusify convert --oci-ref`` against a real docker-registry: the registry receives only
the small artifact (meta blobs, bootstrap layer, config, manifest), never the layers again;
``nydusify check`` passes; ``nydusify mount`` (nydusd reading the original gzip layers from
the registry) shows every file of the source's overlay with the same bytes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_nydusify import _mounted, _unmount, _wait_mount, run

import oci_images as oi
import registry
from nydus.builder.tree import iter_tree
from nydus.convert.rootfs import OciRootfs
from nydus.format import oci

registry_plain = registry.registry_plain
fault_proxy_factory = registry.fault_proxy_factory
VENV_BIN = Path(sys.executable).parent


def test_oci_ref_convert_check_mount(
    registry_plain: registry.RegistryServer,
    fault_proxy_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    layers = [oi.Layer(ly.tar, *oi.compress(ly.tar, "gzip")) for ly in oi.sample_layers(1, 6 << 20)]
    oi.write_layout(tmp_path / "src", "v1", layers)
    oi.skopeo_push(tmp_path / "src", "v1", f"{registry_plain.host}/zsrc:v1")
    proxy = fault_proxy_factory(registry_plain)
    host = proxy.host
    layer_bytes = sum(len(ly.blob) for ly in layers)
    for target in (f"{host}/zsrc:ref", f"{host}/zdst:ref"):  # same repo; cross-repo mount
        proxy.clear()
        out_json = tmp_path / "convert.json"
        rc, out = run(
            ["convert", "--oci-ref", "--source", f"{host}/zsrc:v1", "--target", target,
             "--work-dir", str(tmp_path / "w"), "--output-json", str(out_json)],
            capsys,
        )  # fmt: skip
        assert rc == 0, out
        m = json.loads(out_json.read_text())["manifests"][0]
        assert proxy.received == m["pushed_bytes"] < layer_bytes // 10, (proxy.received, m)
        # exactly the artifact: the manifest's layers (meta blobs, bootstrap), config, itself
        repo, tag = target.split("/", 1)[1].split(":")
        body, _mt, _d = registry_plain.client().get_manifest(repo, tag)
        doc = json.loads(body)
        artifact = sum(d["size"] for d in doc["layers"]) + doc["config"]["size"] + len(body)
        assert proxy.received == artifact
        uploads = [r.path for r in proxy.records if r.method in ("PUT", "PATCH", "POST")]
        assert not any(ly.digest in p for ly in layers for p in uploads)
        rc, out = run(["check", "--source", f"{host}/zsrc:v1", "--target", target,
                       "--work-dir", str(tmp_path / "c")], capsys)  # fmt: skip
        assert rc == 0, out
    manifest = oi.skopeo_inspect(f"{registry_plain.host}/zdst:ref", raw=True)
    metas, boot = manifest["layers"][:-1], manifest["layers"][-1]
    assert boot["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    assert [d["annotations"][oci.ANNOTATION_NYDUS_REF] for d in metas] == [
        ly.digest for ly in layers
    ]
    assert all(d["mediaType"] == oci.MEDIA_TYPE_NYDUS_BLOB for d in metas)

    want = OciRootfs()
    for ly in layers:
        want.apply(io.BytesIO(ly.blob))
    big = max((n for _p, n in iter_tree(want.root) if n.kind == "file"), key=lambda n: n.size)
    with _mount(tmp_path / "m", f"{host}/zdst:ref") as mnt:
        files = 0
        for path, node in iter_tree(want.root):
            if node.kind == "file":
                got = (mnt / os.fsdecode(path).lstrip("/")).read_bytes()
                assert hashlib.sha256(got).hexdigest() == node.digest, path
                files += 1
        assert files > 10
        served = {ly.digest: proxy.blob_bytes(ly.digest) for ly in layers}
        assert sum(served.values()) > 0  # the data came from the original gzip layers
    # a corrupted layer in the registry (the first byte of every ranged answer inverted)
    # gives EIO, never wrong bytes; a fresh cache
    proxy.add(*[registry.Fault("flip", path=ly.digest, times=None) for ly in layers])
    with _mount(tmp_path / "m2", f"{host}/zdst:ref") as mnt:
        big_path = next(p for p, n in iter_tree(want.root) if n is big)
        with pytest.raises(OSError) as ei:
            (mnt / os.fsdecode(big_path).lstrip("/")).read_bytes()
        assert ei.value.errno == errno.EIO


@contextlib.contextmanager
def _mount(work: Path, ref: str) -> Iterator[Path]:
    """``nydusify mount`` of ``ref`` (nydusd reading from the registry) while in the block."""
    mnt = work / "mnt"
    env = {**registry.os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    work.mkdir()
    log = open(work / "mount.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(VENV_BIN / "nydusify"), "mount", "--target", ref, "--mount-path", str(mnt),
         "--work-dir", str(work / "w"),
         "--nydusd", shutil.which("nydusd", path=env["PATH"]) or "nydusd"],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        _wait_mount(mnt, proc, work / "mount.log")
        yield mnt
    finally:
        proc.terminate()
        rc = proc.wait(20)
        log.close()
        _unmount(mnt)
    assert rc == 0 and not _mounted(mnt)
