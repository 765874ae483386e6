"""Cross-image dedup with ``--chunk-dict bootstrap=PATH`` for layer tars, and ``stat -D -T``.

Acceptance: image v2 of a 500 MB tree with one file changed, built with image v1 as the chunk
dictionary, stores only that file's chunks: its new blob is about the file's size.
"""

from __future__ import annotations

import json
import random
import tarfile
from pathlib import Path

import pytest

MiB = 1 << 20
NFILES = 100
FILE_SIZE = 5 * MiB  # 100 x 5 MiB = 500 MiB
CHANGED = 37  # index of the file v2 changes
CHANGED_SIZE = 7 * MiB + 12345


class _Random:
    """Deterministic incompressible bytes, streamed (never the whole file in memory)."""

    def __init__(self, seed: int, size: int) -> None:
        self.rng = random.Random(seed)
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def write_tree_tar(path: Path, changed: bool) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for d in range(10):
            ti = tarfile.TarInfo(f"dir{d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tf.addfile(ti)
        for i in range(NFILES):
            size, seed = FILE_SIZE, i
            if changed and i == CHANGED:
                size, seed = CHANGED_SIZE, 10_000
            ti = tarfile.TarInfo(f"dir{i % 10}/file{i:03d}")
            ti.size, ti.mode, ti.mtime = size, 0o644, 1_700_000_000
            tf.addfile(ti, _Random(seed, size))  # type: ignore[arg-type]


@pytest.mark.slow
def test_v2_with_v1_as_chunk_dict_stores_only_the_changed_file(
    tmp_path: Path,  # type: ignore[no-untyped-def]
    nydus_image,
) -> None:
    v1_tar, v2_tar = tmp_path / "v1.tar", tmp_path / "v2.tar"
    write_tree_tar(v1_tar, changed=False)
    write_tree_tar(v2_tar, changed=True)
    images = tmp_path / "images"
    blobs = tmp_path / "blobs"
    images.mkdir()
    blobs.mkdir()
    nydus_image(
        "create",
        "-t",
        "tar-rafs",
        "-B",
        images / "v1",
        "-D",
        blobs,
        "-J",
        tmp_path / "v1.json",
        v1_tar,
        timeout=900,
    )
    v1 = json.loads((tmp_path / "v1.json").read_text())
    assert v1["new_chunks"] == NFILES * FILE_SIZE // MiB
    v1_tar.unlink()
    nydus_image(
        "create",
        "-t",
        "tar-rafs",
        "-B",
        tmp_path / "v2",
        "-D",
        blobs,
        "-J",
        tmp_path / "v2.json",
        "--chunk-dict",
        f"bootstrap={images / 'v1'}",
        v2_tar,
        timeout=900,
    )
    v2 = json.loads((tmp_path / "v2.json").read_text())
    changed_chunks = -(-CHANGED_SIZE // MiB)
    assert v2["new_chunks"] == changed_chunks
    assert v2["deduped_chunks"] == (NFILES - 1) * FILE_SIZE // MiB
    # new blob bytes near the changed file's size: its data plus the blob's small trailer
    new_blob = blobs / v2["blob"]
    size = new_blob.stat().st_size
    assert CHANGED_SIZE <= size < CHANGED_SIZE + 64 * 1024, size
    assert v2["blobs"] == [v1["blob"], v2["blob"]]  # v1's blob is referenced, not copied
    nydus_image("check", tmp_path / "v2", "-D", blobs, timeout=900)

    # stat -D (the set of images) -T (the new one): what v2 adds to v1
    r = nydus_image("stat", "-D", images, "-T", tmp_path / "v2", "-J", tmp_path / "stat.json")
    st = json.loads((tmp_path / "stat.json").read_text())
    assert json.loads(r.stdout) == st
    assert st["images"] == 1 and st["target_enabled"]
    target = st["target_image"]
    assert target["own_chunks"] == changed_chunks
    assert target["own_uncomp_size"] == CHANGED_SIZE
    assert target["ref_uncomp_size"] == (NFILES - 1) * FILE_SIZE
    assert target["reuse_ratio"] > 0.98


def test_stat_dir_dedup_over_images(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    from hostile_tars import end, entry

    shared = random.Random(1).randbytes(2 * MiB)
    d = tmp_path / "dir"
    d.mkdir()
    for i in range(3):
        tar = tmp_path / f"{i}.tar"
        tar.write_bytes(
            entry(b"shared", shared) + entry(b"own", random.Random(9 + i).randbytes(MiB)) + end()
        )
        nydus_image("create", "-t", "tar-rafs", "-B", d / f"img{i}", "-D", tmp_path / "blobs", tar)
    (d / "notes.txt").write_text("not an image, has an extension")
    (d / "junk").write_bytes(b"not a bootstrap")  # skipped, as upstream
    st = json.loads(nydus_image("stat", "-D", d, "-T", d / "img2").stdout)
    base = st["base_image"]
    assert st["images"] == 2  # the target is not part of the base set
    assert base["files"] == 4 and base["own_chunks"] == 2 * 3
    assert base["dedup_chunks"] == 4 and base["dedup_ratio"] == 1.5
    assert st["target_image"]["ref_chunks"] == 2 and st["target_image"]["own_chunks"] == 1
