"""Zran images (``nydus-image create --type targz-ref``): the blob is the original tar.gz.

A layer we build reads back identically through ``check``, ``unpack`` and nydusd in both
drivers (FUSE RAFS and kernel EROFS, with a blob cache); a corrupted gzip range gives EIO,
never wrong bytes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest
from test_erofs_mode import _cleanup, _start
from test_nydusd import localfs_config, nydus_image

from nydus.metadata import open_bootstrap
from treecmp import compare_trees

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

MiB = 1 << 20


def _layer(path: Path) -> None:
    """A gzip layer with text, random, zero-filled and small files, links and a hard link."""
    rnd = random.Random(14)
    words = [bytes(rnd.choices(b"abcdefghij klmnop\n", k=rnd.randint(3, 9))) for _ in range(500)]
    files = {
        "etc/text": b"".join(rnd.choices(words, k=400_000)),
        "bin/random": rnd.randbytes(3 * MiB + 123),
        "var/zeros": bytes(5 * MiB),
        "empty": b"",
        **{f"small/{i}": rnd.randbytes(rnd.randint(1, 9000)) for i in range(60)},
    }
    with tarfile.open(path, "w:gz", compresslevel=6) as tf:
        for d in ("bin", "etc", "small", "var"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
        for name, kind, target in (
            ("lnk", tarfile.SYMTYPE, "etc/text"),
            ("hard", tarfile.LNKTYPE, "bin/random"),
        ):
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname, ti.mtime = kind, target, 1_700_000_000
            tf.addfile(ti)


@pytest.fixture(scope="module")
def zran_image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    d = tmp_path_factory.mktemp("zran")
    tgz = d / "layer.tar.gz"
    _layer(tgz)
    blob_id = hashlib.sha256(tgz.read_bytes()).hexdigest()
    blobs = d / "blobs"
    blobs.mkdir()
    shutil.copy(tgz, blobs / blob_id)  # the registry's blob: the layer, unchanged
    boot = d / "boot"
    nydus_image(
        d, "create", "-t", "targz-ref", "--zran-spacing", "0x20000", "-B", boot, "-D", blobs, tgz
    )
    # as upstream: the zran blob meta is a small blob of its own, named in the bootstrap
    info = open_bootstrap(str(boot)).blobs[0]
    assert info.meta_blob_id and (blobs / info.meta_blob_id).stat().st_size == info.meta_blob_size
    want = d / "want"
    want.mkdir()
    with tarfile.open(tgz) as tf:
        tf.extractall(want, filter="tar")
    os.utime(want, ns=(0, 0))  # the layer has no root entry: the image's root has time 0
    t = 1_700_000_000 * 10**9  # tarfile does not set a symlink's mtime when it extracts it
    os.utime(want / "lnk", ns=(t, t), follow_symlinks=False)
    return {"boot": boot, "blobs": blobs, "blob_id": blob_id, "want": want, "dir": d}


def test_bootstrap_references_the_layer(zran_image: dict[str, Path | str]) -> None:
    with open_bootstrap(zran_image["boot"]) as md:
        [b] = md.blobs
        assert b.blob_id == zran_image["blob_id"]
        assert b.compressor == "gzip" and b.features & 0x8 and b.features & 0x10
        assert b.compressed_size == (Path(zran_image["blobs"]) / b.blob_id).stat().st_size


def test_check_and_unpack(zran_image: dict[str, Path | str], tmp_path: Path) -> None:
    nydus_image(tmp_path, "check", "-B", zran_image["boot"], "-D", zran_image["blobs"])
    out = tmp_path / "out.tar"
    nydus_image(
        tmp_path, "unpack", "-B", zran_image["boot"], "-D", zran_image["blobs"], "--output", out
    )
    got = tmp_path / "got"
    got.mkdir()
    with tarfile.open(out) as tf:
        tf.extractall(got, filter="tar")
    assert compare_trees(got, Path(zran_image["want"]), exclude=["lnk"]) == []  # see above
    assert os.readlink(got / "lnk") == "etc/text"


@pytest.mark.kernel
@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_nydusd_serves_the_layer(
    zran_image: dict[str, Path | str], tmp_path: Path, driver: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}
    cfg = localfs_config(Path(zran_image["blobs"]), fs_driver=driver)
    cfg["device"]["cache"] = cache
    try:
        with _start(tmp_path, mnt, cfg, Path(zran_image["boot"])):
            assert compare_trees(mnt, Path(zran_image["want"])) == []
            assert compare_trees(mnt, Path(zran_image["want"])) == []  # now from the cache
        assert (tmp_path / "cache" / f"{zran_image['blob_id']}.blob.data").exists()
    finally:
        _cleanup(mnt)


@pytest.mark.kernel
@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_corrupted_gzip_range_gives_eio(
    zran_image: dict[str, Path | str], tmp_path: Path, driver: str
) -> None:
    blob_id = str(zran_image["blob_id"])
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    raw = bytearray((Path(zran_image["blobs"]) / blob_id).read_bytes())
    with open_bootstrap(zran_image["boot"]) as md:
        c = md.chunks(md.resolve("/bin/random"))[1]
        meta_id = md.blobs[0].meta_blob_id
    shutil.copy(Path(zran_image["blobs"]) / meta_id, blobs / meta_id)
    mid = c.compressed_offset + c.compressed_size // 2  # bytes this chunk surely needs
    for i in range(mid, mid + 64):
        raw[i] ^= 0x5A
    (blobs / blob_id).write_bytes(raw)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    want = (Path(zran_image["want"]) / "etc/text").read_bytes()
    try:
        with _start(
            tmp_path, mnt, localfs_config(blobs, fs_driver=driver), Path(zran_image["boot"])
        ) as d:
            assert (mnt / "etc/text").read_bytes() == want
            with open(mnt / "bin/random", "rb") as f:
                f.seek(c.file_offset)
                with pytest.raises(OSError) as ei:
                    f.read(4096)
                assert ei.value.errno == errno.EIO
            d.check_alive()
    finally:
        _cleanup(mnt)


def test_merged_zran_layers(zran_image: dict[str, Path | str], tmp_path: Path) -> None:
    """``merge`` keeps each zran blob's layer digest and meta blob reference."""
    upper = tmp_path / "upper.tar.gz"
    with tarfile.open(upper, "w:gz") as tf:
        for name, data in (("etc/text", b"replaced\n"), ("new", os.urandom(300_000))):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    blobs = tmp_path / "blobs"
    shutil.copytree(zran_image["blobs"], blobs)
    shutil.copy(upper, blobs / hashlib.sha256(upper.read_bytes()).hexdigest())
    nydus_image(
        tmp_path, "create", "-t", "targz-ref", "-B", tmp_path / "upper.boot", "-D", blobs, upper
    )
    merged = tmp_path / "merged.boot"
    nydus_image(tmp_path, "merge", "-B", merged, zran_image["boot"], tmp_path / "upper.boot")
    nydus_image(tmp_path, "check", "-B", merged, "-D", blobs)
    out = tmp_path / "out.tar"
    nydus_image(tmp_path, "unpack", "-B", merged, "-D", blobs, "--output", out)
    with tarfile.open(out) as tf:
        assert tf.extractfile("etc/text").read() == b"replaced\n"  # type: ignore[union-attr]
        want = (Path(zran_image["want"]) / "bin/random").read_bytes()
        assert tf.extractfile("bin/random").read() == want  # type: ignore[union-attr]
        assert len(tf.extractfile("new").read()) == 300_000  # type: ignore[union-attr]
