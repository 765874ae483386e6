"""The blob writer's hot loop: directory files read on the pool in batches and ranges give the
same blob, byte for byte, as the same data handed in as pieces; holes are skipped; a file that
changed size since the walk is a clear error; a failure leaves no thread or descriptor behind."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from nydus import codec
from nydus.builder.blob import BlobWriter, ChunkDict
from nydus.builder.build import BuildOptions, build_image
from nydus.builder.dirsource import load_directory
from nydus.builder.tree import Node, iter_tree
from nydus.errors import FormatError

CS = 0x1000


def _writer(out: io.BytesIO, compressor: str = "zstd") -> BlobWriter:
    return BlobWriter(
        out,
        blob_index=0,
        chunk_size=CS,
        compressor=codec.compressor_by_name(compressor),
        digester=codec.digester_by_name("blake3"),
        chunk_dict=ChunkDict(),
        workers=2,
    )


def _tree(root: Path) -> None:
    """Many small files (several batches), duplicates, an empty file, a file of many ranges
    (more than 1 MiB of 4 KiB chunks) and a sparse one."""
    for i in range(120):
        (root / f"f{i:03}").write_bytes(os.urandom(100 + i * 37) if i % 3 else b"same" * 900)
    (root / "empty").write_bytes(b"")
    (root / "big").write_bytes(os.urandom(CS * 300 + 5) + b"\0" * (3 << 20) + b"tail")
    with open(root / "sparse", "wb") as f:
        f.write(b"head" * 100)
        f.seek(5 * CS)
        f.write(b"middle")
        f.truncate(40 * CS)  # ends in a hole


def _files(root: Node) -> list[Node]:
    return [n for _p, n in iter_tree(root) if n.is_reg]


def _pieces(node: Node) -> list[tuple[int, bytes]]:
    """The reference: every chunk with data (SEEK_DATA finds some in it), read plainly."""
    path = os.fsdecode(node.path)
    data = Path(path).read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for off in range(0, len(data), CS):
            try:
                has_data = os.lseek(fd, off, os.SEEK_DATA) < min(off + CS, len(data))
            except OSError:  # ENXIO: only a hole from here
                has_data = False
            if has_data:
                out.append((off, data[off : off + CS]))
        return out
    finally:
        os.close(fd)


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_pool_reads_give_the_same_blob_as_pieces(tmp_path: Path, compressor: str) -> None:
    _tree(tmp_path)
    outs = []
    for by_pool in (True, False):
        tree = load_directory(tmp_path)
        out = io.BytesIO()
        with _writer(out, compressor) as w:
            if by_pool:
                read = w.add_files(_files(tree))
            else:
                read = sum(w.add_file(n, _pieces(n)) for n in _files(tree))
                w.flush()
            res = w.finish()
        assert res is not None
        refs = {p: [(c.file_offset, c.index) for c in n.chunks or ()] for p, n in iter_tree(tree)}
        outs.append((out.getvalue(), res.entry.blob_id, res.deduped_chunks, read, refs))
    assert outs[0] == outs[1]
    sparse = dict(iter_tree(load_directory(tmp_path)))[b"/sparse"]
    assert len(_pieces(sparse)) < 40  # holes were skipped (on this file system: 2 of 40)


def test_build_reads_back(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    _tree(tmp_path / "src")
    out = io.BytesIO()
    res = build_image(load_directory(tmp_path / "src"), out, BuildOptions(chunk_size=CS))
    assert res.blob is not None and res.files == 123
    blob = out.getvalue()
    tree = load_directory(tmp_path / "src")
    for _p, n in iter_tree(tree):
        if not n.is_reg:
            continue
        src = Path(os.fsdecode(n.path)).read_bytes()
        got = bytearray(n.size)
        built = dict(iter_tree(_rebuilt(res.bootstrap)))[_p]
        for c in built.chunks or ():
            raw = blob[c.compressed_offset : c.compressed_offset + c.compressed_size]
            comp = codec.compressor_by_name("zstd" if c.compressed else "none")
            data = codec.decompress(comp, raw, c.uncompressed_size)
            got[c.file_offset : c.file_offset + len(data)] = data
        assert bytes(got) == src, _p


def _rebuilt(boot: bytes) -> Node:
    from nydus.builder.build import tree_from_metadata
    from nydus.metadata import open_bootstrap

    return tree_from_metadata(open_bootstrap(boot))


@pytest.mark.parametrize("change", ["grow", "shrink", "grow-empty", "grow-after-hole"])
def test_a_file_that_changed_since_the_walk_is_an_error(tmp_path: Path, change: str) -> None:
    (tmp_path / "a").write_bytes(b"x" * (3 * CS))
    (tmp_path / "e").write_bytes(b"")
    with open(tmp_path / "h", "wb") as f:
        f.write(b"data")
        f.truncate(4 * CS)
    tree = load_directory(tmp_path)
    name = {"grow-empty": "e", "grow-after-hole": "h"}.get(change, "a")
    with open(tmp_path / name, "r+b") as f:
        if change == "shrink":
            f.truncate(2 * CS + 1)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"more")
    threads = threading.active_count()
    word = "shrank" if change == "shrink" else "grew"
    msg = f"{name}'? {word} while it was being read"
    with pytest.raises(FormatError, match=msg), _writer(io.BytesIO()) as w:
        w.add_files(_files(tree))
        w.finish()
    assert threading.active_count() == threads  # the pool and the writer thread are gone
