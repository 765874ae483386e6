"""RAFS v5 bootstrap reader: the real upstream fixture, synthetic edge cases, corruption."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nydus.codec import digester_by_name
from nydus.errors import FormatError, NotFoundError
from nydus.format import rafs_v5 as fmt
from nydus.metadata import RafsMetadata, open_bootstrap
from nydus.metadata.v5 import RafsV5Metadata

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "nydus"
V5 = FIXTURES / "v5"
BOOT = V5 / "blake3-nocompress.boot"
RESULT = V5 / "blake3-nocompress.result"

needs_fixture = pytest.mark.skipif(not BOOT.exists(), reason="upstream v5 fixture missing")


def _expected() -> tuple[list[tuple[str, str, str]], dict[str, str], dict[str, int]]:
    """(path, type, link target) in pre-order, {path: md5}, tree's report."""
    text = RESULT.read_text()
    listing, end = json.JSONDecoder().raw_decode(text)
    nodes: list[tuple[str, str, str]] = []

    def visit(node: dict[str, Any], path: str) -> None:
        nodes.append((path, str(node["type"]), str(node.get("target", ""))))
        prefix = "" if path == "/" else path
        for child in node.get("contents", []) if node["type"] == "directory" else []:
            visit(child, f"{prefix}/{child['name']}")

    visit(listing[0], "/")
    md5s = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            md5s[path.strip()] = digest
    report: dict[str, int] = next(n for n in listing if n["type"] == "report")
    return nodes, md5s, report


@pytest.fixture(scope="module")
def meta() -> RafsMetadata:
    return open_bootstrap(BOOT)


def _type(mode: int) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFREG: "file", stat.S_IFLNK: "link"}[
        stat.S_IFMT(mode)
    ]


# The real fixture --------------------------------------------------------------------


@needs_fixture
def test_superblock_and_blobs(meta: RafsMetadata) -> None:
    assert isinstance(meta, RafsV5Metadata)
    assert (meta.version, meta.flags, meta.root_nid) == (5, 0x5, 1)
    assert (meta.chunk_size, meta.compressor, meta.digester) == (1 << 20, "none", "blake3")
    blob_file = next((V5 / "blobs").iterdir())
    [blob] = meta.blobs
    assert blob.blob_id == blob_file.name and blob.index == 0
    assert blob.chunk_count == 23 and blob.chunk_size == 1 << 20
    assert blob.compressed_size == blob.uncompressed_size == blob_file.stat().st_size
    assert (blob.compressor, blob.digester) == ("none", "blake3")
    assert meta.prefetch_nids() == []


@needs_fixture
def test_tree_matches_upstream_listing(meta: RafsMetadata) -> None:
    nodes, _, report = _expected()
    got = []
    for path, nid in meta.walk():
        attr = meta.getattr(nid)
        target = meta.readlink(nid).decode() if attr.is_symlink else ""
        got.append((path.decode(), _type(attr.mode), target))
    assert got == nodes
    assert report["directories"] + report["files"] == len(got) - 1


@needs_fixture
def test_lookup_readdir_agree(meta: RafsMetadata) -> None:
    for path, nid in meta.walk():
        attr = meta.getattr(nid)
        assert attr.nid == nid and meta.resolve(path) == nid
        if not attr.is_dir:
            continue
        entries = list(meta.readdir(nid))
        assert [e.name for e in entries] == sorted(e.name for e in entries)
        for e in entries:
            assert meta.lookup(nid, e.name) == e.nid
            kind = {1: stat.S_IFREG, 2: stat.S_IFDIR, 7: stat.S_IFLNK}[e.file_type]
            assert stat.S_IFMT(meta.getattr(e.nid).mode) == kind
        with pytest.raises(NotFoundError):
            meta.lookup(nid, b"no-such-entry")


@needs_fixture
def test_attributes_and_hardlinks(meta: RafsMetadata) -> None:
    root = meta.getattr(meta.root_nid)
    assert root.is_dir and root.ino == 1 and root.mode == 0o40755
    links = [meta.resolve(p) for p in ("/hardlink-test/foo", "/hardlink-test/test.sh")]
    links.append(meta.resolve("/normal-file-test/test.sh"))
    attrs = [meta.getattr(n) for n in links]
    assert len(set(links)) == 3 and {a.ino for a in attrs} == {attrs[0].ino}
    assert all(a.nlink == 3 and a.size == 944 for a in attrs)
    assert meta.readlink(meta.resolve("/symlink-test/root-1")) == b"/" * 17
    with pytest.raises(FormatError):
        meta.readlink(meta.root_nid)
    with pytest.raises(FormatError):
        list(meta.readdir(links[0]))
    assert meta.chunks(meta.root_nid) == [] and meta.xattrs(links[0]) == {}
    for bad in (0, 10_000, -1):
        with pytest.raises(NotFoundError):
            meta.getattr(bad)
    with pytest.raises(NotFoundError):
        meta.resolve("/normal-file-test/nope")


@needs_fixture
def test_file_contents_and_chunk_digests(meta: RafsMetadata) -> None:
    _, md5s, _ = _expected()
    blake3 = digester_by_name("blake3")
    blob = (V5 / "blobs" / meta.blobs[0].blob_id).read_bytes()
    regular = [p for p, n in meta.walk() if meta.getattr(n).is_reg]
    assert sorted(p.decode() for p in regular) == sorted(md5s)
    for path, want in md5s.items():
        nid = meta.resolve(path)
        attr = meta.getattr(nid)
        content = bytearray(attr.size)
        for c in meta.chunks(nid):
            assert c.blob_index == 0 and not c.compressed
            data = blob[c.compressed_offset : c.compressed_offset + c.compressed_size]
            assert len(data) == c.uncompressed_size
            assert blake3.digest(data) == c.digest, (path, c.index)
            content[c.file_offset : c.file_offset + len(data)] = data
        assert len(content) == attr.size
        assert hashlib.md5(content).hexdigest() == want, path


# Synthetic bootstraps -----------------------------------------------------------------


@dataclass
class Node:
    name: bytes
    mode: int
    parent: int
    ino: int = 0  # 0: the node's own child index
    child_index: int = 0
    child_count: int = 0
    size: int = 0
    symlink: bytes = b""
    xattrs: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[tuple[int, ...]] = field(default_factory=list)  # fields after the digest
    flags: int = 0


def pad(b: bytes) -> bytes:
    return b + b"\0" * (fmt.align8(len(b)) - len(b))


def build(
    nodes: list[Node],
    *,
    blob_ids: tuple[str, ...] = ("blob-a",),
    prefetch: tuple[int, ...] = (),
    chunk_size: int = 0x1000,
) -> bytes:
    """A minimal v5 bootstrap: superblock, inode table, prefetch, blob tables, inodes."""
    inode_tab = fmt.SUPERBLOCK_SIZE
    prefetch_off = inode_tab + fmt.align8(4 * len(nodes))
    blob_tab = pad(b"\0".join(struct.pack("<II", 0, 0) + b.encode() for b in blob_ids))
    blob_off = prefetch_off + fmt.align8(4 * len(prefetch))
    ext_off = blob_off + len(blob_tab)
    ext = b"".join(struct.pack("<IIQQ40x", 100, 0, 1 << 30, 1 << 30) for _ in blob_ids)
    pos = ext_off + len(ext)
    body, offsets = b"", []
    for nid, n in enumerate(nodes, 1):
        offsets.append((pos + len(body)) >> 3)
        flags = n.flags | (fmt.INODE_XATTR if n.xattrs else 0)
        flags |= fmt.INODE_SYMLINK if n.symlink else 0
        size = len(n.symlink) if n.symlink else n.size
        count = len(n.chunks) if stat.S_ISREG(n.mode) else n.child_count
        body += struct.pack(
            "<32sQQIIIIQQQIIIHHIIQ8x", b"\1" * 32, n.parent, n.ino or nid, 0, 0, 0, n.mode,
            size, 0, flags, 1, n.child_index, count, len(n.name), len(n.symlink), 0, 0, 0,
        )  # fmt: skip
        body += pad(n.name) + pad(n.symlink)
        if n.xattrs:
            pairs = b"".join(struct.pack("<I", len(k) + 1 + len(v)) + k + b"\0" + v
                             for k, v in n.xattrs)  # fmt: skip
            body += struct.pack("<Q", len(pairs)) + pad(pairs)
        body += b"".join(struct.pack("<32sIIIIQQQII", b"\2" * 32, *c, 0) for c in n.chunks)
    sb = struct.pack(
        "<IIIIQQQQQIIIIQ", fmt.RAFS_V5_MAGIC, 0x500, 8192, chunk_size, 0x5, len(nodes),
        inode_tab, prefetch_off, blob_off, len(nodes), len(prefetch), len(blob_tab),
        len(blob_ids), ext_off,
    )  # fmt: skip
    table = pad(struct.pack(f"<{len(nodes)}I", *offsets))
    pf = pad(struct.pack(f"<{len(prefetch)}I", *prefetch))
    return sb.ljust(8192, b"\0") + table + pf + blob_tab + ext + body


DIR, REG, LNK = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777


def small_tree(**root: int) -> list[Node]:
    """/ (1) -> a (2, dir) -> f (4); / -> z (3, symlink)."""
    return [
        Node(b"/", DIR, 0, child_index=root.get("ci", 2), child_count=root.get("cc", 2)),
        Node(b"a", DIR, 1, child_index=4, child_count=1),
        Node(b"z", LNK, 1, symlink=b"a/f"),
        Node(b"f", REG, 2, size=5000, chunks=[(0, 0, 4096, 4096, 0, 0, 0, 0),
                                              (0, 0, 904, 904, 4096, 4096, 4096, 1)]),
    ]  # fmt: skip


def test_synthetic_tree_xattrs_prefetch() -> None:
    nodes = small_tree()
    nodes[3].xattrs = [(b"user.foo", b"bar"), (b"security.capability", b"\0\1\2")]
    nodes[1].xattrs = [(b"trusted.x", b"")]
    meta = RafsV5Metadata(build(nodes, prefetch=(2, 4)))
    assert [p for p, _ in meta.walk()] == [b"/", b"/a", b"/a/f", b"/z"]
    f = meta.resolve("/a/f")
    assert meta.xattrs(f) == {b"user.foo": b"bar", b"security.capability": b"\0\1\2"}
    assert meta.getxattr(f, b"user.foo") == b"bar" and meta.getattr(f).xattr_count == 2
    assert meta.xattrs(meta.resolve("/a")) == {b"trusted.x": b""}
    assert [c.file_offset for c in meta.chunks(f)] == [0, 4096]
    assert meta.readlink(meta.resolve("/z")) == b"a/f"
    assert meta.prefetch_nids() == [2, 4]


def test_hole_chunks_are_absent() -> None:
    nodes = small_tree()
    nodes[3].flags = fmt.INODE_HAS_HOLE
    nodes[3].chunks[0] = (0, fmt.CHUNK_HOLE, 0, 4096, 0, 0, 0, 0)
    meta = RafsV5Metadata(build(nodes))
    assert [c.index for c in meta.chunks(4)] == [1]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda n: setattr(n[0], "child_index", 1), "children"),  # root lists itself
        (lambda n: setattr(n[1], "child_index", 1), "children"),  # a lists the root: cycle
        (lambda n: setattr(n[0], "child_count", 3), "parent"),  # / also lists a's child
        (lambda n: setattr(n[1], "child_count", 10**6), "children"),
        (lambda n: setattr(n[2], "name", b"x/y"), "'/'"),
        (lambda n: setattr(n[2], "name", b"x\0y"), "NUL"),
        (lambda n: setattr(n[2], "name", b".."), "reserved"),
        (lambda n: setattr(n[2], "name", b"A"), "sorted"),
        (lambda n: setattr(n[2], "name", b"a"), "sorted"),
        (lambda n: setattr(n[2], "name", b""), "name size"),
        (lambda n: setattr(n[1], "ino", 3), "ino"),
        (lambda n: setattr(n[3], "mode", 0o170644), "mode"),
        (lambda n: setattr(n[3], "size", 9000), "chunks"),
        (lambda n: setattr(n[3], "size", 4100), "file range"),
        (lambda n: n[3].chunks.__setitem__(1, (1, 0, 904, 904, 0, 0, 4096, 1)), "blob index"),
        (lambda n: n[3].chunks.__setitem__(1, (0, 0, 904, 904, 0, 0, 100, 1)), "overlaps"),
        (lambda n: n[3].chunks.__setitem__(1, (0, 0, 904, 904, 0, 0, 4096, 100)), "index"),
        (lambda n: n[3].chunks.__setitem__(1, (0, 0, 900, 904, 0, 0, 4096, 1)), "compressed"),
        (lambda n: n[3].chunks.__setitem__(1, (0, 0x10, 904, 904, 0, 0, 4096, 1)), "flags"),
    ],
)
def test_malformed_trees(mutate: object, message: str) -> None:
    nodes = small_tree()
    mutate(nodes)  # type: ignore[operator]
    with pytest.raises(FormatError, match=message):
        _exercise(RafsV5Metadata(build(nodes)))


def test_malformed_tables() -> None:
    good = build(small_tree())
    cases = {
        "magic": (0, struct.pack("<I", 0x12345678)),
        "version": (4, struct.pack("<I", 0x600)),
        "superblock size": (8, struct.pack("<I", 4096)),
        "block": (12, struct.pack("<I", 0x1234)),
        "unknown flags": (16, struct.pack("<Q", 1 << 40)),
        "several compressors": (16, struct.pack("<Q", 0x3)),
        "inodes_count": (24, struct.pack("<Q", 1 << 60)),
        "inode table": (56, struct.pack("<I", 0xFFFFFFFF)),
        "prefetch table": (60, struct.pack("<I", 1 << 30)),
        "blob table": (64, struct.pack("<I", 1 << 31)),
        "extended blob table": (68, struct.pack("<I", 1 << 28)),
        "aligned": (32, struct.pack("<Q", 8193)),
        "outside": (48, struct.pack("<Q", 1 << 63)),
    }
    for message, (off, raw) in cases.items():
        bad = bytearray(good)
        bad[off : off + len(raw)] = raw
        with pytest.raises(FormatError, match=message):
            RafsV5Metadata(bytes(bad))
    for data in (b"", b"RAFS", good[:8192], good[:8200]):
        with pytest.raises(FormatError):
            open_bootstrap(data) if data[:4] == b"SFAR" else RafsV5Metadata(data)


def test_malformed_xattrs_and_blob_ids() -> None:
    nodes = small_tree()
    nodes[3].xattrs = [(b"user.a", b"1")]
    good = build(nodes)
    at = good.index(b"user.a")
    for off, raw, message in [
        (at - 4, struct.pack("<I", 1000), "overruns"),  # pair size
        (at - 12, struct.pack("<Q", 1 << 40), "runs past"),  # area size
        (at + 6, b"=", "NUL"),  # no separator
        (at, b"\0", "no name"),
    ]:
        bad = bytearray(good)
        bad[off : off + len(raw)] = raw
        with pytest.raises(FormatError, match=message):
            RafsV5Metadata(bytes(bad)).xattrs(4)
    for blob_id in ("a/b", "..", "caf\u00e9"):
        with pytest.raises(FormatError, match="blob"):
            RafsV5Metadata(build(small_tree(), blob_ids=(blob_id,)))


def test_wide_tree_is_linear() -> None:
    """10k entries in one directory: readdir and every lookup stay fast (no full scans)."""
    n = 10_000
    nodes = [Node(b"/", DIR, 0, child_index=2, child_count=n)]
    nodes += [Node(b"f%05d" % i, REG, 1) for i in range(n)]
    meta = RafsV5Metadata(build(nodes))
    assert len(list(meta.readdir(1))) == n
    assert all(meta.lookup(1, b"f%05d" % i) == i + 2 for i in range(0, n, 7))


# Corruption: nothing but FormatError, and no hangs ----------------------------------


def _exercise(meta: RafsMetadata) -> int:
    seen = 0
    meta.prefetch_nids()
    for path, nid in meta.walk():
        attr = meta.getattr(nid)
        meta.xattrs(nid)
        meta.chunks(nid)
        if attr.is_symlink:
            meta.readlink(nid)
        if attr.is_dir:
            for e in meta.readdir(nid):
                assert meta.lookup(nid, e.name) == e.nid
        seen += 1
        assert seen < 100_000, path
    return seen


def _only_format_errors(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        _exercise(open_bootstrap(data))


@needs_fixture
def test_truncation_raises_format_error() -> None:
    data = BOOT.read_bytes()
    points = set(range(0, 96)) | set(range(8192, len(data), 3)) | {len(data) - 1}
    points |= set(range(0, 8192, 512))
    for n in sorted(points):
        _only_format_errors(data[:n])


@needs_fixture
def test_random_corruption_raises_format_error() -> None:
    data = BOOT.read_bytes()
    rng = random.Random(0x5AF5)
    # The 80 superblock bytes that matter plus everything after the reserved area.
    live = [*range(80), *range(8192, len(data))]
    for _ in range(400):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            at = rng.choice(live)
            kind = rng.randrange(3)
            if kind == 0:
                bad[at] ^= 1 << rng.randrange(8)
            elif kind == 1:
                bad[at] = rng.randrange(256)
            else:
                bad[at : at + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, rng.randbytes(4)])
        _only_format_errors(bytes(bad))


def test_garbage_raises_format_error() -> None:
    rng = random.Random(7)
    header = struct.pack("<IIII", fmt.RAFS_V5_MAGIC, 0x500, 8192, 0x100000)
    for size in (0, 3, 100, 8191, 8192, 9000, 20000):
        for _ in range(10):
            _only_format_errors(header + rng.randbytes(size))
            with pytest.raises(FormatError):
                RafsV5Metadata(rng.randbytes(size))
