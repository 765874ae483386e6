"""nydusify against a real docker-registry: convert, check, copy, mount, bad input.

Source images are built here in OCI layout (tests/oci_images.py: several layers with
deletions, opaque directories, hardlinks, xattrs, devices, a large layer; gzip, zstd and plain
tar layers) and pushed with ``skopeo copy --preserve-digests``; what nydusify pushes is read
back with ``skopeo inspect`` and checked with ``nydusify check`` (OCI rootfs vs Nydus rootfs,
file by file).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import oci_images as oi
import registry
from moto_s3 import moto_server
from nydus.cli.nydusify import main
from nydus.format import oci
from nydus.metadata import open_bootstrap

registry_plain = registry.registry_plain
fault_proxy = registry.fault_proxy
Fault = registry.Fault

VENV_BIN = Path(sys.executable).parent


def convert(
    capsys: pytest.CaptureFixture[str], source: str, target: str, *extra: str
) -> tuple[int, str]:
    """``nydusify convert --source SOURCE --target TARGET EXTRA...``: exit code and output."""
    return run(["convert", "--source", source, "--target", target, *extra], capsys)


def run(args: list[str], capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    rc = main(args)
    out = ""
    if capsys is not None:
        cap = capsys.readouterr()
        out = cap.out + cap.err
    return rc, out


@pytest.fixture(scope="module")
def sample(
    registry_plain: registry.RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """v1 and v2 (one file changed) of the standard image in ``sample``, plus a Docker-format
    copy of v1 in ``sample-docker`` and a two-platform index in ``multi``."""
    d = tmp_path_factory.mktemp("oci")
    host = registry_plain.host
    v1, v2 = oi.sample_layers(1), oi.sample_layers(2)
    oi.write_layout(d / "v1", "v1", v1)
    oi.write_layout(d / "v2", "v2", v2)
    small = [
        oi.layer([oi.T("file", "arch", b"amd64\n")]),
        oi.layer([oi.T("file", "arch2", b"x\n")]),
    ]
    arm = [oi.layer([oi.T("file", "arch", b"arm64\n")])]
    oi.write_index_layout(d / "multi", "m", {"linux/amd64": small, "linux/arm64/v8": arm})
    oi.skopeo_push(d / "v1", "v1", f"{host}/sample:v1")
    oi.skopeo_push(d / "v2", "v2", f"{host}/sample:v2")
    gz = [oi.Layer(ly.tar, *oi.compress(ly.tar, "gzip")) for ly in v1]  # v2s2: gzip only
    oi.push_with_client(
        registry_plain.client(), "sample-docker", "v1", gz, docker=True, scratch=d / "dk"
    )
    oi.skopeo_push(d / "multi", "m", f"{host}/multi:m", all_images=True)
    return {"host": host, "v1": v1, "v2": v2, "dir": d}


def manifest(host: str, ref: str) -> dict[str, Any]:
    out = oi.skopeo_inspect(f"{host}/{ref}", raw=True)
    assert isinstance(out, dict)
    return out


def test_convert_check_and_skopeo(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    work = tmp_path / "work"
    report = tmp_path / "out.json"
    rc, out = convert(
        capsys,
        f"{host}/sample:v1",
        f"{host}/sample:v1-nydus",
        "--work-dir",
        str(work),
        "--output-json",
        str(report),
    )
    assert rc == 0, out
    assert "chunks" in out and "target digest" in out
    rep = json.loads(report.read_text())
    m = manifest(host, "sample:v1-nydus")
    assert m["mediaType"] == oci.MEDIA_TYPE_OCI_MANIFEST
    layers = m["layers"]
    assert rep["digest"] == oci.sha256_digest(json.dumps(m, indent=2).encode())
    *blobs, boot = layers
    assert len(blobs) == 5
    for b in blobs:
        assert b["mediaType"] == oci.MEDIA_TYPE_NYDUS_BLOB
        assert b["annotations"][oci.ANNOTATION_NYDUS_BLOB] == "true"
    assert boot["mediaType"] == oci.MEDIA_TYPE_OCI_LAYER_GZIP
    assert boot["annotations"][oci.ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    assert boot["annotations"][oci.ANNOTATION_NYDUS_FS_VERSION] == "6"
    # what containerd hands the snapshotter: the layer annotations under containerd.io/snapshot/
    from nydus.snapshotter.snapshots.labels import is_nydus_blob, is_nydus_bootstrap

    def labels(d: dict[str, Any]) -> dict[str, str]:
        return {
            k: v
            for k, v in d.get("annotations", {}).items()
            if k.startswith("containerd.io/snapshot/")
        }

    assert all(is_nydus_blob(labels(b)) and not is_nydus_bootstrap(labels(b)) for b in blobs)
    assert is_nydus_bootstrap(labels(boot)) and not is_nydus_blob(labels(boot))
    info = oi.skopeo_inspect(f"{host}/sample:v1-nydus")
    assert info["Layers"] == [x["digest"] for x in layers]
    cfg = json.loads(
        subprocess.run(
            [
                "skopeo",
                "inspect",
                "--config",
                "--raw",
                "--tls-verify=false",
                f"docker://{host}/sample:v1-nydus",
            ],
            capture_output=True,
            check=True,
        ).stdout
    )
    assert cfg["rootfs"]["diff_ids"][:-1] == [b["digest"] for b in blobs]
    assert cfg["history"][-1]["comment"] == "Nydus Bootstrap Layer"
    assert "created" not in cfg["history"][-1]
    # per-layer prefix bootstraps, the last one the whole image
    names = sorted(os.listdir(work / "bootstraps"))
    assert names == sorted(f"{i + 1}-{ly.digest}" for i, ly in enumerate(sample["v1"]))
    with open_bootstrap(str(work / "bootstraps" / f"5-{sample['v1'][4].digest}")) as md:
        assert [f"sha256:{b.blob_id}" for b in md.blobs] == [b["digest"] for b in blobs]
        md.resolve("/var/cache/apt/fresh")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v1",
            "--target",
            f"{host}/sample:v1-nydus",
            "--work-dir",
            str(work),
        ],
        capsys,
    )
    assert rc == 0, out
    assert "0 difference(s)" in out and "check passed" in out


def test_check_reports_differences(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    rc, out = convert(
        capsys, f"{host}/sample:v2", f"{host}/sample:v2-plain", "--work-dir", str(tmp_path / "w")
    )
    assert rc == 0, out
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v1",
            "--target",
            f"{host}/sample:v2-plain",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capsys,
    )
    assert rc == 4, out
    assert "/data/blob1.bin: content differs" in out
    assert "check FAILED" in out


def test_seed_command_line_and_nydusd(sample: dict[str, Any], tmp_path: Path) -> None:
    """The article's command line, with a local source; then its nydusd step."""
    port = sample["host"].split(":")[1]
    src = oi.skopeo_inspect(f"{sample['host']}/sample:v1", raw=True)
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--preserve-digests",
            f"docker://{sample['host']}/sample:v1",
            f"docker://localhost:{port}/ubuntu:16.04",
        ],
        check=True,
    )
    env = {**registry.os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    cmd = (
        "nydusify convert --nydus-image $(which nydus-image) --source "
        f"localhost:{port}/ubuntu:16.04 --target localhost:{port}/ubuntu:16.04-nydus"
    )
    out = subprocess.run(
        ["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    boots = sorted(os.listdir(tmp_path / "tmp" / "bootstraps"))
    assert len(boots) == len(src["layers"])
    last = next(b for b in boots if b.startswith(f"{len(boots)}-sha256:"))
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("nydusd step needs /dev/fuse and root")
    # The article's registry.json, except that it puts digest_validate inside "device",
    # which our nydusd config parser rejects as an unknown key; it is a top-level key.
    (tmp_path / "registry.json").write_text(
        json.dumps(
            {
                "device": {
                    "backend": {
                        "type": "registry",
                        "config": {"scheme": "http", "host": f"localhost:{port}", "repo": "ubuntu"},
                    }
                },
                "digest_validate": False,
                "mode": "direct",
            }
        )
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = open(tmp_path / "nydusd.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            "nydusd",
            "--config",
            "./registry.json",
            "--mountpoint",
            str(mnt),
            "--bootstrap",
            f"./tmp/bootstraps/{last}",
            "--log-level",
            "info",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        _wait_mount(mnt, proc, tmp_path / "nydusd.log")
        assert (mnt / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n::1 localhost6\n"
        assert not (mnt / "etc" / "old.conf").exists()
        assert sorted(os.listdir(mnt / "var" / "cache" / "apt")) == ["fresh"]
        assert (mnt / "data" / "blob2.bin").stat().st_size == 6 << 20
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
        _unmount(mnt)


def _mounted(mnt: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def _wait_mount(mnt: Path, proc: subprocess.Popen[Any], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not _mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no mount at {mnt}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _unmount(mnt: Path) -> None:
    if _mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reproducible(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    digests = []
    for i, tag in enumerate(("repro-a", "repro-b")):
        rep = tmp_path / f"{tag}.json"
        rc, out = convert(
            capsys,
            f"{host}/sample:v1",
            f"{host}/repro{i}:{tag}",
            "--work-dir",
            str(tmp_path / tag),
            "--output-json",
            str(rep),
        )
        assert rc == 0, out
        digests.append(json.loads(rep.read_text())["digest"])
    assert digests[0] == digests[1]


def test_chunk_dict_pushes_only_the_change(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    w = str(tmp_path / "w")
    rc, out = convert(capsys, f"{host}/sample:v1", f"{host}/dict:v1", "--work-dir", w)
    assert rc == 0, out
    rep = tmp_path / "v2.json"
    rc, out = convert(
        capsys,
        f"{host}/sample:v2",
        f"{host}/dict:v2",
        "--work-dir",
        w,
        "--chunk-dict",
        f"{host}/dict:v1",
        "--output-json",
        str(rep),
    )
    assert rc == 0, out
    m1, m2 = manifest(host, "dict:v1"), manifest(host, "dict:v2")
    old = {x["digest"]: x["size"] for x in m1["layers"][:-1]}
    new = {x["digest"]: x["size"] for x in m2["layers"][:-1] if x["digest"] not in old}
    big_layer = max(old.values())
    new_bytes = sum(new.values())
    doc = json.loads(rep.read_text())
    layers = doc["manifests"][0]["layers"]
    # 64 KiB changed in one file of the large layer: its new blob holds one or two 1 MiB
    # chunks plus the chunk tables, not the layer.
    changed = layers[3]
    assert changed["new_chunks"] <= 2 and changed["deduped_chunks"] >= 20, changed
    assert changed["blob_size"] < (2 << 20) + (64 << 10), changed
    assert changed["blob_size"] < big_layer / 10
    # Unchanged layers bring nothing new, except the first one: the chunks of files that
    # later layers delete are not in the dictionary (it holds the final image's chunks).
    assert [ly["blob_digest"] for ly in layers[1:3] + layers[4:]] == [None, None, None]
    assert set(new) == {layers[0]["blob_digest"], changed["blob_digest"]}
    assert new_bytes < big_layer / 6
    assert doc["manifests"][0]["pushed_bytes"] < new_bytes + (64 << 10)
    rc, out = run(
        ["check", "--source", f"{host}/sample:v2", "--target", f"{host}/dict:v2", "--work-dir", w],
        capsys,
    )
    assert rc == 0, out
    # the same with the dictionary given as a local bootstrap (its blobs are in the repo)
    boot = tmp_path / "v1.boot"
    boot.write_bytes(next((tmp_path / "w" / "chunk-dict").iterdir()).read_bytes())
    rc, out = convert(
        capsys,
        f"{host}/sample:v2",
        f"{host}/dict:v2-local",
        "--work-dir",
        str(tmp_path / "w2"),
        "--chunk-dict",
        f"bootstrap:local:{boot}",
    )
    assert rc == 0, out
    assert manifest(host, "dict:v2-local") == m2
    rc, out = convert(
        capsys,
        f"{host}/sample:v2",
        f"{host}/elsewhere:v2",
        "--work-dir",
        str(tmp_path / "w2"),
        "--chunk-dict",
        f"bootstrap:local:{boot}",
    )
    assert rc == 2 and "chunk-dict blob" in out, out


def test_platforms(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    w = str(tmp_path / "w")
    rc, out = convert(
        capsys, f"{host}/multi:m", f"{host}/multi:all-nydus", "--all-platforms", "--work-dir", w
    )
    assert rc == 0, out
    idx = manifest(host, "multi:all-nydus")
    assert idx["mediaType"] == oci.MEDIA_TYPE_OCI_INDEX
    assert [(e["platform"]["architecture"]) for e in idx["manifests"]] == ["amd64", "arm64"]
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/multi:m",
            "--target",
            f"{host}/multi:all-nydus",
            "--multi-platform",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out
    assert out.count("OK:") == 2
    rc, out = convert(
        capsys,
        f"{host}/multi:m",
        f"{host}/multi:arm-nydus",
        "--platform",
        "linux/arm64",
        "--work-dir",
        w,
    )
    assert rc == 0, out
    idx = manifest(host, "multi:arm-nydus")
    assert [e["platform"]["architecture"] for e in idx["manifests"]] == ["arm64"]
    rc, out = convert(
        capsys,
        f"{host}/multi:m",
        f"{host}/merged:m",
        "--all-platforms",
        "--merge-platform",
        "--work-dir",
        w,
    )
    assert rc == 0, out
    idx = manifest(host, "merged:m")
    kinds = [(e["platform"]["architecture"], e.get("artifactType", "")) for e in idx["manifests"]]
    assert kinds == [
        ("amd64", ""),
        ("amd64", oci.ARTIFACT_TYPE_NYDUS_MANIFEST),
        ("arm64", ""),
        ("arm64", oci.ARTIFACT_TYPE_NYDUS_MANIFEST),
    ]
    nydus = [e for e in idx["manifests"] if e.get("artifactType")]
    assert all(oci.PLATFORM_FEATURE_NYDUS in e["platform"]["os.features"] for e in nydus)
    nm = manifest(host, f"merged@{nydus[0]['digest']}")
    assert nm["config"]["mediaType"] == oci.MEDIA_TYPE_NYDUS_CONFIG
    # the OCI manifests were copied into the target repository
    oi.skopeo_inspect(f"{host}/merged@{idx['manifests'][0]['digest']}")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/multi:m",
            "--target",
            f"{host}/merged:m",
            "--multi-platform",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out
    rc, out = convert(
        capsys, f"{host}/multi:m", f"{host}/multi:x", "--platform", "linux/s390x", "--work-dir", w
    )
    assert rc == 2 and "no linux/s390x image" in out


def test_formats_and_referrer(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    w = str(tmp_path / "w")
    rc, out = convert(
        capsys, f"{host}/sample-docker:v1", f"{host}/sample-docker:nydus", "--work-dir", w
    )
    assert rc == 0, out
    m = manifest(host, "sample-docker:nydus")
    assert m["mediaType"] == oci.MEDIA_TYPE_OCI_MANIFEST  # upstream's default
    assert m["layers"][0]["mediaType"] == oci.MEDIA_TYPE_NYDUS_BLOB
    oi.skopeo_inspect(f"{host}/sample-docker:nydus")
    rc, out = convert(
        capsys,
        f"{host}/sample-docker:v1",
        f"{host}/sample-docker:nydus-oci",
        "--oci",
        "--with-referrer",
        "--work-dir",
        w,
    )
    assert rc == 0, out
    m = manifest(host, "sample-docker:nydus-oci")
    assert m["mediaType"] == oci.MEDIA_TYPE_OCI_MANIFEST
    src = oi.skopeo_inspect(f"{host}/sample-docker:v1")
    assert m["subject"]["digest"] == src["Digest"]
    oi.skopeo_inspect(f"{host}/sample-docker:nydus-oci")
    rc, out = convert(
        capsys, f"{host}/sample:v1", f"{host}/sample:dv2", "--docker-v2-format", "--work-dir", w
    )
    assert rc == 0, out
    m = manifest(host, "sample:dv2")
    assert m["mediaType"] == oci.MEDIA_TYPE_DOCKER_MANIFEST
    assert m["config"]["mediaType"] == oci.MEDIA_TYPE_DOCKER_CONFIG
    assert {x["mediaType"] for x in m["layers"]} == {oci.MEDIA_TYPE_DOCKER_LAYER_GZIP}
    assert all(x["annotations"][oci.ANNOTATION_NYDUS_BLOB] == "true" for x in m["layers"][:-1])
    oi.skopeo_inspect(f"{host}/sample:dv2")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v1",
            "--target",
            f"{host}/sample:dv2",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out


def test_localfs_backend(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    blobs = tmp_path / "blobs"
    cfgfile = tmp_path / "backend.json"
    cfgfile.write_text(json.dumps({"dir": str(blobs)}))
    source, target = f"{host}/sample:v1", f"{host}/sample:localfs"
    args = ["--backend-type", "localfs", "--backend-config-file", str(cfgfile)]
    args += ["--work-dir", str(tmp_path / "w")]
    rc, out = convert(capsys, source, target, *args)
    assert rc == 0, out
    m = manifest(host, "sample:localfs")
    assert len(m["layers"]) == 1
    ids = json.loads(m["layers"][0]["annotations"][oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS])
    assert sorted(ids) == sorted(os.listdir(blobs))
    check = [
        "check",
        "--source",
        f"{host}/sample:v1",
        "--target",
        f"{host}/sample:localfs",
        "--backend-type",
        "localfs",
        "--backend-config",
        json.dumps({"dir": str(blobs)}),
        "--work-dir",
        str(tmp_path / "w"),
    ]
    rc, out = run(check, capsys)
    assert rc == 0, out
    inodes = {p.name: p.stat().st_ino for p in blobs.iterdir()}
    assert convert(capsys, source, target, *args)[0] == 0
    assert {p.name: p.stat().st_ino for p in blobs.iterdir()} == inodes  # skipped
    assert convert(capsys, source, target, *args, "--backend-force-push")[0] == 0
    assert all(p.stat().st_ino != inodes[p.name] for p in blobs.iterdir())  # rewritten
    # a damaged chunk in the backend: found by the chunk digests while reading the files
    big = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(big.read_bytes())
    raw[4096] ^= 0x01
    big.write_bytes(bytes(raw))
    rc, out = run(check, capsys)
    assert rc == 4 and "reading the image failed" in out, out


def test_copy(sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = sample["host"]
    w = str(tmp_path / "w")
    assert (
        run(
            [
                "convert",
                "--source",
                f"{host}/sample:v1",
                "--target",
                f"{host}/copysrc:n",
                "--work-dir",
                w,
            ],
            capsys,
        )[0]
        == 0
    )
    rc, out = run(
        ["copy", "--source", f"{host}/copysrc:n", "--target", f"{host}/elsewhere/copied:n"], capsys
    )
    assert rc == 0, out
    assert manifest(host, "elsewhere/copied:n") == manifest(host, "copysrc:n")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v1",
            "--target",
            f"{host}/elsewhere/copied:n",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out
    # an index, all platforms: pushed unchanged (same digest)
    assert (
        run(
            [
                "convert",
                "--source",
                f"{host}/multi:m",
                "--target",
                f"{host}/copyidx:n",
                "--all-platforms",
                "--work-dir",
                w,
            ],
            capsys,
        )[0]
        == 0
    )
    rc, out = run(
        [
            "copy",
            "--source",
            f"{host}/copyidx:n",
            "--target",
            f"{host}/copyidx2:n",
            "--all-platforms",
        ],
        capsys,
    )
    assert rc == 0, out
    assert manifest(host, "copyidx2:n") == manifest(host, "copyidx:n")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/multi:m",
            "--target",
            f"{host}/copyidx2:n",
            "--multi-platform",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out
    tarball = tmp_path / "img.tar"
    rc, out = run(
        ["copy", "--source", f"{host}/copysrc:n", "--target", f"file://{tarball}"], capsys
    )
    assert rc == 0, out
    info = json.loads(
        subprocess.run(
            ["skopeo", "inspect", f"oci-archive:{tarball}"], capture_output=True, check=True
        ).stdout
    )
    assert info["Layers"] == [x["digest"] for x in manifest(host, "copysrc:n")["layers"]]


# --- bad input ----------------------------------------------------------------------------


def test_missing_source(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out = convert(
        capsys,
        f"{sample['host']}/nope:missing",
        f"{sample['host']}/nope:n",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 5
    assert "not found" in out


def test_unsupported_media_type(
    sample: dict[str, Any],
    registry_plain: registry.RegistryServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = registry_plain.client()
    ly = oi.layer([oi.T("file", "a", b"a")])
    cfg = oi.config_for([ly])
    for b in (cfg, ly.blob):
        client.push_blob("weird", oci.sha256_digest(b), b)
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": oci.MEDIA_TYPE_OCI_CONFIG,
            "digest": oci.sha256_digest(cfg),
            "size": len(cfg),
        },
        "layers": [
            {
                "mediaType": "application/vnd.example.squashfs",
                "digest": ly.digest,
                "size": len(ly.blob),
            }
        ],
    }
    client.put_manifest("weird", "v1", json.dumps(doc).encode(), oci.MEDIA_TYPE_OCI_MANIFEST)
    rc, out = convert(
        capsys,
        f"{sample['host']}/weird:v1",
        f"{sample['host']}/weird:n",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 3
    assert "unsupported media type 'application/vnd.example.squashfs'" in out
    rc, out = convert(
        capsys,
        f"{sample['host']}/sample:v1-nydus",
        f"{sample['host']}/weird:n2",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 3 or "not found" in out


def _tags(client: Any, repo: str) -> list[str]:
    try:
        return sorted(client.list_tags(repo))
    except Exception:
        return []


def test_layer_digest_mismatch(
    registry_plain: registry.RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = registry_plain.host
    layers = [
        oi.layer([oi.T("file", "x", oi.rand(300_000, 77))]),
        oi.layer([oi.T("file", "y", oi.rand(200_000, 78))]),
    ]
    oi.write_layout(tmp_path / "l", "t", layers)
    oi.skopeo_push(tmp_path / "l", "t", f"{host}/corrupt:t")
    data = registry_plain.blob_path(layers[1].digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    client = registry_plain.client()
    before = client.get_manifest("corrupt", "t")
    rc, out = convert(
        capsys, f"{host}/corrupt:t", f"{host}/corrupt:n", "--work-dir", str(tmp_path / "w")
    )
    assert rc in (3, 4), out
    assert "digest" in out or "CRC" in out or "corrupt" in out.lower()
    assert _tags(client, "corrupt") == ["t"]
    assert client.get_manifest("corrupt", "t") == before


def test_registry_fails_mid_push(
    sample: dict[str, Any],
    fault_proxy: registry.FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = fault_proxy.host
    client = fault_proxy.upstream.client()
    before = client.get_manifest("sample", "v1")
    # a transient failure of blob uploads is retried and the conversion succeeds
    fault_proxy.add(
        Fault("status", path=r"/failing1/blobs/uploads/", method="PUT", status=500, times=2)
    )
    rc, out = convert(
        capsys,
        f"{proxy}/sample:v1",
        f"{proxy}/failing1:ok",
        "--work-dir",
        str(tmp_path / "a"),
        "--push-retry-delay",
        "0s",
    )
    assert rc == 0, out
    # a registry that keeps failing after some blobs went in: no manifest, source untouched
    fault_proxy.clear()
    fault_proxy.add(
        Fault("status", path=r"/failing2/blobs/uploads/.*", method="PUT", status=503, times=None)
    )
    rc, out = convert(
        capsys,
        f"{proxy}/sample:v1",
        f"{proxy}/failing2:bad",
        "--work-dir",
        str(tmp_path / "b"),
        "--push-retry-count",
        "1",
        "--push-retry-delay",
        "0s",
    )
    assert rc == 5, out
    assert "503" in out
    assert _tags(client, "failing2") == []
    assert client.get_manifest("sample", "v1") == before
    assert fault_proxy.count("PUT", r"/manifests/") == 0
    # a failure at the manifest itself: blobs are there, but nothing names them
    fault_proxy.clear()
    fault_proxy.add(
        Fault("status", path=r"/failing3/manifests/", method="PUT", status=500, times=None)
    )
    rc, out = convert(
        capsys,
        f"{proxy}/sample:v1",
        f"{proxy}/failing3:bad",
        "--work-dir",
        str(tmp_path / "c"),
        "--push-retry-count",
        "0",
        "--push-retry-delay",
        "0s",
    )
    assert rc == 5, out
    assert _tags(client, "failing3") == []


def test_blob_streamed_while_built_survives_a_failed_patch(
    fault_proxy: registry.FaultProxy,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With --stream-push the large layer's blob (over the client's one-PUT size) is PATCHed
    to the target while it is built. A PATCH that fails ends the streaming: the blob is
    pushed again from its file and the image is whole; the registry keeps nothing of the
    dropped session. Converted again into the same repository, each streamed upload is
    dropped (DELETE) once the blob turns out to be there already; no blob counts as pushed."""
    proxy = fault_proxy.host
    client = fault_proxy.upstream.client()
    layers = [
        oi.layer([oi.T("file", "small", b"x\n")]),
        oi.layer([oi.T("file", "big", oi.rand(40 << 20, 91))]),  # incompressible: 40 MiB blob
    ]
    oi.write_layout(tmp_path / "l", "t", layers)
    oi.skopeo_push(tmp_path / "l", "t", f"{fault_proxy.upstream.host}/streamsrc:t")
    fault_proxy.add(
        Fault("status", path=r"/streamed/blobs/uploads/.+", method="PATCH", status=500, times=1)
    )
    rep = tmp_path / "a.json"
    rc, out = convert(
        capsys,
        f"{proxy}/streamsrc:t",
        f"{proxy}/streamed:a",
        "--work-dir",
        str(tmp_path / "a"),
        "--output-json",
        str(rep),
        "--push-retry-delay",
        "0s",
        "--stream-push",
    )
    assert rc == 0, out
    assert "streamed upload" in out and "pushed from the file" in out
    doc = json.loads(rep.read_text())
    m = client.get_manifest("streamed", "a")
    for ly in json.loads(m[0])["layers"]:
        data = client.get_blob("streamed", ly["digest"], max_size=1 << 30)  # digest-checked
        assert len(data) == ly["size"]
    want = {lr["blob_digest"] for lr in doc["manifests"][0]["layers"] if lr["blob_digest"]}
    assert {lr["pushed"] for lr in doc["manifests"][0]["layers"] if lr["blob_digest"]} == {True}
    # one upload per data blob (the big one's streamed session was dropped), the bootstrap
    # layer and the config
    assert fault_proxy.count("PUT", r"/streamed/blobs/uploads/") == len(want) + 2
    assert fault_proxy.count("PATCH", r"/streamed/blobs/uploads/") >= 6  # failed + 5 x 8 MiB

    fault_proxy.clear()
    rep = tmp_path / "b.json"
    rc, out = convert(
        capsys,
        f"{proxy}/streamsrc:t",
        f"{proxy}/streamed:b",
        "--work-dir",
        str(tmp_path / "b"),
        "--output-json",
        str(rep),
        "--stream-push",
    )
    assert rc == 0, out
    doc = json.loads(rep.read_text())
    assert {lr["pushed"] for lr in doc["manifests"][0]["layers"]} == {False}
    assert doc["digest"] == json.loads((tmp_path / "a.json").read_text())["digest"]
    assert fault_proxy.count("PATCH", r"/streamed/blobs/uploads/") >= 5
    assert fault_proxy.count("DELETE", r"/streamed/blobs/uploads/") >= 1
    assert fault_proxy.count("PUT", r"/streamed/blobs/uploads/") == 0


@pytest.mark.kernel
@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"
)
def test_mount(sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = sample["host"]
    assert (
        run(
            [
                "convert",
                "--source",
                f"{host}/sample:v1",
                "--target",
                f"{host}/mountme:n",
                "--work-dir",
                str(tmp_path / "w"),
            ],
            capsys,
        )[0]
        == 0
    )
    mnt = tmp_path / "mnt"
    env = {**registry.os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "mount.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "nydusify"),
            "mount",
            "--target",
            f"{host}/mountme:n",
            "--mount-path",
            str(mnt),
            "--work-dir",
            str(tmp_path / "w"),
            "--nydusd",
            shutil.which("nydusd", path=env["PATH"]) or "nydusd",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        _wait_mount(mnt, proc, tmp_path / "mount.log")
        assert (mnt / "usr" / "share" / "doc").read_bytes() == oi.text(10_000, 5)
        st1, st2 = (mnt / "usr/share/doc-link1").stat(), (mnt / "usr/share/doc").stat()
        assert st1.st_ino == st2.st_ino and st1.st_nlink == 3
        assert os.readlink(mnt / "etc" / "abs") == "/etc/hosts"
        assert os.getxattr(mnt / "usr/lib/libcap.so", "user.comment") == b"a library"
        assert not (mnt / "opt" / "gone").exists()
    finally:
        proc.terminate()
        rc = proc.wait(20)
        log.close()
        _unmount(mnt)
    assert rc == 0
    assert not _mounted(mnt)


registry_basic = registry.registry_basic
registry_tls = registry.registry_tls
test_ca = registry.test_ca


def test_docker_config_credentials_and_tls(
    sample: dict[str, Any],
    registry_basic: registry.RegistryServer,
    registry_tls: registry.RegistryServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Credentials come from $DOCKER_CONFIG/config.json as docker and skopeo use it; an
    HTTPS registry with a private CA is reached with --target-insecure."""
    host = sample["host"]
    cfgdir = tmp_path / "docker"
    cfgdir.mkdir()
    (cfgdir / "config.json").write_text(
        json.dumps({"auths": {registry_basic.host: {"auth": registry.basic_auth()}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(cfgdir))
    w = str(tmp_path / "w")
    rc, out = convert(
        capsys, f"{host}/sample:v1", f"{registry_basic.host}/authed:n", "--work-dir", w
    )
    assert rc == 0, out
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v1",
            "--target",
            f"{registry_basic.host}/authed:n",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out
    (cfgdir / "config.json").write_text("{}")
    rc, out = convert(
        capsys, f"{host}/sample:v1", f"{registry_basic.host}/authed:m", "--work-dir", w
    )
    assert rc == 5 and ("401" in out or "auth" in out.lower()), out
    rc, out = convert(
        capsys,
        f"{host}/sample:v1",
        f"{registry_tls.host}/secure:n",
        "--target-insecure",
        "--work-dir",
        w,
    )
    assert rc == 0, out
    assert registry_tls.client().get_manifest("secure", "n")[1] == oci.MEDIA_TYPE_OCI_MANIFEST


def test_prefetch_patterns_from_stdin(
    sample: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = sample["host"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("/data/blob3.bin\n/etc\n"))
    w = tmp_path / "w"
    rc, out = convert(
        capsys,
        f"{host}/sample:v1",
        f"{host}/prefetch:n",
        "--prefetch-patterns",
        "--work-dir",
        str(w),
    )
    assert rc == 0, out
    last = sorted(os.listdir(w / "bootstraps"))[-1]
    with open_bootstrap(str(w / "bootstraps" / last)) as md:
        got = sorted(md.resolve(p) for p in ("/data/blob3.bin", "/etc"))
        assert sorted(md.prefetch_nids()) == got


@pytest.fixture(scope="module")
def moto_s3() -> Any:
    """moto's S3 server with request signing enforced, and a bucket."""
    with moto_server("nydusify") as m:
        s3 = m.s3()
        s3.create_bucket(Bucket="nydus")
        yield {
            "s3": s3,
            "config": {
                "scheme": "http",
                "endpoint": m.endpoint,
                "region": "us-east-1",
                "bucket_name": "nydus",
                "object_prefix": "blobs/",
                "access_key_id": m.key_id,
                "access_key_secret": m.secret,
            },
        }


def test_s3_backend(
    sample: dict[str, Any],
    moto_s3: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = sample["host"]
    cfg = json.dumps(moto_s3["config"])

    def s3_run(cmd: str, source: str, target: str, config: str, *extra: str) -> tuple[int, str]:
        args = ["--source", f"{host}/{source}", "--target", f"{host}/{target}"]
        args += ["--backend-type", "s3", "--backend-config", config]
        return run([cmd, *args, "--work-dir", str(tmp_path / "w"), *extra], capsys)

    rc, out = s3_run("convert", "sample:v1", "s3img:n", cfg)
    assert rc == 0, out
    m = manifest(host, "s3img:n")
    assert len(m["layers"]) == 1
    ids = json.loads(m["layers"][0]["annotations"][oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS])
    keys = [o["Key"] for o in moto_s3["s3"].list_objects_v2(Bucket="nydus")["Contents"]]
    assert sorted(keys) == sorted(f"blobs/{i}" for i in ids)
    rc, out = s3_run("check", "sample:v1", "s3img:n", cfg)
    assert rc == 0, out
    bad = json.dumps({**moto_s3["config"], "access_key_secret": "wrong"})
    rc, out = s3_run("convert", "sample:v2", "s3img:bad", bad, "--push-retry-count", "0")
    assert rc == 5 and "403" in out, out


def test_progress_on_a_terminal_and_quiet_otherwise(sample: dict[str, Any], tmp_path: Path) -> None:
    import pty

    host = sample["host"]
    env = {**registry.os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    cmd = [
        str(VENV_BIN / "nydusify"),
        "convert",
        "--source",
        f"{host}/sample:v1",
        "--target",
        f"{host}/progress:n",
        "--work-dir",
        str(tmp_path / "w"),
    ]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0
    tty = b"".join(chunks).decode(errors="replace")
    for i in range(1, 6):
        assert f"layer {i}/5 " in tty
    assert "chunks (0 deduplicated), blob sha256:" in tty
    assert "pushed" in tty or "already there" in tty
    assert "converted" in stdout and "time" in stdout  # the summary
    quiet = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0
    assert quiet.stderr == ""
    assert "layer 1/5" not in quiet.stdout and "converted" in quiet.stdout


def test_chunk_dict_from_another_repository(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dictionary's blobs that the new image uses are mounted into the target repo, so
    the image is complete there (check reads every blob from the target repository)."""
    host = sample["host"]
    w = str(tmp_path / "w")
    assert (
        run(
            [
                "convert",
                "--source",
                f"{host}/sample:v1",
                "--target",
                f"{host}/dictsrc:v1",
                "--work-dir",
                w,
            ],
            capsys,
        )[0]
        == 0
    )
    rc, out = convert(
        capsys,
        f"{host}/sample:v2",
        f"{host}/dictuser:v2",
        "--chunk-dict",
        f"bootstrap:registry:{host}/dictsrc:v1",
        "--work-dir",
        w,
    )
    assert rc == 0, out
    m = manifest(host, "dictuser:v2")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v2",
            "--target",
            f"{host}/dictuser:v2",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out
    old = {x["digest"] for x in manifest(host, "dictsrc:v1")["layers"]}
    assert len(old & {x["digest"] for x in m["layers"]}) >= 4


def test_merge_platform_of_a_single_manifest(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    w = str(tmp_path / "w")
    rc, out = convert(
        capsys, f"{host}/sample:v1", f"{host}/single-merged:n", "--merge-platform", "--work-dir", w
    )
    assert rc == 0, out
    idx = manifest(host, "single-merged:n")
    src = oi.skopeo_inspect(f"{host}/sample:v1")
    assert idx["manifests"][0]["digest"] == src["Digest"]
    assert idx["manifests"][1]["platform"] == {
        "architecture": "amd64",
        "os": "linux",
        "os.features": [oci.PLATFORM_FEATURE_NYDUS],
    }
    oi.skopeo_inspect(f"{host}/single-merged@{idx['manifests'][0]['digest']}")
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/sample:v1",
            "--target",
            f"{host}/single-merged:n",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 0, out


@pytest.mark.slow
def test_large_layer_in_bounded_memory(
    registry_plain: registry.RegistryServer, tmp_path: Path
) -> None:
    """A 384 MiB layer streams through the converter: peak RSS stays far below its size."""
    host = registry_plain.host
    files = [oi.T("file", f"big/{k}.bin", oi.rand(96 << 20, 500 + k)) for k in range(4)]
    ly = oi.layer(files, "gzip")
    del files
    oi.write_layout(tmp_path / "l", "big", [ly])
    del ly
    oi.skopeo_push(tmp_path / "l", "big", f"{host}/large:v1")
    shutil.rmtree(tmp_path / "l")
    env = {**registry.os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    rc, peak = oi.run_measured(
        [
            str(VENV_BIN / "nydusify"),
            "convert",
            "--source",
            f"{host}/large:v1",
            "--target",
            f"{host}/large:n",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    assert rc == 0
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB"


def test_check_finds_a_damaged_blob(
    sample: dict[str, Any],
    registry_plain: registry.RegistryServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    host = sample["host"]
    w = str(tmp_path / "w")
    layers = [oi.layer([oi.T("file", "f", oi.rand(400_000, 4242))])]
    oi.write_layout(tmp_path / "l", "t", layers)
    oi.skopeo_push(tmp_path / "l", "t", f"{host}/tamper:src")
    assert (
        run(
            [
                "convert",
                "--source",
                f"{host}/tamper:src",
                "--target",
                f"{host}/tamper:n",
                "--work-dir",
                w,
            ],
            capsys,
        )[0]
        == 0
    )
    rc, out = run(["check", "--target", f"{host}/tamper:n", "--work-dir", w], capsys)
    assert rc == 0, out  # without a source: manifest, bootstrap and every chunk verified
    blob = manifest(host, "tamper:n")["layers"][0]["digest"]
    path = registry_plain.blob_path(blob)
    raw = bytearray(path.read_bytes())
    raw[1000] ^= 0x55
    path.write_bytes(bytes(raw))
    rc, out = run(
        [
            "check",
            "--source",
            f"{host}/tamper:src",
            "--target",
            f"{host}/tamper:n",
            "--work-dir",
            w,
        ],
        capsys,
    )
    assert rc == 4, out
    assert "damaged" in out and "check FAILED" in out


def test_compressor_and_chunk_size(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    for comp, cs in (("lz4_block", "0x40000"), ("none", "0x100000")):
        w = tmp_path / comp
        rc, out = convert(
            capsys,
            f"{host}/sample:v1",
            f"{host}/fmt:{comp}",
            "--compressor",
            comp,
            "--fs-chunk-size",
            cs,
            "--work-dir",
            str(w),
        )
        assert rc == 0, out
        last = sorted(os.listdir(w / "bootstraps"))[-1]
        with open_bootstrap(str(w / "bootstraps" / last)) as md:
            assert md.chunk_size == int(cs, 16)
            assert {b.compressor for b in md.blobs} == {comp}
        rc, out = run(
            [
                "check",
                "--source",
                f"{host}/sample:v1",
                "--target",
                f"{host}/fmt:{comp}",
                "--work-dir",
                str(w),
            ],
            capsys,
        )
        assert rc == 0, out
    rc, out = convert(
        capsys,
        f"{host}/sample:v1",
        f"{host}/fmt:v5",
        "--fs-version",
        "5",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 3 and "only RAFS v6" in out
    rc, out = convert(
        capsys,
        f"{host}/sample:v1",
        f"{host}/fmt:bad",
        "--fs-chunk-size",
        "0x1001",
        "--work-dir",
        str(tmp_path),
    )
    assert rc == 2 and "chunk-size" in out


def test_identical_and_empty_layers(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two identical layers give one blob (converted at the same time, pushed once, listed
    once); empty layers give no blob."""
    host = sample["host"]
    data = oi.rand(150_000, 31337)
    a = oi.layer([oi.T("file", "same", data)])
    b = oi.layer([oi.T("file", "other-name", data, mode=0o600)])  # same blob, other tree
    empty = oi.layer([])
    oi.write_layout(tmp_path / "l", "t", [a, empty, a, b, empty])
    oi.skopeo_push(tmp_path / "l", "t", f"{host}/dup:t")
    w = str(tmp_path / "w")
    rc, out = run(
        ["convert", "--source", f"{host}/dup:t", "--target", f"{host}/dup:n", "--work-dir", w],
        capsys,
    )
    assert rc == 0, out
    m = manifest(host, "dup:n")
    assert len(m["layers"]) == 2  # one blob + the bootstrap
    assert os.listdir(tmp_path / "w" / "blobs") == []
    rc, out = run(
        ["check", "--source", f"{host}/dup:t", "--target", f"{host}/dup:n", "--work-dir", w], capsys
    )
    assert rc == 0, out


def test_mount_and_check_refuse_non_nydus_images(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = sample["host"]
    rc, out = run(
        [
            "mount",
            "--target",
            f"{host}/sample:v1",
            "--mount-path",
            str(tmp_path / "m"),
            "--work-dir",
            str(tmp_path),
            "--nydusd",
            str(VENV_BIN / "nydusd"),
        ],
        capsys,
    )
    assert rc == 3 and "not a Nydus image" in out
    rc, out = run(
        [
            "mount",
            "--target",
            f"{host}/sample:v1",
            "--mount-path",
            str(tmp_path / "m"),
            "--nydusd",
            "/nonexistent/nydusd",
        ],
        capsys,
    )
    assert rc == 2 and "not found" in out
    rc, out = run(["check", "--target", f"{host}/sample:v1", "--work-dir", str(tmp_path)], capsys)
    assert rc != 0
    assert "nydus-bootstrap" in out or "bootstrap" in out


def test_newcomer_errors_name_the_cause(
    sample: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16: a plain OCI image given to check, an explicit platform a single-manifest
    source is not built for, a mount path whose parent is missing."""
    host = sample["host"]
    rc, out = run(["check", "--target", f"{host}/sample:v1", "--work-dir", str(tmp_path)], capsys)
    assert rc == 3 and "is not a Nydus image" in out and "holds no" not in out
    rc, out = convert(
        capsys,
        f"{host}/sample:v1",
        f"{host}/sample:s390x",
        "--platform",
        "linux/s390x",
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert rc == 2 and "single-platform linux/amd64 image" in out
    with pytest.raises(RuntimeError, match="skopeo inspect failed"):
        manifest(host, "sample:s390x")  # nothing was pushed
    missing = tmp_path / "no" / "mnt"
    rc, out = run(
        [
            "mount",
            "--target",
            f"{host}/sample:v1",
            "--mount-path",
            str(missing),
            "--nydusd",
            str(VENV_BIN / "nydusd"),
        ],
        capsys,
    )
    assert rc == 2 and "neither it nor its parent" in out
    assert not (tmp_path / "no").exists()
