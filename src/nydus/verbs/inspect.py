"""``inspect`` and ``stat``: answer questions about a bootstrap as JSON data.

Requests (``inspect BOOTSTRAP -R REQUEST``): ``stats``, ``blobs``,
``prefetch``, ``ls [PATH]``, ``stat PATH``, ``chunks PATH`` (alias
``icheck``). :func:`image_stats` also backs ``nydus-image stat``, including the
dedup ratio over several images. Pure reads; single-threaded.
"""

from __future__ import annotations

import shlex
import stat as st
from typing import Any

from ..errors import ConfigError
from ..metadata import RafsMetadata

__all__ = ["inspect_request", "image_stats", "dedup_stats"]


def image_stats(md: RafsMetadata) -> dict[str, Any]:
    counts = {"dirs": 0, "files": 0, "symlinks": 0, "hardlinks": 0, "others": 0}
    seen: set[int] = set()
    file_bytes = 0
    chunk_refs = 0
    unique: dict[tuple[int, int], int] = {}
    for _p, nid in md.walk():
        a = md.getattr(nid)
        if nid in seen:
            counts["hardlinks"] += 1
            continue
        seen.add(nid)
        if a.is_dir:
            counts["dirs"] += 1
        elif a.is_reg:
            counts["files"] += 1
            file_bytes += a.size
            for c in md.chunks(nid):
                chunk_refs += 1
                unique[(c.blob_index, c.index)] = c.uncompressed_size
        elif a.is_symlink:
            counts["symlinks"] += 1
        else:
            counts["others"] += 1
    stored = sum(unique.values())
    return {
        "version": md.version,
        "compressor": md.compressor,
        "digester": md.digester,
        "chunk_size": md.chunk_size,
        "inodes": len(seen),
        **counts,
        "file_bytes": file_bytes,
        "chunks": chunk_refs,
        "unique_chunks": len(unique),
        "unique_chunk_bytes": stored,
        "dedup_ratio": round(file_bytes / stored, 4) if stored else 1.0,
        "blobs": len(md.blobs),
        "compressed_bytes": sum(b.compressed_size for b in md.blobs),
    }


def dedup_stats(images: list[RafsMetadata]) -> dict[str, Any]:
    """Chunk dedup across a set of images: bytes referenced vs distinct digests."""
    total = 0
    distinct: dict[bytes, int] = {}
    for md in images:
        for _p, nid in md.walk():
            a = md.getattr(nid)
            if a.is_reg:
                for c in md.chunks(nid):
                    total += c.uncompressed_size
                    distinct[c.digest] = c.uncompressed_size
    stored = sum(distinct.values())
    return {
        "images": len(images),
        "referenced_bytes": total,
        "distinct_chunks": len(distinct),
        "distinct_bytes": stored,
        "dedup_ratio": round(total / stored, 4) if stored else 1.0,
    }


def _attr(md: RafsMetadata, nid: int) -> dict[str, Any]:
    a = md.getattr(nid)
    out: dict[str, Any] = {
        "nid": nid, "ino": a.ino, "mode": oct(a.mode), "type": _type(a.mode), "nlink": a.nlink,
        "uid": a.uid, "gid": a.gid, "size": a.size, "mtime": a.mtime,
        "mtime_nsec": a.mtime_nsec,
    }
    if a.rdev:
        out["rdev"] = a.rdev
    xs = md.xattrs(nid)
    if xs:
        out["xattrs"] = {k.decode(errors="replace"): v.hex() for k, v in xs.items()}
    if a.is_symlink:
        out["target"] = md.readlink(nid).decode(errors="surrogateescape")
    return out


def _type(mode: int) -> str:
    for test, name in ((st.S_ISDIR, "dir"), (st.S_ISREG, "file"), (st.S_ISLNK, "symlink"),
                       (st.S_ISCHR, "char"), (st.S_ISBLK, "block"), (st.S_ISFIFO, "fifo"),
                       (st.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def inspect_request(md: RafsMetadata, request: str) -> Any:
    words = shlex.split(request)
    if not words:
        raise ConfigError("empty inspect request")
    cmd, args = words[0], words[1:]
    if cmd == "stats":
        return image_stats(md)
    if cmd == "blobs":
        return [
            {"index": b.index, "blob_id": b.blob_id, "compressor": b.compressor,
             "digester": b.digester, "chunk_size": b.chunk_size, "chunk_count": b.chunk_count,
             "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size,
             "features": hex(b.features)}
            for b in md.blobs
        ]
    if cmd == "prefetch":
        paths = {nid: p for p, nid in md.walk()}
        return [{"nid": n, "path": paths.get(n, b"?").decode(errors="replace")}
                for n in md.prefetch_nids()]
    path = args[0] if args else "/"
    nid = md.resolve(path)
    if cmd == "ls":
        return [{"name": e.name.decode(errors="replace"), **_attr(md, e.nid)}
                for e in md.readdir(nid)]
    if cmd == "stat":
        return _attr(md, nid)
    if cmd in ("chunks", "icheck"):
        return [
            {"file_offset": c.file_offset, "blob_index": c.blob_index,
             "blob_id": md.blobs[c.blob_index].blob_id, "index": c.index,
             "compressed_offset": c.compressed_offset, "compressed_size": c.compressed_size,
             "uncompressed_offset": c.uncompressed_offset,
             "uncompressed_size": c.uncompressed_size, "compressed": c.compressed,
             "digest": c.digest.hex()}
            for c in md.chunks(nid)
        ]
    raise ConfigError(
        f"unknown inspect request {cmd!r} (stats, blobs, prefetch, ls, stat, chunks)"
    )
