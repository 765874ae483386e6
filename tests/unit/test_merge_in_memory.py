"""nydusify's in-memory prefix merges (:class:`BootstrapMerger`) give the bytes of
``merge_bootstraps`` over the layer bootstraps written and read back."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from nydus.builder.build import BuildOptions, BuildResult, build_from_tar
from nydus.builder.merge import BootstrapMerger, LayerMeta, MergeOptions, merge_bootstraps
from nydus.metadata import open_bootstrap

Entry = tuple[str, str, bytes | str, dict[str, object]]


def _tar(entries: list[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, data, attrs in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime = int(attrs.get("mtime", 1_600_000_000))  # type: ignore[call-overload]
            ti.uid = int(attrs.get("uid", 0))  # type: ignore[call-overload]
            ti.mode = int(attrs.get("mode", 0o644))  # type: ignore[call-overload]
            if "xattr" in attrs:
                ti.pax_headers = {"SCHILY.xattr.user.k": str(attrs["xattr"])}
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind == "file":
                assert isinstance(data, bytes)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, str(data)
                tf.addfile(ti)
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(data)
                tf.addfile(ti)
    return buf.getvalue()


BIG = bytes(range(256)) * 64  # 16 KiB: several 4 KiB chunks
LAYERS: list[list[Entry]] = [
    [
        ("a", "dir", b"", {"mode": 0o750, "uid": 7, "xattr": "lower"}),
        ("a/b", "dir", b"", {"mode": 0o700}),
        ("a/b/big", "file", BIG, {}),
        ("a/b/hard", "link", "a/b/big", {}),
        ("a/sym", "symlink", "b/big", {}),
        ("gone", "file", b"to be removed", {}),
        ("opq", "dir", b"", {}),
        ("opq/old", "file", b"hidden by an opaque dir", {}),
    ],
    [
        # "a" only implied (no entry of its own): a directory the tar implies
        ("a/new", "file", b"new in layer 2" * 500, {"mode": 0o600}),
        (".wh.gone", "file", b"", {}),
        ("opq/.wh..wh..opq", "file", b"", {}),
        ("opq/fresh", "file", b"fresh", {}),
        ("a/b/big", "file", BIG[::-1], {"mtime": 1_700_000_000}),
    ],
    [("a/.wh.sym", "file", b"", {}), ("z", "dir", b"", {"mode": 0o711})],  # no data: no blob
    [("c", "dir", b"", {}), ("c/big", "file", BIG, {})],  # the same data as layer 1
]


def _build(tar: bytes) -> tuple[BuildResult, bytes]:
    out = io.BytesIO()
    res = build_from_tar(io.BytesIO(tar), out, BuildOptions(chunk_size=0x1000, workers=1))
    return res, out.getvalue()


def test_in_memory_prefix_merges_equal_merge_bootstraps(tmp_path: Path) -> None:
    merger = BootstrapMerger(MergeOptions(prefetch_paths=[b"/a"]))
    parent: str | None = None
    for i, entries in enumerate(LAYERS):
        res, blob = _build(_tar(entries))
        digest = hashlib.sha256(blob).hexdigest() if res.blob is not None else None
        size = len(blob) if res.blob is not None else None
        path = str(tmp_path / f"{i + 1}-layer.boot")
        Path(path).write_bytes(res.bootstrap)
        on_disk = merge_bootstraps(
            [path],
            MergeOptions(
                parent_bootstrap=parent,
                blob_digests=[digest] if digest else None,
                blob_sizes=[size] if size is not None else None,
                prefetch_paths=[b"/a"],
            ),
        )
        parent = str(tmp_path / f"prefix-{i + 1}")
        Path(parent).write_bytes(on_disk.bootstrap)
        assert res.tree is not None
        meta = LayerMeta(res.tree, res.blobs, 0x1000, "zstd", "blake3", path)
        merger.add(meta, digest, size)
        in_memory = merger.bootstrap()
        assert in_memory.bootstrap == on_disk.bootstrap, f"prefix {i + 1}"
        assert [b.pack() for b in in_memory.blobs] == [b.pack() for b in on_disk.blobs]
        assert in_memory.stats == {**on_disk.stats, "layers": i + 1}
    with open_bootstrap(merger.bootstrap().bootstrap) as md:
        names = {p for p, _nid in md.walk()}
        assert len(list(md.blobs)) == 3  # layers 1, 2 and 4 have data
        a = md.getattr(md.resolve(b"/a"))
    assert b"/gone" not in names and b"/opq/old" not in names and b"/a/sym" not in names
    assert {b"/opq/fresh", b"/a/new", b"/c/big", b"/z"} <= names
    # main's bytes: the directory layer 2 only implies takes that layer's (default)
    # attributes, not layer 1's 0750/uid 7 (a bootstrap does not record "implied")
    assert (a.mode & 0o7777, a.uid) != (0o750, 7)


def test_in_memory_merge_checks_chunk_size(tmp_path: Path) -> None:
    merger = BootstrapMerger(MergeOptions())
    res, _blob = _build(_tar(LAYERS[2]))
    assert res.tree is not None
    merger.add(LayerMeta(res.tree, res.blobs, 0x1000, "zstd", "blake3", "x.boot"), None, None)
    res2, _blob = _build(_tar(LAYERS[3]))
    assert res2.tree is not None
    with pytest.raises(Exception, match="different chunk sizes"):
        merger.add(LayerMeta(res2.tree, res2.blobs, 0x2000, "zstd", "blake3", "y.boot"), None, None)
