"""Build verb: a directory tree or a layer tar in, bootstrap bytes and one data blob out.

Ties the pieces together: optional parent image (its tree and blobs become the
lower layer and its chunks the dedup dictionary), optional chunk dictionary
image, overlay of the new tree with whiteouts, prefetch ordering, the blob
writer and the bootstrap writer. :func:`build_image` takes a tree read from a
directory (file data read after the walk); :func:`build_from_tar` reads a tar
stream once, feeding the blob writer as it goes. Single-threaded apart from
the blob writer's pool.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from .. import codec
from ..errors import ConfigError, FormatError
from ..format import rafs_v6 as v6
from ..metadata import Nid, RafsMetadata, open_bootstrap
from ..metadata.v6 import RafsV6Metadata
from .blob import BlobResult, BlobWriter, ChunkDict, _Sink
from .bootstrap import BootstrapOptions, write_bootstrap
from .overlay import apply_layer
from .tarsource import TarLimits, load_tar
from .tree import Node, iter_tree, paused_gc

__all__ = ["BuildOptions", "BuildResult", "build_image", "build_from_tar", "tree_from_metadata"]


@dataclass
class BuildOptions:
    chunk_size: int = 0x100000
    compressor: str = "zstd"
    digester: str = "blake3"
    parent_bootstrap: str | None = None
    chunk_dict_bootstrap: str | None = None
    whiteout_spec: str = "oci"
    prefetch_paths: list[bytes] | None = None
    workers: int | None = None
    inline_bootstrap: bool = False
    # progress: called for every chunk placed with (uncompressed size, deduplicated)
    on_chunk: Callable[[int, bool], None] | None = field(default=None, compare=False)

    def validate(self) -> None:
        cs = self.chunk_size
        if cs < v6.MIN_CHUNK_SIZE or cs > v6.MAX_CHUNK_SIZE or cs & (cs - 1):
            raise ConfigError(
                f"--chunk-size must be a power of two in 0x1000..0x1000000, got {cs:#x}"
            )
        codec.compressor_by_name(self.compressor)
        codec.digester_by_name(self.digester)
        if self.compressor == "gzip":
            raise ConfigError("gzip chunk compression is only for zran images")
        if self.whiteout_spec not in ("oci", "overlayfs", "none"):
            raise ConfigError(f"unknown whiteout spec {self.whiteout_spec!r}")


@dataclass
class BuildResult:
    bootstrap: bytes
    blob: BlobResult | None
    blobs: list[v6.BlobEntry]
    bytes_read: int = 0
    files: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    # the built tree (chunk references, no data): what :class:`.merge.LayerMeta` takes over
    tree: Node | None = field(default=None, repr=False)


def _open_v6(path: str, what: str, why: str = "only v6 can be extended") -> RafsV6Metadata:
    """The RAFS v6 bootstrap at ``path`` (the ``what`` of a build or merge); another version
    is a ConfigError that says ``why``."""
    md = open_bootstrap(path)
    if not isinstance(md, RafsV6Metadata):
        raise ConfigError(f"{what} {path} is RAFS v{md.version}; {why}")
    return md


def tree_from_metadata(md: RafsMetadata, blob_map: dict[int, int] | None = None) -> Node:
    """Rebuild a Node tree (with chunk references, no data) from a bootstrap."""
    nodes: dict[Nid, Node] = {}
    remap = blob_map or {}

    def make(nid: Nid) -> Node:
        hit = nodes.get(nid)
        if hit is not None:
            return hit
        a = md.getattr(nid)
        n = Node(
            mode=a.mode,
            uid=a.uid,
            gid=a.gid,
            mtime=a.mtime,
            mtime_nsec=a.mtime_nsec,
            size=a.size,
            rdev=a.rdev,
            xattrs=md.xattrs(nid),
        )
        if a.is_dir:
            n.children = {}
        elif a.is_symlink:
            n.symlink = md.readlink(nid)
        elif a.is_reg:
            n.chunks = [c.in_blob(remap.get(c.blob_index, c.blob_index)) for c in md.chunks(nid)]
        nodes[nid] = n
        return n

    root = make(md.root_nid)
    for path, nid in md.walk():
        if path == b"/":
            continue
        parent_path, _, name = path.rpartition(b"/")
        parent = make(md.resolve(parent_path or b"/"))
        assert parent.children is not None
        parent.children[name] = make(nid)
        nodes[nid].path = path
    return root


def _prefetch_order(root: Node, paths: list[bytes]) -> tuple[list[Node], list[Node]]:
    """(nodes for the prefetch table, regular files to write first)."""
    table: list[Node] = []
    first: list[Node] = []
    seen: set[int] = set()
    listed: set[int] = set()
    for p in paths:
        node: Node | None = root
        for part in p.strip(b"/").split(b"/"):
            if not part or part == b".":
                continue
            kids = node.children if node is not None else None
            node = kids.get(part) if kids is not None else None
            if node is None:
                break
        if node is None:
            continue  # upstream ignores missing prefetch entries
        if id(node) in listed:
            continue  # listed twice: the first place counts
        listed.add(id(node))
        table.append(node)
        for _sub, n in iter_tree(node):
            if n.is_reg and id(n) not in seen:
                seen.add(id(n))
                first.append(n)
    return table, first


@dataclass
class _Base:
    """What a build starts from: the parent's blobs and tree, and the dedup dictionary."""

    blobs: list[v6.BlobEntry]
    dict_blobs: set[int]  # blobs that only the chunk dictionary brought in
    cdict: ChunkDict
    lower: Node | None


def _prepare(opts: BuildOptions) -> _Base:
    blobs: list[v6.BlobEntry] = []
    dict_blobs: set[int] = set()
    cdict = ChunkDict()
    lower = None
    if opts.parent_bootstrap:
        parent = _open_v6(opts.parent_bootstrap, "parent bootstrap")
        _check_compatible(parent, opts, "parent bootstrap")
        blobs = parent.blob_entries()
        lower = tree_from_metadata(parent)
        for _p, n in iter_tree(lower):
            for c in n.chunks or ():
                cdict.add(c)
    if opts.chunk_dict_bootstrap:
        cd = _open_v6(opts.chunk_dict_bootstrap, "chunk dict")
        _check_compatible(cd, opts, "chunk dict")
        remap: dict[int, int] = {}
        for i, e in enumerate(cd.blob_entries()):
            known = next((b for b in blobs if b.blob_id == e.blob_id), None)
            if known is None:
                e.blob_index = len(blobs)
                dict_blobs.add(e.blob_index)
                blobs.append(e)
                known = e
            remap[i] = known.blob_index
        for _p, n in iter_tree(tree_from_metadata(cd, remap)):
            for c in n.chunks or ():
                cdict.add(c)
    if len(blobs) >= v6.MAX_BLOBS:
        raise FormatError(f"image would reference more than {v6.MAX_BLOBS} blobs")
    return _Base(blobs, dict_blobs, cdict, lower)


def _writer(
    base: _Base, blob_out: _Sink, opts: BuildOptions, spool_dir: str | None = None
) -> BlobWriter:
    return BlobWriter(
        blob_out,
        blob_index=len(base.blobs),
        chunk_size=opts.chunk_size,
        compressor=codec.compressor_by_name(opts.compressor),
        digester=codec.digester_by_name(opts.digester),
        chunk_dict=base.cdict,
        workers=opts.workers,
        spool_dir=spool_dir,
        on_chunk=opts.on_chunk,
    )


@paused_gc()
def build_image(source: Node, blob_out: _Sink | None, opts: BuildOptions) -> BuildResult:
    """Build from a tree whose regular files have ``open_data`` (a directory walk)."""
    opts.validate()
    base = _prepare(opts)
    # A layer built on its own keeps its whiteout markers: `merge` applies them.
    root = apply_layer(base.lower, source, opts.whiteout_spec) if base.lower else source

    table, first = _prefetch_order(root, opts.prefetch_paths or [])
    order: list[Node] = list(first)
    seen = {id(n) for n in order}
    files = 0
    for _p, n in iter_tree(root):
        if n.is_reg:
            files += 1
            if n.chunks is None and id(n) not in seen:
                seen.add(id(n))
                order.append(n)
    order = [n for n in order if n.chunks is None]

    result: BlobResult | None = None
    read = 0
    if order:
        if blob_out is None:
            raise ConfigError("the image has file data: give --blob or --blob-dir")
        with _writer(base, blob_out, opts) as writer:
            read = writer.add_files(order)
            result = writer.finish(_inline_maker(root, base, opts, table))
    elif opts.inline_bootstrap:
        raise ConfigError("--blob-inline-meta needs file data to make a blob")
    return _complete(root, base, result, opts, table, read, files)


@paused_gc()
def build_from_tar(
    stream: BinaryIO,
    blob_out: _Sink | None,
    opts: BuildOptions,
    limits: TarLimits | None = None,
    spool_dir: str | None = None,
) -> BuildResult:
    """Build from an OCI layer tar (plain, gzip or zstd) read once from ``stream``.

    File data goes to the blob while the tar streams. With ``prefetch_paths`` the chunks of
    the files under those paths go first in the blob (the others wait in a spool file in
    ``spool_dir``). The result's ``stats`` hold the layer's ``diff_id``.
    """
    opts.validate()
    base = _prepare(opts)
    patterns = _prefetch_patterns(opts.prefetch_paths or [])
    front = None
    if patterns and b"/" not in patterns:

        def front(path: bytes) -> bool:
            return any(path == p or path.startswith(p + b"/") for p in patterns)

    writer = _writer(base, blob_out, opts, spool_dir) if blob_out is not None else None
    try:
        layer = load_tar(stream, writer, chunk_size=opts.chunk_size, prefetch=front, limits=limits)
        root = apply_layer(base.lower, layer.root, opts.whiteout_spec) if base.lower else layer.root
        table, _first = _prefetch_order(root, opts.prefetch_paths or [])
        result = None
        if writer is not None:
            result = writer.finish(_inline_maker(root, base, opts, table))
        if result is None and opts.inline_bootstrap:
            raise ConfigError("--blob-inline-meta needs file data to make a blob")
    finally:
        if writer is not None:
            writer.close()
    files = sum(1 for _p, n in iter_tree(root) if n.is_reg)
    res = _complete(root, base, result, opts, table, layer.bytes_read, files)
    res.stats.update(layer.stats())
    return res


def _inline_maker(
    root: Node, base: _Base, opts: BuildOptions, table: list[Node]
) -> Callable[[v6.BlobEntry], bytes] | None:
    if not opts.inline_bootstrap:
        return None

    def make_boot(entry: v6.BlobEntry) -> bytes:
        return _bootstrap(root, [*base.blobs, entry], opts, table)

    return make_boot


def _complete(
    root: Node,
    base: _Base,
    result: BlobResult | None,
    opts: BuildOptions,
    table: list[Node],
    read: int,
    files: int,
) -> BuildResult:
    blobs = list(base.blobs)
    if result is not None:
        blobs.append(result.entry)
    if not opts.inline_bootstrap:  # the inlined copy already fixed the blob table
        blobs, root = _prune_blobs(root, blobs, prunable=base.dict_blobs)
    boot = _bootstrap(root, blobs, opts, table)
    stats: dict[str, Any] = {
        "new_chunks": result.new_chunks if result else 0,
        "deduped_chunks": result.deduped_chunks if result else 0,
    }
    return BuildResult(boot, result, blobs, read, files, stats, root)


def _prefetch_patterns(paths: list[bytes]) -> set[bytes]:
    out = set()
    for p in paths:
        parts = [x for x in p.split(b"/") if x and x != b"."]
        out.add(b"/" + b"/".join(parts))
    return out


def _bootstrap(
    root: Node, blobs: list[v6.BlobEntry], opts: BuildOptions, table: list[Node]
) -> bytes:
    return write_bootstrap(
        root,
        BootstrapOptions(
            chunk_size=opts.chunk_size,
            compressor=opts.compressor,
            digester=opts.digester,
            blobs=blobs,
            prefetch=table,
        ),
    )


def _check_compatible(md: RafsV6Metadata, opts: BuildOptions, what: str) -> None:
    if md.chunk_size != opts.chunk_size:
        raise ConfigError(
            f"{what} uses chunk size {md.chunk_size:#x}, this build {opts.chunk_size:#x}"
        )
    if md.digester != opts.digester:
        raise ConfigError(f"{what} uses digester {md.digester}, this build {opts.digester}")


def _prune_blobs(
    root: Node, blobs: list[v6.BlobEntry], prunable: set[int]
) -> tuple[list[v6.BlobEntry], Node]:
    """Drop chunk-dictionary blobs that no file ended up referencing."""
    if not prunable:
        return blobs, root
    used: set[int] = set()
    for _p, n in iter_tree(root):
        for c in n.chunks or ():
            used.add(c.blob_index)
    if not prunable - used:
        return blobs, root
    remap: dict[int, int] = {}
    kept: list[v6.BlobEntry] = []
    for b in blobs:
        if b.blob_index in used or b.blob_index not in prunable:
            remap[b.blob_index] = len(kept)
            b.blob_index = len(kept)
            kept.append(b)
    done: set[int] = set()
    for _p, n in iter_tree(root):
        if n.chunks and id(n) not in done:
            done.add(id(n))
            n.chunks = [c.in_blob(remap[c.blob_index]) for c in n.chunks]
    return kept, root
