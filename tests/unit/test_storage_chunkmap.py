"""The ``.chunk_map`` readiness bitmap: upstream's byte layout, repair, and sharing between
threads and processes."""

from __future__ import annotations

import multiprocessing
import os
import struct
import threading
from pathlib import Path

import pytest

from nydus.storage.chunkmap import HEADER_SIZE, MAGIC, MAGIC2, MAGIC_ALL_READY, ChunkMap


def test_fresh_file_has_upstream_header_and_size(tmp_path: Path) -> None:
    p = tmp_path / "x.blob.data.chunk_map"
    m = ChunkMap(str(p), 10)
    m.close()
    raw = p.read_bytes()
    assert len(raw) == HEADER_SIZE + 2
    assert struct.unpack_from("<IIII", raw) == (MAGIC, 1, MAGIC2, 0)
    assert raw[:4] == bytes.fromhex("5041 4d42")  # "PAMB" little endian
    assert not any(raw[16:])


def test_bits_are_msb_first_and_all_ready_is_recorded(tmp_path: Path) -> None:
    p = tmp_path / "m"
    m = ChunkMap(str(p), 10)
    m.set_ready([0, 9])
    raw = p.read_bytes()
    assert raw[HEADER_SIZE] == 0x80 and raw[HEADER_SIZE + 1] == 0x40
    assert m.is_ready(0) and m.is_ready(9) and not m.is_ready(1)
    assert m.ready_indices() == [0, 9] and m.count_ready() == 2
    assert not m.all_ready
    m.set_ready(list(range(10)))
    assert m.all_ready
    assert struct.unpack_from("<I", p.read_bytes(), 12)[0] == MAGIC_ALL_READY
    m.close()
    m2 = ChunkMap(str(p), 10)
    assert m2.all_ready and all(m2.is_ready(i) for i in range(10)) and not m2.rebuilt
    m2.clear(3)
    assert not m2.is_ready(3) and not m2.all_ready
    assert struct.unpack_from("<I", p.read_bytes(), 12)[0] == 0
    m2.close()


def test_reads_a_map_written_the_upstream_way(tmp_path: Path) -> None:
    """A file laid out as upstream nydusd writes it (header + MSB-first bits) is accepted."""
    p = tmp_path / "up"
    n = 20
    bits = bytearray((n + 7) // 8)
    for i in (1, 7, 8, 19):
        bits[i >> 3] |= 1 << (7 - (i & 7))
    p.write_bytes(struct.pack("<IIII", MAGIC, 1, MAGIC2, 0).ljust(HEADER_SIZE, b"\0") + bits)
    m = ChunkMap(str(p), n)
    assert m.ready_indices() == [1, 7, 8, 19] and not m.rebuilt
    m.close()


@pytest.mark.parametrize(
    "damage",
    ["short", "long", "magic", "magic2", "garbage"],
)
def test_damaged_maps_are_rebuilt_not_trusted(tmp_path: Path, damage: str) -> None:
    p = tmp_path / "m"
    m = ChunkMap(str(p), 64)
    m.set_ready(list(range(64)))
    m.close()
    raw = bytearray(p.read_bytes())
    if damage == "short":
        raw = raw[:-1]
    elif damage == "long":
        raw += b"\xff"
    elif damage == "magic":
        raw[0] ^= 1
    elif damage == "magic2":
        raw[8] ^= 1
    else:
        raw[:16] = b"\x01" * 16
    p.write_bytes(bytes(raw))
    m = ChunkMap(str(p), 64)
    assert m.rebuilt and m.count_ready() == 0 and not m.all_ready
    assert len(p.read_bytes()) == HEADER_SIZE + 8
    m.close()


def test_zeroed_file_of_right_size_gets_a_header(tmp_path: Path) -> None:
    """Upstream's window between set_len and the header write leaves zeros: repaired."""
    p = tmp_path / "m"
    p.write_bytes(bytes(HEADER_SIZE + 1))
    m = ChunkMap(str(p), 3)
    assert not m.rebuilt and m.count_ready() == 0
    assert struct.unpack_from("<I", p.read_bytes())[0] == MAGIC
    m.close()


def test_padding_bits_do_not_count(tmp_path: Path) -> None:
    p = tmp_path / "m"
    raw = struct.pack("<IIII", MAGIC, 1, MAGIC2, 0).ljust(HEADER_SIZE, b"\0") + b"\x01"
    p.write_bytes(raw)  # bit 7 is set but there are only 3 chunks
    m = ChunkMap(str(p), 3)
    assert m.count_ready() == 0
    m.set_ready([0, 1, 2])
    assert m.all_ready
    m.close()


def test_index_out_of_range(tmp_path: Path) -> None:
    m = ChunkMap(str(tmp_path / "m"), 3)
    with pytest.raises(Exception, match="out of range"):
        m.set_ready([3])
    m.close()


def test_threads_never_lose_bits(tmp_path: Path) -> None:
    n = 800
    m = ChunkMap(str(tmp_path / "m"), n)

    def worker(k: int) -> None:
        for i in range(k, n, 8):  # eight threads share every byte
            m.set_ready([i])

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert m.count_ready() == n and m.all_ready
    m.close()


def _proc_set(path: str, n: int, k: int, step: int) -> None:
    m = ChunkMap(path, n)
    for i in range(k, n, step):
        m.set_ready([i])
    m.close()


def _proc_clear(path: str, n: int, rounds: int) -> None:
    m = ChunkMap(path, n)
    for _ in range(rounds):
        m.clear(0)
    m.close()


def test_processes_share_one_map(tmp_path: Path) -> None:
    """Several processes set bits that share bytes; none is lost (OFD byte locks)."""
    path = str(tmp_path / "shared")
    n = 1000
    ChunkMap(path, n).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_proc_set, args=(path, n, k, 4)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    m = ChunkMap(path, n)
    assert m.count_ready() == n and not m.rebuilt
    m.close()


def test_clear_and_set_on_one_byte_lose_nothing(tmp_path: Path) -> None:
    """One process keeps clearing chunk 0 while another sets chunks 1..7 of the same byte:
    no read-modify-write may drop the other's bits or resurrect chunk 0."""
    path = str(tmp_path / "shared")
    n = 8
    ChunkMap(path, n).close()
    ctx = multiprocessing.get_context("fork")
    setter = ctx.Process(target=_proc_set, args=(path, n, 1, 1))
    clearer = ctx.Process(target=_proc_clear, args=(path, n, 2000))
    clearer.start()
    setter.start()
    setter.join(30)
    clearer.join(30)
    m = ChunkMap(path, n)
    assert not m.is_ready(0)  # chunk 0 was never set, only cleared
    assert m.ready_indices() == list(range(1, 8))
    m.close()
    assert os.path.getsize(path) == HEADER_SIZE + 1


def test_complete_bitmap_is_marked_all_ready_on_open(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_bytes(
        struct.pack("<IIII", MAGIC, 1, MAGIC2, 0).ljust(HEADER_SIZE, b"\0") + b"\xff\xe0"
    )  # 11 chunks, all set
    m = ChunkMap(str(p), 11)
    assert m.all_ready
    assert struct.unpack_from("<I", p.read_bytes(), 12)[0] == MAGIC_ALL_READY
    m.close()


def test_bits_set_by_another_process_are_seen(tmp_path: Path) -> None:
    path = str(tmp_path / "m")
    mine = ChunkMap(path, 16)
    mine.set_ready([0])
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_proc_set, args=(path, 16, 1, 1))  # sets 1..15
    p.start()
    p.join(30)
    assert mine.is_ready(15) and mine.count_ready() == 16
    mine.refresh()
    assert mine.all_ready
    mine.close()
