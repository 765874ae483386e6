"""File-system helpers for snapshot directories: disk usage, the mount table, safe removal.

- :func:`disk_usage` counts like containerd's ``fs.DiskUsage`` (and ``du``): 512-byte blocks
  allocated, each inode once (hard links), the root included, without leaving the file system.
- :func:`mount_table` and :func:`mounts_under` read the mount table.
- :func:`remove_tree` deletes a snapshot directory after detaching anything still mounted under
  it (a leftover container rootfs or Nydus mount), so ``rmtree`` never walks into a mount.

Stateless; safe from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
from pathlib import Path

from ...kernel_mount import mount_entries, umount
from .store import Usage

__all__ = ["disk_usage", "mount_table", "mounts_under", "remove_tree"]

log = logging.getLogger(__name__)


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """Bytes (allocated blocks x 512) and distinct inodes under ``path``, on its device only."""
    root = os.fspath(path)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return Usage()
    dev = st.st_dev
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [root]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue  # removed while we walked: an active snapshot is live
        if st.st_dev != dev:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            size += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with (
                contextlib.suppress(FileNotFoundError, NotADirectoryError),
                os.scandir(p) as it,
            ):
                stack.extend(e.path for e in it)
    return Usage(size=size, inodes=len(seen))


def mount_table() -> list[str]:
    """Every mount point of this mount namespace, from ``/proc/self/mountinfo``."""
    try:
        return [m.mountpoint for m in mount_entries()]
    except FileNotFoundError:
        return []


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``path`` (absolute), deepest first."""
    base = os.path.realpath(path).rstrip("/") or "/"
    found = [mp for mp in mount_table() if mp == base or mp.startswith(base + "/")]
    found.sort(key=lambda m: m.count("/"), reverse=True)
    return found


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Detach every mount under ``path`` (lazily), then delete it; missing is fine."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    for mp in mounts_under(p):
        log.warning("detaching leftover mount %s before removing %s", mp, p)
        try:
            umount(mp, lazy=True)
        except OSError as e:
            log.warning("cannot detach %s: %s", mp, e)
    if mounts_under(p):
        raise OSError(f"{p}: still has mounts under it, not removing")
    shutil.rmtree(p)
