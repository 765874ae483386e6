"""Layer semantics of the tar source: names, duplicates, implicit parents, hardlinks,
whiteouts, and the streaming blob writer (deferred prefetch region, dedup)."""

from __future__ import annotations

import io
import os
import stat

import pytest

from hostile_tars import end, entry, pax
from nydus import codec
from nydus.builder.blob import BlobWriter, ChunkDict
from nydus.builder.build import BuildOptions, build_from_tar
from nydus.builder.overlay import apply_layer
from nydus.builder.tarsource import load_tar
from nydus.builder.tree import Node, iter_tree
from nydus.errors import ConfigError, FormatError
from nydus.metadata import open_bootstrap
from nydus.storage.blobfile import open_local_blob

CS = 0x1000


def _dir(name: bytes, **kw: object) -> bytes:
    kw.setdefault("mode", 0o755)
    return entry(name, typeflag=b"5", **kw)


def load(data: bytes) -> Node:
    out = io.BytesIO()
    with BlobWriter(
        out,
        blob_index=0,
        chunk_size=CS,
        compressor=codec.compressor_by_name("none"),
        digester=codec.digester_by_name("sha256"),
        chunk_dict=ChunkDict(),
    ) as w:
        layer = load_tar(io.BytesIO(data), w, chunk_size=CS)
        w.finish()
    return layer.root


def paths(root: Node) -> dict[bytes, Node]:
    return dict(iter_tree(root))


def test_names_are_normalised() -> None:
    root = load(
        entry(b"/abs/f", b"1")
        + entry(b"./rel//g", b"2")
        + entry(b"a/./b/", b"", typeflag=b"5")
        + end()
    )
    assert set(paths(root)) == {b"/", b"/abs", b"/abs/f", b"/rel", b"/rel/g", b"/a", b"/a/b"}


def test_root_entry_sets_root_attributes() -> None:
    root = load(_dir(b"./", uid=7, mtime=99, mode=0o700) + entry(b"f") + end())
    assert (root.mode, root.uid, root.mtime, root.implicit) == (0o40700, 7, 99, False)
    root = load(entry(b"f") + end())
    assert (root.mode, root.uid, root.mtime, root.implicit) == (0o40755, 0, 0, True)


def test_later_entry_wins() -> None:
    root = load(
        entry(b"f", b"old")
        + entry(b"f", b"new!", mode=0o600)
        + _dir(b"d/")
        + entry(b"d/in", b"x")
        + entry(b"d", b"now a file")
        + entry(b"e", b"file first")
        + _dir(b"e/")
        + end()
    )
    p = paths(root)
    assert p[b"/f"].size == 4 and stat.S_IMODE(p[b"/f"].mode) == 0o600
    assert p[b"/d"].is_reg and b"/d/in" not in p
    assert p[b"/e"].is_dir and p[b"/e"].children == {}


def test_directory_after_children_keeps_them() -> None:
    root = load(entry(b"a/b/c", b"x") + _dir(b"a/b/", uid=5, mtime=77) + _dir(b"a/", uid=6) + end())
    p = paths(root)
    assert set(p) == {b"/", b"/a", b"/a/b", b"/a/b/c"}
    assert (p[b"/a/b"].uid, p[b"/a/b"].mtime, p[b"/a/b"].implicit) == (5, 77, False)
    assert (p[b"/a"].uid, p[b"/a"].implicit) == (6, False)


def test_implicit_parents() -> None:
    p = paths(load(entry(b"x/y/z", b"1") + end()))
    for d in (b"/x", b"/x/y"):
        assert p[d].is_dir and p[d].implicit and p[d].mode == 0o40755 and p[d].mtime == 0


def test_hardlinks_share_the_target_node() -> None:
    root = load(
        entry(b"a", b"data", mode=0o640, uid=3)
        + entry(b"d/l", typeflag=b"1", linkname=b"./a", mode=0o777, uid=9)
        + entry(b"l2", typeflag=b"1", linkname=b"/d/l")
        + entry(b"s", typeflag=b"2", linkname=b"a")
        + entry(b"sl", typeflag=b"1", linkname=b"s")
        + end()
    )
    p = paths(root)
    assert p[b"/a"] is p[b"/d/l"] is p[b"/l2"]
    assert (stat.S_IMODE(p[b"/d/l"].mode), p[b"/d/l"].uid) == (0o640, 3)  # the target's
    assert p[b"/s"] is p[b"/sl"] and stat.S_IMODE(p[b"/s"].mode) == 0o777


def test_hardlink_to_a_replaced_name_keeps_the_old_inode() -> None:
    root = load(
        entry(b"a", b"first")
        + entry(b"b", typeflag=b"1", linkname=b"a")
        + entry(b"a", b"second!")
        + end()
    )
    p = paths(root)
    assert p[b"/b"] is not p[b"/a"] and p[b"/b"].size == 5 and p[b"/a"].size == 7


@pytest.mark.parametrize(
    "data,match",
    [
        (entry(b"l", typeflag=b"1", linkname=b"x") + end(), "not an earlier entry"),
        (_dir(b"d/") + entry(b"l", typeflag=b"1", linkname=b"d/") + end(), "names a directory"),
        (entry(b"l", typeflag=b"1", linkname=b"./") + end(), "not an earlier entry"),
        (
            entry(b"s", typeflag=b"2", linkname=b"/") + entry(b"s/x", b"1") + end(),
            "not a directory",
        ),
        (entry(b"a/../b") + end(), "'..'"),
        (entry(b"./", b"x") + end(), "root must be a directory"),
    ],
)
def test_rejected_layers(data: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        load(data)


def test_xattrs_kept_foreign_dropped_default_acl_only_on_dirs() -> None:
    from nydus.builder.tarreader import acl_from_text

    acl = acl_from_text(b"user::rwx,group::r-x,other::r-x")
    root = load(
        pax(
            [
                (b"SCHILY.xattr.user.a", b"1"),
                (b"SCHILY.xattr.trusted.b", b"2"),
                (b"SCHILY.xattr.com.apple.quarantine", b"q"),
                (b"SCHILY.xattr.system.posix_acl_default", acl),
            ]
        )
        + entry(b"f")
        + pax([(b"SCHILY.xattr.system.posix_acl_default", acl)])
        + _dir(b"d/")
        + end()
    )
    p = paths(root)
    assert p[b"/f"].xattrs == {b"user.a": b"1", b"trusted.b": b"2"}
    assert p[b"/d"].xattrs == {b"system.posix_acl_default": acl}


def test_symlinks_are_0777_and_devices_keep_numbers() -> None:
    p = paths(
        load(
            entry(b"s", typeflag=b"2", linkname=b"/etc/x", mode=0o755)
            + entry(b"c", typeflag=b"3", devmajor=1, devminor=3, mode=0o666)
            + end()
        )
    )
    assert p[b"/s"].mode == stat.S_IFLNK | 0o777 and p[b"/s"].symlink == b"/etc/x"
    assert p[b"/c"].rdev == os.makedev(1, 3) and stat.S_ISCHR(p[b"/c"].mode)


def test_whiteouts_are_kept_then_applied() -> None:
    lower = load(
        _dir(b"d/")
        + entry(b"d/gone", b"1")
        + entry(b"d/keep", b"2")
        + _dir(b"o/")
        + entry(b"o/old", b"3")
        + entry(b"x", b"4")
        + end()
    )
    upper = load(
        entry(b"d/.wh.gone")
        + entry(b"o/.wh..wh..opq")
        + entry(b"o/new", b"5")
        + entry(b"x", typeflag=b"3")
        + end()
    )
    assert b".wh.gone" in upper.children[b"d"].children  # type: ignore[index]
    merged = paths(apply_layer(lower, upper, "oci"))
    assert set(merged) == {b"/", b"/d", b"/d/keep", b"/o", b"/o/new", b"/x"}
    # an implicit upper directory leaves the lower one's attributes alone
    assert merged[b"/d"].implicit is False and merged[b"/d"].mtime == 1_700_000_000
    assert stat.S_ISCHR(merged[b"/x"].mode)  # a 0:0 device is no whiteout under "oci"


def test_overlayfs_whiteouts() -> None:
    lower = load(entry(b"a", b"1") + _dir(b"o/") + entry(b"o/old", b"3") + end())
    upper = load(
        entry(b"a", typeflag=b"3")
        + pax([(b"SCHILY.xattr.trusted.overlay.opaque", b"y")])
        + _dir(b"o/")
        + end()
    )
    merged = paths(apply_layer(lower, upper, "overlayfs"))
    assert set(merged) == {b"/", b"/o"} and merged[b"/o"].xattrs == {}


def test_file_data_without_a_writer_is_an_error() -> None:
    with pytest.raises(ConfigError):
        load_tar(io.BytesIO(entry(b"f", b"x") + end()), None, chunk_size=CS)
    layer = load_tar(io.BytesIO(entry(b"f") + _dir(b"d/") + end()), None, chunk_size=CS)
    assert set(paths(layer.root)) == {b"/", b"/f", b"/d"}


def test_chunks_dedup_and_holes() -> None:
    a = os.urandom(CS)
    root = load(entry(b"x", a * 3) + entry(b"y", a + os.urandom(10)) + end())
    p = paths(root)
    assert [c.index for c in p[b"/x"].chunks or []] == [0, 0, 0]
    assert [c.index for c in p[b"/y"].chunks or []] == [0, 1]


def _tar_with(files: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(entry(n, d) for n, d in files) + end()


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_prefetch_files_go_first_even_when_they_come_last(compressor: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = [
        (b"a/one", os.urandom(3 * CS + 100)),
        (b"b/two", os.urandom(CS)),
        (b"a/dup", b""),
        (b"c/three", os.urandom(2 * CS)),
        (b"p/hot", os.urandom(CS + 7)),
        (b"p/again", b""),
    ]
    files[2] = (b"a/dup", files[3][1][:CS])  # a chunk of c/three, seen before it
    files[5] = (b"p/again", files[0][1][:CS])  # a prefetched file reusing a deferred chunk
    data = _tar_with(files)
    blob = io.BytesIO()
    opts = BuildOptions(
        chunk_size=CS, compressor=compressor, digester="sha256", prefetch_paths=[b"/p", b"/missing"]
    )
    res = build_from_tar(io.BytesIO(data), blob, opts, spool_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # the spool is gone
    (tmp_path / "blob").write_bytes(blob.getvalue())
    with open_bootstrap(res.bootstrap) as md:
        hot = md.chunks(md.resolve("/p/hot"))
        assert [c.index for c in hot] == [0, 1] and hot[0].compressed_offset == 0
        assert [md.prefetch_nids()] == [[md.resolve("/p")]]
        reader, close = open_local_blob(str(tmp_path / "blob"), md.blobs[0])
        try:
            for name, content in files:
                got = b"".join(reader.read_chunk(c) for c in md.chunks(md.resolve(name)))
                assert got == content, name
            # the ci array is in blob order
            offs = [ce.compressed_offset for ce in reader.trailer().ci]
            assert offs == sorted(offs)
        finally:
            close()
    assert res.stats["diff_id"].startswith("sha256:")
