"""Access-pattern optimization (issue 17, point 4) without a registry: the chunk → file reverse
mapping, the access pattern of both drivers (file reads; blob-device reads mapped back to
files), its export as a prefetch list, and the optimized image's layout (prefetch blob with the
listed files' chunks first and in order, prefetch table, every file's bytes unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from nydus.builder.build import BuildOptions, build_image
from nydus.builder.dirsource import load_directory
from nydus.builder.optimize import optimize_image, read_prefetch_list
from nydus.cli.nydusify import main as nydusify_main
from nydus.convert.pattern import prefetch_paths, write_pattern
from nydus.errors import ConfigError
from nydus.fs import FsOptions, RafsFs
from nydus.fs.chunkmap import ChunkFileMap, FileRange
from nydus.fs.metrics import merge_ranges
from nydus.metadata import open_bootstrap
from nydus.storage.blobfile import LocalBlobChunks, open_local_blob

CHUNK = 0x1000


def _tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(17)
    files = {
        "a": rng.randbytes(3 * CHUNK + 100),
        "dir/b": rng.randbytes(CHUNK // 2),
        "dir/c": rng.randbytes(5 * CHUNK),
        "dir/sub/d": rng.randbytes(2 * CHUNK),
        "e": rng.randbytes(CHUNK + 1),
        "empty": b"",
    }
    files["same-as-b"] = files["dir/b"]  # a deduplicated chunk
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.link(root / "e", root / "e-link")
    files["e-link"] = files["e"]
    return files


def _build(src: Path, out: Path) -> tuple[Path, Path]:
    blobs = out / "blobs"
    blobs.mkdir(parents=True)
    tmp = blobs / "blob.tmp"
    with open(tmp, "wb") as f:
        res = build_image(load_directory(src), f, BuildOptions(chunk_size=CHUNK))
    assert res.blob is not None
    tmp.rename(blobs / res.blob.entry.blob_id)
    boot = out / "bootstrap"
    boot.write_bytes(res.bootstrap)
    return boot, blobs


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
    src = tmp_path / "src"
    files = _tree(src)
    boot, blobs = _build(src, tmp_path / "img")
    return boot, blobs, files


def _fs(boot: Path, blobs: Path, **kw: Any) -> RafsFs:
    meta = open_bootstrap(boot)
    return RafsFs(meta, LocalBlobChunks(str(blobs), meta.blobs), FsOptions(**kw))


# --------------------------------------------------------------------------- reverse mapping


def test_reverse_mapping_finds_every_chunk_and_partial_ranges(image: Any) -> None:
    boot, _blobs, _files = image
    md = open_bootstrap(boot)
    cmap = ChunkFileMap(md)
    nid_c = md.resolve("/dir/c")
    for c in md.chunks(nid_c):
        hits = cmap.files_in(c.blob_index, c.uncompressed_offset, c.uncompressed_size)
        assert FileRange(nid_c, "/dir/c", c.file_offset, c.uncompressed_size) in hits
    # a range straddling the end of one chunk and the start of the next one
    cs = md.chunks(nid_c)
    a, b = cs[1], cs[2]
    assert b.uncompressed_offset == a.uncompressed_offset + a.uncompressed_size
    hits = cmap.files_in(a.blob_index, b.uncompressed_offset - 10, 30)
    assert hits == [
        FileRange(nid_c, "/dir/c", a.file_offset + a.uncompressed_size - 10, 10),
        FileRange(nid_c, "/dir/c", b.file_offset, 20),
    ]
    # a deduplicated chunk names both files; a hardlink is reported under its first path
    c_b = md.chunks(md.resolve("/dir/b"))[0]
    paths = {r.path for r in cmap.files_in(c_b.blob_index, c_b.uncompressed_offset, 1)}
    assert paths == {"/dir/b", "/same-as-b"}
    c_e = md.chunks(md.resolve("/e"))[0]
    assert {r.path for r in cmap.files_in(0, c_e.uncompressed_offset, 1)} == {"/e"}
    # past the blob, in no blob, empty: nothing
    end = md.blobs[0].uncompressed_size
    assert cmap.files_in(0, end + CHUNK, CHUNK) == []
    assert cmap.files_in(7, 0, CHUNK) == []
    assert cmap.files_in(0, 0, 0) == []
    total = sum(
        len(md.chunks(n)) for p, n in md.walk() if md.getattr(n).is_reg and p not in (b"/e-link",)
    )
    assert cmap.chunk_count() == total


def test_merge_ranges() -> None:
    assert merge_ranges([(10, 20), (0, 5), (5, 8), (15, 30), (40, 41)]) == [
        (0, 8),
        (10, 30),
        (40, 41),
    ]
    assert merge_ranges([]) == []


# --------------------------------------------------------------------------- access pattern


def test_pattern_of_fuse_reads_has_ranges(image: Any) -> None:
    boot, blobs, _files = image
    fs = _fs(boot, blobs, access_pattern=True)
    dino = fs.lookup(1, b"dir").ino
    c = fs.lookup(dino, b"c").ino
    a = fs.lookup(1, b"a").ino
    fs.read(c, 0, 100)
    fs.read(a, CHUNK, 50)
    fs.read(c, 100, 100)  # joins the first range
    fs.read(c, 3 * CHUNK, 10)
    pat = fs.stats.export_patterns()
    assert [p["file_path"] for p in pat] == ["/dir/c", "/a"]
    assert pat[0]["ranges"] == [[0, 200], [3 * CHUNK, 10]] and pat[0]["nr_read"] == 3
    assert pat[1]["ranges"] == [[CHUNK, 50]] and pat[1]["bytes_read"] == 50


def test_pattern_of_blob_device_reads_is_mapped_to_files(image: Any) -> None:
    """Kernel EROFS mode: the daemon sees blob ranges only; the export names the files."""
    boot, blobs, _files = image
    fs = _fs(boot, blobs, access_pattern=True)
    md = fs.meta
    d0 = md.chunks(md.resolve("/dir/sub/d"))[0]
    a1 = md.chunks(md.resolve("/a"))[1]
    fs.stats.record_blob_read(0, d0.uncompressed_offset, 4096)
    fs.stats.record_blob_read(0, a1.uncompressed_offset + 8, 16)
    fs.stats.record_blob_read(0, d0.uncompressed_offset + 4096, 100)  # sequential: coalesced
    pat = fs.stats.export_patterns()
    assert [p["file_path"] for p in pat] == ["/dir/sub/d", "/a"]
    assert pat[0]["ino"] == fs.ino_of(md.resolve("/dir/sub/d"))
    assert pat[0]["ranges"] == [[0, 4196]]
    assert pat[1]["ranges"] == [[a1.file_offset + 8, 16]]
    # exported reads are not mapped twice; later ones add to the same entries
    fs.stats.record_blob_read(0, a1.uncompressed_offset, 8)
    pat = fs.stats.export_patterns()
    assert pat[1]["ranges"] == [[a1.file_offset, 24]] and pat[1]["nr_read"] == 2


def test_blob_reads_are_not_recorded_without_access_pattern(image: Any) -> None:
    boot, blobs, _files = image
    fs = _fs(boot, blobs)
    fs.stats.record_blob_read(0, 0, 4096)
    assert fs.stats._blob_reads == []


def test_blobdev_read_records_the_blob_range(image: Any) -> None:
    """The blob fs hook (daemon/blobdev.py): a READ of a blob file lands in the pattern."""
    from nydus.daemon.blobdev import BlobDevFs
    from nydus.fuse import ROOT_ID, RequestContext

    boot, blobs, _files = image
    fs = _fs(boot, blobs, access_pattern=True)
    md = fs.meta
    info = md.blobs[0]

    class Device:
        amplify_io = 0

        def blob_uncompressed_size(self, i: int) -> int:
            return info.uncompressed_size

        def chunk_span(self, i: int, offset: int, size: int) -> tuple[int, int]:
            return offset, offset + size

        def ready_extent(self, i: int, offset: int, limit: int) -> int:
            return offset

        def read_range(self, i: int, offset: int, size: int, *, amplify: bool = True) -> bytes:
            return bytes(size)

    ctx = RequestContext(unique=1, opcode=0, nodeid=1, uid=0, gid=0, pid=1)
    bfs = BlobDevFs()
    bfs.register(info.blob_id, Device(), 0, fs.stats)
    node = bfs.lookup(ctx, ROOT_ID, info.blob_id.encode()).nodeid
    c = md.chunks(md.resolve("/dir/c"))[2]
    bfs.read(ctx, node, 0, c.uncompressed_offset, 4096)
    pat = fs.stats.export_patterns()
    assert [(p["file_path"], p["ranges"]) for p in pat] == [("/dir/c", [[c.file_offset, 4096]])]


def test_prefetch_list_export_and_parse(tmp_path: Path) -> None:
    entries = [
        {"file_path": "/b", "first_access_time_secs": 5, "first_access_time_nanos": 0},
        {"file_path": "/a", "first_access_time_secs": 4, "first_access_time_nanos": 9},
        {"file_path": "", "first_access_time_secs": 1, "first_access_time_nanos": 0},
        {"file_path": "/b", "first_access_time_secs": 6, "first_access_time_nanos": 0},
    ]
    assert prefetch_paths(entries) == ["/a", "/b"]
    lst, js = tmp_path / "list", tmp_path / "pattern.json"
    assert write_pattern(entries, str(lst), str(js)) == 2
    assert lst.read_text() == "/a\n/b\n"
    assert read_prefetch_list(lst.read_text()) == [b"/a", b"/b"]
    assert read_prefetch_list(js.read_text()) == [b"/b", b"/a", b"/b"]  # JSON: as listed
    assert read_prefetch_list("# comment\n\n /x \n") == [b"/x"]
    with pytest.raises(ConfigError):
        read_prefetch_list("[1, 2")
    with pytest.raises(ConfigError):
        read_prefetch_list('[{"path": "/a"}]')
    with pytest.raises(ConfigError):
        write_pattern([{"file_path": "/a\nb"}], str(lst))


# --------------------------------------------------------------------------- optimize layout


def _optimize(boot: Path, blobs: Path, paths: list[bytes], out: Path) -> tuple[Any, Path]:
    md = open_bootstrap(boot)
    readers = {b.index: open_local_blob(str(blobs / b.blob_id), b)[0] for b in md.blobs}
    planned: list[Any] = []
    h = hashlib.sha256()

    class Sink:
        def __init__(self) -> None:
            self.f = open(out / "prefetch.tmp", "wb")  # noqa: SIM115

        def write(self, b: bytes, /) -> int:
            h.update(b)
            return self.f.write(b)

    sink = Sink()
    res = optimize_image(
        md,
        paths,
        lambda c: readers[c.blob_index].read_chunk(c),
        sink,
        plan=planned.extend,
        blob_id=lambda: h.hexdigest(),
    )
    sink.f.close()
    assert res.blob is not None
    (out / "prefetch.tmp").rename(blobs / h.hexdigest())
    new_boot = out / "optimized.boot"
    new_boot.write_bytes(res.bootstrap)
    assert len(planned) == sum(
        len(md.chunks(md.resolve(p))) for p in (b"/dir/sub/d", b"/a", b"/dir/b")
    )
    return res, new_boot


def test_optimize_places_listed_files_first_in_a_prefetch_blob(image: Any, tmp_path: Path) -> None:
    boot, blobs, files = image
    paths = [b"/dir/sub", b"/a", b"/nope", b"/dir/b", b"/a"]
    res, new_boot = _optimize(boot, blobs, paths, tmp_path)
    assert res.files == 3 and res.missing == ["/nope"] and res.table == 3
    assert res.bytes == len(files["dir/sub/d"]) + len(files["a"]) + len(files["dir/b"])
    old = open_bootstrap(boot)
    md = open_bootstrap(new_boot)
    assert len(md.blobs) == len(old.blobs) + 1
    new = md.blobs[-1]
    assert new.blob_id == res.blob.entry.blob_id
    assert (blobs / new.blob_id).stat().st_size == new.compressed_size
    # the prefetch table: the listed nodes, in list order
    assert md.prefetch_nids() == [md.resolve(p) for p in (b"/dir/sub", b"/a", b"/dir/b")]
    # the prefetch blob holds the listed files' chunks, in list order, from offset 0
    order = [c for p in (b"/dir/sub/d", b"/a", b"/dir/b") for c in md.chunks(md.resolve(p))]
    assert all(c.blob_index == new.index for c in order)
    assert [c.compressed_offset for c in order] == sorted(c.compressed_offset for c in order)
    assert order[0].compressed_offset == 0 and order[0].uncompressed_offset == 0
    assert new.chunk_count == len(order)
    # the deduplicated twin of /dir/b and the other files stay in the source blob
    for p in (b"/same-as-b", b"/dir/c", b"/e"):
        assert {c.blob_index for c in md.chunks(md.resolve(p))} == {0}
        assert md.chunks(md.resolve(p)) == old.chunks(old.resolve(p))
    # every file reads back unchanged through the new bootstrap
    fs = _fs(new_boot, blobs)
    for name, data in files.items():
        ino = fs.resolve("/" + name)
        got = b"".join(bytes(b) for b in fs.read(ino, 0, len(data) + 10))
        assert got == data, name
    # and the prefetch lists nydusd uses come from the table
    lists, everything = fs.prefetch_chunk_lists(None)
    assert not everything and [c.blob_index for cs in lists for c in cs] == [new.index] * len(order)


def test_optimize_refuses_what_it_cannot_do(image: Any, tmp_path: Path) -> None:
    boot, _blobs, _files = image
    md = open_bootstrap(boot)
    with open(os.devnull, "wb") as null:
        res = optimize_image(md, [b"/empty", b"/nope"], lambda c: b"", null)
        assert res.blob is None and res.files == 0 and res.table == 1  # still listed
        with pytest.raises(ConfigError):
            optimize_image(md, [b"/a"], lambda c: b"short", null)


def test_nydusify_optimize_bad_list_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = nydusify_main(
        [
            "optimize",
            "--source",
            "localhost:1/x:1",
            "--target",
            "localhost:1/x:2",
            "--prefetch-files",
            str(tmp_path / "missing"),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "--prefetch-files" in err and "Traceback" not in err
    (tmp_path / "empty").write_text("\n")
    rc = nydusify_main(
        [
            "optimize",
            "--source",
            "localhost:1/x:1",
            "--target",
            "localhost:1/x:2",
            "--prefetch-files",
            str(tmp_path / "empty"),
            "--policy",
            "other",
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "policy" in err and len(err.strip().splitlines()) == 1


def test_nydus_image_optimize(
    image: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nydus.cli.nydus_image import main as nydus_image_main

    boot, blobs, files = image
    lst = tmp_path / "list"
    lst.write_text("/e\n/dir/c\n")
    out, js = tmp_path / "opt.boot", tmp_path / "out.json"
    rc = nydus_image_main(
        [
            "optimize",
            "-p",
            str(lst),
            "-B",
            str(boot),
            "-D",
            str(blobs),
            "-O",
            str(out),
            "-J",
            str(js),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    ids = json.loads(js.read_text())["blobs"]
    md = open_bootstrap(out)
    assert [b.blob_id for b in md.blobs] == ids and len(ids) == 2
    assert hashlib.sha256((blobs / ids[1]).read_bytes()).hexdigest() == ids[1]
    assert md.prefetch_nids() == [md.resolve("/e"), md.resolve("/dir/c")]
    fs = _fs(out, blobs)
    for name in ("e", "e-link", "dir/c", "a"):
        got = b"".join(bytes(b) for b in fs.read(fs.resolve("/" + name), 0, 1 << 20))
        assert got == files[name]
    rc = nydus_image_main(
        [
            "optimize",
            "-p",
            str(tmp_path / "nope"),
            "-B",
            str(boot),
            "-D",
            str(blobs),
            "-O",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "--prefetch-files" in err and "Traceback" not in err


def test_snapshotter_patterns_from_the_daemons_api(image: Any, tmp_path: Path) -> None:
    """``nydusify access-pattern --snapshotter-root``: every image of the snapshotter's state
    file, asked through its daemon's API (an in-process daemon here), merged by first access."""
    from nydus.convert.pattern import snapshotter_patterns
    from nydus.daemon import ApiServer, DaemonOptions, ImageSource, Nydusd
    from nydus.errors import NotFoundError

    boot, blobs, _files = image
    cfg = json.dumps(
        {
            "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
            "mode": "direct",
            "access_pattern": True,
        }
    )
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), id="shared"))
    sock = str(tmp_path / "api.sock")
    server = ApiServer(d, sock)
    server.start()
    try:
        d.mount("/img1", ImageSource(str(boot), cfg))
        d.mount("/img2", ImageSource(str(boot), cfg))
        f1, f2 = d.images["/img1"].fs, d.images["/img2"].fs
        f2.read(f2.resolve("/e"), 0, 10)
        f1.read(f1.resolve("/a"), 0, 10)
        f1.read(f1.resolve("/e"), 5, 10)
        root = tmp_path / "sn"
        (root / "daemons").mkdir(parents=True)
        (root / "daemons" / "state.json").write_text(
            json.dumps(
                {
                    "daemons": [{"id": "shared", "apisock": sock}],
                    "images": [
                        {"id": "img1", "daemon_id": "shared", "image_ref": "r/x:1"},
                        {"id": "img2", "daemon_id": "shared", "image_ref": "r/y:1"},
                    ],
                }
            )
        )
        both = snapshotter_patterns(str(root))
        assert [e["file_path"] for e in both] == ["/e", "/a"]
        assert both[0]["ranges"] == [[0, 10]]  # img2's entry: the earlier access
        one = snapshotter_patterns(str(root), "r/x:1")
        assert [(e["file_path"], e["ranges"]) for e in one] == [
            ("/a", [[0, 10]]),
            ("/e", [[5, 10]]),
        ]
        with pytest.raises(NotFoundError):
            snapshotter_patterns(str(root), "r/z:1")
        with pytest.raises(NotFoundError):
            snapshotter_patterns(str(tmp_path / "none"))
    finally:
        server.stop()
        d.shutdown()


def test_blobdev_does_not_push_ahead_while_recording() -> None:
    """Chunks already in the cache after a read are prefilled into the blob file's page cache
    (other files' data), so their first reads never reach the daemon: while the access pattern
    is recorded that fill-ahead is off, and each file's read is seen."""
    from nydus.daemon.blobdev import BlobDevFs
    from nydus.fs.metrics import FsIoStats
    from nydus.fuse import ROOT_ID, RequestContext

    class Device:
        amplify_io = 32768

        def __init__(self, data: bytes) -> None:
            self.data = data

        def blob_uncompressed_size(self, i: int) -> int:
            return len(self.data)

        def chunk_span(self, i: int, offset: int, size: int) -> tuple[int, int]:
            return offset // 8192 * 8192, min(len(self.data), -(-(offset + size) // 8192) * 8192)

        def ready_extent(self, i: int, offset: int, limit: int) -> int:
            return min(len(self.data), offset + limit)  # everything is in the cache

        def read_range(self, i: int, offset: int, size: int, *, amplify: bool = True) -> bytes:
            return self.data[offset : offset + size]

    ctx = RequestContext(unique=1, opcode=0, nodeid=1, uid=0, gid=0, pid=1)
    data = os.urandom(8 * 8192)
    for recording in (False, True):
        fs = BlobDevFs()
        ahead: list[int] = []  # prefill(nodeid, ranges, fill_ahead_from or -1)
        fs.prefill = lambda node, ranges, start, ahead=ahead: ahead.append(start)
        stats = FsIoStats("/", access_pattern=recording)
        fs.register("s", Device(data), 0, stats)
        node = fs.lookup(ctx, ROOT_ID, b"s").nodeid
        assert fs.read(ctx, node, 0, 0, 8192) == data[:8192]
        assert ahead == ([-1] if recording else [8192])
        if recording:
            assert stats._blob_reads[0][:3] == (0, 0, 8192)


def test_prefetch_list_json_is_parsed_safely() -> None:
    """A prefetch list in JSON goes through the shared parser: deep nesting or a huge number
    is a one-line ConfigError, never a RecursionError."""
    from nydus.builder.optimize import read_prefetch_list
    from nydus.errors import ConfigError

    assert read_prefetch_list('[{"file_path": "/a"}]') == [b"/a"]
    for bad in ("[" * 100_000 + "]" * 100_000, "[1e999]"):
        with pytest.raises(ConfigError, match="prefetch list is not JSON"):
            read_prefetch_list(bad)
