"""The daemon's side of kernel EROFS mode (called from :class:`.service.Nydusd`).

Kept apart from service.py so the daemon core only carries call sites: choosing what happens to
an image whose driver resolved to ``erofs`` (kernel mount now, or once the daemon's FUSE mount
exists), the fallback to fusedev when the kernel cannot mount file-backed EROFS, unmounting, and
shutdown order (EROFS mounts, then the blob fs, then the FUSE mount underneath).

Underneath each kernel EROFS mount, the daemon's FUSE mount serves the same image (FUSE RAFS
mode, same RafsFs): the FUSE mount appears a moment before the EROFS mount is stacked on it, and
whoever looks in between (a script that waits for the mount point) sees the image, never an
empty directory; what it opened there keeps being served through FUSE. The FUSE side does not
own the image: it is closed with the EROFS side (:func:`umount_erofs_image`).
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING

from .erofs_mode import EROFS, FUSEDEV

if TYPE_CHECKING:
    from .service import ImageMount, Nydusd

__all__ = ["mount_erofs_image", "remount_erofs_image", "umount_erofs_image", "activate_pending",
           "shutdown_erofs"]

log = logging.getLogger("nydus.daemon.erofs")

_KERNEL_CANNOT = (errno.ENODEV, errno.ENOTBLK)


def _fallback(d: Nydusd, im: ImageMount, e: OSError) -> str:
    log.warning("%s: kernel EROFS mount not possible (%s); falling back to fs_driver fusedev "
                "(FUSE RAFS mode)", im.path, e)
    im.fs_driver, im.erofs = FUSEDEV, None
    return FUSEDEV


def _kernel_mount(d: Nydusd, im: ImageMount) -> str:
    if d.erofs.on_lost is None:
        d.erofs.on_lost = lambda path: _lost(d, path)
    try:
        d.erofs.mount(im.path, im.bootstrap, im.device, [b.blob_id for b in im.fs.meta.blobs],
                      stats=im.fs.stats, verified=im.verified)
    except OSError as e:
        d.vfs.detach(im.path)  # the caller attaches it again (fallback) or closes it
        if e.errno in _KERNEL_CANNOT:
            return _fallback(d, im, e)
        raise
    return EROFS


def _is_erofs_file(path: str) -> bool:
    """True if ``path`` has the EROFS magic at 1024 (a bootstrap, not an inline-meta blob)."""
    try:
        with open(path, "rb") as f:
            f.seek(1024)
            return f.read(4) == b"\xe2\xe1\xf5\xe0"
    except OSError:
        return True  # let the mount report it


def _not_owned() -> None:
    """The FUSE view of a kernel EROFS image does not close it (module docstring)."""


def mount_erofs_image(d: Nydusd, im: ImageMount) -> str:
    """Returns the driver the image ends up with (``fusedev`` after a fallback, in which case
    the caller attaches it to the FUSE VFS)."""
    is_erofs = (im.verified[1024:1028] == b"\xe2\xe1\xf5\xe0" if im.verified is not None
                else _is_erofs_file(im.bootstrap))
    if not is_erofs:
        log.info("%s: fs_driver fusedev (%s is a data blob with the bootstrap inlined: the "
                 "kernel mounts only a bootstrap file of its own)", im.path, im.bootstrap)
        im.fs_driver, im.erofs = FUSEDEV, None
        return FUSEDEV
    im.fs_driver, im.erofs = EROFS, d.erofs
    d.vfs.attach(im.path, im.fs, on_close=_not_owned)
    s = d.session
    if s is None or not s.mounted:
        log.info("%s: fs_driver erofs; the kernel mount follows the daemon's FUSE mount",
                 im.path)
        return EROFS
    return _kernel_mount(d, im)


def activate_pending(d: Nydusd) -> None:
    """After the daemon's FUSE mount: kernel-mount the EROFS images opened before it."""
    with d._lock:
        for im in list(d.images.values()):
            if im.fs_driver != EROFS or im.path in d.erofs.images:
                continue
            if _kernel_mount(d, im) == FUSEDEV:
                d.vfs.attach(im.path, im.fs, on_close=im.close)


def remount_erofs_image(d: Nydusd, old: ImageMount, im: ImageMount) -> None:
    """``PUT /api/v1/mount`` of a kernel EROFS image: the new bootstrap replaces the old one in
    place; the old image stays open for files opened before, and is closed with the new one."""
    im.fs_driver, im.erofs = EROFS, d.erofs
    if im.path not in d.erofs.images:  # not kernel-mounted yet (no FUSE mount so far)
        d.vfs.replace(im.path, im.fs, on_close=_not_owned)
        old.close()
        return
    d.erofs.replace(im.path, im.bootstrap, im.device, [b.blob_id for b in im.fs.meta.blobs],
                    stats=im.fs.stats, verified=im.verified)
    # the FUSE view underneath keeps the old image (kept open below): replacing it would
    # invalidate the dentry the new kernel mount sits on, and the kernel detaches mounts on
    # an invalidated dentry
    im.retired = [*old.retired, old]
    old.retired = []


def umount_erofs_image(d: Nydusd, im: ImageMount) -> None:
    d.erofs.umount(im.path)
    d.vfs.detach(im.path)
    im.close()


def _lost(d: Nydusd, path: str) -> None:
    """The kernel mount of ``path`` was removed from outside (see erofs_mode)."""
    if path == "/":
        log.info("the kernel EROFS mount of / was removed from outside: session ended")
        d.end_session("erofs mount removed")
        return
    try:
        d.umount(path)
    except Exception as e:  # already gone (a concurrent DELETE): nothing left to do
        log.info("%s: detaching after the external unmount: %s", path, e)


def shutdown_erofs(d: Nydusd) -> None:
    d.erofs.shutdown()
    with d._lock:
        images = [im for im in d.images.values() if im.fs_driver == EROFS]
    for im in images:
        try:
            im.close()
        except Exception:
            log.exception("closing %s", im.path)
