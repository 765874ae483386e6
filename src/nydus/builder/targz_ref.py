"""``nydus-image create --type targz-ref``: a RAFS v6 image whose data blob is the original
tar.gz layer (zran, nydus-reference.md §2.2; upstream ``ZranContextGenerator``).

The layer is read once. :class:`_ZranStream` inflates it with ``Z_BLOCK`` and keeps an
access point (format/zran.py) at the first deflate block boundary ``spacing`` compressed
bytes (or ``4 * spacing`` uncompressed bytes) after the previous one, and at the start of
every gzip member. :class:`_ZranChunks` takes the tar's file chunks in place of a
BlobWriter and remembers where each lies in the uncompressed stream. At the end each chunk
gets the last access point before it; the used access points become the zran contexts.

The bootstrap's blob is the layer itself (blob id: sha256 of the .tar.gz) with features
zran | separate | has_toc: as upstream, its blob meta (ci array v2, contexts, windows; zstd)
is a small blob of its own, the "meta blob" (``--blob``): ``blob.meta`` (at offset 0, the
table's ``ci_offset``), ``blob.digest``, optionally ``image.boot``, and the ToC, each with
its tar header. The bootstrap names it by ``blob_meta_digest`` / ``blob_meta_size`` and
vouches for its ToC (``blob_toc_digest``); the bootstrap inside it cannot, and has zeros.

Single-threaded apart from the layer reader's producer thread (whose records are read only
after it ended).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO, cast

from .. import codec
from ..errors import ConfigError, FormatError, UnsupportedError
from ..format import blob_meta as bm
from ..format import rafs_v6 as v6
from ..format import zran
from ..metadata import ChunkInfo
from .blob import BlobResult, BlobWriter
from .build import BuildOptions, BuildResult, _bootstrap, _prepare
from .tarsource import TarLimits, _load
from .tarstream import PIECE, LayerStream
from .tree import Node, iter_tree

__all__ = ["DEFAULT_SPACING", "build_targz_ref"]

DEFAULT_SPACING = zran.DEFAULT_SPACING

_FEATURES = (
    v6.BLOB_FEATURE_ALIGNED
    | v6.BLOB_FEATURE_CHUNK_INFO_V2
    | v6.BLOB_FEATURE_ZRAN
    | v6.BLOB_FEATURE_SEPARATE
    | v6.BLOB_FEATURE_INLINED_CHUNK_DIGEST
    | v6.BLOB_FEATURE_HAS_TAR_HEADER
    | v6.BLOB_FEATURE_HAS_TOC
)


@dataclass
class _AccessPoint:
    in_offset: int
    out_offset: int
    bits: int
    byte: int
    window: bytes


class _ZranStream(LayerStream):
    """A gzip LayerStream that records access points and (in, out) positions."""

    def __init__(self, raw: BinaryIO, spacing: int) -> None:
        self.spacing = spacing
        self.points: list[_AccessPoint] = []
        self.pos_in: list[int] = []  # compressed bytes consumed when ...
        self.pos_out: list[int] = []  # ... this much output was produced
        self.sha = hashlib.sha256()
        super().__init__(raw)
        if self.compression != "gzip":
            self.close()
            raise FormatError("targz-ref needs a gzip-compressed tar")

    def _more(self) -> bytes:
        data = super()._more()
        self.sha.update(data)
        return data

    def _gunzip(self, first: bytes) -> Iterator[bytes]:
        self.sha.update(first)
        inf = zran.Inflater(31)
        data, base, out_pos, tail = first, 0, 0, 0
        member_start = True
        inf.feed(data)
        while True:
            ret, out = inf.inflate(PIECE, zran.Z_BLOCK)
            used = len(data) - inf.avail_in
            at = base + used
            out_pos += len(out)
            if out:
                self.pos_in.append(at)
                self.pos_out.append(out_pos)
            if ret == zran.Z_STREAM_END:
                rest, base = self._after_member(inf.unused()), at
                if not rest:
                    return
                inf.reset(31)
                data, tail, member_start = rest, 0, True
                inf.feed(data)
            elif ret not in (zran.Z_OK, zran.Z_BUF_ERROR):
                raise FormatError(f"gzip stream corrupt near byte {at} (zlib {ret})")
            else:
                dt = inf.data_type
                if dt & 0x80 and not dt & 0x40 and self._due(at, out_pos, member_start):
                    bits = dt & 7
                    byte = (inf.last_consumed_byte() if used else tail) if bits else 0
                    w = b"" if member_start else inf.get_dictionary()
                    self.points.append(_AccessPoint(at, out_pos, bits, byte, w))
                    member_start = False
                if inf.avail_in == 0:
                    more = self._more()
                    if not more:
                        raise FormatError("gzip stream truncated (the last member is incomplete)")
                    base, tail, data = base + len(data), data[-1], more
                    inf.feed(data)
            if out:
                yield out

    def _due(self, at: int, out_pos: int, member_start: bool) -> bool:
        if member_start or not self.points:
            return True
        last = self.points[-1]
        return at - last.in_offset >= self.spacing or out_pos - last.out_offset >= 4 * self.spacing


@dataclass
class _Chunk:
    node: Node
    file_offset: int
    out_start: int
    out_end: int
    digest: bytes


class _ZranChunks:
    """Takes file chunks in place of a BlobWriter; :meth:`finish` makes the ci and contexts."""

    def __init__(self, stream: _ZranStream, opts: BuildOptions, blob_index: int) -> None:
        self.stream = stream
        self.digester = codec.digester_by_name(opts.digester)
        self.chunk_size = opts.chunk_size
        self.blob_index = blob_index
        self.chunks: list[_Chunk] = []
        self.digests: list[bytes] = []  # per ci entry (upstream's blob.digest)
        self.zran_count = self.zran_offset = 0

    def add_file(
        self, node: Node, pieces: Iterable[tuple[int, bytes]], *, deferred: bool = False
    ) -> int:
        total = 0
        node.chunks = []
        start = self.stream.pos
        for off, data in pieces:
            end = self.stream.pos
            if end - start != len(data):  # holes are not in the stream
                raise UnsupportedError(f"targz-ref: sparse file {node.path!r} is not supported")
            self.chunks.append(_Chunk(node, off, start, end, self.digester.digest(data)))
            total += len(data)
            start = end
        return total

    def flush(self) -> None:
        pass

    def finish(self) -> tuple[v6.BlobEntry, bytes] | None:
        """The blob table entry (``ci_offset`` 0) and the uncompressed blob meta."""
        s = self.stream
        if not self.chunks:
            return None
        ap_outs = [p.out_offset for p in s.points]
        used: dict[int, int] = {}  # access point -> context index
        spans: list[list[int]] = []  # per context: [in_len, out_len]
        cis: list[bm.CiEntry] = []
        seen: dict[bytes, ChunkInfo] = {}
        upos = 0
        for c in self.chunks:
            hit = seen.get(c.digest)
            size = c.out_end - c.out_start
            if hit is not None and hit.uncompressed_size == size:
                cast(list[ChunkInfo], c.node.chunks).append(replace(hit, file_offset=c.file_offset))
                continue
            a = bisect.bisect_right(ap_outs, c.out_start) - 1
            ap = s.points[a]
            k = used.setdefault(a, len(used))
            if k == len(spans):
                spans.append([0, 0])
            j = bisect.bisect_right(s.pos_out, c.out_start) - 1
            cin = max(s.pos_in[j] if j >= 0 else 0, ap.in_offset)
            cend = s.pos_in[bisect.bisect_left(s.pos_out, c.out_end)]
            spans[k][0] = max(spans[k][0], cend - ap.in_offset)
            spans[k][1] = max(spans[k][1], c.out_end - ap.out_offset)
            e = bm.CiEntry(
                cin, cend - cin, upos, size, True, bm.CI_V2_FLAG_ZRAN,
                k << 32 | (c.out_start - ap.out_offset),
            )  # fmt: skip
            ref = ChunkInfo(
                c.digest, self.blob_index, len(cis), c.file_offset, cin, cend - cin, upos,
                size, True,
            )  # fmt: skip
            cis.append(e)
            self.digests.append(c.digest)
            seen[c.digest] = ref
            cast(list[ChunkInfo], c.node.chunks).append(ref)
            upos += size + (-size % 4096)
        contexts, windows, woff = [], [], 0
        for a, k in sorted(used.items(), key=lambda t: t[1]):
            ap = s.points[a]
            in_len, out_len = spans[k]
            if in_len >> 32 or out_len > zran.MAX_CONTEXT_OUT:
                raise FormatError("a zran context spans 4 GiB; lower --zran-spacing")
            contexts.append(
                zran.ZranContext(
                    ap.in_offset,
                    ap.out_offset,
                    woff,
                    in_len,
                    out_len,
                    len(ap.window),
                    ap.byte,
                    ap.bits,
                )
            )
            windows.append(ap.window)
            woff += len(ap.window)
        ci_raw = b"".join(bm.pack_ci_v2(e) for e in cis)
        meta = ci_raw + zran.ZranTable(contexts, b"".join(windows)).pack()
        entry = v6.BlobEntry(
            blob_id=s.sha.hexdigest(),
            blob_index=self.blob_index,
            chunk_size=self.chunk_size,
            chunk_count=len(cis),
            compression_algo=codec.compressor_by_name("gzip").id,
            digest_algo=self.digester.id,
            features=_FEATURES,
            compressed_size=s.compressed_bytes,
            uncompressed_size=upos,
            ci_uncompressed_size=len(meta),
        )
        self.zran_count, self.zran_offset = len(contexts), len(ci_raw)
        return entry, meta


def build_targz_ref(
    stream: BinaryIO,
    opts: BuildOptions,
    *,
    spacing: int = DEFAULT_SPACING,
    limits: TarLimits | None = None,
    inline_bootstrap: bool = False,
) -> tuple[BuildResult, bytes]:
    """A zran image of the tar.gz read from ``stream``: the bootstrap and upstream's meta blob
    (``--blob``: blob meta, digest array, with ``inline_bootstrap`` the bootstrap, ToC)."""
    if opts.parent_bootstrap or opts.chunk_dict_bootstrap or opts.prefetch_paths:
        raise ConfigError("targz-ref builds take no parent, chunk dict or prefetch list")
    if spacing < 0x8000:
        raise ConfigError("--zran-spacing must be at least 32 KiB")
    opts.validate()
    opts = replace(opts, compressor="gzip", inline_bootstrap=False)  # upstream: gzip (zran)
    base = _prepare(opts)
    ls = _ZranStream(stream, spacing)
    with ls:
        writer = _ZranChunks(ls, opts, len(base.blobs))
        layer = _load(ls, cast(BlobWriter, writer), opts.chunk_size, None, limits or TarLimits())
    made = writer.finish()
    blobs: list[v6.BlobEntry] = []
    meta_blob, result = b"", None
    if made is not None:
        entry, meta = made
        entry.features |= v6.BLOB_FEATURE_INLINED_FS_META if inline_bootstrap else 0
        blobs = [entry]
        result = BlobResult(entry, entry.chunk_count, 0, 0)
        sections = _meta_sections(entry, meta, writer)

        def boot_of(e: v6.BlobEntry) -> bytes:
            return _bootstrap(layer.root, [e], opts, [])

        entry.blob_toc_size = (len(sections) + inline_bootstrap) * bm.TOC_ENTRY_SIZE + bm.TAR_BLOCK
        inner = boot_of(entry) if inline_bootstrap else None  # ToC and meta digests unknown
        meta_blob = _pack_sections(sections, inner)
        entry.blob_meta_digest = hashlib.sha256(meta_blob).digest()
        entry.blob_meta_size = len(meta_blob)
        entry.blob_toc_digest = hashlib.sha256(meta_blob[-entry.blob_toc_size :]).digest()
    boot = _bootstrap(layer.root, blobs, opts, [])
    files = sum(1 for _p, n in iter_tree(layer.root) if n.is_reg)
    stats = {"new_chunks": len(writer.chunks), "contexts": writer.zran_count}
    res = BuildResult(boot, result, blobs, layer.bytes_read, files, {**stats, **layer.stats()})
    return res, meta_blob


def _meta_sections(
    entry: v6.BlobEntry, meta: bytes, writer: _ZranChunks
) -> list[tuple[str, bytes, bm.TocEntry]]:
    """The meta blob's sections before the bootstrap: (name, bytes, ToC entry at offset 0)."""
    ci_comp = codec.compressor_by_name("zstd")
    ci_data, ok = codec.compress(ci_comp, meta)
    if not ok:
        ci_comp, ci_data = codec.compressor_by_name("none"), meta
    entry.ci_compressor, entry.ci_compressed_size = ci_comp.id, len(ci_data)
    header = bm.CiHeader(
        entry.features, ci_comp.id, entry.chunk_count, 0, len(ci_data), len(meta),
        writer.zran_offset, len(meta) - writer.zran_offset, writer.zran_count,
    ).pack()  # fmt: skip
    raw = bm.TOC_FLAG_COMPRESSION_NONE
    digests = b"".join(writer.digests)
    return [
        (bm.TOC_ENTRY_BLOB_META, ci_data + header,
         bm.TocEntry(bm.TOC_COMPRESSION.get(ci_comp.name, 1), bm.TOC_ENTRY_BLOB_META,
                     hashlib.sha256(meta).digest(), 0, len(ci_data), len(meta))),
        ("", b"", bm.TocEntry(raw, bm.TOC_ENTRY_BLOB_META_HEADER, hashlib.sha256(header).digest(),
                              len(ci_data), len(header), len(header))),
        (bm.TOC_ENTRY_BLOB_DIGEST, digests,
         bm.TocEntry(raw, bm.TOC_ENTRY_BLOB_DIGEST, hashlib.sha256(digests).digest(), 0,
                     len(digests), len(digests))),
    ]  # fmt: skip


def _pack_sections(sections: list[tuple[str, bytes, bm.TocEntry]], boot: bytes | None) -> bytes:
    """``data | tar header`` per section, then the ToC (offsets filled in here)."""
    if boot is not None:
        d = hashlib.sha256(boot).digest()
        e = bm.TocEntry(
            bm.TOC_FLAG_COMPRESSION_NONE, bm.TOC_ENTRY_BOOTSTRAP, d, 0, *[len(boot)] * 2
        )
        sections = [*sections, (bm.TOC_ENTRY_BOOTSTRAP, boot, e)]
    out = bytearray()
    toc: list[bm.TocEntry] = []
    for name, data, e in sections:
        if name:  # the header entry lies inside blob.meta: its offset is already right
            e = replace(e, compressed_offset=len(out))
            out += data + bm.tar_header(name, len(data))
        toc.append(e)
    toc_bytes = b"".join(e.pack() for e in toc)
    return bytes(out) + toc_bytes + bm.tar_header(bm.TOC_ENTRY_BLOB_TOC, len(toc_bytes))
