"""Hostile-input properties of the bootstrap readers and the blob reader.

The contract: a truncated, corrupted or hostile bootstrap or blob gives a
:class:`nydus.errors.NydusError` subclass naming what is wrong, never another
exception type, never a hang, never a huge allocation and never wrong bytes.

* arbitrary bytes, and bytes behind a valid magic, through ``open_bootstrap`` and
  a full traversal (the fuzz target's :func:`traverse`, shared with
  ``tests/unit/test_fuzz_corpus.py``);
* mutations of valid bootstraps: the upstream v6 and v5 fixtures and one made by
  our builder (byte flips, truncation, u16/u32/u64 fields set to extreme values in
  the superblock, RAFS ext superblock, blob table and inodes), both random
  (hypothesis) and exhaustive sweeps; every traversal must end within
  ``TIME_LIMIT`` seconds (SIGALRM);
* crafted directory loops, a directory with two parents (exponential walk), and
  dirent names holding '/' or NUL;
* blob corruption: flipped chunk bytes (IntegrityError or, for a flip that zstd
  ignores, exactly the original bytes), a corrupted trailer, a truncated blob,
  hostile blob-table and chunk fields;
* a golden build: the same tree created twice in different orders with
  different atimes gives identical bootstrap and blob bytes, and a pinned blob id.

Everything runs in well under a minute; hypothesis keeps no example database.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import struct
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nydus.builder.build import BuildOptions, build_image
from nydus.builder.dirsource import load_directory
from nydus.errors import FormatError, IntegrityError, NydusError
from nydus.format import blob_meta as bm
from nydus.format import erofs
from nydus.format import rafs_v5 as v5fmt
from nydus.metadata import BlobInfo, ChunkInfo, RafsMetadata, open_bootstrap
from nydus.metadata.v6 import RafsV6Metadata
from nydus.storage.blobfile import BlobReader, BlobTrailer, open_local_blob

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "nydus"
V6_BOOT = FIXTURES / "v6" / "rafs-v6-2.2.boot"
V6_BLOBS = FIXTURES / "v6" / "blobs"
V5_BOOT = FIXTURES / "v5" / "blake3-nocompress.boot"

needs_fixtures = pytest.mark.skipif(
    not (V6_BOOT.is_file() and V5_BOOT.is_file()), reason=f"upstream fixtures missing: {FIXTURES}"
)

TIME_LIMIT = 2.0  # seconds per traversal of one (small) hostile bootstrap
CHUNK = 0x1000
EXTREMES = (0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 2**32, 2**63, 2**64 - 1)

BASE = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _load_fuzz_target() -> ModuleType:
    path = REPO / "fuzz" / "fuzz_bootstrap.py"
    spec = importlib.util.spec_from_file_location("fuzz_bootstrap", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FUZZ = _load_fuzz_target()


# --------------------------------------------------------------------------- contract helpers


time_limit = FUZZ.time_limit


def check_bootstrap(data: bytes) -> NydusError | None:
    """Open and traverse ``data``: fine, or a NydusError with a message; nothing else, fast."""
    result: NydusError | None = FUZZ.replay(data, TIME_LIMIT)
    return result


def expect_format_error(md: RafsMetadata, match: str) -> FormatError:
    """A full traversal of ``md`` must raise FormatError matching ``match``, quickly."""
    with time_limit(TIME_LIMIT), pytest.raises(FormatError, match=match) as info:
        FUZZ.traverse_metadata(md)
    return info.value


# --------------------------------------------------------------------------- trees and images


def make_sample_tree(root: Path) -> None:
    """Dirs, files (empty, one chunk, several chunks, duplicate), symlinks, hardlink, xattrs."""
    root.mkdir()
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "leaf.txt").write_bytes(b"leaf\n")
    (root / "a" / "text.txt").write_bytes(b"".join(b"line %05d of text\n" % i for i in range(900)))
    (root / "empty").write_bytes(b"")
    (root / "rand.bin").write_bytes(random.Random(7).randbytes(3 * CHUNK + 100))
    (root / "dup.bin").write_bytes((root / "rand.bin").read_bytes())
    os.symlink("a/text.txt", root / "link")
    os.symlink("x" * 300, root / "long-link")
    os.link(root / "a" / "text.txt", root / "hard")
    try:
        os.setxattr(root / "rand.bin", "user.k", b"v" * 60)
        os.setxattr(root / "a", "user.dir", b"d")
    except OSError:
        pass


class Built:
    """An image built by our builder from :func:`make_sample_tree`, and its chunks' bytes."""

    def __init__(
        self,
        boot: bytes,
        blob: bytes,
        blob_path: Path,
        md: RafsV6Metadata,
        chunks: list[ChunkInfo],
        expected: dict[int, bytes],
    ) -> None:
        self.boot = boot
        self.blob = blob
        self.blob_path = blob_path
        self.md = md
        self.info = md.blobs[0]
        self.chunks = chunks  # unique by chunk index
        self.expected = expected  # chunk index -> uncompressed bytes

    def __repr__(self) -> str:  # keeps hypothesis' failure reports readable
        return f"Built(blob {self.info.blob_id[:12]}, {len(self.chunks)} chunks)"


def build_tree(src: Path, blob_path: Path, chunk_size: int = CHUNK) -> tuple[bytes, str]:
    with open(blob_path, "wb") as f:
        res = build_image(
            load_directory(src), f, BuildOptions(compressor="zstd", chunk_size=chunk_size)
        )
    assert res.blob is not None
    return res.bootstrap, res.blob.entry.blob_id


def _unique_chunks(md: RafsMetadata, root: Path | None) -> tuple[list[ChunkInfo], dict[int, bytes]]:
    chunks: dict[int, ChunkInfo] = {}
    expected: dict[int, bytes] = {}
    for path, nid in md.walk():
        if not md.getattr(nid).is_reg:
            continue
        for c in md.chunks(nid):
            chunks.setdefault(c.index, c)
            if root is not None:
                with open(root / path.decode().lstrip("/"), "rb") as f:
                    f.seek(c.file_offset)
                    expected.setdefault(c.index, f.read(c.uncompressed_size))
    return sorted(chunks.values(), key=lambda c: c.index), expected


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    base = tmp_path_factory.mktemp("props")
    make_sample_tree(base / "tree")
    blob_path = base / "blob"
    boot, _ = build_tree(base / "tree", blob_path)
    md = open_bootstrap(boot)
    assert isinstance(md, RafsV6Metadata)
    chunks, expected = _unique_chunks(md, base / "tree")
    return Built(boot, blob_path.read_bytes(), blob_path, md, chunks, expected)


def reader_over(blob: bytes, info: BlobInfo) -> BlobReader:
    return BlobReader(lambda off, n: blob[off : off + n], info, len(blob))


# --------------------------------------------------------------------------- (a) arbitrary bytes

EROFS_MAGIC = struct.pack("<I", erofs.EROFS_MAGIC)
V5_HEAD = struct.pack("<IIII", v5fmt.RAFS_V5_MAGIC, 0x500, v5fmt.SUPERBLOCK_SIZE, 0x100000)

arbitrary_bootstraps = st.one_of(
    st.binary(max_size=2048),
    st.builds(
        lambda head, tail: head.ljust(1024, b"\0")[:1024] + EROFS_MAGIC + tail,
        st.binary(max_size=64),
        st.binary(max_size=6000),
    ),
    st.builds(lambda tail: V5_HEAD + tail, st.binary(max_size=9000)),
)


@settings(BASE, max_examples=1000)
@given(arbitrary_bootstraps)
def test_arbitrary_bytes_raise_only_nydus_errors(data: bytes) -> None:
    check_bootstrap(data)


def test_empty_and_tiny_inputs_are_format_errors() -> None:
    for data in (b"", b"\0", EROFS_MAGIC, b"\0" * 1024 + EROFS_MAGIC, V5_HEAD):
        assert isinstance(check_bootstrap(data), FormatError), data[:8]


def test_unreadable_path_is_a_nydus_error(tmp_path: Path) -> None:
    with pytest.raises(NydusError, match="cannot read bootstrap"):
        open_bootstrap(tmp_path / "does-not-exist.boot")


# --------------------------------------------------------------------------- (b) mutations


@dataclasses.dataclass
class Seed:
    name: str
    data: bytes
    regions: dict[str, tuple[int, int]]  # name -> [start, end) of a structure
    inodes: list[tuple[int, int]]  # (offset, size) of each inode actually in the tree


def _v6_seed(name: str, data: bytes) -> Seed:
    md = open_bootstrap(data)
    assert isinstance(md, RafsV6Metadata)
    ext, sb = md.ext, md.sb
    regions = {
        "superblock": (1024, 1152),
        "ext_superblock": (1152, 1408),
        "device_table": (1408, 1408 + max(1, sb.extra_devices) * erofs.DEVICE_SLOT_SIZE),
        "blob_table": (ext.blob_table_offset, ext.blob_table_offset + ext.blob_table_size),
        "inode_area": (md.meta_base, ext.chunk_table_offset or len(data)),
    }
    if ext.chunk_table_size:
        regions["chunk_table"] = (
            ext.chunk_table_offset,
            ext.chunk_table_offset + ext.chunk_table_size,
        )
    inodes = sorted({(md.meta_base + nid * erofs.ISLOT, 64) for _p, nid in md.walk()})
    return Seed(name, data, regions, inodes)


def _v5_seed(name: str, data: bytes) -> Seed:
    sb = v5fmt.RafsV5SuperBlock.parse(data)
    ito = sb.inode_table_offset
    regions = {
        "superblock": (0, 128),
        "reserved_1024": (1024, 1408),
        "inode_table": (ito, ito + 4 * sb.inode_table_entries),
        "blob_table": (sb.blob_table_offset, sb.blob_table_offset + sb.blob_table_size),
        "inode_area": (ito + 4 * sb.inode_table_entries, len(data)),
    }
    if sb.ext_blob_table_entries:
        off = sb.ext_blob_table_offset
        regions["ext_blob_table"] = (off, off + 64 * sb.ext_blob_table_entries)
    inodes = sorted(
        {
            (v5fmt.inode_table_offset(data, sb, i), v5fmt.INODE_SIZE)
            for i in range(1, sb.inode_table_entries + 1)
        }
    )
    return Seed(name, data, regions, inodes)


@pytest.fixture(scope="module")
def seeds(built: Built) -> dict[str, Seed]:
    out = {"builder": _v6_seed("builder", built.boot)}
    if V6_BOOT.is_file():
        out["upstream-v6"] = _v6_seed("upstream-v6", V6_BOOT.read_bytes())
    if V5_BOOT.is_file():
        out["upstream-v5"] = _v5_seed("upstream-v5", V5_BOOT.read_bytes())
    return out


def test_seeds_are_valid(seeds: dict[str, Seed]) -> None:
    for seed in seeds.values():
        assert check_bootstrap(seed.data) is None, seed.name
        assert FUZZ.traverse(seed.data) > 1


def _splice(buf: bytearray, off: int, width: int, value: int) -> None:
    if off >= 0 and off + width <= len(buf):
        buf[off : off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


values = st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1), st.integers(0, 4096))


@st.composite
def mutated(draw: st.DrawFn, seed: Seed) -> bytes:
    buf = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["flip", "byte", "field", "field", "inode"]))
        if kind == "flip":
            off = draw(st.integers(0, len(buf) - 1))
            buf[off] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        elif kind == "field":
            lo, hi = seed.regions[draw(st.sampled_from(sorted(seed.regions)))]
            width = draw(st.sampled_from([2, 4, 8]))
            off = lo + 2 * draw(st.integers(0, max(0, (hi - lo - 2) // 2)))
            _splice(buf, off, width, draw(values))
        else:
            ioff, isize = draw(st.sampled_from(seed.inodes))
            width = draw(st.sampled_from([2, 4, 8]))
            _splice(buf, ioff + 2 * draw(st.integers(0, isize // 2 - 1)), width, draw(values))
    if draw(st.booleans()) and draw(st.booleans()):
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    return bytes(buf)


@pytest.mark.parametrize("name", ["builder", "upstream-v6", "upstream-v5"])
@settings(BASE, max_examples=800)
@given(data=st.data())
def test_mutated_bootstraps_raise_only_nydus_errors(
    seeds: dict[str, Seed], name: str, data: st.DataObject
) -> None:
    if name not in seeds:
        pytest.skip("upstream fixture missing")
    check_bootstrap(data.draw(mutated(seeds[name])))


@pytest.mark.parametrize("name", ["builder", "upstream-v6", "upstream-v5"])
def test_extreme_field_sweep(seeds: dict[str, Seed], name: str) -> None:
    """Every 4-byte-aligned u32/u64 in the superblocks, blob table and inodes set to 0,
    0xFFFFFFFF and 2**63, one at a time."""
    if name not in seeds:
        pytest.skip("upstream fixture missing")
    seed = seeds[name]
    step = max(1, len(seed.inodes) // 6)  # a v5 traversal is slower: sample its inodes
    spans = [r for k, r in seed.regions.items() if k not in ("inode_area", "reserved_1024")]
    spans += [(o, o + n) for o, n in seed.inodes[::step]]
    tried = 0
    for lo, hi in spans:
        for off in range(lo, hi, 4):
            for width in (4, 8):
                for value in (0, 0xFFFF_FFFF, 2**63):
                    buf = bytearray(seed.data)
                    _splice(buf, off, width, value)
                    check_bootstrap(bytes(buf))
                    tried += 1
    assert tried > 300


@pytest.mark.parametrize("name", ["builder", "upstream-v6", "upstream-v5"])
def test_every_truncation_of_the_metadata(seeds: dict[str, Seed], name: str) -> None:
    if name not in seeds:
        pytest.skip("upstream fixture missing")
    data = seeds[name].data
    for cut in [*range(0, 1500, 7), *range(1500, len(data), 61), len(data) - 1]:
        err = check_bootstrap(data[:cut])
        if cut < 1408:
            assert isinstance(err, FormatError), cut


# --------------------------------------------------------------------------- (c) loops


@dataclasses.dataclass
class Dirent:
    header: int  # byte offset of the 12-byte dirent header in the bootstrap
    name: int  # byte offset of its name


def find_dirent(md: RafsV6Metadata, dir_nid: int, name: bytes) -> Dirent:
    """Where the dirent ``name`` of directory ``dir_nid`` sits in the bootstrap bytes."""
    data = md.data
    ioff = md.meta_base + dir_nid * erofs.ISLOT
    di = erofs.DiskInode.unpack(data, ioff)
    bs = md.blksize
    nblocks = -(-di.size // bs)
    for k in range(nblocks):
        limit = min(bs, di.size - k * bs)
        if di.layout == erofs.LAYOUT_FLAT_INLINE and k == nblocks - 1 and di.size % bs:
            start = ioff + di.size_on_disk + di.xattr_size
        else:
            start = di.i_u * bs + k * bs
        block = data[start : start + limit]
        for i, (ename, _nid, _ft) in enumerate(erofs.unpack_dir_block(block, limit)):
            if ename == name:
                nameoff = struct.unpack_from("<H", block, i * erofs.DIRENT_SIZE + 8)[0]
                return Dirent(start + i * erofs.DIRENT_SIZE, start + nameoff)
    raise AssertionError(f"no dirent {name!r} in directory {dir_nid}")


def repoint(boot: bytes, md: RafsV6Metadata, dir_nid: int, name: bytes, nid: int) -> bytes:
    """``boot`` with the dirent ``name`` of ``dir_nid`` pointing at ``nid`` as a directory."""
    ent = find_dirent(md, dir_nid, name)
    buf = bytearray(boot)
    struct.pack_into("<Q", buf, ent.header, nid)
    buf[ent.header + 10] = erofs.FT_DIR
    return bytes(buf)


@pytest.fixture(scope="module")
def loop_image(tmp_path_factory: pytest.TempPathFactory) -> RafsV6Metadata:
    base = tmp_path_factory.mktemp("loop")
    src = base / "tree"
    (src / "a" / "b" / "c").mkdir(parents=True)
    (src / "a" / "b" / "file").write_bytes(b"data")
    (src / "top").write_bytes(b"top")
    boot, _ = build_tree(src, base / "blob")
    md = open_bootstrap(boot)
    assert isinstance(md, RafsV6Metadata)
    return md


@pytest.mark.parametrize(
    ("entry", "target"),
    [("c", "/"), ("c", "/a"), ("c", "/a/b"), ("file", "/"), ("file", "/a")],
    ids=["dir-to-root", "dir-to-parent", "dir-to-self", "file-to-root", "file-to-parent"],
)
def test_directory_loop_is_a_format_error(
    loop_image: RafsV6Metadata, entry: str, target: str
) -> None:
    """An entry of /a/b re-pointed at / , at /a (b's parent) or at /a/b itself."""
    md = loop_image
    bad = repoint(md.data, md, md.resolve("/a/b"), entry.encode(), md.resolve(target))
    err = expect_format_error(open_bootstrap(bad), "loop")
    assert "directory" in str(err)


def test_directory_with_two_parents_is_a_format_error(loop_image: RafsV6Metadata) -> None:
    """/top pointed at /a/b: no loop, but a directory linked twice."""
    md = loop_image
    bad = repoint(md.data, md, md.root_nid, b"top", md.resolve("/a/b"))
    expect_format_error(open_bootstrap(bad), "reached twice")


def test_exponential_directory_dag_is_rejected_quickly(tmp_path: Path) -> None:
    """A chain of 40 dirs where each also lists its child a second time: 2**40 paths
    for a naive walk. The walk must refuse in linear time."""
    src = tmp_path / "tree"
    cur = src
    for _ in range(40):
        (cur / "d").mkdir(parents=True)
        (cur / "e").write_bytes(b"e")
        cur = cur / "d"
    boot, _ = build_tree(src, tmp_path / "blob")
    md = open_bootstrap(boot)
    assert isinstance(md, RafsV6Metadata)
    nid = md.root_nid
    while True:
        d = md.lookup(nid, b"d") if b"d" in {e.name for e in md.readdir(nid)} else None
        if d is None:
            break
        boot = repoint(boot, md, nid, b"e", d)
        nid = d
    expect_format_error(open_bootstrap(boot), "reached twice")


@needs_fixtures
def test_v5_child_range_pointing_back_is_a_format_error() -> None:
    data = bytearray(V5_BOOT.read_bytes())
    md = open_bootstrap(bytes(data))
    sb = v5fmt.RafsV5SuperBlock.parse(bytes(data))
    sub = next(
        nid
        for p, nid in md.walk()
        if p != b"/" and md.getattr(nid).is_dir and list(md.readdir(nid))
    )
    off = v5fmt.inode_table_offset(bytes(data), sb, sub)
    # RafsV5Inode: digest, parent, ino, uid, gid, projid, mode, size, blocks, flags, nlink,
    # then child_index (u32) at byte 92.
    pos = off + struct.calcsize("<32sQQIIIIQQQI")
    assert (
        v5fmt.RafsV5Inode.parse(bytes(data), off).child_index
        == struct.unpack_from("<I", data, pos)[0]
    )
    for target in (1, sub):
        buf = bytearray(data)
        struct.pack_into("<I", buf, pos, target)
        expect_format_error(open_bootstrap(bytes(buf)), "children")


# --------------------------------------------------------------------------- (d) names


@pytest.fixture(scope="module")
def names_image(tmp_path_factory: pytest.TempPathFactory) -> RafsV6Metadata:
    base = tmp_path_factory.mktemp("names")
    src = base / "tree"
    (src / "dir").mkdir(parents=True)
    for name in ("a", "kXk", "z"):
        (src / "dir" / name).write_bytes(name.encode())
    boot, _ = build_tree(src, base / "blob")
    md = open_bootstrap(boot)
    assert isinstance(md, RafsV6Metadata)
    return md


@pytest.mark.parametrize("bad", [b"/", b"\0"])
def test_dirent_name_with_slash_or_nul_is_a_format_error(
    names_image: RafsV6Metadata, bad: bytes
) -> None:
    md = names_image
    d = md.resolve("/dir")
    ent = find_dirent(md, d, b"kXk")
    buf = bytearray(md.data)
    buf[ent.name + 1] = bad[0]
    hostile = open_bootstrap(bytes(buf))
    with pytest.raises(FormatError, match="invalid entry name"):
        list(hostile.readdir(d))
    expect_format_error(hostile, "invalid entry name")


def test_empty_dirent_name_is_a_format_error(names_image: RafsV6Metadata) -> None:
    md = names_image
    d = md.resolve("/dir")
    first = find_dirent(md, d, b"a")
    second = find_dirent(md, d, b"kXk")
    buf = bytearray(md.data)
    # A name ends where the next one starts: start "kXk" where "a" starts, so "a" is empty.
    nameoff_a = struct.unpack_from("<H", buf, first.header + 8)[0]
    struct.pack_into("<H", buf, second.header + 8, nameoff_a)
    expect_format_error(open_bootstrap(bytes(buf)), "dirent name")


@needs_fixtures
@pytest.mark.parametrize("bad", [b"/", b"\0"])
def test_v5_name_with_slash_or_nul_is_a_format_error(bad: bytes) -> None:
    data = V5_BOOT.read_bytes()
    md = open_bootstrap(data)
    sb = v5fmt.RafsV5SuperBlock.parse(data)
    nid = next(nid for p, nid in md.walk() if len(p.rsplit(b"/", 1)[1]) >= 3)
    inode = v5fmt.RafsV5Inode.parse(data, v5fmt.inode_table_offset(data, sb, nid))
    buf = bytearray(data)
    buf[inode.name_offset + 1] = bad[0]
    expect_format_error(open_bootstrap(bytes(buf)), "'/' or NUL")


# --------------------------------------------------------------------------- (e) blobs


def test_built_blob_reads_back_exactly(built: Built) -> None:
    reader, close = open_local_blob(str(built.blob_path), built.info)
    try:
        assert len(built.chunks) >= 5
        assert any(c.compressed for c in built.chunks)
        assert any(not c.compressed for c in built.chunks)
        for c in built.chunks:
            assert reader.read_chunk(c) == built.expected[c.index]
        trailer = reader.trailer()
        assert len(trailer.ci) == built.info.chunk_count
    finally:
        close()


def _check_flipped_chunk(
    blob: bytes, info: BlobInfo, c: ChunkInfo, good: bytes, off: int, xor: int
) -> None:
    buf = bytearray(blob)
    buf[c.compressed_offset + off] ^= xor
    try:
        out = reader_over(bytes(buf), info).read_chunk(c)
    except IntegrityError:
        return
    # zstd ignores a few bits (reserved header bits, unused Huffman weights): such a flip
    # still decodes to the original, digest-verified bytes. Wrong bytes never come back.
    assert c.compressed, f"flip at +{off} of stored chunk {c.index} went unnoticed"
    assert out == good


@settings(BASE, max_examples=800)
@given(data=st.data())
def test_flipped_chunk_byte_is_an_integrity_error(built: Built, data: st.DataObject) -> None:
    c = data.draw(st.sampled_from(built.chunks))
    off = data.draw(st.integers(0, c.compressed_size - 1))
    xor = data.draw(st.integers(1, 255))
    _check_flipped_chunk(built.blob, built.info, c, built.expected[c.index], off, xor)


def test_flipped_stored_chunks_fail_through_a_local_file(built: Built, tmp_path: Path) -> None:
    for c in built.chunks:
        for off in (0, c.compressed_size // 2, c.compressed_size - 1):
            buf = bytearray(built.blob)
            buf[c.compressed_offset + off] ^= 0x20
            path = tmp_path / "blob"
            path.write_bytes(buf)
            reader, close = open_local_blob(str(path), built.info)
            try:
                if not c.compressed:
                    with pytest.raises(IntegrityError, match="digest mismatch"):
                        reader.read_chunk(c)
                else:
                    with suppress(IntegrityError):
                        assert reader.read_chunk(c) == built.expected[c.index]
            finally:
                close()


@needs_fixtures
def test_upstream_blob_chunk_flips() -> None:
    md = open_bootstrap(V6_BOOT)
    info = md.blobs[0]
    blob = (V6_BLOBS / info.blob_id).read_bytes()
    chunks, _ = _unique_chunks(md, None)
    for c in chunks:
        good = reader_over(blob, info).read_chunk(c)
        rng = random.Random(c.index)
        for _ in range(150):
            _check_flipped_chunk(
                blob, info, c, good, rng.randrange(c.compressed_size), rng.randrange(1, 256)
            )


@dataclasses.dataclass
class TrailerMap:
    covered: list[tuple[int, int]]  # bytes protected by a digest the reader checks
    unchecked: list[tuple[int, int]]  # section tar headers: carry nothing trailer() uses
    ci_header: tuple[int, int]  # protected by a ToC digest that trailer() does not check


def trailer_map(blob: bytes, info: BlobInfo, trailer: BlobTrailer) -> TrailerMap:
    toc = {e.name: e for e in trailer.toc}
    needed = {bm.TOC_ENTRY_BLOB_RAW, bm.TOC_ENTRY_BLOB_META, bm.TOC_ENTRY_BLOB_DIGEST}
    assert needed <= toc.keys(), f"blob ToC lacks sections: {sorted(toc)}"
    raw = toc[bm.TOC_ENTRY_BLOB_RAW]
    dig = toc[bm.TOC_ENTRY_BLOB_DIGEST]
    hdr_off = info.ci_offset + info.ci_compressed_size
    dig_end = dig.compressed_offset + dig.compressed_size
    return TrailerMap(
        covered=[
            (info.ci_offset, hdr_off),
            (dig.compressed_offset, dig_end),
            (len(blob) - info.toc_size, len(blob)),
        ],
        unchecked=[
            # image.blob: data at 0, its tar header right after it (upstream records the
            # header's offset as compressed_offset, equal to compressed_size).
            (raw.compressed_size, raw.compressed_size + bm.TAR_BLOCK),
            (hdr_off + bm.CI_HEADER_SIZE, hdr_off + bm.CI_HEADER_SIZE + bm.TAR_BLOCK),
            (dig_end, dig_end + bm.TAR_BLOCK),
        ],
        ci_header=(hdr_off, hdr_off + bm.CI_HEADER_SIZE),
    )


def _blobs(built: Built) -> list[tuple[str, bytes, BlobInfo]]:
    out = [("builder", built.blob, built.info)]
    if V6_BOOT.is_file():
        info = open_bootstrap(V6_BOOT).blobs[0]
        out.append(("upstream", (V6_BLOBS / info.blob_id).read_bytes(), info))
    return out


def test_trailer_flip_sweep(built: Built) -> None:
    """Each trailer byte flipped in turn: digest-covered bytes must fail, the section tar
    headers (which trailer() ignores) must fail or leave the parsed trailer unchanged."""
    for name, blob, info in _blobs(built):
        pristine = reader_over(blob, info).trailer()
        tmap = trailer_map(blob, info, pristine)
        for spans, strict in ((tmap.covered, True), (tmap.unchecked, False)):
            for lo, hi in spans:
                for off in range(lo, hi):
                    buf = bytearray(blob)
                    buf[off] ^= 0x41
                    try:
                        got = reader_over(bytes(buf), info).trailer()
                    except NydusError:
                        continue
                    assert not strict, f"{name}: flip at {off} in [{lo}, {hi}) unnoticed"
                    assert got == pristine, f"{name}: flip at {off} changed the trailer"


def test_trailer_flip_in_ci_header_is_detected(built: Built) -> None:
    blob, info = built.blob, built.info
    pristine = reader_over(blob, info).trailer()
    lo, _hi = trailer_map(blob, info, pristine).ci_header
    for off in range(lo, lo + 64):  # the header's fields
        buf = bytearray(blob)
        buf[off] ^= 0x04
        with pytest.raises(NydusError):
            reader_over(bytes(buf), info).trailer()


@settings(BASE, max_examples=400)
@given(data=st.data())
def test_corrupted_trailer_raises(built: Built, data: st.DataObject) -> None:
    blob, info = built.blob, built.info
    pristine = reader_over(blob, info).trailer()
    spans = trailer_map(blob, info, pristine).covered
    positions = st.sampled_from(spans).flatmap(lambda s: st.integers(s[0], s[1] - 1))
    buf = bytearray(blob)
    offs = data.draw(st.lists(positions, min_size=1, max_size=4, unique=True))
    for off in offs:
        buf[off] ^= data.draw(st.integers(1, 255))
    try:
        got = reader_over(bytes(buf), info).trailer()
    except NydusError:
        return
    # The ci array is stored zstd-compressed and its digest covers the decompressed
    # bytes: a flip in a frame field zstd ignores is harmless, as long as what the
    # reader returns is exactly the original.
    ci_end = info.ci_offset + info.ci_compressed_size
    assert info.ci_compressor != "none"
    assert all(info.ci_offset <= o < ci_end for o in offs), offs
    assert got == pristine


@settings(BASE, max_examples=300)
@given(data=st.data())
def test_truncated_blob_raises_or_reads_exactly(built: Built, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(built.blob) - 1))
    reader = reader_over(built.blob[:cut], built.info)
    with pytest.raises(NydusError):
        reader.trailer()
    for c in built.chunks:
        if c.compressed_offset + c.compressed_size <= cut:
            assert reader.read_chunk(c) == built.expected[c.index]
        else:
            with pytest.raises(NydusError):
                reader.read_chunk(c)


def test_truncated_local_blob_file(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "blob"
    for cut in (
        0,
        1,
        built.chunks[-1].compressed_offset + 1,
        len(built.blob) - 600,
        len(built.blob) - 1,
    ):
        path.write_bytes(built.blob[:cut])
        reader, close = open_local_blob(str(path), built.info)
        try:
            with pytest.raises(NydusError):
                reader.trailer()
            for c in built.chunks:
                if c.compressed_offset + c.compressed_size <= cut:
                    assert reader.read_chunk(c) == built.expected[c.index]
                else:
                    with pytest.raises(NydusError, match="past end"):
                        reader.read_chunk(c)
        finally:
            close()


BLOB_FIELDS = [
    "chunk_count",
    "compressed_size",
    "uncompressed_size",
    "ci_offset",
    "ci_compressed_size",
    "ci_uncompressed_size",
    "toc_size",
    "features",
]
CHUNK_FIELDS = ["compressed_offset", "compressed_size", "uncompressed_offset", "uncompressed_size"]


@settings(BASE, max_examples=600)
@given(data=st.data())
def test_hostile_blob_and_chunk_fields(built: Built, data: st.DataObject) -> None:
    """Blob-table and chunk fields from a hostile bootstrap: NydusError or exact bytes."""
    info = built.info
    for _ in range(data.draw(st.integers(0, 3))):
        field = data.draw(st.sampled_from(BLOB_FIELDS))
        info = dataclasses.replace(info, **{field: data.draw(values)})  # type: ignore[arg-type]
    c = data.draw(st.sampled_from(built.chunks))
    for _ in range(data.draw(st.integers(0, 2))):
        field = data.draw(st.sampled_from(CHUNK_FIELDS))
        c = dataclasses.replace(c, **{field: data.draw(values)})  # type: ignore[arg-type]
    with time_limit(TIME_LIMIT):
        try:
            reader = reader_over(built.blob, info)
        except NydusError:
            return
        with suppress(NydusError):
            reader.trailer()
        try:
            got = reader.read_chunk(c)
        except NydusError:
            return
    assert got == built.expected[c.index]


# --------------------------------------------------------------------------- golden build

GOLDEN_FILES: dict[str, bytes] = {
    "etc/config": b"key = value\n" * 50,
    "etc/empty": b"",
    "usr/bin/tool": bytes(range(256)) * 33,  # 8448 bytes: 3 chunks of 4 KiB
    "usr/lib/libdup.so": bytes(range(256)) * 33,  # same content: deduplicated
    "usr/share/doc/readme": b"".join(b"readme line %d\n" % i for i in range(400)),
    "var/log/zeros": b"\0" * 5000,
}
GOLDEN_DIRS = ["etc", "usr", "usr/bin", "usr/lib", "usr/share", "usr/share/doc", "var", "var/log"]
GOLDEN_LINKS = {"bin": "usr/bin", "etc/motd": "../usr/share/doc/readme"}
GOLDEN_HARDLINKS = {"usr/bin/tool-alias": "usr/bin/tool"}
GOLDEN_MTIME_NS = 1_650_000_000_123_456_789
# Computed once from this tree (zstd, 4 KiB chunks). A change means the blob format,
# chunking, dedup or compressed bytes changed: check it is intended, then update.
GOLDEN_BLOB_ID = "9b6777956ee6dedc0ab63e0aee47ace1ade20d90a9465dc82a372bfbc529ba21"


def make_golden_tree(root: Path, reverse: bool, atime_ns: int) -> None:
    """The golden tree; ``reverse`` creates every directory's entries in the opposite order."""

    def order(xs: list[str]) -> list[str]:
        return sorted(xs, reverse=reverse)

    root.mkdir()
    for d in sorted(order(GOLDEN_DIRS), key=lambda p: p.count("/")):  # parents first
        (root / d).mkdir()
    for rel in order(list(GOLDEN_FILES)):
        (root / rel).write_bytes(GOLDEN_FILES[rel])
    for rel in order(list(GOLDEN_LINKS)):
        os.symlink(GOLDEN_LINKS[rel], root / rel)
    for rel, target in GOLDEN_HARDLINKS.items():
        os.link(root / target, root / rel)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in order(filenames + dirnames):
            os.utime(
                os.path.join(dirpath, name), ns=(atime_ns, GOLDEN_MTIME_NS), follow_symlinks=False
            )
    os.utime(root, ns=(atime_ns, GOLDEN_MTIME_NS))


class _ListedInOrder:
    """What ``os.scandir`` returns, with the entries in a chosen order."""

    def __init__(self, entries: list[os.DirEntry[bytes]]) -> None:
        self._entries = entries

    def __enter__(self) -> _ListedInOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __iter__(self) -> Iterator[os.DirEntry[bytes]]:
        return iter(self._entries)


def test_golden_build_is_reproducible_and_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of the golden tree, created in opposite orders with different atimes and
    listed by the file system in different orders (ext4 hashes names, so the listing order is
    forced through ``os.scandir``), give byte-identical bootstraps and blobs."""
    real_scandir = os.scandir
    results = []
    for i, (reverse, atime_ns) in enumerate(((False, 10**18), (True, 19 * 10**17 + 5))):
        src = tmp_path / f"src{i}"
        make_golden_tree(src, reverse, atime_ns)

        def scandir(path: bytes, *, _rev: bool = reverse) -> _ListedInOrder:
            with real_scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=_rev)
            return _ListedInOrder(entries)

        monkeypatch.setattr(os, "scandir", scandir)
        blob_path = tmp_path / f"blob{i}"
        boot, blob_id = build_tree(src, blob_path)
        monkeypatch.setattr(os, "scandir", real_scandir)
        results.append((boot, blob_path.read_bytes(), blob_id))
    (boot0, blob0, id0), (boot1, blob1, id1) = results
    assert boot0 == boot1
    assert blob0 == blob1
    assert id0 == id1 == GOLDEN_BLOB_ID
    assert open_bootstrap(boot0).blobs[0].blob_id == GOLDEN_BLOB_ID
    assert check_bootstrap(boot0) is None
