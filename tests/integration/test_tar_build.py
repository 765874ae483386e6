"""``nydus-image create -t tar-rafs|targz-rafs|tarzstd-rafs`` end to end.

Images built from layer tars are mounted by the kernel (EROFS) and compared with what GNU tar
extracts from the same tar, and with the tree the tar was made from; upstream's fixture tars
build, unpack and re-extract to the same tree; the diff_id in ``-J`` is the sha256 of the
uncompressed tar for every compression and for stdin.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard

from corpus import TreeInfo
from nydus.kernel_mount import mount_erofs, umount
from nydus.metadata import open_bootstrap
from treecmp import compare_trees

# --delay-directory-restore: a directory listed before entries that come after other
# directories (the macOS fixture) otherwise gets the extraction time as its mtime
GNU_X = [
    "tar",
    "--xattrs",
    "--xattrs-include=*",
    "--acls",
    "--numeric-owner",
    "--same-owner",
    "--delay-directory-restore",
    "-xpf",
]


def create(
    nydus_image,
    src: Path | str,
    out: Path,
    *extra: str,  # type: ignore[no-untyped-def]
    stdin: bytes | None = None,
    check: bool = True,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "create",
        "-t",
        "tar-rafs",
        "-B",
        out / "boot",
        "-D",
        out / "blobs",
        "-J",
        out / "out.json",
        *extra,
        src,
    ]
    if stdin is None:
        nydus_image(*args)
    else:
        p = subprocess.run(
            nydus_image.command(*args),
            input=stdin,
            capture_output=True,
            cwd=nydus_image.cwd,
            timeout=600,
        )
        assert p.returncode == 0 or not check, p.stderr.decode(errors="replace")[-3000:]
    return json.loads((out / "out.json").read_text())


def blob_paths(out: Path) -> list[str]:
    with open_bootstrap(out / "boot") as md:
        return [str(out / "blobs" / b.blob_id) for b in md.blobs]


def gnu_extract(tar: Path, dest: Path) -> None:
    dest.mkdir()
    p = subprocess.run([*GNU_X, str(tar), "-C", str(dest)], capture_output=True, text=True)
    # GNU tar exits 0 even when it cannot set foreign xattrs (the macOS fixture); 2 is fatal
    assert p.returncode == 0, p.stderr


class Mounted:
    def __init__(self, out: Path, mnt: Path) -> None:
        self.out, self.mnt = out, mnt

    def __enter__(self) -> Path:
        self.mnt.mkdir()
        mount_erofs(self.out / "boot", self.mnt, blob_paths(self.out))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        umount(self.mnt)


FIXTURES = ["all-entry-type.tar", "all-entry-type-macos.tar"]


@pytest.mark.kernel
@pytest.mark.parametrize("name", FIXTURES)
def test_upstream_fixture_tars_match_gnu_tar(
    fixtures_dir: Path,
    nydus_image,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    name: str,
) -> None:
    tar = fixtures_dir / "tar" / name
    gnu = tmp_path / "gnu"
    gnu_extract(tar, gnu)
    out = tmp_path / "img"
    j = create(nydus_image, tar, out, "--compressor", "none")
    assert j["diff_id"] == "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    sub = "tar" if (gnu / "tar").exists() else "."  # no root entry: compare below the root
    with Mounted(out, tmp_path / "mnt") as mnt:
        assert compare_trees(gnu / sub, mnt / sub) == []
    # unpack gives a tar that GNU tar extracts to the same tree again
    nydus_image("check", out / "boot", "-D", out / "blobs")
    again = tmp_path / "again.tar"
    nydus_image("unpack", out / "boot", "-D", out / "blobs", "--output", again)
    back = tmp_path / "back"
    gnu_extract(again, back)
    assert compare_trees(gnu / sub, back / sub) == []


def test_upstream_empty_fixture(fixtures_dir: Path, nydus_image, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 0-byte layer: GNU tar calls it "not a tar archive"; upstream (and we) build an image
    holding only the root directory, and no blob."""
    out = tmp_path / "img"
    j = create(nydus_image, fixtures_dir / "tar" / "empty.tar", out)
    assert j["blob"] is None and j["blobs"] == [] and j["entries"] == 0
    with open_bootstrap(out / "boot") as md:
        assert [p for p, _n in md.walk()] == [b"/"]


def test_upstream_fixture_hardlinks_and_symlinks(
    fixtures_dir: Path,
    nydus_image,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    out = tmp_path / "img"
    create(nydus_image, fixtures_dir / "tar" / "all-entry-type.tar", out)
    with open_bootstrap(out / "boot") as md:
        names = [
            "/tar/dir1/dir3/hardlink1.txt",
            "/tar/dir1/dir3/xfile.txt",
            "/tar/dir1/hardlink2.txt",
            "/tar/dir2/hardlink3.txt",
        ]
        nids = {md.resolve(n) for n in names}
        assert len(nids) == 1 and md.getattr(nids.pop()).nlink == 4
        assert md.readlink(md.resolve("/tar/dir2/symlink1.txt")) == b"../dir1/dir3/file1.txt"


def _compressions(raw: bytes) -> dict[str, bytes]:
    return {
        "tar": raw,
        "gz": gzip.compress(raw, 6),
        "zst": zstandard.ZstdCompressor(level=3).compress(raw),
    }


@pytest.mark.kernel
def test_corpus_round_trip_through_our_unpack(
    sample_tree: TreeInfo,
    nydus_image,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    """tree -> image -> unpack (PAX: ns mtimes, xattrs, ACL text) -> tar image == tree."""
    d = tmp_path / "dirimg"
    d.mkdir()
    nydus_image(
        "create", "-B", d / "boot", "-D", d / "blobs", "--compressor", "none", sample_tree.root
    )
    tar = tmp_path / "layer.tar"
    nydus_image("unpack", d / "boot", "-D", d / "blobs", "--output", tar)
    raw = tar.read_bytes()
    sockets = sample_tree.paths.get("socket", [])
    for kind, blob in _compressions(raw).items():
        out = tmp_path / f"img-{kind}"
        src = tmp_path / f"layer.{kind}"
        src.write_bytes(blob)
        if kind == "gz":
            j = create(nydus_image, "-", out, "--compressor", "none", stdin=blob)
        else:
            j = create(nydus_image, src, out, "--compressor", "none")
        assert j["diff_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
        assert j["compression"] == {"tar": "none", "gz": "gzip", "zst": "zstd"}[kind]
        with Mounted(out, tmp_path / f"mnt-{kind}") as mnt:
            assert compare_trees(sample_tree.root, mnt, exclude=sockets) == [], kind


@pytest.mark.kernel
@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_tar_layers_match_gnu_extraction(
    sample_tree: TreeInfo,
    nydus_image,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    fmt: str,
) -> None:
    """GNU tar's own archive (sparse files, xattrs, ACLs, long names) built as a layer shows
    what GNU tar extracts from it; the PAX one also equals the source tree."""
    tar = tmp_path / "layer.tar"
    meta = ["--xattrs", "--xattrs-include=*", "--acls"] if fmt == "posix" else []  # GNU: none
    p = subprocess.run(
        [
            "tar",
            *meta,
            "--sparse",
            f"--format={fmt}",
            "-C",
            str(sample_tree.root),
            "-cf",
            str(tar),
            ".",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode in (0, 1), p.stderr  # 1: "socket ignored"
    out = tmp_path / "img"
    create(nydus_image, tar, out, "--compressor", "none")
    gnu = tmp_path / "gnu"
    gnu_extract(tar, gnu)
    sockets = sample_tree.paths.get("socket", [])
    with Mounted(out, tmp_path / "mnt") as mnt:
        assert compare_trees(gnu, mnt) == []
        if fmt == "posix":
            assert compare_trees(sample_tree.root, mnt, exclude=sockets) == []


def test_stdin_and_types(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    from hostile_tars import end, entry

    raw = entry(b"a", os.urandom(300_000)) + entry(b"b", b"x" * 5000) + end()
    ids = set()
    for i, (typ, blob) in enumerate(
        [
            ("tar-rafs", raw),
            ("targz-rafs", gzip.compress(raw)),
            ("tarzstd-rafs", zstandard.compress(raw)),
            ("tar-rafs", gzip.compress(raw)),
        ]
    ):
        out = tmp_path / f"o{i}"
        out.mkdir()
        cmd = nydus_image.command(
            "create", "-t", typ, "-B", out / "boot", "-D", out / "blobs", "-J", out / "j.json", "-"
        )
        subprocess.run(cmd, input=blob, check=True, capture_output=True)
        j = json.loads((out / "j.json").read_text())
        assert j["diff_id"] == "sha256:" + hashlib.sha256(raw).hexdigest()
        ids.add(j["blob"])
        nydus_image("check", out / "boot", "-D", out / "blobs")
    assert len(ids) == 1  # the same layer gives the same blob whatever its compression


def test_cli_errors(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 100)
    r = nydus_image(
        "create", "-t", "tar-rafs", "-B", tmp_path / "b", "-D", tmp_path / "d", bad, check=False
    )
    assert r.returncode == 3 and "checksum" in r.stderr
    assert not (tmp_path / "b").exists() and os.listdir(tmp_path / "d") == []
    r = nydus_image("create", "-t", "tar-rafs", "-B", tmp_path / "b", bad, check=False)
    assert r.returncode == 2 and "--blob" in r.stderr
    r = nydus_image(
        "create",
        "-t",
        "tar-rafs",
        "-B",
        tmp_path / "b",
        "-D",
        tmp_path / "d",
        "--prefetch-policy",
        "fs",
        "-",
        check=False,
    )
    assert r.returncode == 2 and "stdin" in r.stderr


def test_prefetch_policy_fs_for_tar(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    from hostile_tars import end, entry

    tar = tmp_path / "l.tar"
    tar.write_bytes(
        entry(b"a", os.urandom(3 << 20))
        + entry(b"z/hot", os.urandom(2 << 20))
        + entry(b"z/cold", os.urandom(100))
        + end()
    )
    out = tmp_path / "o"
    out.mkdir()
    cmd = nydus_image.command(
        "create",
        "-t",
        "tar-rafs",
        "-B",
        out / "boot",
        "-D",
        out / "blobs",
        "--prefetch-policy",
        "fs",
        tar,
    )
    subprocess.run(cmd, input="/z/hot\n/nope\n", text=True, check=True, capture_output=True)
    got = json.loads(nydus_image("inspect", out / "boot", "-R", "prefetch").stdout)
    assert [e["path"] for e in got] == ["/z/hot"]
    hot = json.loads(nydus_image("inspect", out / "boot", "-R", "chunks /z/hot").stdout)
    assert hot[0]["compressed_offset"] == 0 and [c["index"] for c in hot] == [0, 1]
    nydus_image("check", out / "boot", "-D", out / "blobs")
    assert [p.name for p in (out / "blobs").iterdir() if p.name.startswith(".")] == []


def test_blob_inline_meta_from_tar(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    from hostile_tars import end, entry

    tar = tmp_path / "l.tar"
    tar.write_bytes(entry(b"f", os.urandom(70_000)) + end())
    out = tmp_path / "o"
    out.mkdir()
    r = nydus_image(
        "create",
        "-t",
        "tar-rafs",
        "--blob-inline-meta",
        "-B",
        out / "boot",
        "-D",
        out / "blobs",
        tar,
    )
    blob = out / "blobs" / r.stdout.split("blob: ")[1].split()[0]
    nydus_image("check", blob, "--blob", blob)


def test_layered_tar_build_with_whiteouts(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    from hostile_tars import end, entry

    shared = os.urandom(200_000)
    l1 = tmp_path / "l1.tar"
    l1.write_bytes(
        entry(b"./", typeflag=b"5", mode=0o755, mtime=5)
        + entry(b"keep", shared)
        + entry(b"gone", b"bye")
        + entry(b"d/sub/old", b"o")
        + end()
    )
    l2 = tmp_path / "l2.tar"
    l2.write_bytes(
        entry(b".wh.gone")
        + entry(b"d/sub/.wh..wh..opq")
        + entry(b"d/sub/new", b"n")
        + entry(b"copy", shared)
        + end()
    )
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    create(nydus_image, l1, o1)
    j = create(nydus_image, l2, o2, "--parent-bootstrap", str(o1 / "boot"))
    assert j["deduped_chunks"] == 1 and j["new_chunks"] == 1
    with open_bootstrap(o2 / "boot") as md:
        assert sorted(p for p, _n in md.walk()) == [
            b"/",
            b"/copy",
            b"/d",
            b"/d/sub",
            b"/d/sub/new",
            b"/keep",
        ]
        assert md.getattr(md.root_nid).mtime == 5  # l2 has no root entry: l1's stays
        assert len(md.blobs) == 2
    for b in (o1 / "blobs").iterdir():
        shutil.copy(b, o2 / "blobs" / b.name)
    nydus_image("check", o2 / "boot", "-D", o2 / "blobs")


def test_converter_style_invocation(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    """The arguments nydus-snapshotter's converter passes to pack a layer (tar2rafs): the tar
    through a FIFO, "/" as prefetch pattern on stdin, the bootstrap inlined in the blob, the
    log level after the subcommand; then its merge and unpack calls."""
    import threading

    from hostile_tars import end, entry

    raw = entry(b"etc/os-release", b"ID=test\n") + entry(b"bin/x", os.urandom(2 << 20)) + end()
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(gzip.compress(raw)))
    writer.start()
    blob = tmp_path / "layer.blob"
    cmd = nydus_image.command(
        "create",
        "--log-level",
        "warn",
        "--prefetch-policy",
        "fs",
        "--blob",
        blob,
        "--whiteout-spec",
        "none",
        "--fs-version",
        "6",
        "--type",
        "tar-rafs",
        "--blob-inline-meta",
        "--features",
        "blob-toc",
        "--compressor",
        "zstd",
        "--chunk-size",
        "0x100000",
        "--batch-size",
        "0",
        "--aligned-chunk",
        fifo,
    )
    p = subprocess.run(cmd, input=b"/", capture_output=True, timeout=120)
    writer.join()
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    boot = tmp_path / f"{hashlib.sha256(blob.read_bytes()).hexdigest()}"
    shutil.copy(blob, boot)  # the converter names each layer's file by its digest
    merged = tmp_path / "merged.boot"
    js = tmp_path / "merge.json"
    cmd = nydus_image.command(
        "merge",
        "--log-level",
        "warn",
        "--prefetch-policy",
        "fs",
        "--output-json",
        js,
        "--bootstrap",
        merged,
        boot,
        "--blob-digests",
        boot.name,
        "--blob-sizes",
        str(blob.stat().st_size),
    )
    subprocess.run(cmd, input=b"/", check=True, capture_output=True, timeout=120)
    assert json.loads(js.read_text())["blobs"] == [boot.name]
    out = tmp_path / "back.tar"
    nydus_image(
        "unpack", "--log-level", "warn", "--bootstrap", merged, "--output", out, "--blob", boot
    )
    import tarfile

    with tarfile.open(out) as tf:
        x = tf.extractfile("bin/x")
        assert x is not None and x.read() == raw[1536 : 1536 + (2 << 20)]
