"""The compact per-chunk tables of a blob and a bootstrap: the ci array as columns (CiArray),
the digest array as one bytes (DigestArray), the v6 chunk table as sorted keys; each answers
as the object-per-chunk form it replaced did."""

from __future__ import annotations

import random
import struct

import pytest

from nydus.errors import FormatError
from nydus.format import blob_meta as bm
from nydus.format import rafs_v6 as v6
from nydus.metadata.v6 import _ChunkTable
from nydus.storage.metacache import BlobMeta


def _entries(n: int, v2: bool) -> list[bm.CiEntry]:
    rnd = random.Random(n)
    out, coff = [], 0
    for i in range(n):
        usize = rnd.choice([4096, 8192, 1 << 20])
        csize = usize if rnd.random() < 0.2 else rnd.randrange(1, usize)
        if v2:
            flags = (bm.CI_V2_FLAG_COMPRESSED if csize != usize else 0) | rnd.choice(
                [0, bm.CI_V2_FLAG_HAS_CRC32]
            )
            e = bm.CiEntry(coff, csize, i << 20, usize, csize != usize, flags, rnd.getrandbits(32))
        else:
            e = bm.CiEntry(coff, csize, i << 20, usize, csize != usize)
        out.append(e)
        coff += csize
    rnd.shuffle(out)  # blob order need not be index order
    return out


@pytest.mark.parametrize("v2", [False, True])
def test_ci_array_reads_as_the_entries_it_packs(v2: bool) -> None:
    es = _entries(500, v2)
    pack, size = (bm.pack_ci_v2, bm.CI_V2_SIZE) if v2 else (bm.pack_ci_v1, bm.CI_V1_SIZE)
    raw = b"".join(pack(e) for e in es)
    ci = bm.unpack_ci_array(raw + b"\xff" * 7, len(es), v2)  # bytes past the count ignored
    one = bm.unpack_ci_v2 if v2 else bm.unpack_ci_v1
    assert list(ci) == [one(raw, i * size) for i in range(len(es))] == es
    assert ci == es and ci == bm.CiArray.of(es) and len(ci) == 500
    assert ci[-1] == es[-1] and ci[10:13] == es[10:13]
    assert list(ci.coff) == [e.compressed_offset for e in es]
    with pytest.raises(IndexError):
        ci[500]
    with pytest.raises(FormatError):
        bm.unpack_ci_array(raw[:-1], len(es), v2)
    assert len(bm.unpack_ci_array(b"", 0, v2)) == 0


def test_blob_meta_lookups_by_uncompressed_offset() -> None:
    es = _entries(64, True)
    meta = BlobMeta.build(bm.CiHeader(0, 0, 64, 0, 0, 0), bm.CiArray.of(es))
    by_off = sorted(range(64), key=lambda i: es[i].uncompressed_offset)
    assert list(meta.by_uoff) == by_off
    rnd = random.Random(1)
    for _ in range(200):
        lo, n = rnd.randrange(65 << 20), rnd.randrange(1, 3 << 20)
        assert meta.chunks_in(lo, n) == [
            i
            for i in by_off
            if es[i].uncompressed_offset < lo + n
            and es[i].uncompressed_offset + es[i].uncompressed_size > lo
        ]


def test_digest_array_slices_the_raw_bytes() -> None:
    raw = bytes(range(256)) * 2
    d = bm.DigestArray(raw)
    assert len(d) == 16 and d[0] == raw[:32] and d[-1] == raw[-32:]
    assert d[1:3] == [raw[32:64], raw[64:96]]
    with pytest.raises(IndexError):
        d[16]
    with pytest.raises(FormatError):
        bm.DigestArray(raw[:-1])


def _record(blob: int, index: int, tag: int) -> bytes:
    rec = bytearray(v6.CHUNK_INFO_SIZE)
    rec[:32] = bytes([tag]) * 32  # the digest: tells records apart
    struct.pack_into("<I", rec, 32, blob)
    struct.pack_into("<I", rec, 72, index)
    return bytes(rec)


def test_chunk_table_finds_records_by_blob_and_index_the_later_winning() -> None:
    recs = [(1, 7, 1), (0, 3, 2), (1, 7, 3), (0, 0, 4), (0, 1 << 31, 5)]
    t = _ChunkTable(b"".join(_record(*r) for r in recs), 2)
    tag = {k: v.digest[0] for k in [(1, 7), (0, 3), (0, 0), (0, 1 << 31)] if (v := t.get(k))}
    assert tag == {(1, 7): 3, (0, 3): 2, (0, 0): 4, (0, 1 << 31): 5}
    assert t.get((0, 7)) is None and t.get((2, 0)) is None and t.get((-1, 0)) is None
    assert t and not _ChunkTable(b"", 0)
    with pytest.raises(FormatError, match="blob 1"):
        _ChunkTable(_record(1, 0, 0), 1)
