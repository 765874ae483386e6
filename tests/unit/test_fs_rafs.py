"""RafsFs without a mount: the fs core against built images, the upstream fixtures and a
storage stand-in (nydus.storage.blobfile.LocalBlobChunks), plus the real storage device."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from corpus import TreeInfo
from nydus.errors import BackendError, NotFoundError
from nydus.fs import ROOT_INO, FsOptions, RafsFs, StatsFop
from nydus.metadata import ChunkInfo, open_bootstrap
from nydus.storage.blobfile import LocalBlobChunks


def _build(nydus_image: Any, src: Path, out: Path, *extra: str) -> tuple[Path, Path]:
    blobs = out / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    boot = out / "bootstrap"
    nydus_image("create", "--bootstrap", boot, "--blob-dir", blobs, *extra, src)
    return boot, blobs


def _open(boot: Path, blobs: Path, **opts: Any) -> RafsFs:
    meta = open_bootstrap(boot)
    return RafsFs(meta, LocalBlobChunks(str(blobs), meta.blobs), FsOptions(**opts))


@pytest.fixture(scope="module")
def image(sample_tree: TreeInfo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import NydusImage

    out = tmp_path_factory.mktemp("fsimg")
    return _build(
        NydusImage(cwd=out),
        sample_tree.root,
        out,
        "--compressor",
        "zstd",
        "--chunk-size",
        "0x10000",
    )


def _walk(
    fs: RafsFs, ino: int = ROOT_INO, prefix: str = "", parents: dict[str, int] | None = None
) -> dict[str, int]:
    out = {}
    for e in fs.readdir(ino, 0):
        if e.name in (b".", b".."):
            continue
        path = f"{prefix}/{os.fsdecode(e.name)}"
        out[path] = e.ino
        if parents is not None:
            parents[path] = ino
        if e.dtype == stat.S_IFDIR >> 12:
            out.update(_walk(fs, e.ino, path, parents))
    return out


def test_tree_attributes_and_data_match_the_source(
    sample_tree: TreeInfo, image: tuple[Path, Path]
) -> None:
    src = sample_tree.root
    fs = _open(*image, enable_xattr=True)
    parents: dict[str, int] = {}
    paths = _walk(fs, parents=parents)
    expect = {}
    for dirpath, dirs, files in os.walk(src):
        for n in dirs + files:
            full = os.path.join(dirpath, n)
            expect["/" + os.path.relpath(full, src)] = full
    assert sorted(paths) == sorted(expect)
    by_src_ino: dict[int, int] = {}
    for path, ino in paths.items():
        st = os.lstat(expect[path])
        a = fs.getattr(ino)
        assert a.ino == ino
        assert (a.mode, a.uid, a.gid) == (st.st_mode, st.st_uid, st.st_gid), path
        assert a.mtime * 10**9 + a.mtime_nsec == st.st_mtime_ns, path
        if stat.S_ISREG(st.st_mode):
            assert a.size == st.st_size
            with open(expect[path], "rb") as f:
                assert b"".join(fs.read(ino, 0, a.size + 10)) == f.read(), path
            # hardlinks: one inode in the image for one inode in the source
            assert by_src_ino.setdefault(st.st_ino, ino) == ino, path
        elif stat.S_ISLNK(st.st_mode):
            assert fs.readlink(ino) == os.readlink(expect[path]).encode()
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            assert a.rdev == st.st_rdev
        assert fs.lookup(parents[path], os.fsencode(path.rsplit("/", 1)[1])).ino == ino
        if stat.S_ISDIR(st.st_mode):
            assert fs.parent_of(ino) == parents[path]
        names = sorted(n.encode() for n in os.listxattr(expect[path], follow_symlinks=False))
        assert fs.listxattr(ino) == names, path
        for n in names:
            assert fs.getxattr(ino, n) == os.getxattr(expect[path], n, follow_symlinks=False)


def test_random_ranges_match(sample_tree: TreeInfo, image: tuple[Path, Path]) -> None:
    fs = _open(*image, chunk_cache_bytes=0)
    rng = random.Random(5)
    files = [(p, i) for p, i in _walk(fs).items() if stat.S_ISREG(fs.getattr(i).mode)]
    for _ in range(300):
        path, ino = rng.choice(files)
        size = fs.getattr(ino).size
        off = rng.randrange(0, size + 100)
        n = rng.choice([1, 100, 4096, 65536, 131072, 1 << 20])
        with open(str(sample_tree.root) + path, "rb") as f:
            f.seek(off)
            want = f.read(n)
        assert b"".join(fs.read(ino, off, n)) == want, (path, off, n)


def test_holes_and_seek_data(sample_tree: TreeInfo, image: tuple[Path, Path]) -> None:
    fs = _open(*image)
    sparse = [p for p in sample_tree.paths.get("sparse", []) if p]
    assert sparse
    for rel in sparse:
        ino = fs.resolve("/" + rel)
        size = fs.getattr(ino).size
        if size == 0:
            continue
        data_at = [c.file_offset for c in fs.chunks_of(ino)]
        if data_at:
            assert fs.lseek(ino, 0, 3) == data_at[0]  # SEEK_DATA
        hole = fs.lseek(ino, 0, 4)  # SEEK_HOLE
        assert 0 <= hole <= size
        assert b"".join(fs.read(ino, 0, size)) == Path(sample_tree.root, rel).read_bytes()


def test_lookup_errors(image: tuple[Path, Path]) -> None:
    fs = _open(*image)
    with pytest.raises(NotFoundError):
        fs.lookup(ROOT_INO, b"no-such-file")
    f = fs.resolve("/sizes")
    child = next(e for e in fs.readdir(f, 2))
    with pytest.raises(OSError) as ei:
        fs.lookup(child.ino, b"x")
    assert ei.value.errno == errno.ENOTDIR
    assert fs.lookup(ROOT_INO, b"..").ino == ROOT_INO
    assert fs.lookup(f, b".").ino == f
    with pytest.raises(OSError) as ei:
        fs.open(child.ino, os.O_WRONLY)
    assert ei.value.errno == errno.EROFS
    with pytest.raises(OSError) as ei:
        fs.access(child.ino, os.W_OK, 0, 0)
    assert ei.value.errno == errno.EROFS
    fs.access(child.ino, os.R_OK, 0, 0)


def test_xattrs_follow_enable_xattr_or_the_image_flag(image: tuple[Path, Path]) -> None:
    fs = _open(*image, enable_xattr=False)
    # the builder sets HAS_XATTR when the tree has xattrs, which enables them (as upstream)
    assert fs.xattr_enabled
    fs.xattr_enabled = False
    with pytest.raises(OSError) as ei:
        fs.listxattr(ROOT_INO)
    assert ei.value.errno == errno.ENOSYS
    fs.xattr_enabled = True
    with pytest.raises(OSError) as ei:
        fs.getxattr(ROOT_INO, b"user.none")
    assert ei.value.errno == errno.ENODATA


def test_readdir_offsets_resume(image: tuple[Path, Path]) -> None:
    fs = _open(*image)
    d = fs.resolve("/bigdir")
    full = list(fs.readdir(d, 0))
    assert [e.name for e in full[:2]] == [b".", b".."]
    assert [e.offset for e in full] == list(range(1, len(full) + 1))
    for k in (0, 1, 2, 7, len(full) - 1, len(full)):
        assert list(fs.readdir(d, k)) == full[k:]
    plus = list(fs.readdir(d, 0, plus=True))
    assert all(e.attr is not None and e.attr.ino == e.ino for e in plus[2:])
    assert plus[0].attr is None and plus[1].attr is None  # the kernel ignores them


def test_chunk_cache_serves_repeated_reads(image: tuple[Path, Path]) -> None:
    meta = open_bootstrap(image[0])
    src = LocalBlobChunks(str(image[1]), meta.blobs)
    fs = RafsFs(meta, src)
    ino = fs.resolve("/sizes/size-1048576")
    size = fs.getattr(ino).size
    for off in range(0, size, 4096):
        fs.read(ino, off, 4096)
    assert src.read_count == len(fs.chunks_of(ino))


def test_metrics_files_pattern_and_latest(image: tuple[Path, Path]) -> None:
    fs = _open(*image, iostats_files=True, access_pattern=True, latest_read_files=True, id="/img")
    a = fs.lookup(fs.lookup(ROOT_INO, b"sizes").ino, b"size-4097")
    b = fs.lookup(fs.lookup(ROOT_INO, b"sizes").ino, b"size-1")
    fh = fs.open(a.ino, os.O_RDONLY)
    fs.read(a.ino, 0, 4097)
    fs.read(b.ino, 0, 1)
    fs.read(a.ino, 4096, 10)
    fs.release(a.ino, fh)
    g = fs.stats.export_global()
    assert g["id"] == "/img" and g["data_read"] == 4097 + 1 + 1
    assert g["fop_hits"][StatsFop.READ] == 3 and g["fop_hits"][StatsFop.OPEN] == 1
    assert g["nr_opens"] == 0 and g["nr_max_opens"] == 1
    files = fs.stats.export_files()
    assert files[str(a.ino)]["data_read"] == 4098 and files[str(a.ino)]["nr_max_open"] == 1
    pat = fs.stats.export_patterns()
    assert [p["file_path"] for p in pat] == ["/sizes/size-4097", "/sizes/size-1"]
    assert pat[0]["nr_read"] == 2 and pat[0]["first_access_time_secs"] > 0
    assert fs.stats.export_latest_read_files() == sorted([a.ino, b.ino])
    assert fs.stats.export_latest_read_files() == []
    with pytest.raises(NotFoundError):
        fs.lookup(ROOT_INO, b"nope")
    assert fs.stats.export_global()["fop_errors"][StatsFop.LOOKUP] == 0


def test_prefetch_lists(image: tuple[Path, Path]) -> None:
    fs = _open(*image)
    lists, everything = fs.prefetch_chunk_lists(["/sizes/size-1048576", "/data", "/missing"])
    assert not everything and lists
    assert all(isinstance(c, ChunkInfo) for lst in lists for c in lst)
    assert fs.prefetch_chunk_lists(["/"]) == ([], True)
    assert fs.prefetch_chunk_lists(None) == ([], False)  # no prefetch table in this image


def test_a_missing_blob_fails_only_its_reads(tmp_path: Path, nydus_image: Any) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "old").write_bytes(b"lower data" * 1000)
    upper.mkdir()
    (upper / "new").write_bytes(b"upper data" * 1000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    nydus_image("create", "--bootstrap", tmp_path / "l1", "--blob-dir", blobs, lower)
    nydus_image(
        "create",
        "--parent-bootstrap",
        tmp_path / "l1",
        "--bootstrap",
        tmp_path / "l2",
        "--blob-dir",
        blobs,
        upper,
    )
    meta = open_bootstrap(tmp_path / "l2")
    assert len(meta.blobs) == 2
    os.unlink(blobs / meta.blobs[0].blob_id)
    fs = RafsFs(meta, LocalBlobChunks(str(blobs), meta.blobs))
    old = fs.resolve("/d/old")
    new = fs.resolve("/new")
    with pytest.raises(BackendError):
        fs.read(old, 0, 100)
    assert fs.getattr(old).size == 10000  # metadata still served
    assert b"".join(fs.read(new, 0, 20000)) == b"upper data" * 1000
    assert fs.stats.export_global()["fop_errors"][StatsFop.READ] == 1


def test_corrupt_chunk_is_an_error_not_wrong_data(tmp_path: Path, nydus_image: Any) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    boot, blobs = _build(nydus_image, src, tmp_path / "img", "--compressor", "none")
    meta = open_bootstrap(boot)
    blob = blobs / meta.blobs[0].blob_id
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(raw))
    fs = RafsFs(meta, LocalBlobChunks(str(blobs), meta.blobs, verify=True))
    with pytest.raises(Exception) as ei:
        fs.read(fs.resolve("/f"), 0, 1000)
    assert getattr(ei.value, "errno", None) == errno.EIO


def test_with_the_storage_device(
    sample_tree: TreeInfo, image: tuple[Path, Path], tmp_path: Path
) -> None:
    from nydus.config import DaemonConfig
    from nydus.storage import open_device

    boot, blobs = image
    meta = open_bootstrap(boot)
    cfg = DaemonConfig.from_json(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path)}},
            },
            "digest_validate": True,
        }
    )
    with open_device(meta.blobs, cfg) as dev:
        fs = RafsFs(meta, dev)
        for rel in ("sizes/size-1048577", "data/random-2m.bin", "sizes/size-0", "data/text-3m.txt"):
            p = sample_tree.root / rel
            if p.exists():
                ino = fs.resolve("/" + rel)
                assert b"".join(fs.read(ino, 0, p.stat().st_size)) == p.read_bytes()


# --- the upstream fixtures -------------------------------------------------------------------


def _v5_md5s(fixtures_dir: Path) -> dict[str, str]:
    text = (fixtures_dir / "v5" / "blake3-nocompress.result").read_text()
    _listing, end = json.JSONDecoder().raw_decode(text)
    out = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            out[path.strip()] = digest
    return out


def test_v5_fixture_every_md5(fixtures_dir: Path) -> None:
    meta = open_bootstrap(fixtures_dir / "v5" / "blake3-nocompress.boot")
    fs = RafsFs(meta, LocalBlobChunks(str(fixtures_dir / "v5" / "blobs"), meta.blobs))
    md5s = _v5_md5s(fixtures_dir)
    assert md5s
    for path, digest in md5s.items():
        ino = fs.resolve(path)
        data = b"".join(fs.read(ino, 0, fs.getattr(ino).size))
        assert hashlib.md5(data).hexdigest() == digest, path
    assert fs.getattr(ROOT_INO).ino == ROOT_INO


def test_v6_fixture(fixtures_dir: Path) -> None:
    meta = open_bootstrap(fixtures_dir / "v6" / "rafs-v6-2.2.boot")
    fs = RafsFs(meta, LocalBlobChunks(str(fixtures_dir / "v6" / "blobs"), meta.blobs))
    ino = fs.resolve("/lib.rs")
    data = b"".join(fs.read(ino, 0, 1 << 20))
    assert len(data) == 16931 and data.startswith(b"// Copyright")
    assert [e.name for e in fs.readdir(ROOT_INO, 2)] == [b"lib.rs", b"sync_io.rs"]


class _SlowSource:
    """A chunk source that counts what it is asked for and takes its time."""

    def __init__(self, inner: LocalBlobChunks, delay: float = 0.05) -> None:
        import threading

        self.inner, self.delay = inner, delay
        self.asked: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def read_chunks(self, chunks: list[ChunkInfo]) -> list[bytes]:
        import time

        with self.lock:
            self.asked += [(c.blob_index, c.index) for c in chunks]
        time.sleep(self.delay)
        return self.inner.read_chunks(chunks)


def test_concurrent_reads_of_a_chunk_fetch_it_once(image: tuple[Path, Path]) -> None:
    import threading

    meta = open_bootstrap(image[0])
    src = _SlowSource(LocalBlobChunks(str(image[1]), meta.blobs))
    fs = RafsFs(meta, src, FsOptions(readahead_chunks=0))
    ino = fs.resolve("/sizes/size-1048576")
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(b"".join(fs.read(ino, 0, 4096))))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    assert len(src.asked) == len(set(src.asked)) == 1


def test_sequential_reads_fetch_ahead(image: tuple[Path, Path], sample_tree: TreeInfo) -> None:
    import time

    meta = open_bootstrap(image[0])
    src = _SlowSource(LocalBlobChunks(str(image[1]), meta.blobs), delay=0.01)
    fs = RafsFs(meta, src, FsOptions(readahead_chunks=4))
    ino = fs.resolve("/data/random-2m.bin")
    chunks = fs.chunks_of(ino)
    assert len(chunks) > 5  # 64 KiB chunks in this image
    step = chunks[1].file_offset
    fs.read(ino, 0, step)
    deadline = time.time() + 5
    while len(src.asked) < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert len(src.asked) == 5  # the chunk asked for, then 4 ahead in the background
    data = b"".join(fs.read(ino, step, 3 * step))
    assert data == (sample_tree.root / "data" / "random-2m.bin").read_bytes()[step : 4 * step]
    assert len(src.asked) == len(set(src.asked))  # nothing fetched twice
    # a random reader (not sequential) gets no readahead; first let the background settle
    settled = time.time()
    before = len(src.asked)
    while time.time() - settled < 0.5:
        time.sleep(0.05)
        if len(src.asked) != before:
            before, settled = len(src.asked), time.time()
    fs.read(ino, 28 * step, 10)  # a jump of more than 1 MiB
    time.sleep(0.3)
    assert len(src.asked) == before + 1
    fs.close()


def test_blob_range_files_map_is_built_once_and_can_be_dropped(
    image: tuple[Path, Path],
) -> None:
    fs = _open(*image)
    c = next(
        c for _p, nid in fs.meta.walk() if fs.meta.getattr(nid).is_reg for c in fs.meta.chunks(nid)
    )
    first = fs.blob_range_files(c.blob_index, c.uncompressed_offset, 1)
    assert first and fs._chunk_map is not None
    kept = fs._chunk_map
    assert fs.blob_range_files(c.blob_index, c.uncompressed_offset, 1) == first
    assert fs._chunk_map is kept
    fs.drop_chunk_map()  # after the native switch: no blob device reads any more
    assert fs._chunk_map is None
    assert fs.blob_range_files(c.blob_index, c.uncompressed_offset, 1) == first  # rebuilt
