"""System calls for FUSE: open ``/dev/fuse``, mount(2) a FUSE file system on it (unmounting
is :mod:`nydus.kernel_mount`'s), clone a device fd, register passthrough backing files, tune the
mount's readahead.

No libfuse and no fusermount: we are root, so mount(2) is called directly through ctypes with
the options the kernel's FUSE parser understands (``fd=N,rootmode=40000,user_id=0,group_id=0,
allow_other,default_permissions``; read-only via MS_RDONLY).

Threading contract: stateless functions; safe from any thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

from ..libc import MS_NODEV, MS_NOSUID, MS_RDONLY, libc
from .protocol import (
    BACKING_MAP,
    FUSE_DEV_IOC_BACKING_CLOSE,
    FUSE_DEV_IOC_BACKING_OPEN,
    FUSE_DEV_IOC_CLONE,
)

__all__ = [
    "DEV_FUSE",
    "open_device",
    "clone_device",
    "mount_fuse",
    "is_mountpoint",
    "mount_options",
    "backing_open",
    "backing_close",
    "set_readahead_kb",
]

DEV_FUSE = "/dev/fuse"


def open_device() -> int:
    """A new ``/dev/fuse`` fd (close-on-exec; pass it on explicitly)."""
    try:
        return os.open(DEV_FUSE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"cannot open {DEV_FUSE}: {e.strerror} (is FUSE available?)") from e


def clone_device(fd: int) -> int:
    """A new ``/dev/fuse`` fd attached to the same connection as ``fd`` (FUSE_DEV_IOC_CLONE)."""
    new = open_device()
    try:
        fcntl.ioctl(new, FUSE_DEV_IOC_CLONE, struct.pack("<I", fd))
    except OSError:
        os.close(new)
        raise
    return new


def mount_options(
    fd: int,
    *,
    rootmode: int = 0o40000,
    allow_other: bool = True,
    default_permissions: bool = True,
    max_read: int = 0,
    extra: str = "",
) -> str:
    parts = [f"fd={fd}", f"rootmode={rootmode:o}", "user_id=0", "group_id=0"]
    if allow_other:
        parts.append("allow_other")
    if default_permissions:
        parts.append("default_permissions")
    if max_read:
        parts.append(f"max_read={max_read}")
    if extra:
        parts.extend(p for p in extra.split(",") if p)
    return ",".join(parts)


def is_mountpoint(path: str) -> bool:
    """True if ``path`` is a mount point (its st_dev differs from its parent's, or it is /)."""
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def mount_fuse(
    mountpoint: str,
    fd: int,
    *,
    fsname: str = "rafs",
    subtype: str = "rafs",
    readonly: bool = True,
    options: str = "",
) -> None:
    """mount(2) a FUSE file system served through ``fd`` on ``mountpoint``.

    ``options`` is the comma-separated data string (see :func:`mount_options`); the ``fd=`` in
    it must be ``fd``. Raises OSError with a readable message.
    """
    st = os.stat(mountpoint)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"mount point {mountpoint} is not a directory")
    fstype = f"fuse.{subtype}" if subtype else "fuse"
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    data = options or mount_options(fd)
    rc = libc().mount(
        fsname.encode(),
        os.fsencode(os.path.abspath(mountpoint)),
        fstype.encode(),
        flags,
        data.encode(),
    )
    if rc != 0:
        err = ctypes.get_errno()
        hint = {
            errno.EPERM: " (mounting FUSE this way needs CAP_SYS_ADMIN: run as root)",
            errno.ENODEV: " (the kernel has no FUSE support)",
            errno.EINVAL: " (bad mount options or fd)",
        }.get(err, "")
        raise OSError(err, f"mount(2) {fstype} on {mountpoint} failed: {os.strerror(err)}{hint}")


def backing_open(devfd: int, backing_fd: int) -> int:
    """Register ``backing_fd`` for FUSE passthrough; returns the backing id (kernel 6.9+)."""
    buf = bytearray(BACKING_MAP.pack(backing_fd, 0, 0))
    # with a mutable buffer and mutate_flag=True, ioctl returns the system call's result
    ret = fcntl.ioctl(devfd, FUSE_DEV_IOC_BACKING_OPEN, buf, True)
    return int(ret)


def backing_close(devfd: int, backing_id: int) -> None:
    fcntl.ioctl(devfd, FUSE_DEV_IOC_BACKING_CLOSE, struct.pack("<I", backing_id))


def set_readahead_kb(mountpoint: str, kb: int) -> bool:
    """Set the FUSE mount's bdi readahead (``/sys/class/bdi/MAJ:MIN/read_ahead_kb``).

    The kernel caps a FUSE mount's readahead at what it offered in INIT (128 KiB by default);
    root can raise it afterwards. Returns False if the knob is not writable.
    """
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(kb))
        return True
    except OSError:
        return False
