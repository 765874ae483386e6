"""Access-pattern optimization of a built image (``nydus-image optimize``, ``nydusify optimize``).

Upstream's ``separated-blob-with-prefetch-files`` policy: given a RAFS v6 bootstrap and a list
of files a workload reads (in first-access order: a recorded access pattern, see
:mod:`nydus.fs.metrics` and :mod:`nydus.convert.pattern`), write one new *prefetch blob* that
holds the chunks of those files, contiguous and in list order (identical chunks once), and a new
bootstrap in which

* those files' chunks point into the prefetch blob (the blob table gains it as the last blob;
  the original blobs stay: every other file still reads from them), and
* the prefetch table lists the files, so that nydusd with ``fs_prefetch`` fetches the prefetch
  blob from its front as a few large merged requests when the image is mounted.

Directories in the list stand for every regular file beneath them; paths that are not in the
image are skipped (as upstream does) and reported in :attr:`OptimizeResult.missing`.

Chunk data is read through ``read_chunk`` (decompressed and verified by the caller's reader,
e.g. a :class:`~nydus.storage.blobfile.BlobReader`) and compressed again with the image's
compressor. Single-threaded apart from the blob writer's compression pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .. import codec
from ..errors import ConfigError
from ..format import rafs_v6 as v6
from ..metadata import ChunkInfo, RafsMetadata
from ..metadata.v6 import RafsV6Metadata
from .blob import BlobResult, ChunkDict, _Sink
from .build import BuildOptions, _bootstrap, _prefetch_order, tree_from_metadata
from .tree import Node

__all__ = [
    "OptimizeResult",
    "optimize_image",
    "read_prefetch_list",
    "load_prefetch_list",
    "POLICY_SEPARATED",
]

POLICY_SEPARATED = "separated-blob-with-prefetch-files"

ReadChunk = Callable[[ChunkInfo], bytes]


@dataclass
class OptimizeResult:
    bootstrap: bytes
    blob: BlobResult | None  # None when no listed file has data
    files: int  # regular files whose chunks went to the prefetch blob
    bytes: int  # their uncompressed bytes
    table: int  # entries of the prefetch table
    missing: list[str] = field(default_factory=list)


def load_prefetch_list(path: str) -> list[bytes]:
    """:func:`read_prefetch_list` of the file a user named with ``--prefetch-files``."""
    from ..config import read_input_file

    data = read_input_file(path, "--prefetch-files", 64 << 20)
    return read_prefetch_list(data.decode("utf-8", "surrogateescape"))


def read_prefetch_list(text: str) -> list[bytes]:
    """Paths of a prefetch list: one absolute path a line (upstream's ``--prefetch-files``
    and ``--prefetch-patterns`` format; blank lines and ``#`` comments ignored), or the JSON
    of an access-pattern export (a list of objects with ``file_path``, in first-access
    order)."""
    s = text.strip()
    if s.startswith("["):
        from ..format.safejson import parse_json

        doc = parse_json(s, "prefetch list", error=ConfigError)
        if not isinstance(doc, list):
            raise ConfigError("prefetch list JSON must be a list of entries")
        out: list[bytes] = []
        for item in doc:
            p = item.get("file_path") if isinstance(item, dict) else item
            if not isinstance(p, str):
                raise ConfigError("prefetch list JSON: each entry needs a 'file_path' string")
            if p:
                out.append(p.encode(errors="surrogateescape"))
        return out
    return [
        ln.strip().encode(errors="surrogateescape")
        for ln in text.splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]


def _listed_files(root: Node, paths: list[bytes]) -> tuple[list[Node], list[Node], list[str]]:
    """(prefetch table nodes, regular files in order, paths not in the image)."""
    missing: list[str] = []
    for p in paths:
        node: Node | None = root
        for part in p.strip(b"/").split(b"/"):
            if part and part != b".":
                kids = node.children if node is not None else None
                node = kids.get(part) if kids is not None else None
        if node is None:
            missing.append(p.decode(errors="replace"))
    table, first = _prefetch_order(root, paths)
    return table, first, missing


def _pieces(
    node: Node, chunks: list[ChunkInfo], read_chunk: ReadChunk
) -> Iterator[tuple[int, bytes]]:
    for c in chunks:
        data = read_chunk(c)
        if len(data) != c.uncompressed_size:
            raise ConfigError(
                f"{node.path!r}: chunk {c.index} read {len(data)} bytes, "
                f"expected {c.uncompressed_size}"
            )
        yield c.file_offset, data


def optimize_image(
    md: RafsMetadata,
    paths: list[bytes],
    read_chunk: ReadChunk,
    blob_out: _Sink,
    workers: int | None = None,
    *,
    plan: Callable[[list[ChunkInfo]], None] | None = None,
    blob_id: Callable[[], str] | None = None,
) -> OptimizeResult:
    """The optimized bootstrap, with the prefetch blob written to ``blob_out`` (module
    docstring). ``read_chunk`` returns a source chunk's uncompressed, verified bytes;
    ``plan`` is told every chunk that will be read, in order, before the first read (a
    remote reader fetches them as merged ranges); ``blob_id`` names the written blob in the
    blob table (default: the builder's id; ``nydusify`` uses the blob file's sha256, the
    registry digest, as the converter does)."""
    from .blob import BlobWriter

    if not isinstance(md, RafsV6Metadata):
        raise ConfigError(f"optimize needs a RAFS v6 bootstrap, this one is v{md.version}")
    if len(md.blobs) + 1 > v6.MAX_BLOBS:
        raise ConfigError("the image already references the most blobs a bootstrap can hold")
    if any(b.compressor == "gzip" for b in md.blobs):
        raise ConfigError("optimize does not support zran (gzip chunk) images")
    opts = BuildOptions(
        chunk_size=md.chunk_size, compressor=md.compressor, digester=md.digester, workers=workers
    )
    blobs = md.blob_entries()
    root = tree_from_metadata(md)
    table, files, missing = _listed_files(root, paths)
    hot = [(n, list(n.chunks or ())) for n in files if n.chunks]
    result: BlobResult | None = None
    nbytes = 0
    if hot and plan is not None:
        plan([c for _n, cs in hot for c in cs])
    if hot:
        writer = BlobWriter(
            blob_out,
            blob_index=len(blobs),
            chunk_size=md.chunk_size,
            compressor=codec.compressor_by_name(md.compressor),
            digester=codec.digester_by_name(md.digester),
            chunk_dict=ChunkDict(),
            workers=workers,
        )
        with writer:
            for node, chunks in hot:
                nbytes += writer.add_file(node, _pieces(node, chunks, read_chunk))
            writer.flush()
            result = writer.finish()
        if result is not None:
            if blob_id is not None:
                result.entry.blob_id = blob_id()
            blobs.append(result.entry)
    boot = _bootstrap(root, blobs, opts, table)
    # every listed file now reads from the new blob: check, cheaply, before anyone pushes it
    if result is not None:
        new = result.entry.blob_index
        for node, _c in hot:
            assert all(c.blob_index == new for c in node.chunks or ())
    return OptimizeResult(boot, result, len(hot), nbytes, len(table), missing)
