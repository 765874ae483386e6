"""Kernel EROFS mode: the kernel mounts the v6 bootstrap, the daemon only fills blob data.

Per image mount the driver (:mod:`.driver`) is ``fusedev`` (FUSE RAFS: the daemon answers every
request) or ``erofs``. In ``erofs`` mode the image is mounted with mount(2) as file-backed EROFS at
``<daemon mountpoint><path>`` (the daemon's FUSE mount shows an empty directory there, or for
``/`` the EROFS mount stacks on the FUSE root), with one ``device=`` per blob in device-table
order. Each device is either the blob's file on the daemon's blob fs (:mod:`.blobdev`, lazy:
reads are fetched, verified and decompressed by the daemon) or, when the blob is complete in the
blob cache, its local ``<blob_id>.blob.data`` file (native: no daemon in the path).

What differs for readers (kernel behaviour, not ours): ``open(O_DIRECT)`` fails with EINVAL on a
file-backed EROFS mount; use fusedev for applications that need O_DIRECT on image files. Each
image is its own file system (its own ``st_dev``; inode numbers are the EROFS nids), where FUSE
RAFS mode shows all images of a daemon in one inode space.

External unmount: the watcher also follows /proc/self/mountinfo (POLLPRI). When an image's EROFS
mount disappears without the daemon unmounting it (``umount <mountpoint>``), the daemon is told
(``on_lost``): the image at ``/`` ends the daemon, as an external unmount of a FUSE mount ends the
session; any other image is detached as by ``DELETE /api/v1/mount``.

A bootstrap mounted with an expected digest (``bootstrap_digest``) is mounted from the daemon's
private copy of the checked bytes (:meth:`ErofsManager._private_copy`), removed at unmount.

Remount (``PUT /api/v1/mount``): the new bootstrap is mounted on a staging directory and moved
beneath the current mount, which is then detached lazily, as for the switch to native below.

Switch to native: a watcher polls the images still read through the blob fs; once every blob is
complete in the cache *and verified* (``BlobDevice.verify_blob``: every chunk of the cache file
hashed by this process, on the watcher thread, outside the manager's lock; a bad chunk is
cleared and fetched again, and the switch waits), a second EROFS instance with the local files
is mounted on a private staging directory, warmed (the file ranges whose blob bytes the kernel
READ through the blob fs are read into the new instance's page cache with
``POSIX_FADV_WILLNEED``: a new instance starts with an empty page cache, and the first container
after the switch would otherwise copy every page it reads from the local blob files again:
+0.4-0.8 s for ``import torch``), and moved *beneath* the lazy one at the mount point
(move_mount(2) with MOVE_MOUNT_BENEATH, Linux 6.5+), and the lazy one is then detached
(MNT_DETACH): path lookups see one instance or the other, never an empty directory. New opens
go to the native mount at once; files already open on the old instance keep reading it (their
uncached pages through the blob fs, served from the complete cache) until they are closed.

Daemon death: its /dev/fuse fds close, the kernel aborts both FUSE connections, and a later read
that misses the page cache fails (ENOTCONN on the blob file, EIO from EROFS); nothing hangs
(:mod:`.blobdev`; :mod:`nydus.deathwatch`, :mod:`nydus.fusectl` and the sweep below abort what
a dying process leaves). Native-switched mounts do not depend on the daemon. The snapshotter's
daemon manager restores service: it lazily unmounts the stale EROFS mounts and the dead blob fs
(``blobfs`` in ``GET /api/v1/daemon``), starts a new nydusd and mounts again; containers must be
restarted to see the new mounts. ``PUT /api/v1/daemon/fuse/sendfd`` refuses (501) while EROFS
mounts exist.

Threading contract: :class:`ErofsManager` methods are called under the daemon's lock; the
native-switch watcher thread takes the manager's own lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import fusectl, kernel_mount
from ..fs.metrics import FsIoStats
from ..libc import heap_trimmer, idle_priority
from ..storage import BlobDevice
from .blobdev import BlobFsServer

__all__ = ["ErofsImage", "ErofsManager", "ErofsSource"]

log = logging.getLogger("nydus.daemon.erofs")

BLOBFS_BASE = "/run/nydusd-blobfs"
# the native switch's warm-up reads at most this much, for at most this long (a hint)
WARM_MAX_BYTES = 1 << 30
WARM_MAX_S = 10.0
WARM_STEP = 128 << 10

# (blob index, offset, size) -> [(ino, path, file offset, length)]: fs.rafs.Rafs.blob_range_files
Resolver = Callable[[int, int, int], list[tuple[int, str, int, int]]]


def _warm(
    root: str,
    plan: list[tuple[str, list[tuple[int, int]]]],
    max_bytes: int,
    deadline: float,
    stop: threading.Event,
) -> tuple[int, int]:
    """Ask the EROFS instance mounted at ``root`` to read ``plan``'s file ranges into its page
    cache (``POSIX_FADV_WILLNEED``: the kernel reads them from the local blob files, no copy to
    user space); returns (bytes asked, files). Stops at ``max_bytes``, at ``deadline`` or when
    ``stop`` is set (the daemon shuts down); a file that cannot be opened is skipped."""
    asked = files = 0
    for fpath, ranges in plan:
        if asked >= max_bytes or time.monotonic() > deadline or stop.is_set():
            break
        try:
            fd = os.open(
                os.path.join(root, fpath.lstrip("/")),
                os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
            )
        except OSError:
            continue
        try:
            files += 1
            for off, n in ranges:
                # the kernel reads at most the file's readahead window per call (128 KiB by
                # default), so the range is asked for in pieces of that size
                for at in range(off, off + n, WARM_STEP):
                    os.posix_fadvise(fd, at, min(WARM_STEP, off + n - at), os.POSIX_FADV_WILLNEED)
                asked += n
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked, files


def _drop_staging(staging: str, *, mounted: bool) -> None:
    """A staging directory gone, with the instance on it if it was not moved away."""
    if mounted:
        with contextlib.suppress(OSError):
            kernel_mount.umount(staging, lazy=True)
    with contextlib.suppress(OSError):
        os.rmdir(staging)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _alive(pid: int) -> bool:
    """Running, and not a zombie (a killed daemon its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: leave it alone


def sweep_stale_blobfs_dirs(base: str = BLOBFS_BASE) -> int:
    """Clean up after daemons that are gone (a killed daemon cannot clean up after itself):
    abort their blob fs connection if it is still up (a daemon that died stuck in the kernel:
    its readers wait until then), detach their dead blob fs and staging mounts lazily (EROFS
    mounts still holding blob files keep them; their uncached reads fail as they already did)
    and remove the ``<base>/<pid>`` directories. Directories of live processes (not zombies)
    are left alone. Returns how many went."""
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    table: dict[str, list[str]] | None = None
    for name in names:
        if not name.isdigit() or int(name) == os.getpid() or _alive(int(name)):
            continue
        d = os.path.join(base, name)
        if table is None:
            try:
                table = kernel_mount.mounted_fstypes()
            except OSError:
                table = {}
        for sub, fstype in (("blobs", "fuse.nydus-blobfs"), ("stage", None)):
            path = os.path.realpath(os.path.join(d, sub))
            kinds = table.get(path, [])
            if fstype is not None and fstype in kinds:
                for m in fusectl.abort_mounts([path], fstypes=[fstype]):
                    log.warning(
                        "aborted FUSE connection %d of %s, left up by a daemon that "
                        "is gone (pid %s)",
                        m.conn,
                        path,
                        name,
                    )
            if kinds and (fstype is None or kinds[-1] == fstype):
                with contextlib.suppress(OSError):
                    kernel_mount.umount(path, lazy=True)
                    log.info("detached %s, left by a daemon that is gone (pid %s)", path, name)
            with contextlib.suppress(OSError):
                os.rmdir(path)  # fails if still mounted or not empty: kept
        boot = os.path.join(d, "boot")  # its private bootstrap copies (mounts keep theirs open)
        with contextlib.suppress(OSError):
            for f in os.listdir(boot):
                _unlink_quiet(os.path.join(boot, f))
            os.rmdir(boot)
        try:
            os.rmdir(d)
            removed += 1
        except OSError:
            pass
    return removed


def _read_all(fd: int) -> str | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        parts = []
        while chunk := os.read(fd, 1 << 16):
            parts.append(chunk)
    except OSError as e:
        log.debug("reading the mount table: %s", e)
        return None
    return b"".join(parts).decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ErofsSource:
    """What an image is mounted from. ``stats``: the image's FsIoStats (blob fs READs are
    accounted there). ``verified``: the bootstrap's digest-checked bytes; the kernel then
    mounts a private copy of them (:meth:`ErofsManager._private_copy`), not ``bootstrap``."""

    bootstrap: str
    device: BlobDevice
    blob_ids: list[str]
    stats: FsIoStats | None = None
    verified: bytes | None = None
    resolve: Resolver | None = None  # blob range -> file ranges (the native switch's warm-up)
    release: Callable[[], None] | None = None  # drops what resolve built (after the switch)


@dataclass
class ErofsImage:
    """One image mounted by the kernel at ``target``."""

    path: str
    target: str
    bootstrap: str
    device: BlobDevice
    blob_ids: list[str]
    devices: list[str] = field(default_factory=list)
    native: list[bool] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    stats: FsIoStats | None = None  # the image's, for blob fs READs
    retired: list[ErofsImage] = field(default_factory=list)  # replaced by remount
    mounted: bool = False
    switched_at: float = 0.0
    old_detached: int = 0
    private_bootstrap: bool = False  # ``bootstrap`` is the daemon's own verified copy
    resolve: Resolver | None = None  # see ErofsSource
    release: Callable[[], None] | None = None  # see ErofsSource

    @property
    def mode(self) -> str:
        if self.native and all(self.native):
            return "native"
        return "lazy" if not any(self.native) else "mixed"

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "mode": self.mode,
            "devices": list(self.devices),
            "native_since": self.switched_at or None,
        }


class ErofsManager:
    """Kernel EROFS mounts of a daemon, the blob fs they read through, and the native switch."""

    def __init__(self, mountpoint: str, blobfs_dir: str = "", *, poll: float = 0.5) -> None:
        # resolved: the kernel's mount table shows real paths (see _check_lost)
        self.mountpoint = os.path.realpath(mountpoint)
        d = blobfs_dir or os.path.join(BLOBFS_BASE, str(os.getpid()))
        self._sweep = not blobfs_dir
        self.blobfs = BlobFsServer(os.path.join(d, "blobs"))
        self.stage = os.path.join(d, "stage")
        self._stage_ready = False
        self.images: dict[str, ErofsImage] = {}
        self.poll = poll
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._seq = 0
        # told the path of an image whose mount vanished from outside; called by the watcher
        # thread without the manager's lock held
        self.on_lost: Callable[[str], None] | None = None

    def target_of(self, path: str) -> str:
        return self.mountpoint if path == "/" else self.mountpoint + path

    # ------------------------------------------------------------------ mounts

    def _private_copy(self, data: bytes) -> str:
        """Write ``data`` (a bootstrap whose digest was checked) to a new 0600 file in the
        daemon's own 0700 directory and return its path.

        Why a copy: the kernel mounts a bootstrap by *path* and reads it itself, now and again
        at every later mount of the same image (the native switch, a remount). Mounting the
        caller's path would let a file swapped or rewritten after the check be what the kernel
        serves; /proc/self/fd/N of the checked fd would pin the inode but not its contents (a
        writer can still modify it in place). A file only this daemon writes, holding exactly
        the checked bytes, is what was verified for as long as the image is mounted."""
        d = os.path.join(os.path.dirname(self.stage), "boot")
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        self._seq += 1
        name = os.path.join(d, f"{self._seq}.boot")
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            _unlink_quiet(name)
            raise
        os.close(fd)
        return name

    def _new_image(
        self, path: str, target: str, src: ErofsSource, mount: Callable[[ErofsImage], None]
    ) -> ErofsImage:
        """An image with its devices registered, mounted by ``mount`` (undone if it fails)."""
        if src.verified is None:
            bootstrap = os.path.abspath(src.bootstrap)
        else:
            bootstrap = self._private_copy(src.verified)
        im = ErofsImage(
            path,
            target,
            bootstrap,
            src.device,
            list(src.blob_ids),
            stats=src.stats,
            private_bootstrap=src.verified is not None,
            resolve=src.resolve,
            release=src.release,
        )
        try:
            self._devices(im)
            mount(im)
        except BaseException:
            self._drop_private(im)
            self._unregister(im)
            raise
        return im

    def mount(self, path: str, src: ErofsSource) -> ErofsImage:
        """mount(2) the bootstrap at the target of ``path``. Raises OSError; ``errno`` in
        (ENODEV, ENOTBLK) means the kernel cannot do it at all (caller falls back)."""
        with self._lock:
            im = self._new_image(
                path,
                self.target_of(path),
                src,
                lambda im: kernel_mount.mount_erofs(im.bootstrap, im.target, im.devices),
            )
            im.mounted = True
            self.images[path] = im
            log.info(
                "%s: kernel EROFS mount at %s (%s; devices %s)",
                path,
                im.target,
                im.mode,
                ", ".join(im.devices),
            )
            self._ensure_watcher()
            return im

    def replace(self, path: str, src: ErofsSource) -> ErofsImage:
        """Remount: the new bootstrap takes the place of the image at ``path`` without a moment
        of an empty directory; files open on the old instance keep reading it (its blob files
        stay registered until the new image is unmounted)."""
        with self._lock:
            old = self.images.get(path)
            if old is None or not old.mounted:
                raise OSError(errno.EINVAL, f"no kernel EROFS mount at {path}")
            im = self._new_image(
                path,
                old.target,
                src,
                lambda im: self._mount_beneath(im.bootstrap, im.devices, old.target),
            )
            kernel_mount.umount(old.target, lazy=True)
            old.mounted = False
            im.mounted = True
            im.retired = [*old.retired, old]
            old.retired = []
            self.images[path] = im
            log.info("%s: remounted %s at %s (%s)", path, im.bootstrap, im.target, im.mode)
            return im

    def _devices(self, im: ErofsImage) -> None:
        im.devices, im.native = [], []
        for i, bid in enumerate(im.blob_ids):
            local = self._local(im.device, i)
            if local is not None:
                im.devices.append(local)
                im.native.append(True)
                continue
            if self._sweep:
                self._sweep = False
                sweep_stale_blobfs_dirs()
            self.blobfs.start()
            im.registered.append(self.blobfs.fs.register(bid, im.device, i, im.stats))
            im.devices.append(self.blobfs.path(bid))
            im.native.append(False)

    @staticmethod
    def _local(device: BlobDevice, i: int) -> str | None:
        """The blob's cache file if the kernel may read it: complete and verified by this
        process (``native_file`` does no hashing; ``_verify_local`` does)."""
        try:
            p = device.native_file(i)
            if p and os.path.isfile(p):
                return str(p)
        except Exception as e:  # a blob that cannot be opened: stay lazy, reads report it
            log.debug("blob %d not local: %s", i, e)
        return None

    @staticmethod
    def _verify_local(device: BlobDevice, i: int) -> bool:
        """Hash a complete cached blob (may take a while: never under the manager's lock)."""
        try:
            return bool(device.verify_blob(i))
        except Exception as e:
            log.warning("blob %d: cannot verify its cache file (%s); staying on the blob fs", i, e)
            return False

    def _unregister(self, im: ErofsImage) -> None:
        for old in im.retired:
            self._unregister(old)
        im.retired = []
        for bid in im.registered:
            self.blobfs.fs.unregister(bid)
        im.registered = []

    def umount(self, path: str) -> None:
        with self._lock:
            im = self.images.pop(path, None)
        if im is not None:
            self._umount(im)

    def _umount(self, im: ErofsImage) -> None:
        if im.mounted:
            kernel_mount.umount_or_detach(im.target)
            im.mounted = False
            log.info("%s: kernel EROFS mount at %s removed", im.path, im.target)
        self._drop_private(im)  # before _unregister, which empties ``retired``
        self._unregister(im)

    @staticmethod
    def _drop_private(im: ErofsImage) -> None:
        """Remove the private bootstrap copies of ``im`` and the images it replaced (a mount
        still using one keeps the open file; the name is no longer needed)."""
        for old in im.retired:
            ErofsManager._drop_private(old)
        if im.private_bootstrap:
            _unlink_quiet(im.bootstrap)
            im.private_bootstrap = False

    def shutdown(self) -> None:
        """Unmount every EROFS mount, then the blob fs. Idempotent."""
        self._stop.set()
        w = self._watcher
        if w is not None and w is not threading.current_thread():
            w.join(5)
        with self._lock:
            images = list(self.images.values())
            self.images.clear()
        for im in images:
            try:
                self._umount(im)
            except OSError as e:
                log.error("unmounting %s: %s", im.target, e)
        self.blobfs.stop()
        if self._stage_ready:
            with contextlib.suppress(OSError):
                kernel_mount.umount(self.stage, lazy=True)
            with contextlib.suppress(OSError):
                os.rmdir(self.stage)
            self._stage_ready = False
        with contextlib.suppress(OSError):  # private bootstrap copies: all removed by now
            os.rmdir(os.path.join(os.path.dirname(self.stage), "boot"))
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.stage))

    def describe(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            im = self.images.get(path)
            return im.describe() if im is not None else None

    def info(self) -> dict[str, Any]:
        return {
            "blobfs": self.blobfs.directory if self.blobfs.running else None,
            "blob_files": self.blobfs.fs.stats(),
            "blobfs_prefilled_pages": self.blobfs.prefilled,
            "blobfs_prefill_dropped": self.blobfs.prefill_dropped,
        }

    # ------------------------------------------------------------------ native switch

    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, name="erofs-native", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        try:
            fd = os.open(kernel_mount.PROC_MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("cannot follow the mount table (%s): external unmounts go unnoticed", e)
            fd = -1
        poller = select.poll()
        if fd >= 0:
            poller.register(fd, select.POLLPRI | select.POLLERR)
        try:
            # a first look at once: a change before the fd was opened raises no POLLPRI
            changed = fd >= 0
            while not self._stop.is_set():
                if changed:
                    self._check_lost(fd)
                with self._lock:
                    todo = [im for im in self.images.values() if im.mounted and not all(im.native)]
                for im in todo:
                    try:
                        self.switch_native(im.path)
                    except Exception:
                        log.exception(
                            "%s: switch to native failed; staying on the blob fs", im.path
                        )
                # POLLPRI: the mount table changed; otherwise wake every `poll` seconds
                changed = bool(poller.poll(int(self.poll * 1000))) if fd >= 0 else False
        finally:
            if fd >= 0:
                os.close(fd)

    def _check_lost(self, fd: int) -> None:
        """Images whose EROFS mount is gone though we did not unmount it: tell ``on_lost``."""
        lost: list[str] = []
        with self._lock:
            # read under the lock (mounts are made under it), so the table is not older than
            # the image list; reading through the polled fd is what re-arms POLLPRI
            text = _read_all(fd)
            if text is None:
                return
            table = kernel_mount.mounted_fstypes(text)
            for im in self.images.values():
                if im.mounted and "erofs" not in table.get(im.target, ()):
                    log.warning(
                        "%s: the kernel EROFS mount at %s was removed from outside",
                        im.path,
                        im.target,
                    )
                    im.mounted = False
                    lost.append(im.path)
        cb = self.on_lost
        for path in lost:
            if cb is not None:
                try:
                    cb(path)
                except Exception:
                    log.exception("%s: handling the lost mount", path)

    def _ensure_stage(self) -> None:
        if self._stage_ready:
            return
        os.makedirs(self.stage, mode=0o700, exist_ok=True)
        # a private mount of its own: moving refuses to move a mount whose parent is shared,
        # and nothing mounted here should propagate anywhere. A tmpfs, not a bind mount of the
        # directory: the switch makes and removes a staging directory here while it holds the
        # lock, and on a disk file system removing one can wait behind the disk (ext4 with
        # ``discard`` and no journal frees the directory's block with a synchronous discard:
        # 0.1-0.3 s under write load, and 0.66-1.26 s as the first discard after the prefetch's
        # 1.5 GB had been written back, when a VM's disk absorbs it on its first flush)
        kernel_mount.tmpfs_private(self.stage, "mode=700,size=64k,nr_inodes=1024")
        self._stage_ready = True

    def _mount_staging(self, bootstrap: str, devices: list[str]) -> str:
        """A new EROFS instance on a new private staging directory (returned)."""
        self._ensure_stage()
        self._seq += 1
        staging = os.path.join(self.stage, str(self._seq))
        os.makedirs(staging, exist_ok=True)
        try:
            kernel_mount.mount_erofs(bootstrap, staging, devices)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(staging)
            raise
        return staging

    def _mount_beneath(self, bootstrap: str, devices: list[str], target: str) -> None:
        """A new EROFS instance *beneath* the one at ``target`` (the caller then detaches the
        top one): lookups see one instance or the other, never an empty directory."""
        staging = self._mount_staging(bootstrap, devices)
        moved = False
        try:
            kernel_mount.move_beneath(staging, target)
            moved = True
        finally:
            _drop_staging(staging, mounted=not moved)

    def _warm_plan(self, im: ErofsImage) -> list[tuple[str, list[tuple[int, int]]]]:
        """The file ranges (path in the image, ``[(offset, length)]``) whose blob bytes the
        kernel read through the blob fs (:meth:`.blobdev.BlobDevFs.read_ranges`): the pages the
        lazy instance holds in its page cache. Empty without a resolver or on any error (the
        warm-up is an optimization, never a reason not to switch)."""
        resolve = im.resolve
        if resolve is None:
            return []
        files: dict[str, list[tuple[int, int]]] = {}
        try:
            for i, bid in enumerate(im.blob_ids):
                for lo, hi in self.blobfs.fs.read_ranges(bid):
                    for _ino, fpath, off, n in resolve(i, lo, hi - lo):
                        files.setdefault(fpath, []).append((off, n))
        except Exception as e:
            log.warning("%s: no warm-up of the native mount (%s)", im.path, e)
            return []
        return list(files.items())

    def switch_native(self, path: str, wait: Callable[[], None] | None = None) -> bool:
        """Move the image at ``path`` to local blob files if every blob is complete.

        Returns True if the mount is (now) native. See the module docstring. The hashing,
        the warm-up plan and the warm-up run at ``SCHED_IDLE`` priority (background work: a
        container starting meanwhile reads through the lazy instance at full speed) and
        outside the manager's lock; the lock is held to mount the new instance on its staging
        directory and to move it beneath the lazy one.
        """
        with self._lock:
            im = self.images.get(path)
            if im is None or not im.mounted:
                return False
            if all(im.native):
                return True
            device, count = im.device, len(im.blob_ids)
        t0 = time.monotonic()
        with idle_priority():
            # nothing unverified goes to the kernel: hash first, outside the lock
            if not all(self._verify_local(device, i) for i in range(count)):
                return False
            plan = self._warm_plan(im)  # the first call maps the whole image
        t1 = time.monotonic()
        with self._lock:
            if self.images.get(path) is not im or not im.mounted:
                return False
            if all(im.native):
                return True
            locals_ = [self._local(im.device, i) for i in range(len(im.blob_ids))]
            if any(p is None for p in locals_):
                return False
            devices = [str(p) for p in locals_]
            staging = self._mount_staging(im.bootstrap, devices)
        moved = False
        try:
            t2 = time.monotonic()
            with idle_priority():
                warmed = _warm(staging, plan, WARM_MAX_BYTES, t2 + WARM_MAX_S, self._stop)
            t3 = time.monotonic()
            with self._lock:
                if self.images.get(path) is not im or not im.mounted:
                    return False  # unmounted or remounted while warming
                if all(im.native):
                    return True
                kernel_mount.move_beneath(staging, im.target)
                moved = True
                kernel_mount.umount(im.target, lazy=True)
                t4 = time.monotonic()
                im.old_detached += 1
                # the blob files stay registered until umount: the old instance may still
                # read through them for files opened before the switch
                im.devices, im.native = devices, [True] * len(devices)
                im.switched_at = time.time()
        finally:
            _drop_staging(staging, mounted=not moved)
        log.info(
            "%s: switched to native (local blob files %s, every chunk hashed by this daemon); "
            "no reads go through the daemon any more (verify and plan %.3fs, warm-up %.3fs: "
            "%.1f MiB of %d files, move and detach %.3fs)",
            path,
            ", ".join(devices),
            t1 - t0,
            t3 - t2,
            warmed[0] / 2**20,
            warmed[1],
            t4 - t3,
        )
        if im.release is not None:  # the file map: no reads come through the blob fs now
            im.release()
        heap_trimmer().nudge()
        return True
