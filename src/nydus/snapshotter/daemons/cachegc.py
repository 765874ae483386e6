"""The shared blob cache directory (``--cache-dir``): which blobs images use, its size, and GC.

Every nydusd the snapshotter starts uses the same cache ``work_dir``, so blobs that several
images share are fetched once. nydusd never evicts anything (nydus-reference.md §3.1); the
snapshotter deletes the cache files of blobs that no remaining image refers to, as upstream's
cache manager does. A blob's files are named after its blob id (64 hex digits)::

    <blob_id>.blob.data  <blob_id>.blob.data.chunk_map      (or .blob.raw / .blob.raw.chunk_map)
    <blob_id>.blob.meta  <blob_id>.blob.toc  <blob_id>.blob.digest
    <blob_id>.blob.data.verified (or .blob.raw.verified: ours, see nydus.storage.verified)

Files that do not follow this pattern are never touched.

Stateless functions; callers serialize GC against themselves (a blob becomes live again only
when an image that uses it is pulled, and deleting the files of a blob no daemon has open is
safe at any time: a later reader fetches it again).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import NotFoundError, NydusError
from ...metadata import open_bootstrap

__all__ = ["CacheUsage", "GcResult", "blob_ids_of", "cache_usage", "collect_garbage"]

log = logging.getLogger(__name__)

_CACHE_FILE = re.compile(
    r"^(?P<blob>[0-9a-f]{64})\.(?P<kind>blob\.data|blob\.raw|blob\.data\.chunk_map|"
    r"blob\.raw\.chunk_map|blob\.data\.verified|blob\.raw\.verified|blob\.meta|blob\.toc|"
    r"blob\.digest)$"
)


_memo: dict[tuple[str, int, int, int], frozenset[str]] = {}
_memo_lock = threading.Lock()


def blob_ids_of(bootstrap: str | os.PathLike[str]) -> frozenset[str]:
    """The blob ids in a bootstrap's blob table (raises :class:`NydusError` if unreadable).

    Remembered per file identity (path, inode, size, mtime): bootstraps never change.
    """
    path = os.fspath(bootstrap)
    try:
        st = os.stat(path)
    except OSError as e:
        raise NotFoundError(f"bootstrap {path}: {e.strerror}") from e
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
    with _memo_lock:
        hit = _memo.get(key)
    if hit is not None:
        return hit
    with open_bootstrap(path) as md:
        ids = frozenset(b.blob_id for b in md.blobs)
    with _memo_lock:
        if len(_memo) > 4096:
            _memo.clear()
        _memo[key] = ids
    return ids


@dataclass
class CacheUsage:
    blobs: int = 0
    files: int = 0
    bytes: int = 0  # allocated (sparse data files count what is really cached)
    per_blob: dict[str, int] = field(default_factory=dict)


def _cache_files(cache_dir: Path) -> Iterable[tuple[os.DirEntry[str], str]]:
    try:
        it = os.scandir(cache_dir)
    except FileNotFoundError:
        return
    with it:
        for e in it:
            m = _CACHE_FILE.match(e.name)
            if m is not None and e.is_file(follow_symlinks=False):
                yield e, m.group("blob")


def cache_usage(cache_dir: Path) -> CacheUsage:
    """What the cache holds: blobs, files and allocated bytes (in total and per blob)."""
    u = CacheUsage()
    for e, blob in _cache_files(cache_dir):
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        n = st.st_blocks * 512
        u.files += 1
        u.bytes += n
        u.per_blob[blob] = u.per_blob.get(blob, 0) + n
    u.blobs = len(u.per_blob)
    return u


@dataclass
class GcResult:
    deleted_blobs: set[str] = field(default_factory=set)
    deleted_files: int = 0
    freed_bytes: int = 0


def collect_garbage(cache_dir: Path, live_bootstraps: Iterable[Path]) -> GcResult:
    """Delete the cache files of every blob none of ``live_bootstraps`` refers to.

    A bootstrap that cannot be read makes the whole collection stop (nothing deleted): its
    blobs are unknown, and deleting a blob an image still needs would only cost a refetch, but
    deleting everything because one file is damaged is not a trade worth making.
    """
    live: set[str] = set()
    for boot in live_bootstraps:
        try:
            live |= blob_ids_of(boot)
        except NydusError as err:
            log.warning("cache GC skipped: cannot read bootstrap %s: %s", boot, err)
            return GcResult()
    res = GcResult()
    for entry, blob in list(_cache_files(cache_dir)):
        if blob in live:
            continue
        try:
            n = entry.stat(follow_symlinks=False).st_blocks * 512
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("cache GC: cannot delete %s: %s", entry.path, err)
            continue
        res.deleted_blobs.add(blob)
        res.deleted_files += 1
        res.freed_bytes += n
    if res.deleted_files:
        log.info(
            "cache GC: deleted %d file(s) of %d unused blob(s), %d bytes freed",
            res.deleted_files,
            len(res.deleted_blobs),
            res.freed_bytes,
        )
    return res
