"""An image's data path: FUSE RAFS (:class:`FuseDriver`) or kernel EROFS (:class:`ErofsDriver`).

Each :class:`ImageMount` holds the driver that serves it; the daemon attaches, replaces and
detaches images through it. Drivers get what they work with (the VFS, the kernel mount manager,
callbacks), never the daemon.

Choosing the driver (:func:`resolve_driver`): the mount request's or the config's ``fs_driver``,
else the daemon default (``nydusd --fs-driver``, default ``erofs``), which gives way to fusedev
(said in the log) where only FUSE RAFS mode can do what was asked: per-file metrics
(``iostats_files``, ``latest_read_files``: the kernel serves files without telling the daemon;
the access pattern works in both modes) and a daemon under a supervisor (fd-handoff failover
cannot hand over kernel EROFS mounts). RAFS v5 bootstraps, a daemon in upgrade (takeover) mode,
a data blob with the bootstrap inlined and a kernel without (file-backed) EROFS (ENODEV,
ENOTBLK) use fusedev too.

Underneath each kernel EROFS mount the daemon's FUSE mount serves the same image (same RafsFs):
whoever looks before the EROFS mount is stacked on it sees the image, never an empty directory,
and what it opened there keeps being served through FUSE. The FUSE side does not own the image
(:meth:`ErofsDriver.detach` closes it). Images mounted before the daemon's FUSE mount exists
are kernel-mounted by :meth:`ErofsDriver.activate`.

Threading contract: drivers are called under the daemon's lock; ``on_lost`` comes from the
EROFS manager's watcher thread without any lock held.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .. import kernel_mount
from ..config import DaemonConfig, FsDriver
from ..credentials import redact_config
from ..errors import UnsupportedError
from ..fs.rafs import RafsFs
from ..storage import BlobDevice
from .erofs_mode import ErofsManager, ErofsSource
from .vfs import RafsVfs

__all__ = ["Driver", "ErofsDriver", "FuseDriver", "ImageMount", "resolve_driver"]

log = logging.getLogger("nydus.daemon.erofs")

_KERNEL_CANNOT = (errno.ENODEV, errno.ENOTBLK)
_EROFS_MAGIC = b"\xe2\xe1\xf5\xe0"  # at offset 1024 of a bootstrap


def resolve_driver(
    requested: FsDriver | None,
    default: FsDriver,
    rafs_version: int,
    upgrade: bool = False,
    needs_fuse: str = "",
) -> tuple[FsDriver, str]:
    """(driver, reason) for one image mount. ``needs_fuse``: why this mount wants FUSE RAFS
    mode (empty if it does not); it overrides the daemon default, not an explicit request."""
    want = FsDriver(requested or default)
    if want == FsDriver.EROFS:
        if needs_fuse and not requested:
            return FsDriver.FUSEDEV, needs_fuse
        if rafs_version != 6:
            return FsDriver.FUSEDEV, f"RAFS v{rafs_version} is not an EROFS image"
        if upgrade:
            return FsDriver.FUSEDEV, "upgrade (takeover) mode serves FUSE only"
        if not kernel_mount.erofs_supported():
            return FsDriver.FUSEDEV, "the kernel has no erofs file system (/proc/filesystems)"
    return want, "requested" if requested else "daemon default"


class Driver(Protocol):
    """How an image's files reach readers. ``attach`` returns the driver that ends up serving
    the image (a fallback may); ``replace``: a remount, ``im`` takes the place of ``old``."""

    kind: ClassVar[FsDriver]

    def attach(self, im: ImageMount) -> Driver: ...

    def replace(self, old: ImageMount, im: ImageMount) -> None: ...

    def detach(self, im: ImageMount) -> None: ...

    def describe(self, path: str) -> dict[str, Any]: ...


@dataclass
class ImageMount:
    """One image attached to the daemon at ``path`` (a virtual mount point)."""

    path: str
    bootstrap: str
    config: DaemonConfig
    fs: RafsFs
    device: BlobDevice
    prefetch_files: list[str] | None
    driver: Driver
    mounted_at: float = field(default_factory=time.time)
    # images this one replaced by a kernel EROFS remount: files opened before may still read them
    retired: list[ImageMount] = field(default_factory=list)
    # set when the mount gave an expected digest: the checked bytes (the metadata parses this
    # same object) and the digest; a kernel EROFS mount then mounts a private copy of them
    bootstrap_digest: str = ""
    verified: bytes | None = None

    def close(self) -> None:
        try:
            self.fs.close()
        finally:
            self.device.close()
            for old in self.retired:
                old.close()
            self.retired = []

    def describe(self) -> dict[str, Any]:
        return {
            "fs_type": "rafs",
            "mountpoint": self.path,
            "bootstrap": self.bootstrap,
            "rafs_version": self.fs.version,
            "blobs": [b.blob_id for b in self.fs.meta.blobs],
            "config": redact_config(self.config.to_dict()),
            "mounted_at": int(self.mounted_at),
            "fs_driver": self.driver.kind,
            **({"bootstrap_digest": self.bootstrap_digest} if self.bootstrap_digest else {}),
            **self.driver.describe(self.path),
        }


class FuseDriver:
    """FUSE RAFS mode: the daemon answers every request through its VFS, which owns the image."""

    kind: ClassVar[FsDriver] = FsDriver.FUSEDEV

    def __init__(self, vfs: RafsVfs) -> None:
        self.vfs = vfs

    def attach(self, im: ImageMount) -> Driver:
        self.vfs.attach(im.path, im.fs, on_close=im.close)
        return self

    def replace(self, old: ImageMount, im: ImageMount) -> None:
        self.vfs.replace(im.path, im.fs, on_close=im.close)

    def detach(self, im: ImageMount) -> None:
        self.vfs.detach(im.path)  # closes the image

    def describe(self, path: str) -> dict[str, Any]:
        return {}


def _not_owned() -> None:
    """The FUSE view of a kernel EROFS image does not close it (module docstring)."""


def _is_bootstrap(im: ImageMount) -> bool:
    """True if the image's bootstrap has the EROFS magic (not an inline-meta data blob)."""
    if im.verified is not None:
        return im.verified[1024:1028] == _EROFS_MAGIC
    try:
        with open(im.bootstrap, "rb") as f:
            f.seek(1024)
            return f.read(4) == _EROFS_MAGIC
    except OSError:
        return True  # let the mount report it


def _source(im: ImageMount) -> ErofsSource:
    blob_ids = [b.blob_id for b in im.fs.meta.blobs]
    return ErofsSource(
        im.bootstrap,
        im.device,
        blob_ids,
        im.fs.stats,
        im.verified,
        im.fs.blob_range_files,
        im.fs.drop_chunk_map,
    )


class ErofsDriver:
    """Kernel EROFS mode (:mod:`.erofs_mode`), with ``fuse`` underneath and as the fallback.
    ``fuse_mounted``: whether the daemon's FUSE mount exists (the kernel mount stacks on it);
    ``on_lost``: told the path of an image whose kernel mount was removed from outside."""

    kind: ClassVar[FsDriver] = FsDriver.EROFS

    def __init__(
        self,
        manager: ErofsManager,
        fuse: FuseDriver,
        fuse_mounted: Callable[[], bool],
        on_lost: Callable[[str], None],
    ) -> None:
        self.manager, self.fuse, self.vfs, self.fuse_mounted = manager, fuse, fuse.vfs, fuse_mounted
        manager.on_lost = on_lost

    def attach(self, im: ImageMount) -> Driver:
        if not _is_bootstrap(im):
            log.info(
                "%s: fs_driver fusedev (%s is a data blob with the bootstrap inlined: the "
                "kernel mounts only a bootstrap file of its own)",
                im.path,
                im.bootstrap,
            )
            return self.fuse.attach(im)
        self.vfs.attach(im.path, im.fs, on_close=_not_owned)
        if not self.fuse_mounted():
            log.info(
                "%s: fs_driver erofs; the kernel mount follows the daemon's FUSE mount", im.path
            )
            return self
        return self._kernel_mount(im)

    def _kernel_mount(self, im: ImageMount) -> Driver:
        try:
            self.manager.mount(im.path, _source(im))
        except OSError as e:
            self.vfs.detach(im.path)  # attached again by the fallback, or closed by the caller
            if e.errno not in _KERNEL_CANNOT:
                raise
            log.warning(
                "%s: kernel EROFS mount not possible (%s); falling back to fs_driver "
                "fusedev (FUSE RAFS mode)",
                im.path,
                e,
            )
            return self.fuse.attach(im)
        return self

    def activate(self, images: Iterable[ImageMount]) -> None:
        """After the daemon's FUSE mount: kernel-mount the EROFS images opened before it."""
        for im in images:
            if im.driver is self and im.path not in self.manager.images:
                im.driver = self._kernel_mount(im)

    def replace(self, old: ImageMount, im: ImageMount) -> None:
        """The new bootstrap replaces the old one in place; the old image stays open for files
        opened before, and is closed with the new one."""
        if im.fs.version != 6:
            raise UnsupportedError(
                f"{im.path} is a kernel EROFS mount; a RAFS v{im.fs.version} "
                "bootstrap cannot replace it (umount and mount)"
            )
        if im.path not in self.manager.images:  # not kernel-mounted yet (no FUSE mount so far)
            self.vfs.replace(im.path, im.fs, on_close=_not_owned)
            old.close()
            return
        self.manager.replace(im.path, _source(im))
        # the FUSE view underneath keeps the old image (kept open below): replacing it would
        # invalidate the dentry the new kernel mount sits on, and the kernel detaches mounts on
        # an invalidated dentry
        im.retired = [*old.retired, old]
        old.retired = []

    def detach(self, im: ImageMount) -> None:
        self.manager.umount(im.path)
        self.vfs.detach(im.path)
        im.close()

    def describe(self, path: str) -> dict[str, Any]:
        return {"erofs": self.manager.describe(path)}

    def stop(self) -> None:
        """Unmount every kernel EROFS mount, then the blob fs (the images stay open)."""
        self.manager.shutdown()
