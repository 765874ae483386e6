"""Rewrite one of our ``--blob-inline-meta`` blobs the way upstream's builder lays it out.

Upstream's builder (nydus ``builder/src/core/blob.rs``, read, not copied) dumps the blob table
into the bootstrap *before* it appends the bootstrap and the ToC, so the table's
``compressed_size`` is the size of everything before ``image.boot``; with ``--features
blob-toc`` it stores ``image.boot`` zstd-compressed (ToC flags 0x2, digest of the uncompressed
bootstrap), without it the bootstrap is stored plain and there is no ToC at all. Our builder
writes the whole file size and an uncompressed bootstrap; these helpers make the other shapes so
the readers can be tested against them.
"""

from __future__ import annotations

import hashlib

import zstandard

from nydus.format import blob_meta as bm
from nydus.format import rafs_v6 as v6

__all__ = ["split_inline_blob", "upstream_inline_blob"]


def split_inline_blob(blob: bytes) -> tuple[bytes, bytes, list[bm.TocEntry]]:
    """(everything before the bootstrap, the bootstrap, the ToC entries) of our inline blob."""
    name, toc_size = bm.parse_tar_header(blob[-bm.TAR_BLOCK :])
    assert name == bm.TOC_ENTRY_BLOB_TOC
    toc_end = len(blob) - bm.TAR_BLOCK
    toc = bm.unpack_toc(blob[toc_end - toc_size : toc_end])
    (boot_e,) = [e for e in toc if e.name == bm.TOC_ENTRY_BOOTSTRAP]
    boot = blob[boot_e.compressed_offset : boot_e.compressed_offset + boot_e.compressed_size]
    return blob[: boot_e.compressed_offset], boot, [e for e in toc if e is not boot_e]


def _patch_table(boot: bytes, size: int, no_toc: bool) -> bytes:
    """The bootstrap with blob 0's compressed_size set to ``size`` (and its ToC dropped)."""
    ext = v6.ExtSuperBlock.unpack(boot)
    e = v6.BlobEntry.unpack(boot, ext.blob_table_offset)
    e.compressed_size = size
    if no_toc:
        e.features &= ~(v6.BLOB_FEATURE_HAS_TOC | v6.BLOB_FEATURE_CAP_TAR_TOC)
        e.blob_toc_size = 0
    off = ext.blob_table_offset
    return boot[:off] + e.pack() + boot[off + v6.BLOB_ENTRY_SIZE :]


def upstream_inline_blob(blob: bytes, *, toc: bool = True) -> bytes:
    """Our inline blob laid out as upstream writes it: ``toc`` True is ``--features blob-toc``
    (zstd-compressed ``image.boot`` listed in a ToC), False an older build (plain
    ``image.boot`` as the last section, no ToC)."""
    head, boot, entries = split_inline_blob(blob)
    boot = _patch_table(boot, len(head), no_toc=not toc)
    if not toc:
        return head + boot + bm.tar_header(bm.TOC_ENTRY_BOOTSTRAP, len(boot))
    packed = zstandard.ZstdCompressor().compress(boot)
    entries.append(
        bm.TocEntry(
            bm.TOC_FLAG_COMPRESSION_ZSTD,
            bm.TOC_ENTRY_BOOTSTRAP,
            hashlib.sha256(boot).digest(),
            len(head),
            len(packed),
            len(boot),
        )
    )
    toc_bytes = b"".join(e.pack() for e in entries)
    return (
        head
        + packed
        + bm.tar_header(bm.TOC_ENTRY_BOOTSTRAP, len(packed))
        + toc_bytes
        + bm.tar_header(bm.TOC_ENTRY_BLOB_TOC, len(toc_bytes))
    )
