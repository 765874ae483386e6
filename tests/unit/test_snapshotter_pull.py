"""The snapshotter unpacker's layer extraction (the extractor itself: test_extract.py; the
containerd side is in integration)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from hostile_tars import hostile_cases, make_sentinel, tree_state
from nydus.errors import FormatError, IntegrityError, UnsupportedError
from nydus.snapshotter.containerd.proto import mount_pb2
from nydus.snapshotter.content.pull import _spooled, extract_layer, mounted


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


def test_escaping_names_are_refused(tmp_path: Path) -> None:
    raw, diff_id = _tar(_entry("../escape", data=b"x"))
    (tmp_path / "root").mkdir()
    with pytest.raises(FormatError, match=r"contains '\.\.'"):
        extract_layer(raw, tmp_path / "root", diff_id)
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_whiteouts_and_devices_are_applied(tmp_path: Path) -> None:
    """The extractor is containerd's applier now: whiteouts and device nodes work."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "gone").write_bytes(b"lower")
    raw, diff_id = _tar(_entry("dir/.wh.gone"), _entry("fifo", tarfile.FIFOTYPE))
    extract_layer(raw, tmp_path, diff_id)
    assert not (tmp_path / "dir" / "gone").exists()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners and modes need root")
@pytest.mark.parametrize("name", [c.name for c in hostile_cases() if c.name.startswith("slip-")])
def test_slip_layer_stays_inside_the_snapshot(name: str, tmp_path: Path) -> None:
    """Regression (issue 12): a hostile layer wrote a file outside the snapshot and made an
    outside file mode 4777 owned by uid 4242, following symlinks and hard links the same tar
    had made. Each slip case now applies inside the root or fails with a FormatError, and the
    sentinel beside the root is left identical."""
    outside = tmp_path / "outside"
    make_sentinel(str(outside))
    case = next(c for c in hostile_cases(os.fsencode(outside)) if c.name == name)
    raw = case.make()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    root = tmp_path / "root"
    root.mkdir()
    before = tree_state(str(outside))
    try:
        extract_layer(raw, root, diff_id)
        outcome = "ok"
    except FormatError as e:
        outcome = "error"
        assert (case.apply_match or case.match) in str(e)
    assert tree_state(str(outside)) == before, "a file outside the snapshot changed"
    assert sorted(os.listdir(tmp_path)) == ["outside", "root"]
    assert outcome == case.apply_expect


def test_spooled_layers_are_digest_checked() -> None:
    data = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    for source in (data, iter([data[:4], data[4:]])):
        with _spooled(source, digest) as f:
            assert f.read() == data
    with (
        pytest.raises(IntegrityError, match="fetched data has"),
        _spooled(iter([b"other"]), digest),
    ):
        pass


def test_bind_mount_is_written_in_place(tmp_path: Path) -> None:
    m = mount_pb2.Mount(type="bind", source=str(tmp_path), options=["rw", "rbind"])
    with mounted([m]) as root:
        assert root == tmp_path
    ro = mount_pb2.Mount(type="bind", source=str(tmp_path), options=["ro", "rbind"])
    with pytest.raises(UnsupportedError), mounted([ro]):
        pass
