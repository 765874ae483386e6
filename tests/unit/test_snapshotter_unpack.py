"""The layer extractor of nydus.snapshotter.unpack (the containerd side is in integration)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard

from nydus.errors import FormatError, IntegrityError, UnsupportedError
from nydus.snapshotter.api import mount_pb2
from nydus.snapshotter.unpack import extract_layer, mounted


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return raw, "sha256:" + hashlib.sha256(raw).hexdigest()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object):  # type: ignore[no-untyped-def]
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o640
    ti.uid, ti.gid = os.getuid(), os.getgid()
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, (data if kind == tarfile.REGTYPE else None)


def test_bootstrap_layer_extracts_with_modes(tmp_path: Path) -> None:
    raw, diff_id = _tar(
        _entry("image", tarfile.DIRTYPE),
        _entry("image/image.boot", data=b"boot"),
        _entry("image/link", tarfile.SYMTYPE, linkname="image.boot"),
        _entry("image/hard", tarfile.LNKTYPE, linkname="image/image.boot"),
    )
    for blob in (raw, gzip.compress(raw), zstandard.ZstdCompressor().compress(raw)):
        root = tmp_path / f"r{len(blob)}"
        root.mkdir()
        extract_layer(blob, root, diff_id)
        assert (root / "image" / "image.boot").read_bytes() == b"boot"
        assert os.readlink(root / "image" / "link") == "image.boot"
        assert (root / "image" / "hard").stat().st_ino == (root / "image/image.boot").stat().st_ino
        assert (root / "image" / "image.boot").stat().st_mode & 0o7777 == 0o640


def test_diff_id_is_checked(tmp_path: Path) -> None:
    raw, _ = _tar(_entry("f", data=b"x"))
    with pytest.raises(IntegrityError, match="diff ID"):
        extract_layer(raw, tmp_path, "sha256:" + "0" * 64)
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    ("member", "error"),
    [
        (_entry("../escape", data=b"x"), FormatError),
        (_entry("dir/.wh.gone", data=b""), UnsupportedError),
        (_entry("dev", tarfile.CHRTYPE), UnsupportedError),
    ],
)
def test_refused_entries(tmp_path: Path, member, error) -> None:  # type: ignore[no-untyped-def]
    raw, diff_id = _tar(member)
    with pytest.raises(error):
        extract_layer(raw, tmp_path / "root", diff_id)


def test_bind_mount_is_written_in_place(tmp_path: Path) -> None:
    m = mount_pb2.Mount(type="bind", source=str(tmp_path), options=["rw", "rbind"])
    with mounted([m]) as root:
        assert root == tmp_path
    ro = mount_pb2.Mount(type="bind", source=str(tmp_path), options=["ro", "rbind"])
    with pytest.raises(UnsupportedError), mounted([ro]):
        pass
