"""``check``: validate a bootstrap and, given its blobs, every chunk in them.

Walks every node (attributes, xattrs, symlinks, directory entries, chunk
lists), cross-checks chunk records with the blob table, and with blobs parses
each blob's ToC / ci header / digest array and reads, decompresses and
verifies every chunk the image references. Returns a report; problems are
collected rather than stopping at the first. Single-threaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotFoundError, NydusError
from ..format import rafs_v6 as v6
from ..metadata import RafsMetadata, open_bootstrap
from ..metadata.model import check_blob_id
from ..storage.blobfile import open_local_blob

__all__ = ["CheckReport", "check_image", "find_blob"]


@dataclass
class CheckReport:
    version: int
    inodes: int = 0  # distinct inodes (a hardlinked file counts once), as ``inspect -R stats``
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    others: int = 0
    paths: int = 0  # names in the tree (hardlinks count once per name)
    chunks_checked: int = 0
    bytes_checked: int = 0
    blobs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def find_blob(blob_id: str, blob_dir: str | None, blob_file: str | None) -> str | None:
    if blob_file:
        return blob_file
    if blob_dir:
        p = os.path.join(blob_dir, check_blob_id(blob_id))
        if os.path.exists(p):
            return p
    return None


def check_image(
    bootstrap: str, blob_dir: str | None = None, blob_file: str | None = None
) -> CheckReport:
    if blob_dir is not None and not os.path.isdir(blob_dir):
        raise NotFoundError(
            f"blob directory {blob_dir} does not exist"
            if not os.path.exists(blob_dir)
            else f"{blob_dir} is not a directory"
        )
    if blob_file is not None and not os.path.isfile(blob_file):
        raise NotFoundError(f"blob file {blob_file} does not exist")
    md = open_bootstrap(bootstrap)
    rep = CheckReport(version=md.version)
    referenced: dict[int, dict[tuple[int, int], Any]] = {}
    seen: set[int] = set()
    for path, nid in md.walk():
        rep.paths += 1
        if nid in seen:
            continue  # another name of a hardlinked file
        seen.add(nid)
        try:
            a = md.getattr(nid)
            md.xattrs(nid)
            rep.inodes += 1
            if a.is_dir:
                rep.dirs += 1
            elif a.is_symlink:
                rep.symlinks += 1
                md.readlink(nid)
            elif not a.is_reg:
                rep.others += 1
            else:
                rep.files += 1
                end = 0
                for c in md.chunks(nid):
                    if c.file_offset < end or c.file_offset + c.uncompressed_size > a.size:
                        rep.errors.append(f"{path!r}: chunk at {c.file_offset} out of place")
                    end = c.file_offset + c.uncompressed_size
                    referenced.setdefault(c.blob_index, {})[(c.index, c.uncompressed_offset)] = c
        except NydusError as e:
            rep.errors.append(f"{path.decode(errors='replace')}: {e}")
    for b in md.blobs:
        entry: dict[str, Any] = {
            "blob_id": b.blob_id,
            "compressed_size": b.compressed_size,
            "uncompressed_size": b.uncompressed_size,
            "chunk_count": b.chunk_count,
            "compressor": b.compressor,
            "digester": b.digester,
            "features": hex(b.features),
            "feature_names": v6.feature_names(b.features),
        }
        rep.blobs.append(entry)
        if blob_dir is None and blob_file is None:
            continue
        blob_path = find_blob(b.blob_id, blob_dir, blob_file if len(md.blobs) == 1 else None)
        if blob_path is None:
            rep.errors.append(f"blob {b.blob_id} not found")
            continue
        _check_blob(md, b.index, blob_path, referenced.get(b.index, {}), rep)
    return rep


def _check_blob(
    md: RafsMetadata,
    index: int,
    path: str,
    chunks: dict[tuple[int, int], Any],
    rep: CheckReport,
) -> None:
    info = md.blobs[index]
    reader, close = open_local_blob(path, info)
    try:
        if reader.size != info.compressed_size and not _inline_tail(info, reader.size):
            rep.errors.append(
                f"blob {info.blob_id}: file is {reader.size} bytes, table says "
                f"{info.compressed_size}"
            )
            return
        if info.ci_compressed_size:
            try:
                tr = reader.trailer()
                for c in chunks.values():
                    if c.index >= len(tr.ci):
                        rep.errors.append(f"blob {info.blob_id}: chunk {c.index} not in ci array")
                        continue
                    ce = tr.ci[c.index]
                    if (
                        ce.compressed_offset,
                        ce.compressed_size,
                        ce.uncompressed_offset,
                        ce.uncompressed_size,
                    ) != (
                        c.compressed_offset,
                        c.compressed_size,
                        c.uncompressed_offset,
                        c.uncompressed_size,
                    ):
                        rep.errors.append(
                            f"blob {info.blob_id}: chunk {c.index} differs from its ci entry"
                        )
                    if tr.digests and tr.digests[c.index] != c.digest:
                        rep.errors.append(
                            f"blob {info.blob_id}: chunk {c.index} digest differs from blob"
                        )
            except NydusError as e:
                rep.errors.append(f"blob {info.blob_id}: {e}")
        for c in sorted(chunks.values(), key=lambda c: c.compressed_offset):
            try:
                data = reader.read_chunk(c)
                rep.chunks_checked += 1
                rep.bytes_checked += len(data)
            except NydusError as e:
                rep.errors.append(str(e))
    finally:
        close()


def _inline_tail(info: Any, file_size: int) -> bool:
    """A blob with the bootstrap inlined may be longer than its table says: upstream's
    builder writes the table (inside the bootstrap) before it appends the bootstrap and the
    ToC, so the table records the size up to there; upstream reads such blobs."""
    return (
        bool(info.features & v6.BLOB_FEATURE_INLINED_FS_META) and file_size > info.compressed_size
    )
