"""FUSE connections seen from outside their daemon: find the one behind a mount, abort it.

The kernel lists every FUSE connection in the fusectl file system (``/sys/fs/fuse/connections``,
mounted here on first use when it is not), one directory per connection, named by the device
number of the mount's superblock: for FUSE an anonymous device (major 0), so the name is the
minor of the mount's ``st_dev``. Writing to ``<dir>/abort`` aborts the connection: every request
waiting for the daemon fails at once, and every later one too (ENOTCONN on the FUSE mount; EIO
through a kernel EROFS mount whose blob device is a file on it), and the page-cache pages those
requests held locked are released.

Why it is needed: normally the kernel aborts a connection by itself when the last ``/dev/fuse``
fd of it is closed, which happens when the daemon's process has exited. A process whose thread
sits in an uninterruptible wait inside the kernel cannot finish exiting (SIGKILL included), so
its fds stay open, nothing aborts the connection, and if that wait depends on a request only the
dead daemon could answer, readers and ``umount -l`` hang forever. Aborting breaks that knot (see
:mod:`nydus.deathwatch` for who does it and :mod:`nydus.daemon.blobdev` for the wait we removed).

Mount points are found in ``/proc/self/mountinfo`` (field 3 is ``major:minor``) and are never
stat'ed: a stat of a dead daemon's mount point may wait for that daemon too.

Threading contract: stateless functions, callable from any thread.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .kernel_mount import mount_entries
from .libc import libc

__all__ = [
    "FUSECTL_DIR",
    "FuseMount",
    "abort_connection",
    "abort_mounts",
    "conn_id",
    "ensure_fusectl",
    "fuse_mounts",
    "host_path",
]

FUSECTL_DIR = "/sys/fs/fuse/connections"


@dataclass(frozen=True)
class FuseMount:
    """A FUSE mount from the mount table: where, what type, and its connection id."""

    mountpoint: str
    fstype: str  # "fuse", "fuse.<subtype>" or "fuseblk"
    conn: int


def conn_id(major: int, minor: int) -> int:
    """The fusectl name of the connection of a superblock on ``major:minor`` (the kernel's
    internal dev_t, printed with %u: major << 20 | minor; for FUSE, major is 0)."""
    return (major << 20) | minor


def _is_fuse(fstype: str) -> bool:
    return fstype in ("fuse", "fuseblk") or fstype.startswith("fuse.")


def fuse_mounts(text: str | None = None) -> list[FuseMount]:
    """Every FUSE mount in ``/proc/self/mountinfo`` (or ``text``), in table order."""
    out: list[FuseMount] = []
    for m in mount_entries(text):
        major, colon, minor = m.dev.partition(":")
        if _is_fuse(m.fstype) and colon and major.isdigit() and minor.isdigit():
            out.append(FuseMount(m.mountpoint, m.fstype, conn_id(int(major), int(minor))))
    return out


def host_path(path: str | os.PathLike[str]) -> str:
    """``path`` as the mount table spells it (absolute, symlinks of its *parent* resolved),
    without touching ``path`` itself (it may be a dead daemon's mount point)."""
    parent, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(os.path.realpath(parent), name) if name else parent


def ensure_fusectl() -> bool:
    """Mount fusectl on ``/sys/fs/fuse/connections`` unless it is there; whether it is now.
    Needs root (CAP_SYS_ADMIN); False, not an error, when it cannot be mounted."""
    if _fusectl_mounted():
        return True
    if not os.path.isdir(FUSECTL_DIR):
        return False
    rc = libc().mount(b"fusectl", FUSECTL_DIR.encode(), b"fusectl", 0, None)
    return rc == 0 or ctypes.get_errno() == errno.EBUSY or _fusectl_mounted()


def _fusectl_mounted() -> bool:
    try:
        return any(m.mountpoint == FUSECTL_DIR and m.fstype == "fusectl" for m in mount_entries())
    except OSError:
        return False


def abort_connection(conn: int) -> bool:
    """Abort FUSE connection ``conn``: True if it was aborted, False if there is no such
    connection (gone already) or fusectl is unavailable. Aborting twice is harmless."""
    if not ensure_fusectl():
        return False
    try:
        fd = os.open(os.path.join(FUSECTL_DIR, str(conn), "abort"), os.O_WRONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
    return True


def abort_mounts(
    paths: Iterable[str | os.PathLike[str]],
    *,
    below: bool = False,
    fstypes: Iterable[str] | None = None,
) -> list[FuseMount]:
    """Abort the connection of every FUSE mount at one of ``paths`` (and, with ``below``, at
    any mount point beneath one of them); ``fstypes`` limits it to those types. Returns the
    mounts whose connection was aborted. Reads only the mount table: never touches the paths.
    """
    bases = {host_path(p) for p in paths}
    kinds = set(fstypes) if fstypes is not None else None
    done: list[FuseMount] = []
    seen: set[int] = set()
    for m in fuse_mounts():
        if kinds is not None and m.fstype not in kinds:
            continue
        hit = m.mountpoint in bases or (
            below and any(m.mountpoint.startswith(b.rstrip("/") + "/") for b in bases)
        )
        if hit and m.conn not in seen and abort_connection(m.conn):
            seen.add(m.conn)
            done.append(m)
    return done
