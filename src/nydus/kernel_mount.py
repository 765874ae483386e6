"""Kernel EROFS mounts of a RAFS v6 bootstrap with its blobs as extra devices, via mount(2).

This module owns the system calls the kernel EROFS data path needs: mount a bootstrap file
read-only as ``erofs`` with one ``device=`` option per blob, unmount it, and the private bind
mount and move_mount(2) beneath that let a new instance replace a mounted one.

Why not mount(8): the bootstrap is a regular file and so are the blobs (or they are files on the
daemon's small FUSE file system). util-linux ``mount -t erofs -o device=blob meta.img mnt``
auto-attaches a loop device for ``meta.img``, and the kernel then refuses a regular-file
``device=`` next to a block-device primary with EINVAL (erofs-format.md §0). The kernel *does*
accept a file-backed primary with file-backed extra devices (CONFIG_EROFS_FS_BACKED_BY_FILE,
Linux 6.12+), but only when asked directly, so we call ``mount(2)`` through ctypes with every
path absolute (the kernel resolves ``device=`` paths itself, not relative to our cwd).

Rules the kernel enforces (erofs-format.md §1): when ``device=`` options are given, their number
must equal the bootstrap's ``extra_devices`` and they are matched to the device table in order.
Without any ``device=`` the mount succeeds but reading chunked data fails lazily with EIO.

Threading contract: stateless; every function may be called from any thread. The libc handle is
loaded once, lazily, and errno is read through ctypes' thread-local copy.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .libc import MNT_DETACH, MS_NODEV, MS_NOSUID, MS_PRIVATE, MS_RDONLY, libc

__all__ = [
    "MountEntry",
    "build_mount_data",
    "erofs_supported",
    "mount_erofs",
    "mount_entries",
    "mounted_fstypes",
    "mounts_at",
    "move_beneath",
    "nydusd_serving",
    "tmpfs_private",
    "umount",
    "umount_or_detach",
]

log = logging.getLogger(__name__)

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429
_AT_FDCWD, _OPEN_TREE_CLOEXEC = -100, 0o2000000
_MOVE_MOUNT_F_EMPTY_PATH, _MOVE_MOUNT_BENEATH = 0x4, 0x200

_PROC_FILESYSTEMS = "/proc/filesystems"
PROC_MOUNTINFO = "/proc/self/mountinfo"

_MOUNT_HINTS: dict[int, str] = {
    errno.EINVAL: (
        "the kernel rejected the image or the options: check `dmesg | tail` for an erofs line. "
        "Usual causes: the bootstrap is not a valid RAFS v6/EROFS image; the number of device= "
        "paths differs from the bootstrap's extra_devices, or they are in the wrong order; a "
        "device is a block device while the bootstrap is a regular file (or the reverse)"
    ),
    errno.ENODEV: (
        "the kernel does not know the erofs file system: it needs CONFIG_EROFS_FS "
        "(see /proc/filesystems; try `modprobe erofs`)"
    ),
    errno.ENOTBLK: (
        "the kernel cannot mount a regular file as erofs: it needs "
        "CONFIG_EROFS_FS_BACKED_BY_FILE (Linux 6.12+); otherwise attach loop devices"
    ),
    errno.EPERM: "mounting needs CAP_SYS_ADMIN: run as root",
    errno.EACCES: "permission denied on the bootstrap, a device or the mount point",
    errno.ENOENT: "the bootstrap, a device or the mount point does not exist",
    errno.ENOTDIR: "the mount point is not a directory",
    errno.EBUSY: "the mount point is busy (already mounted?)",
    errno.EBADMSG: "the superblock checksum does not match: the bootstrap is corrupt",
    errno.EIO: "an I/O error reading the bootstrap or a device",
}

_UMOUNT_HINTS: dict[int, str] = {
    errno.EINVAL: "not a mount point",
    errno.EBUSY: "still in use (open files or a process cwd inside); try lazy=True",
    errno.EPERM: "unmounting needs CAP_SYS_ADMIN: run as root",
    errno.ENOENT: "the mount point does not exist",
}


def _os_error(err: int, what: str, path: str, hints: dict[int, str]) -> OSError:
    name = errno.errorcode.get(err, f"errno {err}")
    message = f"{what} failed: {name} ({os.strerror(err)})"
    hint = hints.get(err)
    if hint:
        message += f"; hint: {hint}"
    return OSError(err, message, path)


def _absolute(path: str | os.PathLike[str], role: str) -> bytes:
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise ValueError(f"{role} path must be absolute, got {text!r}")
    return os.fsencode(text)


def erofs_supported() -> bool:
    """True if the running kernel lists ``erofs`` in /proc/filesystems."""
    try:
        text = Path(_PROC_FILESYSTEMS).read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["erofs"] for line in text.splitlines())


def build_mount_data(devices: Sequence[str | os.PathLike[str]], options: str = "") -> bytes:
    """The mount(2) data string: ``device=/abs/a,device=/abs/b[,options]``.

    Raises ValueError for a relative path or a path containing a comma (the kernel splits the
    options on commas and has no escape for them).
    """
    parts: list[bytes] = []
    for dev in devices:
        raw = _absolute(dev, "device")
        if b"," in raw:
            raise ValueError(f"device path must not contain a comma: {os.fspath(dev)!r}")
        parts.append(b"device=" + raw)
    if options:
        parts.extend(os.fsencode(opt) for opt in options.split(",") if opt)
    return b",".join(parts)


def mount_erofs(
    bootstrap: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    devices: Sequence[str | os.PathLike[str]],
    options: str = "",
    *,
    flags: int = 0,
) -> None:
    """Mount ``bootstrap`` read-only as EROFS on ``mountpoint`` with ``devices`` as blob devices.

    ``devices`` are the blob files in the order of the bootstrap's device table (blob table).
    ``options`` is a comma-separated list of extra EROFS mount options (for example ``directio``
    or ``user_xattr``). ``flags`` are extra MS_* flags; MS_RDONLY is always set.

    Raises ValueError for relative paths, OSError (with the errno name and a hint) when the kernel
    refuses the mount.
    """
    source = _absolute(bootstrap, "bootstrap")
    target = _absolute(mountpoint, "mountpoint")
    data = build_mount_data(devices, options)
    rc = libc().mount(source, target, b"erofs", MS_RDONLY | flags, data or None)
    if rc != 0:
        err = ctypes.get_errno()
        raise _os_error(
            err,
            f"mount(2) erofs {os.fsdecode(source)} on {os.fsdecode(target)} "
            + (f"with options {os.fsdecode(data)!r}" if data else "without options"),
            os.fsdecode(target),
            _MOUNT_HINTS,
        )


def umount(mountpoint: str | os.PathLike[str], lazy: bool = False) -> None:
    """Unmount ``mountpoint`` with umount2(2); ``lazy`` detaches it now and frees it when unused.

    Raises OSError with the errno name (EINVAL: not a mount point; EBUSY: still in use).
    """
    target = os.fsencode(os.path.abspath(os.fspath(mountpoint)))
    rc = libc().umount2(target, MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        raise _os_error(err, "umount2", os.fsdecode(target), _UMOUNT_HINTS)


def umount_or_detach(
    mountpoint: str | os.PathLike[str], before_detach: Callable[[], None] | None = None
) -> None:
    """Unmount ``mountpoint``; if it is busy, call ``before_detach`` (if any) and detach it
    lazily. Not being mounted (EINVAL) is fine; any other failure raises OSError."""
    try:
        umount(mountpoint)
    except OSError as e:
        if e.errno == errno.EBUSY:
            log.warning("%s busy; detaching lazily", os.fspath(mountpoint))
            if before_detach is not None:
                before_detach()
            umount(mountpoint, lazy=True)
        elif e.errno != errno.EINVAL:
            raise


def _errno_error(what: str, path: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", path)


def tmpfs_private(path: str, options: str = "mode=700") -> None:
    """Mount a new tmpfs at ``path`` (nosuid, nodev, with ``options``), then make it private:
    a mount below it can be moved, and nothing mounted there propagates anywhere. Creating and
    removing directories in it never touches a disk."""
    lc, target = libc(), os.fsencode(path)
    if lc.mount(b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, os.fsencode(options)) != 0:
        raise _errno_error(f"mount tmpfs on {path!r} ({options})", path)
    if lc.mount(None, target, None, MS_PRIVATE, None) != 0:
        err = _errno_error(f"mount({path!r}, MS_PRIVATE)", path)
        lc.umount2(target, MNT_DETACH)
        raise err


def move_beneath(source: str, target: str) -> None:
    """move_mount(2) the mount at ``source`` beneath the top mount at ``target`` (Linux 6.5+,
    MOVE_MOUNT_BENEATH): after it, unmounting ``target`` reveals the moved mount."""
    lc = libc()
    fd = lc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLOEXEC)
    if fd < 0:
        raise _errno_error(f"open_tree({source!r})", source)
    try:
        if (
            lc.syscall(
                _SYS_MOVE_MOUNT,
                fd,
                b"",
                _AT_FDCWD,
                os.fsencode(target),
                _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_BENEATH,
            )
            != 0
        ):
            raise _errno_error(f"move_mount({source!r} beneath {target!r})", target)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class MountEntry:
    """One line of the mount table: the superblock's ``major:minor``, the mount point (absolute,
    octal escapes decoded) and the file system type."""

    dev: str
    mountpoint: str
    fstype: str


_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo escapes space, tab, newline, backslash


def mount_entries(text: str | None = None) -> list[MountEntry]:
    """Every mount of this namespace, in table order, from /proc/self/mountinfo (or ``text``)."""
    if text is None:
        with open(PROC_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    out: list[MountEntry] = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, fstype = left.split(), right.split()[:1]
        if len(fields) >= 5 and fstype:
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append(MountEntry(fields[2], point, fstype[0]))
    return out


def mounted_fstypes(text: str | None = None) -> dict[str, list[str]]:
    """Mount point -> file system types mounted there, bottom first (see :func:`mount_entries`)."""
    out: dict[str, list[str]] = {}
    for m in mount_entries(text):
        out.setdefault(m.mountpoint, []).append(m.fstype)
    return out


def mounts_at(path: str | os.PathLike[str]) -> list[str]:
    """The file system types mounted at ``path`` (bottom first; empty if none)."""
    try:
        return mounted_fstypes().get(os.path.realpath(os.fspath(path)), [])
    except OSError:
        return []


def nydusd_serving(mountpoint: str, proc: str = "/proc") -> list[int]:
    """Pids of running nydusd processes whose command line names ``mountpoint``
    (``--mountpoint``/``-M``), to tell a live daemon's mount from one a killed daemon left."""
    want = {os.path.realpath(mountpoint), mountpoint}
    pids = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(os.path.join(proc, name, "cmdline"), "rb") as f:
                argv = [os.fsdecode(x) for x in f.read().split(b"\0") if x]
        except OSError:
            continue
        if not any(os.path.basename(x) == "nydusd" or "nydus.cli.nydusd" in x for x in argv[:3]):
            continue  # nydusd, python .../nydusd, or python -c '...nydus.cli.nydusd...'

        for i, arg in enumerate(argv):
            val = None
            if arg in ("--mountpoint", "-M") and i + 1 < len(argv):
                val = argv[i + 1]
            elif arg.startswith("--mountpoint="):
                val = arg.split("=", 1)[1]
            if val is not None and (val in want or os.path.realpath(val) in want):
                pids.append(int(name))
                break
    return pids
