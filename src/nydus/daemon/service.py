"""nydusd's core: images (bootstrap + storage device + RAFS fs) served over one FUSE session.

:class:`Nydusd` owns the state machine, the :class:`~.vfs.RafsVfs`, the FUSE session and the
images. The CLI builds one, calls :meth:`Nydusd.run`; the API server calls its verbs (mount,
umount, start, exit, metrics). Image mounts are validated completely (config, bootstrap,
storage) *before* anything is attached, so a bad request leaves the daemon as it was.

Threading contract: verbs are serialized by one lock (API requests may come concurrently),
except that mount/remount read the bootstrap and open storage outside it (the mount path is
reserved meanwhile), so one slow image never blocks other requests. FUSE requests run on the
session's workers and never take that lock.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, deathwatch
from ..config import DaemonConfig
from ..credentials import RedactingFilter, redact_config
from ..errors import ConfigError, NotFoundError, NydusError, UnsupportedError
from ..fs.rafs import FsOptions, RafsFs
from ..fuse import FuseSession, SessionOptions
from ..metadata import open_bootstrap, read_verified_bootstrap
from ..storage import open_device
from .erofs_mode import EROFS, FUSEDEV, ErofsManager, resolve_driver
from .state import DaemonEvent, DaemonState, StateError, StateMachine
from .vfs import RafsVfs

__all__ = ["Nydusd", "DaemonOptions", "ImageMount", "ErrorHolder", "redact_config"]

log = logging.getLogger("nydus.daemon")

@dataclass
class DaemonOptions:
    mountpoint: str
    id: str = ""
    supervisor: str = ""
    apisock: str = ""
    upgrade: bool = False
    failover_policy: str = "resend"
    session: SessionOptions = field(default_factory=SessionOptions)
    fs_driver: str = EROFS  # per-mount default when the config has no fs_driver
    blobfs_dir: str = ""  # kernel EROFS mode: where the blob fs and staging mounts live


@dataclass
class ImageMount:
    """One image attached to the daemon at ``path`` (a virtual mount point)."""

    path: str
    bootstrap: str
    config: DaemonConfig
    fs: RafsFs
    device: Any
    prefetch_files: list[str] | None
    mounted_at: float = field(default_factory=time.time)
    fs_driver: str = FUSEDEV
    erofs: Any = None  # the daemon's ErofsManager when fs_driver is "erofs"
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
            "fs_driver": self.fs_driver,
            **({"bootstrap_digest": self.bootstrap_digest} if self.bootstrap_digest else {}),
            **({"erofs": self.erofs.describe(self.path)} if self.erofs is not None else {}),
        }


class ErrorHolder(logging.Handler):
    """Keeps the latest ERROR log records for ``GET /api/v1/daemon/events``."""

    def __init__(self, max_errors: int = 500, max_size: int = 50 * 1024) -> None:
        super().__init__(logging.ERROR)
        self.addFilter(RedactingFilter())  # the API shows these: no credentials in them
        self.max_errors, self.max_size = max_errors, max_size
        self.total = 0
        self._items: collections.deque[str] = collections.deque()
        self._size = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {record.name}: {record.getMessage()}"
        except Exception:
            return
        with self._guard:
            self.total += 1
            self._items.append(text)
            self._size += len(text)
            while self._items and (len(self._items) > self.max_errors
                                   or self._size > self.max_size):
                self._size -= len(self._items.popleft())

    def export(self) -> dict[str, Any]:
        with self._guard:
            return {"max_errors": self.max_errors, "total_errors": self.total,
                    "max_size": self.max_size, "errors": list(self._items)}


def parse_config(config: DaemonConfig | str | bytes | dict[str, Any]) -> DaemonConfig:
    if isinstance(config, DaemonConfig):
        return config
    return DaemonConfig.from_json(config)


class Nydusd:
    """A running nydusd (see the module docstring)."""

    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.id = opts.id
        self.sm = StateMachine()
        self.vfs = RafsVfs(zero_message_open=opts.session.no_open)
        self.session: FuseSession | None = None
        self.images: dict[str, ImageMount] = {}
        self.events = ErrorHolder()
        self._lock = threading.RLock()
        self._loading: set[str] = set()  # paths whose image loads outside the lock
        self._exit = threading.Event()
        self.exit_reason = ""
        self.started = time.time()
        self.erofs = ErofsManager(opts.mountpoint, opts.blobfs_dir)

    # ------------------------------------------------------------------ images

    def open_image(self, path: str, bootstrap: str, config: DaemonConfig | str | bytes |
                   dict[str, Any], prefetch_files: Sequence[str] | None = None,
                   bootstrap_digest: str | None = None) -> ImageMount:
        """Validate and open an image without attaching it. With ``bootstrap_digest``
        (``sha256:HEX``) the bootstrap's bytes are read once, checked, and parsed from memory:
        a mismatch is an IntegrityError and nothing is mounted."""
        cfg = parse_config(config)
        if cfg.overlay is not None and (cfg.overlay.upper_dir or cfg.overlay.work_dir):
            raise UnsupportedError("writable overlay (config 'overlay') is not supported")
        verified: bytes | None = None
        if bootstrap_digest:
            verified = read_verified_bootstrap(bootstrap, bootstrap_digest)
            meta = open_bootstrap(verified)
        else:
            meta = open_bootstrap(bootstrap)
        try:
            fs_id = self.vfs.normalize(path)
            device = open_device(meta.blobs, cfg, id=fs_id, chunk_lookup=meta.chunk_record)
        except BaseException:
            meta.close()
            raise
        try:
            fs = RafsFs(meta, device, FsOptions(
                id=fs_id, enable_xattr=cfg.enable_xattr, iostats_files=cfg.iostats_files,
                access_pattern=cfg.access_pattern, latest_read_files=cfg.latest_read_files,
            ))
        except BaseException:
            device.close()
            meta.close()
            raise
        return ImageMount(fs_id, os.path.abspath(bootstrap), cfg, fs, device,
                          list(prefetch_files) if prefetch_files else None,
                          bootstrap_digest=bootstrap_digest.strip().lower()
                          if bootstrap_digest else "", verified=verified)

    def _start_prefetch(self, im: ImageMount) -> None:
        pf = im.config.fs_prefetch
        if not pf.enable:
            if im.prefetch_files:
                log.info("%s: --prefetch-files given but fs_prefetch.enable is false; "
                         "not prefetching", im.path)
            return
        try:
            lists, everything = im.fs.prefetch_chunk_lists(im.prefetch_files)
            if everything or (pf.prefetch_all and not lists):
                log.info("%s: prefetching all blobs", im.path)
                im.device.prefetch_all()
            else:
                log.info("%s: prefetching %d files", im.path, len(lists))
                im.device.prefetch_files(lists)
                if pf.prefetch_all:
                    im.device.prefetch_all()
        except NydusError as e:
            log.warning("%s: prefetch not started: %s", im.path, e)

    def _reserve(self, path: str, want_mounted: bool) -> str:
        """Claim ``path`` for one mount/remount while its image loads outside the lock."""
        with self._lock:
            path = self.vfs.normalize(path)
            if path in self._loading:
                raise StateError(f"{path} is being mounted by another request")
            if want_mounted and path not in self.images:
                raise NotFoundError(f"nothing is mounted at {path}")
            if not want_mounted and path in self.images:
                raise StateError(f"{path} is already mounted")
            self._loading.add(path)
            return path

    def mount(self, path: str, bootstrap: str, config: DaemonConfig | str | bytes |
              dict[str, Any], prefetch_files: Sequence[str] | None = None,
              fs_driver: str | None = None, bootstrap_digest: str | None = None) -> ImageMount:
        """Attach an image at ``path`` (``POST /api/v1/mount``); ``bootstrap_digest``: see
        :meth:`open_image`.

        The bootstrap is read and the storage opened without the daemon lock (``path`` is
        reserved meanwhile), so a slow or large image never stalls other API requests.
        """
        path = self._reserve(path, want_mounted=False)
        try:
            im = self.open_image(path, bootstrap, config, prefetch_files, bootstrap_digest)
            with self._lock:
                try:
                    if self._exit.is_set():
                        raise StateError("the daemon is exiting")
                    driver, why = resolve_driver(fs_driver or im.config.fs_driver,
                                                 self.opts.fs_driver, im.fs.version,
                                                 self.opts.upgrade, self._needs_fuse(im))
                    if driver == EROFS:
                        from .erofs_hooks import mount_erofs_image
                        driver = mount_erofs_image(self, im)
                    else:
                        log.info("%s: fs_driver fusedev (%s)", path, why)
                    if driver != EROFS:
                        self.vfs.attach(path, im.fs, on_close=im.close)
                except BaseException:
                    im.close()
                    raise
                self.images[path] = im
                if self.sm.state == DaemonState.INIT:
                    self.sm.fire(DaemonEvent.MOUNT)
                self._start_prefetch(im)
                log.info("mounted %s at %s (RAFS v%d, %d blobs)", bootstrap, path,
                         im.fs.version, len(im.fs.meta.blobs))
                return im
        finally:
            with self._lock:
                self._loading.discard(path)

    def remount(self, path: str, bootstrap: str, config: DaemonConfig | str | bytes |
                dict[str, Any], prefetch_files: Sequence[str] | None = None,
                bootstrap_digest: str | None = None) -> ImageMount:
        """Replace the image at ``path`` (``PUT /api/v1/mount``); loads outside the lock."""
        path = self._reserve(path, want_mounted=True)
        try:
            im = self.open_image(path, bootstrap, config, prefetch_files, bootstrap_digest)
            with self._lock:
                try:
                    if self._exit.is_set():
                        raise StateError("the daemon is exiting")
                    old = self.images.get(path)
                    if old is None:
                        raise NotFoundError(f"nothing is mounted at {path}")
                    if old.fs_driver == EROFS:
                        if im.fs.version != 6:
                            raise UnsupportedError(
                                f"{path} is a kernel EROFS mount; a RAFS v{im.fs.version} "
                                "bootstrap cannot replace it (umount and mount)")
                        from .erofs_hooks import remount_erofs_image
                        remount_erofs_image(self, old, im)
                    else:
                        self.vfs.replace(path, im.fs, on_close=im.close)
                except BaseException:
                    im.close()
                    raise
                self.images[path] = im
                self._start_prefetch(im)
                log.info("remounted %s at %s", bootstrap, path)
                return im
        finally:
            with self._lock:
                self._loading.discard(path)

    def _needs_fuse(self, im: ImageMount) -> str:
        """Why this image wants FUSE RAFS mode when the daemon default is erofs ('' if not)."""
        cfg = im.config
        if cfg.iostats_files or cfg.latest_read_files:  # access_pattern: blob reads, mapped
            return "per-file metrics (iostats_files, latest_read_files) need fusedev"
        if self.opts.supervisor:
            return "a supervised daemon (fd failover) serves fusedev"
        return ""

    def umount(self, path: str) -> None:
        """Detach the image at ``path`` (``DELETE /api/v1/mount``)."""
        with self._lock:
            path = self.vfs.normalize(path)
            if path in self._loading:
                raise StateError(f"{path} is being mounted by another request")
            if path not in self.images:
                raise NotFoundError(f"nothing is mounted at {path}")
            if self.images[path].fs_driver == EROFS:
                from .erofs_hooks import umount_erofs_image
                umount_erofs_image(self, self.images[path])
            else:
                self.vfs.detach(path)
            del self.images[path]
            log.info("unmounted %s", path)

    def image(self, fs_id: str | None) -> ImageMount:
        """The image with metrics id ``fs_id`` (its mount path); the default is ``/`` or the
        only/first mounted image."""
        with self._lock:
            if fs_id:
                im = self.images.get(self.vfs.normalize(fs_id))
                if im is None:
                    raise NotFoundError(f"no file system with id {fs_id}")
                return im
            if "/" in self.images:
                return self.images["/"]
            if not self.images:
                raise NotFoundError("no file system is mounted")
            return self.images[sorted(self.images)[0]]

    # ------------------------------------------------------------------ FUSE

    def mount_fuse(self) -> None:
        """Mount the FUSE file system at the daemon's mount point and start serving."""
        s = FuseSession(self.vfs, self.opts.mountpoint, self.opts.session)
        s.mount()
        if not self.opts.supervisor:  # a supervisor keeps the connection alive on purpose
            deathwatch.guard(self.opts.mountpoint)
        self.vfs.notify_entry = s.notify_inval_entry
        self.vfs.notify_inode = s.notify_inval_inode
        self.session = s
        s.start()
        if not s.wait_initialized(10):
            log.warning("the kernel has not sent FUSE INIT within 10 s")
        from .erofs_hooks import activate_pending
        activate_pending(self)

    def start(self) -> None:
        with self._lock:
            if self.sm.state == DaemonState.INIT:
                self.sm.fire(DaemonEvent.MOUNT)
            self.sm.fire(DaemonEvent.START)
            log.info("daemon state RUNNING")

    # ------------------------------------------------------------------ run / exit

    def request_exit(self, reason: str = "") -> None:
        if not self._exit.is_set():
            self.exit_reason = reason
            log.info("exit requested%s", f" ({reason})" if reason else "")
        self._exit.set()

    def wait(self, poll: float = 0.5) -> None:
        """Until an exit is requested or the FUSE session ends (unmounted from outside)."""
        while not self._exit.wait(poll):
            s = self.session
            if s is not None and s.ended:
                log.info("FUSE session ended (unmounted?)")
                self.end_session("fuse session ended")

    def end_session(self, reason: str) -> None:
        """The mount went away from outside: INTERRUPT, then exit."""
        with self._lock:
            if self.sm.can(DaemonEvent.INTERRUPT):
                self.sm.fire(DaemonEvent.INTERRUPT)
        self.request_exit(reason)

    def shutdown(self) -> None:
        """Unmount, close every image, state STOPPED. Idempotent."""
        with self._lock:
            if self.sm.can(DaemonEvent.EXIT):
                self.sm.fire(DaemonEvent.EXIT)
            s = self.session
            self.session = None
            self.vfs.notify_entry = None
            self.vfs.notify_inode = None
        from .erofs_hooks import shutdown_erofs
        shutdown_erofs(self)
        if s is not None:
            deathwatch.release(self.opts.mountpoint)
            try:
                s.unmount()
            except OSError as e:
                log.error("unmounting %s: %s", self.opts.mountpoint, e)
                s.stop()
        with self._lock:
            self.images.clear()
        self.vfs.close_all()

    # ------------------------------------------------------------------ info and metrics

    def info(self) -> dict[str, Any]:
        with self._lock:
            backends = {p: im.describe() for p, im in sorted(self.images.items())}
        return {
            "version": {
                "package_ver": __version__, "git_commit": "", "build_time": "",
                "profile": "release", "rustc": f"python {sys.version.split()[0]}",
            },
            "id": self.id,
            "supervisor": self.opts.supervisor,
            "state": self.sm.state.value,
            "mountpoint": self.opts.mountpoint,
            "backend_collection": backends,
            "fs_driver_default": self.opts.fs_driver,
            **self.erofs.info(),
        }

    def metrics_fs(self, fs_id: str | None) -> dict[str, Any]:
        return self.image(fs_id).fs.stats.export_global()

    def metrics_files(self, fs_id: str | None, latest: bool) -> Any:
        st = self.image(fs_id).fs.stats
        if latest:
            return st.export_latest_read_files()
        if not st.files_enabled:
            raise ConfigError("per-file metrics are off (set iostats_files in the config)")
        return st.export_files()

    def metrics_pattern(self, fs_id: str | None) -> list[dict[str, Any]]:
        st = self.image(fs_id).fs.stats
        if not st.access_pattern_enabled:
            raise ConfigError("access pattern is off (set access_pattern in the config)")
        return st.export_patterns()

    def metrics_backend(self, fs_id: str | None) -> dict[str, Any]:
        return dict(self.image(fs_id).device.metrics_backend())

    def metrics_blobcache(self, fs_id: str | None) -> dict[str, Any]:
        return dict(self.image(fs_id).device.metrics_blobcache())

    def metrics_inflight(self) -> list[dict[str, Any]]:
        s = self.session
        return s.inflight() if s is not None else []

    def config_of(self, fs_id: str | None) -> dict[str, Any]:
        return dict(redact_config(self.image(fs_id).config.to_dict()))

    def dump(self) -> str:
        return json.dumps(self.info(), indent=2)
