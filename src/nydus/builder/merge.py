"""``merge``: per-layer bootstraps (lowest first) into one image bootstrap.

The layers are overlaid with the whiteout rules of :mod:`.overlay`, so the result needs no
overlayfs at run time; no data is read or written, only chunk references move. The blob table
is built as upstream ``nydus-image merge`` builds it (``nydus:builder/src/merge.rs``):

- the parent bootstrap's blobs come first, unchanged, and its tree is the lowest layer;
- each layer brings at most one blob of its own (others must come from the chunk dictionary
  image; two own blobs is an error, as upstream). The own blob's id becomes
  ``--original-blob-ids[i]`` if given, else the layer bootstrap's file name up to its first
  dot (nydusify names layer bootstraps by their blob digest); then ``--blob-digests[i]``
  replaces it (``blob_meta_digest`` instead for a ``SEPARATE`` blob), ``--blob-sizes[i]``
  sets the compressed size (``blob_meta_size`` for ``SEPARATE``), and
  ``--blob-toc-digests[i]`` / ``--blob-toc-sizes[i]`` the ToC digest and size. Every list,
  when given, has one item per source bootstrap;
- a blob already in the table (by its id in the layer bootstrap) is not added twice.

Differences from upstream, both deliberate: the lowest layer's own whiteout markers are
removed too (upstream keeps the first layer's tree as it is; overlayfs hides them), and an
empty chunk-dictionary blob set is allowed with any number of layers.

Single-threaded, pure computation over bootstraps read into memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from ..errors import ConfigError, FormatError
from ..format import rafs_v6 as v6
from ..metadata import ChunkInfo, open_bootstrap
from ..metadata.v6 import RafsV6Metadata
from .bootstrap import BootstrapOptions, write_bootstrap
from .build import _entry_of, _prefetch_order, tree_from_metadata
from .overlay import apply_layer
from .tree import Node, iter_tree, new_dir

__all__ = ["MergeOptions", "MergeResult", "merge_bootstraps", "blob_id_from_meta_path"]


@dataclass
class MergeOptions:
    parent_bootstrap: str | None = None
    chunk_dict_bootstrap: str | None = None
    blob_digests: list[str] | None = None
    original_blob_ids: list[str] | None = None
    blob_sizes: list[int] | None = None
    blob_toc_digests: list[str] | None = None
    blob_toc_sizes: list[int] | None = None
    prefetch_paths: list[bytes] | None = None
    whiteout_spec: str = "oci"


@dataclass
class MergeResult:
    bootstrap: bytes
    blobs: list[v6.BlobEntry]
    stats: dict[str, int] = field(default_factory=dict)


def blob_id_from_meta_path(path: str) -> str:
    """Upstream's ``BlobInfo::get_blob_id_from_meta_path``: the file name up to its first
    dot (``/x/abc.boot`` -> ``abc``)."""
    name = os.path.basename(path)
    stem = name.split(".", 1)[0]
    if not stem:
        raise ConfigError(f"cannot take a blob id from the bootstrap file name {path!r}")
    return stem


def _digest(hexstr: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(hexstr)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{what} {hexstr!r} is not a sha256 hex digest")
    return raw


def _open(path: str, what: str) -> RafsV6Metadata:
    md = open_bootstrap(path)
    if not isinstance(md, RafsV6Metadata):
        raise ConfigError(f"{what} {path} is RAFS v{md.version}; merge writes RAFS v6 only")
    return md


def _check_lists(n: int, opts: MergeOptions) -> None:
    for name, lst in (
        ("--blob-digests", opts.blob_digests),
        ("--original-blob-ids", opts.original_blob_ids),
        ("--blob-sizes", opts.blob_sizes),
        ("--blob-toc-digests", opts.blob_toc_digests),
        ("--blob-toc-sizes", opts.blob_toc_sizes),
    ):
        if lst is not None and len(lst) != n:
            raise ConfigError(f"{name} has {len(lst)} entries for {n} source bootstraps")


def merge_bootstraps(sources: list[str], opts: MergeOptions) -> MergeResult:
    if not sources:
        raise ConfigError("merge needs at least one source bootstrap")
    if opts.whiteout_spec not in ("oci", "overlayfs", "none"):
        raise ConfigError(f"unknown whiteout spec {opts.whiteout_spec!r}")
    _check_lists(len(sources), opts)
    blobs: list[v6.BlobEntry] = []
    index_of: dict[str, int] = {}  # blob id as the layer bootstraps name it -> table index
    tree: Node | None = None
    chunk_size: int | None = None
    compressor = digester = ""
    if opts.parent_bootstrap:
        parent = _open(opts.parent_bootstrap, "parent bootstrap")
        for i in range(len(parent.blobs)):
            e = _entry_of(parent, i)
            index_of.setdefault(e.blob_id, len(blobs))
            blobs.append(e)
        tree = tree_from_metadata(parent)
        chunk_size, compressor, digester = parent.chunk_size, parent.compressor, parent.digester
    dict_ids: set[str] = set()
    if opts.chunk_dict_bootstrap:
        cd = _open(opts.chunk_dict_bootstrap, "chunk dict")
        dict_ids = {b.blob_id for b in cd.blobs}

    for layer, path in enumerate(sources):
        md = _open(path, "bootstrap")
        if chunk_size is not None and md.chunk_size != chunk_size:
            raise ConfigError(
                f"cannot merge bootstraps with different chunk sizes: {path} uses "
                f"{md.chunk_size:#x}, the others {chunk_size:#x}"
            )
        chunk_size, compressor, digester = md.chunk_size, md.compressor, md.digester
        remap: dict[int, int] = {}
        own_added = False
        for i in range(len(md.blobs)):
            e = _entry_of(md, i)
            original = e.blob_id
            if original not in dict_ids:
                if own_added:
                    raise FormatError(
                        f"invalid per layer bootstrap {path}: it has more than one data blob "
                        f"of its own (built with --parent-bootstrap?)"
                    )
                own_added = True
                _rename_own_blob(e, layer, path, opts)
            if original not in index_of:
                index_of[original] = len(blobs)
                e.blob_index = len(blobs)
                blobs.append(e)
            remap[i] = index_of[original]
        upper = tree_from_metadata(md, remap)
        if tree is None:
            tree = new_dir(0o755, implicit=True)
        tree = apply_layer(tree, upper, opts.whiteout_spec)
    assert tree is not None and chunk_size is not None
    if len(blobs) > v6.MAX_BLOBS:
        raise FormatError(f"merged image would reference {len(blobs)} blobs (max {v6.MAX_BLOBS})")
    table, _first = _prefetch_order(tree, opts.prefetch_paths or [])
    opts_of = partial(
        BootstrapOptions, chunk_size=chunk_size, compressor=compressor, digester=digester
    )
    boot = write_bootstrap(tree, opts_of(blobs=blobs, prefetch=table))
    refs = {(c.blob_index, c.index) for _p, n in iter_tree(tree) for c in _chunks(n)}
    return MergeResult(boot, blobs, {"layers": len(sources), "chunks": len(refs)})


def _chunks(n: Node) -> list[ChunkInfo]:
    return n.chunks or []


def _rename_own_blob(e: v6.BlobEntry, layer: int, path: str, opts: MergeOptions) -> None:
    separate = bool(e.features & v6.BLOB_FEATURE_SEPARATE)
    if opts.original_blob_ids is not None:
        e.blob_id = opts.original_blob_ids[layer]
    elif not e.features & v6.BLOB_FEATURE_ZRAN:  # a zran blob is named by its layer digest
        e.blob_id = blob_id_from_meta_path(path)
    if opts.blob_digests is not None:
        digest = _digest(opts.blob_digests[layer], "--blob-digests entry")
        if separate:
            e.blob_meta_digest = digest
        else:
            e.blob_id = digest.hex()
    if opts.blob_sizes is not None:
        if separate:
            e.blob_meta_size = opts.blob_sizes[layer]
        else:
            e.compressed_size = opts.blob_sizes[layer]
    if opts.blob_toc_digests is not None:
        e.blob_toc_digest = _digest(opts.blob_toc_digests[layer], "--blob-toc-digests entry")
    if opts.blob_toc_sizes is not None:
        e.blob_toc_size = opts.blob_toc_sizes[layer]
    if not e.blob_id or len(e.blob_id) > 64 or not e.blob_id.isprintable() or "/" in e.blob_id:
        raise ConfigError(f"blob id {e.blob_id!r} for layer {layer} is not usable")
