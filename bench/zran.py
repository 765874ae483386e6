"""Zran costs by access-point spacing: build time, index size, read amplification.

    .venv/bin/python bench/zran.py LAYER.tar.gz [--spacing 0x10000,0x80000,0x200000]

For each ``--zran-spacing``: the targz-ref build time, the number of contexts, the blob meta's
size (ci + contexts + windows; raw and zstd as stored) against the layer, and, for every chunk
read on its own (a cold random read), the compressed bytes fetched (from its access point to
its end) and the bytes inflated, as totals over all chunks against the chunks' own sizes, plus
the mean wall time to serve one chunk (fetch from a local file + inflate + digest). A
sequential read of the whole layer fetches each context's span once (reported as ``seq``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from nydus import codec
from nydus.builder.build import BuildOptions
from nydus.builder.targz_ref import build_targz_ref
from nydus.metadata import open_bootstrap
from nydus.storage.metacache import load_blob_meta
from nydus.storage.zran import ZranChunks


def _row(layer: str, spacing: int, sample: int) -> dict[str, float]:
    t0 = time.perf_counter()
    with open(layer, "rb") as f:
        res, meta_blob = build_targz_ref(f, BuildOptions(), spacing=spacing)
    build_s = time.perf_counter() - t0
    md = open_bootstrap(res.bootstrap)
    info = md.blobs[0]
    meta = load_blob_meta(info, lambda s, e: meta_blob[s:e], None)
    assert meta.zran_table is not None
    zc = ZranChunks(info.blob_id, meta.ci, meta.zran_table)
    size = os.path.getsize(layer)
    fetched = inflated = plain = 0
    seq: dict[int, tuple[int, int]] = {}
    for i, e in enumerate(meta.ci):
        s, end = zc.span(i)
        fetched += end - s
        inflated += (e.data & 0xFFFFFFFF) + e.uncompressed_size
        plain += e.uncompressed_size
        k = e.data >> 32
        lo, hi = seq.get(k, (s, end))
        seq[k] = (min(lo, s), max(hi, end))
    fd = os.open(layer, os.O_RDONLY)
    dig = codec.digester_by_name(info.digester)
    picks = random.Random(1).sample(range(len(meta.ci)), min(sample, len(meta.ci)))
    t0 = time.perf_counter()
    for i in picks:
        dig.digest(zc.read(i, lambda s, e: os.pread(fd, e - s, s)))
    read_ms = (time.perf_counter() - t0) * 1000 / max(1, len(picks))
    os.close(fd)
    return {
        "spacing_KiB": spacing >> 10,
        "build_s": round(build_s, 2),
        "chunks": len(meta.ci),
        "contexts": len(meta.zran_table.contexts),
        "meta_KiB": (info.ci_uncompressed_size) >> 10,
        "meta_zstd_KiB": info.ci_compressed_size >> 10,
        "meta_%_of_layer": round(100 * info.ci_compressed_size / size, 2),
        "rand_fetch_x": round(fetched / size, 2),
        "rand_inflate_x": round(inflated / plain, 2),
        "seq_fetch_x": round(sum(h - lo for lo, h in seq.values()) / size, 3),
        "ms_per_chunk": round(read_ms, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("layer")
    p.add_argument("--spacing", default="0x10000,0x40000,0x80000,0x100000,0x200000")
    p.add_argument("--sample", type=int, default=40, help="chunks timed per spacing")
    a = p.parse_args()
    print(f"layer {a.layer}: {os.path.getsize(a.layer)} bytes; load {os.getloadavg()[0]:.2f}")
    for sp in a.spacing.split(","):
        print(_row(a.layer, int(sp, 0), a.sample), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
