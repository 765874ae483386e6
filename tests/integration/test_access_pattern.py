"""Issue 17, point 4 end to end: a recorded access pattern, exported, and an image optimized
for it.

* nydusd with ``access_pattern`` in both drivers (FUSE RAFS mode; kernel EROFS mode, where the
  blob-device reads are mapped back to files): files read through the mount come back from
  ``nydusify access-pattern --apisock`` in first-access order.
* ``nydusify optimize`` against a real docker-registry: a small image converted by our
  nydusify, optimized for a list of its files; the pushed image has the prefetch blob as one more
  Nydus blob layer, the upstream bootstrap annotation, a prefetch table and the listed files'
  chunks first in that blob, reads few ranges of the source, and ``nydusify check`` finds it
  equal to the OCI source file by file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
from pathlib import Path

import pytest
import test_erofs_mode as em
from test_nydusd import localfs_config, nydus_image

import oci_images as oi
import registry
from nydus.cli.nydusify import main as nydusify
from nydus.format import oci
from nydus.metadata import open_bootstrap

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

registry_plain = registry.registry_plain
mnt = em.mnt
_mounts, _start = em._mounts, em._start
MiB = 1 << 20


def _files(root: Path) -> dict[str, bytes]:
    rng = random.Random(4)
    files = {name: rng.randbytes(MiB + 4096) for name in ("a", "b", "c", "d", "e")}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_pattern_recorded_and_exported(
    driver: str, tmp_path: Path, mnt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = _files(src)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    nydus_image(tmp_path, "create", "--bootstrap", boot, "--blob-dir", blobs, src)
    cfg = localfs_config(blobs, fs_driver=driver, access_pattern=True)
    with _start(tmp_path, mnt, cfg, boot) as d:
        assert _mounts(mnt)[-1] == ("erofs" if driver == "erofs" else "fuse.rafs")
        with open(mnt / "d", "rb") as f:
            f.seek(MiB)
            assert f.read(100) == files["d"][MiB : MiB + 100]
        assert (mnt / "b").read_bytes()[:10] == files["b"][:10]
        out = tmp_path / "list"
        js = tmp_path / "pattern.json"
        rc = nydusify(
            [
                "access-pattern",
                "--apisock",
                str(d.apisock),
                "--output",
                str(out),
                "--output-json",
                str(js),
            ]
        )
        assert rc == 0, capsys.readouterr().err
    assert out.read_text() == "/d\n/b\n"
    entries = json.loads(js.read_text())
    by = {e["file_path"]: e for e in entries}
    # what was read is inside the ranges (the kernel reads ahead: they may be wider)
    assert any(lo <= MiB and MiB + 100 <= lo + n for lo, n in by["/d"]["ranges"])
    assert any(lo == 0 and n >= 10 for lo, n in by["/b"]["ranges"])
    assert all(e["ino"] > 0 and e["nr_read"] >= 1 for e in entries)


# --------------------------------------------------------------------------- optimize


def _layer(files: dict[str, bytes]) -> oi.Layer:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in sorted({os.path.dirname(p) for p in files if "/" in p}):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    tar = raw.getvalue()
    return oi.Layer(tar, *oi.compress(tar, "gzip"))


def test_nydusify_optimize(
    registry_plain: registry.RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(9)
    base = {f"usr/lib/l{i}.so": rng.randbytes(rng.randrange(1, 3 * MiB)) for i in range(8)}
    app = {f"app/m{i}.py": rng.randbytes(rng.randrange(100, 300_000)) for i in range(20)}
    oi.write_layout(tmp_path / "oci", "1", [_layer(base), _layer(app)])
    host = registry_plain.host
    oi.skopeo_push(tmp_path / "oci", "1", f"{host}/opt:1")
    work = str(tmp_path / "work")
    rc = nydusify(
        [
            "convert",
            "--source",
            f"{host}/opt:1",
            "--target",
            f"{host}/opt:1-nydus",
            "--work-dir",
            work,
            "--fs-chunk-size",
            "0x40000",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    listed = ["/app/m7.py", "/usr/lib/l3.so", "/app/m2.py", "/not/there", "/app/m7.py"]
    lst = tmp_path / "prefetch.list"
    lst.write_text("\n".join(listed) + "\n")
    report = tmp_path / "report.json"
    rc = nydusify(
        [
            "optimize",
            "--plain-http",
            "--source",
            f"{host}/opt:1-nydus",
            "--target",
            f"{host}/opt:1-opt",
            "--prefetch-files",
            str(lst),
            "--work-dir",
            work,
            "--output-json",
            str(report),
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "prefetch blob" in out.out
    rep = json.loads(report.read_text())
    want_bytes = len(app["app/m7.py"]) + len(base["usr/lib/l3.so"]) + len(app["app/m2.py"])
    assert rep["files"] == 3 and rep["bytes"] == want_bytes and rep["missing"] == ["/not/there"]
    # only the listed chunks were read, as a few merged ranges
    assert rep["requests"] <= 4 and rep["fetched"] < 2 * want_bytes
    client = registry_plain.client()
    src_body, _, _ = client.get_manifest("opt", "1-nydus")
    body, _, digest = client.get_manifest("opt", "1-opt")
    assert digest == rep["manifest_digest"]
    src_m, m = json.loads(src_body), json.loads(body)
    *blobs, boot_desc = m["layers"]
    assert blobs[:-1] == src_m["layers"][:-1]
    new = blobs[-1]
    assert new["digest"] == rep["prefetch_blob"] and new["size"] == rep["prefetch_blob_size"]
    assert new["mediaType"] == oci.MEDIA_TYPE_NYDUS_BLOB
    assert new["annotations"][oci.ANNOTATION_NYDUS_BLOB] == "true"
    ann = boot_desc["annotations"]
    assert (
        ann["containerd.io/snapshot/nydus-separated-blob-with-prefetch-files"] == new["digest"][7:]
    )
    assert ann[oci.ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    cfg = json.loads(client.get_blob("opt", m["config"]["digest"]))
    assert cfg["rootfs"]["diff_ids"][:-1] == [b["digest"] for b in blobs]
    gz = client.get_blob("opt", boot_desc["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz))) as tf:
        member = tf.extractfile("image/image.boot")
        assert member is not None
        (tmp_path / "opt.boot").write_bytes(member.read())
    with open_bootstrap(str(tmp_path / "opt.boot")) as md:
        assert md.blobs[-1].blob_id == new["digest"][7:]
        assert md.prefetch_nids() == [md.resolve(p) for p in listed[:3]]
        order = [c for p in listed[:3] for c in md.chunks(md.resolve(p))]
        assert {c.blob_index for c in order} == {len(md.blobs) - 1}
        assert [c.compressed_offset for c in order] == sorted(c.compressed_offset for c in order)
        assert order[0].compressed_offset == 0
        assert {c.blob_index for c in md.chunks(md.resolve("/app/m1.py"))} != {len(md.blobs) - 1}
    # the optimized image has the source's files, byte for byte
    rc = nydusify(
        [
            "check",
            "--plain-http",
            "--source",
            f"{host}/opt:1",
            "--target",
            f"{host}/opt:1-opt",
            "--work-dir",
            work,
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    # an OCI (non-Nydus) source is refused in one line
    rc = nydusify(
        [
            "optimize",
            "--plain-http",
            "--source",
            f"{host}/opt:1",
            "--target",
            f"{host}/opt:x",
            "--prefetch-files",
            str(lst),
            "--work-dir",
            work,
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "not a Nydus image" in err and "Traceback" not in err


def test_convert_prefetch_patterns_places_listed_files_first(
    registry_plain: registry.RegistryServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``nydusify convert --prefetch-patterns`` (the list on stdin): the prefetch table lists
    the files, and in each layer's blob their chunks come before every other chunk."""
    import sys

    rng = random.Random(3)
    base = {f"lib/l{i}": rng.randbytes(rng.randrange(1, 600_000)) for i in range(10)}
    app = {f"app/m{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(10)}
    oi.write_layout(tmp_path / "oci", "1", [_layer(base), _layer(app)])
    host = registry_plain.host
    oi.skopeo_push(tmp_path / "oci", "1", f"{host}/pp:1")
    listed = ["/app/m8", "/lib/l9", "/lib/l4"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(listed) + "\n"))
    work = tmp_path / "w"
    rc = nydusify(
        [
            "convert",
            "--source",
            f"{host}/pp:1",
            "--target",
            f"{host}/pp:1-nydus",
            "--prefetch-patterns",
            "--work-dir",
            str(work),
            "--fs-chunk-size",
            "0x10000",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    last = sorted(os.listdir(work / "bootstraps"))[-1]
    with open_bootstrap(str(work / "bootstraps" / last)) as md:
        assert sorted(md.prefetch_nids()) == sorted(md.resolve(p) for p in listed)
        hot: dict[int, list[int]] = {}
        cold: dict[int, list[int]] = {}
        for path, nid in md.walk():
            if not md.getattr(nid).is_reg:
                continue
            side = hot if path.decode() in listed else cold
            for c in md.chunks(nid):
                side.setdefault(c.blob_index, []).append(c.compressed_offset)
        assert sorted(hot) == [0, 1]  # both layers have listed files
        for blob, offs in hot.items():
            assert max(offs) < min(cold[blob]), f"blob {blob}: a listed chunk comes late"
