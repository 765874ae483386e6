"""``inspect`` and ``stat``: answer questions about a bootstrap as JSON data.

Requests (``inspect BOOTSTRAP -R REQUEST``): ``stats``, ``blobs``,
``prefetch``, ``ls [PATH]``, ``stat PATH``, ``chunks PATH`` (alias
``icheck``). :func:`image_stats` backs ``nydus-image stat -B``;
:func:`dedup_report` backs ``stat -D DIR [-T TARGET]``: chunk dedup over a set
of images and what a target image adds to them. Pure reads; single-threaded.
"""

from __future__ import annotations

import shlex
import stat as st
from typing import Any

from ..errors import ConfigError
from ..format import rafs_v6 as v6
from ..metadata import Nid, RafsMetadata

__all__ = ["inspect_request", "image_stats", "dedup_report"]


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


def _chunk_stats(md: RafsMetadata) -> tuple[dict[str, Any], dict[bytes, tuple[int, int]]]:
    """Upstream ``stat``'s per-image numbers, and the image's distinct chunks by digest
    (compressed size, uncompressed size)."""
    info = {
        "dirs": 0,
        "files": 0,
        "symlinks": 0,
        "chunks": 0,
        "file_size": 0,
        "padding_size": 0,
        "comp_size": 0,
        "uncomp_size": 0,
    }
    distinct: dict[bytes, tuple[int, int]] = {}
    seen: set[int] = set()
    for _p, nid in md.walk():
        a = md.getattr(nid)
        if a.is_reg:
            info["files"] += 1
            if nid in seen:
                continue  # another name of a hardlinked file
            seen.add(nid)
            info["file_size"] += a.size
            info["padding_size"] += -a.size % 4096
            for c in md.chunks(nid):
                info["chunks"] += 1
                info["comp_size"] += c.compressed_size
                info["uncomp_size"] += c.uncompressed_size
                key = c.digest or f"{c.blob_index}:{c.index}".encode()
                distinct.setdefault(key, (c.compressed_size, c.uncompressed_size))
        elif a.is_dir:
            info["dirs"] += 1
        elif a.is_symlink:
            info["symlinks"] += 1
    info["uncomp_size"] += info["padding_size"]
    return info, distinct


def dedup_report(base: list[RafsMetadata], target: RafsMetadata | None = None) -> dict[str, Any]:
    """``stat -D DIR [-T TARGET]`` as upstream computes it: the base images' chunks summed
    per image (``own_*``) and deduplicated across images (``dedup_*``); with a target, its
    distinct chunks found in the base (``ref_*``) and not (``own_*``: what a build with the
    base as chunk dictionary has to store)."""
    total: dict[str, Any] = {}
    pool: dict[bytes, tuple[int, int]] = {}
    own = [0, 0, 0]
    for md in base:
        info, distinct = _chunk_stats(md)
        for k, v in info.items():
            total[k] = total.get(k, 0) + v
        for key, (comp, uncomp) in distinct.items():
            own[0] += 1
            own[1] += comp
            own[2] += uncomp
            pool.setdefault(key, (comp, uncomp))
    total.update(
        {
            "own_chunks": own[0],
            "own_comp_size": own[1],
            "own_uncomp_size": own[2],
            "dedup_chunks": len(pool),
            "dedup_comp_size": sum(c for c, _u in pool.values()),
            "dedup_uncomp_size": sum(u for _c, u in pool.values()),
        }
    )
    total["dedup_ratio"] = (
        round(own[2] / total["dedup_uncomp_size"], 4) if total["dedup_uncomp_size"] else 1.0
    )
    out: dict[str, Any] = {
        "images": len(base),
        "dedup_enabled": True,
        "target_enabled": target is not None,
        "base_image": total,
    }
    if target is not None:
        info, distinct = _chunk_stats(target)
        ref = [0, 0, 0]
        mine = [0, 0, 0]
        for key, (comp, uncomp) in distinct.items():
            acc = ref if key in pool else mine
            acc[0] += 1
            acc[1] += comp
            acc[2] += uncomp
        info.update(
            {
                "own_chunks": mine[0],
                "own_comp_size": mine[1],
                "own_uncomp_size": mine[2],
                "ref_chunks": ref[0],
                "ref_comp_size": ref[1],
                "ref_uncomp_size": ref[2],
            }
        )
        whole = mine[2] + ref[2]
        info["reuse_ratio"] = round(ref[2] / whole, 4) if whole else 0.0  # found in the base
        out["target_image"] = info
    return out


def _attr(md: RafsMetadata, nid: Nid) -> dict[str, Any]:
    a = md.getattr(nid)
    out: dict[str, Any] = {
        "nid": nid,
        "ino": a.ino,
        "mode": oct(a.mode),
        "type": _type(a.mode),
        "nlink": a.nlink,
        "uid": a.uid,
        "gid": a.gid,
        "size": a.size,
        "mtime": a.mtime,
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
    for test, name in (
        (st.S_ISDIR, "dir"),
        (st.S_ISREG, "file"),
        (st.S_ISLNK, "symlink"),
        (st.S_ISCHR, "char"),
        (st.S_ISBLK, "block"),
        (st.S_ISFIFO, "fifo"),
        (st.S_ISSOCK, "socket"),
    ):
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
            {
                "index": b.index,
                "blob_id": b.blob_id,
                "compressor": b.compressor,
                "digester": b.digester,
                "chunk_size": b.chunk_size,
                "chunk_count": b.chunk_count,
                "compressed_size": b.compressed_size,
                "uncompressed_size": b.uncompressed_size,
                "features": hex(b.features),
                "feature_names": v6.feature_names(b.features),
            }
            for b in md.blobs
        ]
    if cmd == "prefetch":
        paths = {nid: p for p, nid in md.walk()}
        return [
            {"nid": n, "path": paths.get(n, b"?").decode(errors="replace")}
            for n in md.prefetch_nids()
        ]
    path = args[0] if args else "/"
    nid = md.resolve(path)
    if cmd == "ls":
        return [
            {"name": e.name.decode(errors="replace"), **_attr(md, e.nid)} for e in md.readdir(nid)
        ]
    if cmd == "stat":
        return _attr(md, nid)
    if cmd in ("chunks", "icheck"):
        return [
            {
                "file_offset": c.file_offset,
                "blob_index": c.blob_index,
                "blob_id": md.blobs[c.blob_index].blob_id,
                "index": c.index,
                "compressed_offset": c.compressed_offset,
                "compressed_size": c.compressed_size,
                "uncompressed_offset": c.uncompressed_offset,
                "uncompressed_size": c.uncompressed_size,
                "compressed": c.compressed,
                "digest": c.digest.hex(),
            }
            for c in md.chunks(nid)
        ]
    raise ConfigError(f"unknown inspect request {cmd!r} (stats, blobs, prefetch, ls, stat, chunks)")
