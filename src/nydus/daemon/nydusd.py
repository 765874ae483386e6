"""nydusd's core: images (bootstrap + storage device + RAFS fs) served over one FUSE session.

:class:`Nydusd` owns the state machine, the :class:`~.vfs.RafsVfs`, the FUSE session, the
images and their data-path drivers (:mod:`.driver`). The CLI builds one; the API server calls
its verbs (mount, umount, start, exit, metrics). Image mounts are validated completely (config,
bootstrap, storage) *before* anything is attached, so a bad request leaves the daemon as it was.

Threading contract: verbs are serialized by one lock (API requests may come concurrently),
except that mount/remount read the bootstrap and open storage outside it (the mount path is
reserved meanwhile), so one slow image never blocks other requests. FUSE requests run on the
session's workers and never take that lock.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .. import __version__, deathwatch
from ..config import DaemonConfig, FsDriver
from ..credentials import RedactingFilter, redact_config
from ..errors import ConfigError, NotFoundError, NydusError, UnsupportedError
from ..fs.rafs import FsOptions, RafsFs
from ..fuse import FuseSession, SessionOptions
from ..libc import heap_trimmer, resident
from ..metadata import open_bootstrap, read_verified_bootstrap
from ..storage import open_device
from .driver import ErofsDriver, FuseDriver, ImageMount, resolve_driver
from .erofs_mode import ErofsManager
from .state import DaemonEvent, DaemonState, StateError, StateMachine
from .vfs import RafsVfs

__all__ = ["Nydusd", "DaemonOptions", "ImageMount", "ImageSource", "ErrorHolder"]

ConfigSource: TypeAlias = DaemonConfig | str | bytes | dict[str, Any]

log = logging.getLogger("nydus.daemon")


@dataclass(frozen=True)
class ImageSource:
    """What an image is opened from. With ``bootstrap_digest`` (``sha256:HEX``) the bootstrap's
    bytes are read once, checked, and parsed from memory: a mismatch is an IntegrityError and
    nothing is mounted."""

    bootstrap: str
    config: ConfigSource
    prefetch_files: Sequence[str] | None = None
    bootstrap_digest: str | None = None


@dataclass
class DaemonOptions:
    mountpoint: str
    id: str = ""
    supervisor: str = ""
    apisock: str = ""
    upgrade: bool = False
    failover_policy: str = "resend"
    session: SessionOptions = field(default_factory=SessionOptions)
    fs_driver: FsDriver = FsDriver.EROFS  # per-mount default when the config has no fs_driver
    blobfs_dir: str = ""  # kernel EROFS mode: where the blob fs and staging mounts live


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
            while self._items and (
                len(self._items) > self.max_errors or self._size > self.max_size
            ):
                self._size -= len(self._items.popleft())

    def export(self) -> dict[str, Any]:
        with self._guard:
            return {
                "max_errors": self.max_errors,
                "total_errors": self.total,
                "max_size": self.max_size,
                "errors": list(self._items),
            }


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
        self.started = time.time()
        self.fuse = FuseDriver(self.vfs)
        self.erofs = ErofsDriver(
            ErofsManager(opts.mountpoint, opts.blobfs_dir),
            self.fuse,
            lambda: self.session is not None and self.session.mounted,
            self._lost,
        )

    # ------------------------------------------------------------------ images

    def open_image(self, path: str, src: ImageSource) -> ImageMount:
        """Validate and open an image without attaching it."""
        cfg = src.config
        if not isinstance(cfg, DaemonConfig):
            cfg = DaemonConfig.from_json(cfg)
        if cfg.overlay is not None and (cfg.overlay.upper_dir or cfg.overlay.work_dir):
            raise UnsupportedError("writable overlay (config 'overlay') is not supported")
        verified: bytes | None = None
        digest = src.bootstrap_digest
        if digest:
            verified = read_verified_bootstrap(src.bootstrap, digest)
            meta = open_bootstrap(verified)
        else:
            meta = open_bootstrap(src.bootstrap)
        with contextlib.ExitStack() as undo:  # closes what was opened if a step fails
            undo.callback(meta.close)
            fs_id = self.vfs.normalize(path)
            device = open_device(meta.blobs, cfg, id=fs_id, chunk_lookup=meta.chunk_record)
            undo.callback(device.close)
            fs = RafsFs(
                meta,
                device,
                FsOptions(
                    id=fs_id,
                    enable_xattr=cfg.enable_xattr,
                    iostats_files=cfg.iostats_files,
                    access_pattern=cfg.access_pattern,
                    latest_read_files=cfg.latest_read_files,
                ),
            )
            undo.pop_all()
        return ImageMount(
            fs_id,
            os.path.abspath(src.bootstrap),
            cfg,
            fs,
            device,
            list(src.prefetch_files) if src.prefetch_files else None,
            self.fuse,
            bootstrap_digest=digest.strip().lower() if digest else "",
            verified=verified,
        )

    def _start_prefetch(self, im: ImageMount) -> None:
        pf = im.config.fs_prefetch
        if not pf.enable:
            if im.prefetch_files:
                log.info(
                    "%s: --prefetch-files given but fs_prefetch.enable is false; not prefetching",
                    im.path,
                )
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

    def _settled(self, path: str, mounted: bool) -> str:
        """``path`` normalized, if no request is loading it and it is ``mounted`` or not."""
        path = self.vfs.normalize(path)
        if path in self._loading:
            raise StateError(f"{path} is being mounted by another request")
        if mounted and path not in self.images:
            raise NotFoundError(f"nothing is mounted at {path}")
        if not mounted and path in self.images:
            raise StateError(f"{path} is already mounted")
        return path

    @contextlib.contextmanager
    def _loaded(self, path: str, want_mounted: bool, src: ImageSource) -> Iterator[ImageMount]:
        """Claim ``path`` and open the image without the lock, then hold the lock while the
        caller attaches it (an error closes it); then the image is recorded and prefetches."""
        with self._lock:
            path = self._settled(path, want_mounted)
            self._loading.add(path)
        try:
            im = self.open_image(path, src)
            with self._lock:
                try:
                    if self._exit.is_set():
                        raise StateError("the daemon is exiting")
                    yield im
                except BaseException:
                    im.close()
                    raise
                self.images[path] = im
                if not want_mounted and self.sm.state == DaemonState.INIT:
                    self.sm.fire(DaemonEvent.MOUNT)
                self._start_prefetch(im)
        finally:
            with self._lock:
                self._loading.discard(path)

    def mount(self, path: str, src: ImageSource, fs_driver: FsDriver | None = None) -> ImageMount:
        """Attach an image at ``path`` (``POST /api/v1/mount``).

        The bootstrap is read and the storage opened without the daemon lock (``path`` is
        reserved meanwhile), so a slow or large image never stalls other API requests.
        """
        with self._loaded(path, False, src) as im:
            kind, why = resolve_driver(
                fs_driver or im.config.fs_driver,
                self.opts.fs_driver,
                im.fs.version,
                self.opts.upgrade,
                self._needs_fuse(im),
            )
            if kind == FsDriver.FUSEDEV:
                log.info("%s: fs_driver fusedev (%s)", im.path, why)
            im.driver = (self.erofs if kind == FsDriver.EROFS else self.fuse).attach(im)
        log.info(
            "mounted %s at %s (RAFS v%d, %d blobs)",
            src.bootstrap,
            im.path,
            im.fs.version,
            len(im.fs.meta.blobs),
        )
        return im

    def remount(self, path: str, src: ImageSource) -> ImageMount:
        """Replace the image at ``path`` (``PUT /api/v1/mount``); loads outside the lock."""
        with self._loaded(path, True, src) as im:
            old = self.images.get(im.path)
            if old is None:
                raise NotFoundError(f"nothing is mounted at {im.path}")
            im.driver = old.driver
            old.driver.replace(old, im)
        log.info("remounted %s at %s", src.bootstrap, im.path)
        return im

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
            path = self._settled(path, True)
            self.images[path].driver.detach(self.images[path])
            del self.images[path]
            log.info("unmounted %s", path)
        heap_trimmer().nudge()

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
        self._serve(s)
        if not s.wait_initialized(10):
            log.warning("the kernel has not sent FUSE INIT within 10 s")
        with self._lock:
            self.erofs.activate(list(self.images.values()))

    def _serve(self, s: FuseSession) -> None:
        self.vfs.notify_entry = s.notify_inval_entry
        self.vfs.notify_inode = s.notify_inval_inode
        self.session = s
        s.start()

    def handover(self) -> tuple[FuseSession, dict[str, Any], list[ImageMount]]:
        """For a fd hand-over (:mod:`.failover`): the live FUSE session, the VFS slot layout
        and the images, taken together under the lock."""
        with self._lock:
            s = self.session
            if s is None or s.device_fd < 0:
                raise NydusError("no FUSE session to hand over")
            return s, self.vfs.export_layout(), list(self.images.values())

    def adopt(
        self,
        images: list[dict[str, Any]],
        layout: dict[str, Any],
        resume: Callable[[RafsVfs], FuseSession],
    ) -> FuseSession:
        """Takeover (:mod:`.failover`): reopen ``images`` (path, bootstrap, config, ...) in the
        VFS slots of ``layout``, then serve the session ``resume`` makes for the VFS."""
        with self._lock:
            opened: list[ImageMount] = []
            try:
                for img in images:
                    opened.append(
                        self.open_image(
                            img["path"],
                            ImageSource(
                                img["bootstrap"],
                                img["config"],
                                img.get("prefetch_files"),
                                img.get("bootstrap_digest") or None,
                            ),
                        )
                    )
                by_path = {im.path: im for im in opened}
                self.vfs.import_layout(layout, {p: (im.fs, im.close) for p, im in by_path.items()})
            except BaseException:
                for im in opened:
                    im.close()
                raise
            self.images.update(by_path)
            s = resume(self.vfs)
            self._serve(s)
            return s

    def start(self) -> None:
        with self._lock:
            if self.sm.state == DaemonState.INIT:
                self.sm.fire(DaemonEvent.MOUNT)
            self.sm.fire(DaemonEvent.START)
            log.info("daemon state RUNNING")

    # ------------------------------------------------------------------ run / exit

    def _lost(self, path: str) -> None:
        """The kernel EROFS mount of ``path`` was removed from outside (see erofs_mode)."""
        if path == "/":
            log.info("the kernel EROFS mount of / was removed from outside: session ended")
            self.end_session("erofs mount removed")
            return
        try:
            self.umount(path)
        except Exception as e:  # already gone (a concurrent DELETE): nothing left to do
            log.info("%s: detaching after the external unmount: %s", path, e)

    def request_exit(self, reason: str = "") -> None:
        if not self._exit.is_set():
            log.info("exit requested%s", f" ({reason})" if reason else "")
        self._exit.set()

    def wait(self, poll: float = 0.5) -> None:
        """Until an exit is requested or the FUSE session ends (unmounted from outside). The
        heap's free memory is handed back on the way once it has stayed free (HeapTrimmer)."""
        trimmer = heap_trimmer()
        while not self._exit.wait(poll):
            gone = trimmer.tick(time.monotonic())
            if gone >= 1 << 20:
                log.info(
                    "heap: %.0f MiB of free memory handed back (resident now %.0f MiB)",
                    gone / 2**20,
                    resident() / 2**20,
                )
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
        self.erofs.stop()
        with self._lock:  # the VFS does not own kernel EROFS images: close them here
            unowned = [im for im in self.images.values() if im.driver is self.erofs]
        for im in unowned:
            try:
                im.close()
            except Exception:
                log.exception("closing %s", im.path)
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
                "package_ver": __version__,
                "git_commit": "",
                "build_time": "",
                "profile": "release",
                "rustc": f"python {sys.version.split()[0]}",
            },
            "id": self.id,
            "supervisor": self.opts.supervisor,
            "state": self.sm.state.value,
            "mountpoint": self.opts.mountpoint,
            "backend_collection": backends,
            "fs_driver_default": self.opts.fs_driver,
            **self.erofs.manager.info(),
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
