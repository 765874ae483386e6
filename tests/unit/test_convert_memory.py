"""What keeps nydusify convert's memory down: a file upload's PATCH pieces in one reused
buffer, the bootstrap layer gzipped as its tar is written (same bytes as the one-shot
gzip), and malloc_trim at phase boundaries."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

from nydus.convert import image as im
from nydus.format import oci
from nydus.libc import trim_heap
from nydus.registry.upload import UploadSource


def _digest(data: bytes) -> str:
    return oci.sha256_digest(data)


def test_file_pieces_reuse_one_buffer(tmp_path: Path) -> None:
    data = os.urandom(10 * 1000 + 123)
    p = tmp_path / "blob"
    p.write_bytes(data)
    src = UploadSource(str(p), None, _digest(data), 1000)
    got: list[bytes] = []
    ids: set[int] = set()
    for piece in src.chunks(reuse=True):
        got.append(bytes(piece))  # used up before the next piece is read
        if len(piece) == 1000:
            ids.add(id(piece))
    src.check_complete()
    assert b"".join(got) == data
    assert [len(g) for g in got] == [1000] * 10 + [123]
    assert len(ids) == 1  # every full piece is the same buffer
    # without reuse (and for a monolithic upload) every piece is its own
    src = UploadSource(str(p), None, _digest(data), 1000)
    assert src.read_all() == data


def test_file_pieces_exact_multiple(tmp_path: Path) -> None:
    data = os.urandom(3000)
    p = tmp_path / "blob"
    p.write_bytes(data)
    src = UploadSource(str(p), None, _digest(data), 1000)
    got = [bytes(x) for x in src.chunks(reuse=True)]
    src.check_complete()
    assert got == [data[:1000], data[1000:2000], data[2000:]]


def _one_shot(boot: bytes) -> tuple[bytes, str]:
    """The bootstrap layer as it was built before: a whole tar, then gzip.compress."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        f = tarfile.TarInfo(oci.BOOTSTRAP_FILE_IN_LAYER)
        f.size, f.mode, f.mtime = len(boot), 0o644, 0
        tf.addfile(f, io.BytesIO(boot))
    tar = raw.getvalue()
    return gzip.compress(tar, compresslevel=6, mtime=0), oci.sha256_digest(tar)


def test_bootstrap_layer_streamed_is_the_one_shot_gzip(tmp_path: Path) -> None:
    for boot in (b"", b"x" * 511, os.urandom(70_000), bytes(range(256)) * 20_000):
        want = _one_shot(boot)
        assert im.bootstrap_layer(boot) == want
        p = tmp_path / "b.boot"
        p.write_bytes(boot)
        assert im.bootstrap_layer(str(p)) == want
        assert im.read_bootstrap_layer(want[0]) == boot


def test_trim_heap_is_harmless() -> None:
    assert trim_heap() in (True, False)
    junk = [bytes(1 << 20) for _ in range(8)]
    del junk
    assert trim_heap() in (True, False)
