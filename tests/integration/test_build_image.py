"""nydus-image create end to end: kernel mount, fsck.erofs, unpack round trip, check,
reproducibility, dedup, layered builds and prefetch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from corpus import TreeInfo
from nydus.kernel_mount import mount_erofs, umount
from nydus.metadata import open_bootstrap
from treecmp import compare_trees


def _build(nydus_image, src: Path, out: Path, *extra: str, compressor: str = "zstd") -> dict:  # type: ignore[no-untyped-def]
    out.mkdir(parents=True, exist_ok=True)
    nydus_image(
        "create",
        "--bootstrap",
        out / "boot",
        "--blob-dir",
        out / "blobs",
        "--compressor",
        compressor,
        "-J",
        out / "out.json",
        *extra,
        src,
    )
    return json.loads((out / "out.json").read_text())


def _blob_paths(out: Path) -> list[str]:
    with open_bootstrap(out / "boot") as md:
        return [str(out / "blobs" / b.blob_id) for b in md.blobs]


@pytest.mark.kernel
def test_kernel_mounts_uncompressed_image(
    sample_tree: TreeInfo,
    nydus_image,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    out = tmp_path / "img"
    _build(nydus_image, sample_tree.root, out, compressor="none")
    devices = _blob_paths(out)
    if shutil.which("fsck.erofs"):
        args = ["fsck.erofs", *(f"--device={d}" for d in devices), str(out / "boot")]
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(out / "boot", mnt, devices)
    try:
        diffs = compare_trees(sample_tree.root, mnt)
    finally:
        umount(mnt)
    assert diffs == []


def _extract(tar: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--acls",
            "--numeric-owner",
            "--same-owner",
            "-xpf",
            str(tar),
            "-C",
            str(dest),
        ],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("compressor", ["zstd", "lz4_block"])
def test_unpack_gives_back_the_source(
    sample_tree: TreeInfo,
    nydus_image,
    tmp_path: Path,
    compressor: str,  # type: ignore[no-untyped-def]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("restoring owners and devices from the tar needs root")
    out = tmp_path / "img"
    _build(nydus_image, sample_tree.root, out, compressor=compressor)
    nydus_image("check", out / "boot", "-D", out / "blobs")
    tar = tmp_path / "x.tar"
    r = nydus_image("unpack", out / "boot", "-D", out / "blobs", "--output", tar)
    assert "sockets skipped" in r.stdout  # the corpus has one; tar cannot hold it
    dest = tmp_path / "x"
    _extract(tar, dest)
    sockets = sample_tree.paths.get("socket", [])
    diffs = compare_trees(sample_tree.root, dest, exclude=sockets)
    assert diffs == []


def test_check_detects_corrupt_chunk(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    out = tmp_path / "img"
    _build(nydus_image, src, out, compressor="none")
    blob = Path(_blob_paths(out)[0])
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    r = nydus_image("check", out / "boot", "-D", out / "blobs", check=False)
    assert r.returncode == 4
    assert "digest mismatch" in r.stderr
    r = nydus_image(
        "unpack", out / "boot", "-D", out / "blobs", "--output", tmp_path / "x.tar", check=False
    )
    assert r.returncode == 4 and "digest mismatch" in r.stderr


def _copy_tree(src: Path, dst: Path, reverse: bool) -> None:
    """Copy a tree creating entries in sorted or reverse-sorted order (differs on disk)."""
    dst.mkdir()
    for name in sorted(os.listdir(src), reverse=reverse):
        s, d = src / name, dst / name
        if s.is_dir() and not s.is_symlink():
            _copy_tree(s, d, reverse)
        else:
            shutil.copy2(s, d, follow_symlinks=False)
    shutil.copystat(src, dst)


def test_builds_are_reproducible(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    for i in range(50):
        (src / "d" / f"f{i:03d}").write_bytes(os.urandom(1000 + 997 * i))
        (src / "d" / "e" / f"g{49 - i}").write_text("x" * i)
    os.symlink("d/f001", src / "link")
    a, b = tmp_path / "a", tmp_path / "b"
    _copy_tree(src, a, reverse=False)
    _copy_tree(src, b, reverse=True)
    ja = _build(nydus_image, a, tmp_path / "oa")
    jb = _build(nydus_image, b, tmp_path / "ob")
    assert ja["blob"] == jb["blob"]
    assert (tmp_path / "oa" / "boot").read_bytes() == (tmp_path / "ob" / "boot").read_bytes()
    pa, pb = _blob_paths(tmp_path / "oa")[0], _blob_paths(tmp_path / "ob")[0]
    assert Path(pa).read_bytes() == Path(pb).read_bytes()


def test_dedup_within_and_across_files(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    block = os.urandom(1 << 20)
    (src / "a").write_bytes(block * 3)  # the same chunk three times
    (src / "b").write_bytes(block + os.urandom(1 << 20))
    j = _build(nydus_image, src, tmp_path / "o", "--compressor", "none")
    assert j["new_chunks"] == 2 and j["deduped_chunks"] == 3
    stats = json.loads(nydus_image("inspect", tmp_path / "o" / "boot", "-R", "stats").stdout)
    assert stats["unique_chunks"] == 2 and stats["chunks"] == 5


def test_layered_build_with_whiteouts(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    l1, l2 = tmp_path / "l1", tmp_path / "l2"
    (l1 / "dir" / "sub").mkdir(parents=True)
    shared = os.urandom(200_000)
    (l1 / "keep").write_bytes(shared)
    (l1 / "gone").write_text("delete me")
    (l1 / "dir" / "sub" / "old").write_text("hidden by opaque")
    (l2 / "dir" / "sub").mkdir(parents=True)
    (l2 / ".wh.gone").write_text("")
    (l2 / "dir" / "sub" / ".wh..wh..opq").write_text("")
    (l2 / "dir" / "sub" / "new").write_text("fresh")
    (l2 / "copy").write_bytes(shared)  # same data as a lower file: no new chunk
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    _build(nydus_image, l1, out1)
    out2.mkdir()
    nydus_image(
        "create",
        "--parent-bootstrap",
        out1 / "boot",
        "--bootstrap",
        out2 / "boot",
        "--blob-dir",
        out1 / "blobs",
        "-J",
        out2 / "j.json",
        l2,
    )
    j = json.loads((out2 / "j.json").read_text())
    assert j["deduped_chunks"] == 1
    with open_bootstrap(out2 / "boot") as md:
        paths = sorted(p for p, _n in md.walk())
        assert paths == [b"/", b"/copy", b"/dir", b"/dir/sub", b"/dir/sub/new", b"/keep"]
        assert len(md.blobs) == 2
    nydus_image("check", out2 / "boot", "-D", out1 / "blobs")


def test_prefetch_policy_fs(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    for n in ("a", "b", "c"):
        (src / n).write_bytes(os.urandom(10_000))
    out = tmp_path / "o"
    out.mkdir()
    cmd = nydus_image.command(
        "create",
        "--bootstrap",
        out / "boot",
        "--blob-dir",
        out / "blobs",
        "--prefetch-policy",
        "fs",
        src,
    )
    subprocess.run(cmd, input="/c\n/missing\n", text=True, check=True, capture_output=True)
    got = json.loads(nydus_image("inspect", out / "boot", "-R", "prefetch").stdout)
    assert [e["path"] for e in got] == ["/c"]
    chunks = json.loads(nydus_image("inspect", out / "boot", "-R", "chunks /c").stdout)
    assert chunks[0]["compressed_offset"] == 0  # prefetched file's data comes first


def test_blob_inline_meta(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    (src / "g").write_text("g" * 10_000)
    out = tmp_path / "o"
    r = nydus_image(
        "create",
        "--blob-inline-meta",
        "--bootstrap",
        out / "boot",
        "--blob-dir",
        out / "blobs",
        src,
    )
    blob_id = r.stdout.split("blob: ")[1].split()[0]
    blob = out / "blobs" / blob_id
    # the blob alone is a complete image: its bootstrap is read from the ToC
    nydus_image("check", blob, "--blob", blob)
    with open_bootstrap(blob) as inner, open_bootstrap(out / "boot") as outer:
        assert inner.blobs == outer.blobs
        assert inner.blobs[0].features & 0x2  # INLINED_FS_META
    tar = tmp_path / "x.tar"
    nydus_image("unpack", blob, "--blob", blob, "--output", tar)
    import tarfile

    with tarfile.open(tar) as tf:
        got = tf.extractfile("f")
        assert got is not None and got.read() == (src / "f").read_bytes()


@pytest.mark.kernel
def test_file_over_4gib_with_holes(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    """A > 4 GiB sparse file: 64-bit size, hole chunks, data near the end; kernel reads it."""
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    with open(big, "wb") as f:
        f.write(b"head" * 1000)
        f.seek((4 << 30) + 4096)
        f.write(os.urandom(8192))
    out = tmp_path / "img"
    _build(nydus_image, src, out, compressor="none")
    with open_bootstrap(out / "boot") as md:
        nid = md.resolve("/big")
        assert md.getattr(nid).size == (4 << 30) + 4096 + 8192
        assert len(md.chunks(nid)) == 2  # the two data chunks; the rest are holes
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_erofs(out / "boot", mnt, _blob_paths(out))
    try:
        assert compare_trees(src, mnt) == []
    finally:
        umount(mnt)
