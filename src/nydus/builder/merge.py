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

Single-threaded, pure computation over bootstraps read into memory, or (:class:`BootstrapMerger`,
nydusify's prefix merges) over the layers' trees as the builder left them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from ..errors import ConfigError, FormatError
from ..format import rafs_v6 as v6
from ..metadata import ChunkInfo
from ..metadata.v6 import RafsV6Metadata
from .bootstrap import BootstrapOptions, write_bootstrap
from .build import _open_v6, _prefetch_order, tree_from_metadata
from .overlay import apply_layer
from .tree import Node, iter_tree, new_dir

__all__ = [
    "MergeOptions",
    "MergeResult",
    "merge_bootstraps",
    "blob_id_from_meta_path",
    "LayerMeta",
    "BootstrapMerger",
]


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
    return _open_v6(path, what, "merge writes RAFS v6 only")


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
    m = _Merge(opts)
    if opts.parent_bootstrap:
        m.start_from(_open(opts.parent_bootstrap, "parent bootstrap"))
    for layer, path in enumerate(sources):
        md = _open(path, "bootstrap")
        blobs = md.blob_entries()
        geometry = (md.chunk_size, md.compressor, md.digester)
        m.add(layer, path, blobs, geometry, partial(tree_from_metadata, md), opts)
    return m.result(len(sources))


@dataclass
class LayerMeta:
    """What merging needs of one built layer (not its build state): its tree (chunk references
    only; :class:`BootstrapMerger` takes it over), its blob table as its bootstrap lists it,
    its chunk geometry, and the path its bootstrap was written to (it names the own blob)."""

    tree: Node
    blobs: list[v6.BlobEntry]
    chunk_size: int
    compressor: str
    digester: str
    path: str


class BootstrapMerger:
    """The prefix merges of nydusify, over trees held in memory.

    After the ``k``-th :meth:`add`, :meth:`bootstrap` is byte for byte what
    ``merge_bootstraps([layer k's bootstrap], MergeOptions(parent_bootstrap=<prefix k-1>,
    blob_digests=[digest], blob_sizes=[size], ...))`` gives, without writing a prefix or a
    layer bootstrap and reading it back into a tree. A layer's tree is normalised as that
    round trip would leave it (a bootstrap does not record that a directory was only implied
    by its tar, so such a directory's attributes replace the lower one's, as in
    :func:`merge_bootstraps`). Single-threaded; the trees it is given become its own.
    """

    def __init__(self, opts: MergeOptions) -> None:
        if opts.whiteout_spec not in ("oci", "overlayfs", "none"):
            raise ConfigError(f"unknown whiteout spec {opts.whiteout_spec!r}")
        self.opts = opts
        self._m = _Merge(opts)
        self._layers = 0

    def add(self, layer: LayerMeta, blob_digest: str | None, blob_size: int | None) -> None:
        """Put ``layer`` on top; its own blob (if any) becomes ``blob_digest`` (hex) of
        ``blob_size`` bytes."""
        m = self._m
        # as a parent bootstrap read back: blobs known by their final ids, first one wins
        m.index_of = {}
        for k, e in enumerate(m.blobs):
            m.index_of.setdefault(e.blob_id, k)
        one = MergeOptions(
            blob_digests=[blob_digest] if blob_digest is not None else None,
            blob_sizes=[blob_size] if blob_size is not None else None,
        )
        geometry = (layer.chunk_size, layer.compressor, layer.digester)
        tree = layer.tree

        def normalised(remap: dict[int, int]) -> Node:
            done: set[int] = set()
            for _p, n in iter_tree(tree):
                n.implicit = False
                if n.chunks and id(n) not in done:
                    done.add(id(n))
                    n.chunks = [c.in_blob(remap.get(c.blob_index, c.blob_index)) for c in n.chunks]
            return tree

        m.add(0, layer.path, [replace(e) for e in layer.blobs], geometry, normalised, one)
        self._layers += 1

    def bootstrap(self) -> MergeResult:
        """The image up to the last layer added."""
        if self._layers == 0:
            raise ConfigError("merge needs at least one layer")
        return self._m.result(self._layers)


class _Merge:
    """The state of a merge: the blob table so far and the merged tree."""

    def __init__(self, opts: MergeOptions) -> None:
        self.opts = opts
        self.blobs: list[v6.BlobEntry] = []
        self.index_of: dict[str, int] = {}  # blob id as the layer bootstraps name it -> index
        self.tree: Node | None = None
        self.chunk_size: int | None = None
        self.compressor = self.digester = ""
        self.dict_ids: set[str] = set()
        if opts.chunk_dict_bootstrap:
            cd = _open(opts.chunk_dict_bootstrap, "chunk dict")
            self.dict_ids = {b.blob_id for b in cd.blobs}

    def start_from(self, parent: RafsV6Metadata) -> None:
        for e in parent.blob_entries():
            self.index_of.setdefault(e.blob_id, len(self.blobs))
            self.blobs.append(e)
        self.tree = tree_from_metadata(parent)
        self.chunk_size = parent.chunk_size
        self.compressor, self.digester = parent.compressor, parent.digester

    def add(
        self,
        layer: int,
        path: str,
        layer_blobs: list[v6.BlobEntry],
        geometry: tuple[int, str, str],
        upper_tree: Callable[[dict[int, int]], Node],
        opts: MergeOptions,
    ) -> None:
        """Layer ``layer`` (of ``opts``' lists) with blob table ``layer_blobs`` on top."""
        chunk_size = geometry[0]
        if self.chunk_size is not None and chunk_size != self.chunk_size:
            raise ConfigError(
                f"cannot merge bootstraps with different chunk sizes: {path} uses "
                f"{chunk_size:#x}, the others {self.chunk_size:#x}"
            )
        self.chunk_size, self.compressor, self.digester = geometry
        remap: dict[int, int] = {}
        own_added = False
        for i, e in enumerate(layer_blobs):
            original = e.blob_id
            if original not in self.dict_ids:
                if own_added:
                    raise FormatError(
                        f"invalid per layer bootstrap {path}: it has more than one data blob "
                        f"of its own (built with --parent-bootstrap?)"
                    )
                own_added = True
                _rename_own_blob(e, layer, path, opts)
            if original not in self.index_of:
                self.index_of[original] = len(self.blobs)
                e.blob_index = len(self.blobs)
                self.blobs.append(e)
            remap[i] = self.index_of[original]
        upper = upper_tree(remap)
        if self.tree is None:
            self.tree = new_dir(0o755, implicit=True)
        self.tree = apply_layer(self.tree, upper, self.opts.whiteout_spec)

    def result(self, layers: int) -> MergeResult:
        tree, chunk_size, blobs = self.tree, self.chunk_size, self.blobs
        assert tree is not None and chunk_size is not None
        if len(blobs) > v6.MAX_BLOBS:
            raise FormatError(
                f"merged image would reference {len(blobs)} blobs (max {v6.MAX_BLOBS})"
            )
        table, _first = _prefetch_order(tree, self.opts.prefetch_paths or [])
        opts_of = partial(
            BootstrapOptions,
            chunk_size=chunk_size,
            compressor=self.compressor,
            digester=self.digester,
        )
        boot = write_bootstrap(tree, opts_of(blobs=list(blobs), prefetch=table))
        refs = {c.blob_index << 32 | c.index for _p, n in iter_tree(tree) for c in _chunks(n)}
        return MergeResult(boot, list(blobs), {"layers": layers, "chunks": len(refs)})


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
