"""The nydusd daemon manager: the :class:`~..snapshots.mounter.NydusMounter` of
``containerd-nydus-grpc``.

An *image* (RAFS instance) is one bootstrap file, shared by every container snapshot made from
it; it is identified by its bootstrap snapshot's id (``<root>/snapshots/<N>/fs/image/image.boot``
gives image ``N``). What serves it depends on the daemon mode:

- ``dedicated``: one ``nydusd --bootstrap <image.boot>`` per image, mounted at
  ``<root>/mnt/<N>``, which is the image's lower dir;
- ``shared``: one ``nydusd`` (no bootstrap) with its FUSE root at ``<root>/mnt/shared``; each
  image is attached with ``POST /api/v1/mount?mountpoint=/<N>`` and its lower dir is
  ``<root>/mnt/shared/<N>``.

Each image gets a nydusd config from the template (:mod:`.imageconfig`: registry host and repo
from the image reference, credentials, the shared cache ``work_dir``), written 0600 to
``<root>/daemons/<N>.config.json``. Daemons log to ``<root>/daemons/<id>.log`` and answer on an
API socket in ``<root>/sockets`` (or a short directory under ``/run`` when that path would be too
long for a unix socket). A daemon starts in the warm spare nydusd kept ahead (:mod:`.spare`,
unless ``nydusd_standby`` is off), which has done its imports already.

State that must survive a snapshotter restart -- daemons (pid, API socket, mount point) and
images (bootstrap, reference, the snapshot ids using it) -- is written atomically to
``<root>/daemons/state.json`` after every change. Daemons run in their own session and outlive
the snapshotter; at start-up :meth:`DaemonManager.recover` adopts every recorded daemon that is
still RUNNING (checked by pid, command line and API), restores those that are not, and releases
images no snapshot uses any more.

Supervision: a watcher thread checks every daemon each ``daemon_check_interval`` seconds, and
:meth:`mount` checks the one it needs. A dead daemon is restored per ``recover_policy``:
``restart`` detaches its dead mount and starts a new daemon on the same mount point (shared
mode: every image is attached again), so new containers work and the lower dirs recorded in
containerd's mounts stay valid; ``failover`` first tries to hand the FUSE connection the
snapshotter holds (:mod:`.supervisor`) to a new ``nydusd --upgrade``, so running containers
keep reading, and falls back to ``restart``; ``none`` leaves it dead (until a new container
needs it). A daemon serving kernel EROFS mounts (``fs_driver`` erofs) is always restored by
restart: the manager records its blob fs (``GET /api/v1/daemon``) at mount time, and before the
new daemon starts, the stale EROFS mounts, the dead FUSE mount and the dead blob fs are detached
lazily; its FUSE fd is not held, since a takeover could not bring its EROFS mounts back.

Release: :meth:`umount` drops a snapshot's reference; the last one stops a dedicated daemon (or
detaches the image from the shared daemon, which keeps running). :meth:`collect_garbage`
deletes cache files of blobs no remaining image uses (:mod:`.cachegc`).

Threading contract: every public method may be called from any thread. A re-entrant lock per
image and per daemon serializes slow work on one of them (start, wait, stop), taken in that
order; a short manager lock guards the maps and the state file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...atomicwrite import write_atomic
from ...credentials import private_dir
from ...daemon.client import ApiClientError
from ...errors import ConfigError, NydusError
from ...format.safejson import parse_json_object
from ..config import SnapshotterConfig
from ..containerd.errdefs import DaemonError
from ..snapshots.mounter import MountRequest, NydusMounter, RecoveredMount
from . import cachegc
from .imageconfig import DEFAULT_TEMPLATE, check_template, image_config
from .process import DaemonProcess, log_tail
from .spare import Spares
from .supervisor import FdSupervisor

__all__ = ["DaemonManager", "ImageMetrics", "ImageRecord", "resolve_nydusd"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
SHARED_ID = "shared"
_SOCK_MAX = 100  # bytes; sun_path holds 108 with the NUL
_RUN_SOCK_DIR = Path("/run/nydus-snapshotter")
_BOOT_IN_SNAPSHOT = re.compile(r"/snapshots/(\d+)/fs/")


def resolve_nydusd(path: str) -> str:
    """The nydusd to run for ``--nydusd-path``.

    A name is looked up on PATH; if neither it nor the given path exists, this package's own
    ``nydusd`` beside the running interpreter is used (with a warning): the seed article's
    ``--nydusd-path /usr/local/bin/nydusd`` then works on a machine where nydus-py lives in a
    virtualenv.
    """
    found = shutil.which(path)
    if found:
        return found
    ours = Path(sys.executable).parent / "nydusd"
    if ours.is_file() and os.access(ours, os.X_OK):
        if path not in ("nydusd", str(ours)):
            log.warning("--nydusd-path %s: not found; using this package's %s", path, ours)
        return str(ours)
    raise ConfigError(
        f"--nydusd-path {path}: no such executable (and none beside {sys.executable})"
    )


@dataclass
class ImageRecord:
    """One image served by a daemon."""

    id: str
    bootstrap: str
    image_ref: str | None
    daemon_id: str
    lower_dir: str
    config_path: str
    snapshots: list[str] = field(default_factory=list)
    # the bootstrap's recorded sha256, passed to nydusd at every mount ("" when unknown). Kept
    # in state.json under "bootstrap_digests", not in the image entries, which an older
    # snapshotter would refuse (it builds records from every key of an entry)
    bootstrap_digest: str = field(default="", compare=False)

    @property
    def fs_id(self) -> str:
        """The image's mount path inside its daemon (its metrics id)."""
        return "/" if self.daemon_id == self.id else f"/{self.id}"


@dataclass
class ImageMetrics:
    image_id: str
    image_ref: str
    daemon_id: str
    fetched_bytes: int | None  # backend read_amount_total
    read_bytes: int | None  # FUSE data_read


class DaemonManager(NydusMounter):
    """Starts, supervises and stops nydusd for the snapshotter (see the module docstring)."""

    def __init__(self, config: SnapshotterConfig, *, start_watcher: bool = True) -> None:
        if config.daemon_mode not in ("dedicated", "shared"):
            raise ConfigError(f"daemon mode {config.daemon_mode!r} has no daemon manager")
        self.cfg = config
        self.mode = config.daemon_mode
        self.policy = config.recover_policy
        self.template: dict[str, Any] = dict(config.nydusd_config) or dict(DEFAULT_TEMPLATE)
        if config.fs_driver and "fs_driver" not in self.template:
            self.template["fs_driver"] = config.fs_driver
        check_template(self.template)
        self.root = config.root
        self.cache_dir = config.effective_cache_dir
        self.state_dir = self.root / "daemons"
        self.mnt_dir = self.root / "mnt"
        private_dir(self.root)  # configs and state name registries and may carry credentials
        private_dir(self.state_dir)
        for d in (self.mnt_dir, self.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.sock_dir = self._socket_dir()
        self.nydusd = resolve_nydusd(config.nydusd_path)
        self.spares = Spares(
            self.nydusd, self.state_dir / "standby.log", enabled=config.nydusd_standby
        )
        self.log_level = "debug" if config.log_level in ("trace", "debug") else "info"
        self.supervisor = FdSupervisor()
        self.daemons: dict[str, DaemonProcess] = {}
        self.images: dict[str, ImageRecord] = {}
        self.restarts = 0
        self.gc_freed_bytes = 0
        self.gc_deleted_blobs = 0
        self._lock = threading.RLock()
        self._keyed: dict[str, threading.RLock] = {}
        self._gc_lock = threading.Lock()
        self._recovered = threading.Event()
        self._stop = threading.Event()
        self._load_state()
        self._watcher: threading.Thread | None = None
        self.spares.start()
        if start_watcher and config.daemon_check_interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="nydusd-watcher", daemon=True)
            self._watcher.start()

    # -- paths and ids ---------------------------------------------------------------------------

    def _socket_dir(self) -> Path:
        d = self.root / "sockets"
        if len(os.fsencode(str(d))) + 24 > _SOCK_MAX:
            h = hashlib.sha256(os.fsencode(str(self.root))).hexdigest()[:12]
            d = _RUN_SOCK_DIR / h
            log.info("socket dir %s (the root's path is too long for unix sockets)", d)
        private_dir(d)
        return d

    @staticmethod
    def image_id(bootstrap: Path) -> str:
        """The image's id: its bootstrap snapshot's number, else a digest of the path."""
        m = _BOOT_IN_SNAPSHOT.search(str(bootstrap))
        if m:
            return m.group(1)
        return "b" + hashlib.sha256(os.fsencode(str(bootstrap))).hexdigest()[:15]

    def _new_daemon(self, daemon_id: str, mode: str) -> DaemonProcess:
        mnt = self.mnt_dir / daemon_id
        return DaemonProcess(
            id=daemon_id,
            mode=mode,
            mountpoint=str(mnt),
            apisock=str(self.sock_dir / f"{daemon_id}.sock"),
            log_file=str(self.state_dir / f"{daemon_id}.log"),
        )

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        with self._lock:
            lk = self._keyed.setdefault(key, threading.RLock())
        with lk:
            yield

    # -- persistence -----------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    def _load_state(self) -> None:
        try:
            doc = parse_json_object(self.state_path.read_bytes(), "daemon state")
        except FileNotFoundError:
            return
        except (OSError, NydusError) as e:
            log.error("daemon state %s unreadable (%s); starting without it", self.state_path, e)
            return
        if doc.get("version") != STATE_VERSION:
            log.error(
                "daemon state %s has version %s; ignored", self.state_path, doc.get("version")
            )
            return
        for d in doc.get("daemons", []):
            dp = DaemonProcess.from_json(d)
            self.daemons[dp.id] = dp
        names = set(ImageRecord.__dataclass_fields__)
        digests = doc.get("bootstrap_digests") or {}
        for i in doc.get("images", []):
            rec = ImageRecord(**{k: v for k, v in i.items() if k in names})
            digest = digests.get(rec.id) if isinstance(digests, dict) else None
            rec.bootstrap_digest = digest if isinstance(digest, str) else ""
            self.images[rec.id] = rec
        self.restarts = int(doc.get("restarts", 0))

    def _save(self) -> None:
        with self._lock:
            doc = {
                "version": STATE_VERSION,
                "daemons": [d.to_json() for d in self.daemons.values()],
                "images": [
                    {k: v for k, v in asdict(r).items() if k != "bootstrap_digest"}
                    for r in self.images.values()
                ],
                "bootstrap_digests": {
                    r.id: r.bootstrap_digest for r in self.images.values() if r.bootstrap_digest
                },
                "restarts": self.restarts,
            }
            write_atomic(self.state_path, json.dumps(doc, indent=1).encode(), 0o600)

    # -- starting and restoring daemons ----------------------------------------------------------

    def _start(self, d: DaemonProcess) -> None:
        """Start ``d`` afresh (a dead predecessor's mount is detached first)."""
        if self.policy == "failover":
            d.supervisor = str(self.sock_dir / f"{d.id}.sup")
            self.supervisor.listen(d.id, d.supervisor)
        else:
            d.supervisor = ""
        d.release_mount()
        d.spawn(self.nydusd, self.log_level, spares=self.spares)
        try:
            d.wait_state("RUNNING", self.cfg.daemon_start_timeout)
        except DaemonError:
            d.kill()
            raise
        d.note_mounts()
        self._collect(d)

    def _collect(self, d: DaemonProcess) -> None:
        """failover: have ``d`` hand us its FUSE fd and state (failure is not fatal)."""
        if self.policy != "failover" or not d.supervisor:
            return
        if d.erofs:
            # Its kernel EROFS mounts read through its own blob fs, which no FUSE takeover
            # keeps: a held (older) state would restore a daemon without them.
            if self.supervisor.has_state(d.id):
                self.supervisor.forget(d.id)
            log.info(
                "nydusd %s serves kernel EROFS mounts: it will be restored by restart, "
                "not failover",
                d.id,
            )
            return
        try:
            self.supervisor.listen(d.id, d.supervisor)
            self.supervisor.collect(d.id, lambda: d.client.put("/api/v1/daemon/fuse/sendfd"))
        except (OSError, NydusError) as e:
            log.warning("nydusd %s: cannot keep its FUSE fd for failover: %s", d.id, e)

    def _takeover(self, d: DaemonProcess) -> None:
        """failover: a new ``nydusd --upgrade`` takes the held FUSE connection over."""
        d.spawn(self.nydusd, self.log_level, upgrade=True, spares=self.spares)
        try:
            d.wait_state("INIT", self.cfg.daemon_start_timeout)
            self.supervisor.give_back(d.id, lambda: d.client.put("/api/v1/daemon/fuse/takeover"))
            d.client.start()
            d.wait_state("RUNNING", self.cfg.daemon_start_timeout)
        except (OSError, NydusError) as e:
            d.kill(keep_mount=True)
            raise DaemonError(f"takeover by a new nydusd {d.id} failed: {e}") from e
        self._collect(d)

    def _restore(self, d: DaemonProcess, why: str) -> None:
        """Bring dead daemon ``d`` back with everything it served (caller holds its lock)."""
        log.warning(
            "nydusd %s (pid %d) %s; restoring it (recover policy %s). Log tail:\n%s",
            d.id,
            d.pid,
            why,
            self.policy,
            log_tail(d.log_file, 15),
        )
        if d.proc is not None:
            d.proc.poll()
        d.proc = None
        if self.policy == "failover" and d.erofs:
            log.warning(
                "nydusd %s serves kernel EROFS mounts, whose blob fs died with it: "
                "failover cannot keep them; restarting it instead",
                d.id,
            )
            self.supervisor.forget(d.id)
        elif self.policy == "failover" and self.supervisor.has_state(d.id):
            try:
                self._takeover(d)
                self.restarts += 1
                self._save()
                log.info("nydusd %s restored by failover (pid %d)", d.id, d.pid)
                return
            except DaemonError as e:
                log.warning("%s; restarting it instead", e)
                self.supervisor.forget(d.id)  # close the held connection: requests fail, not hang
        self._start(d)
        self.restarts += 1
        if d.mode == "shared":
            for rec in self._images_of(d.id):
                try:
                    self._attach(d, rec)
                except (OSError, NydusError) as e:
                    log.error("nydusd %s: cannot attach image %s again: %s", d.id, rec.id, e)
            d.note_mounts()
            self._collect(d)
        self._save()
        log.info("nydusd %s restored by restart (pid %d)", d.id, d.pid)

    def _ensure_running(self, d: DaemonProcess) -> None:
        """``d`` alive, or restored (caller holds its lock)."""
        if not d.alive():
            self._restore(d, "is not running")

    def _images_of(self, daemon_id: str) -> list[ImageRecord]:
        with self._lock:
            return [r for r in self.images.values() if r.daemon_id == daemon_id]

    def _attach(self, d: DaemonProcess, rec: ImageRecord) -> None:
        """shared: mount image ``rec`` in daemon ``d`` (``POST /api/v1/mount``)."""
        config = Path(rec.config_path).read_text()
        try:
            d.client.mount(
                rec.fs_id, rec.bootstrap, config, bootstrap_digest=rec.bootstrap_digest or None
            )
        except ApiClientError as e:
            raise DaemonError(f"nydusd {d.id} refused to mount image {rec.id}: {e}") from e
        deadline = time.monotonic() + 5
        while not os.path.isdir(rec.lower_dir):
            if time.monotonic() > deadline:
                raise DaemonError(f"{rec.lower_dir} did not appear after mounting image {rec.id}")
            time.sleep(0.02)

    def _shared_daemon(self) -> DaemonProcess:
        """The shared daemon, started if needed (caller holds its lock)."""
        d = self.daemons.get(SHARED_ID)
        if d is None:
            d = self._new_daemon(SHARED_ID, "shared")
            self._start(d)
            with self._lock:
                self.daemons[d.id] = d
            self._save()
        else:
            self._ensure_running(d)
        return d

    # -- NydusMounter ----------------------------------------------------------------------------

    def mount(self, request: MountRequest) -> Path:
        image_id = self.image_id(request.bootstrap_path)
        with self._locked(f"image:{image_id}"):
            with self._lock:
                rec = self.images.get(image_id)
            if rec is not None:
                d = self.daemons.get(rec.daemon_id)
                with self._locked(f"daemon:{rec.daemon_id}"):
                    if d is None:  # its daemon record was lost: serve it again
                        self._forget_image(rec)
                        rec = None
                    else:
                        self._ensure_running(d)
            if rec is None:
                rec = self._serve(
                    image_id,
                    request.bootstrap_path,
                    request.image_ref,
                    request.labels,
                    bootstrap_digest=request.bootstrap_digest,
                )
            with self._lock:
                if request.snapshot_id not in rec.snapshots:
                    rec.snapshots.append(request.snapshot_id)
            self._save()
            return Path(rec.lower_dir)

    def _serve(
        self,
        image_id: str,
        bootstrap: Path,
        image_ref: str | None,
        labels: Mapping[str, str],
        mode: str | None = None,
        bootstrap_digest: str | None = None,
    ) -> ImageRecord:
        """Start serving a new image (caller holds its image lock); nydusd checks the bootstrap
        against ``bootstrap_digest`` when there is one."""
        mode = mode or self.mode
        cfg, creds = image_config(
            self.template, image_ref, labels, self.cache_dir, self.cfg.docker_config
        )
        config_path = self.state_dir / f"{image_id}.config.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # an older file may have had a looser mode
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=1)
        log.info(
            "image %s (%s): %s daemon, registry credentials from %s",
            image_id,
            image_ref or "reference unknown",
            mode,
            creds,
        )
        daemon_id = image_id if mode == "dedicated" else SHARED_ID
        lower = (
            self.mnt_dir / image_id if mode == "dedicated" else self.mnt_dir / SHARED_ID / image_id
        )
        rec = ImageRecord(
            image_id,
            str(bootstrap),
            image_ref,
            daemon_id,
            str(lower),
            str(config_path),
            bootstrap_digest=bootstrap_digest or "",
        )
        if not bootstrap_digest:
            log.info(
                "image %s: no recorded bootstrap digest (a snapshot made by an older "
                "snapshotter); nydusd mounts %s unchecked",
                image_id,
                bootstrap,
            )
        try:
            with self._locked(f"daemon:{daemon_id}"):
                if mode == "dedicated":
                    d = self._new_daemon(image_id, "dedicated")
                    d.bootstrap, d.config_path = str(bootstrap), str(config_path)
                    d.bootstrap_digest = bootstrap_digest or ""
                    self._start(d)
                    with self._lock:
                        self.daemons[d.id] = d
                else:
                    d = self._shared_daemon()
                    self._attach(d, rec)
                    d.note_mounts()
                    self._collect(d)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                config_path.unlink()
            raise
        with self._lock:
            self.images[image_id] = rec
        return rec

    def umount(self, snapshot_id: str) -> None:
        with self._lock:
            image_id = next(
                (r.id for r in self.images.values() if snapshot_id in r.snapshots), None
            )
        if image_id is None:
            log.debug("umount %s: not mounted", snapshot_id)
            return
        with self._locked(f"image:{image_id}"):
            with self._lock:
                rec = self.images.get(image_id)
                if rec is None or snapshot_id not in rec.snapshots:
                    return
                rec.snapshots.remove(snapshot_id)
                last = not rec.snapshots
            if last:
                self._release(rec)
            self._save()

    def _release(self, rec: ImageRecord) -> None:
        """Stop serving image ``rec`` (caller holds its image lock)."""
        d = self.daemons.get(rec.daemon_id)
        with self._locked(f"daemon:{rec.daemon_id}"):
            if d is not None and d.mode == "dedicated":
                d.stop()
                self.supervisor.forget(d.id)
                with self._lock:
                    self.daemons.pop(d.id, None)
                with contextlib.suppress(OSError):
                    os.rmdir(d.mountpoint)
            elif d is not None and d.alive():
                try:
                    d.client.umount(rec.fs_id)
                except ApiClientError as e:
                    if e.status != 404:
                        log.warning("nydusd %s: umount of image %s: %s", d.id, rec.id, e)
                except (OSError, NydusError) as e:
                    log.warning("nydusd %s: umount of image %s: %s", d.id, rec.id, e)
                self._forget_image(rec)
                self._collect(d)
                log.info("image %s detached from nydusd %s", rec.id, d.id)
                return
        self._forget_image(rec)
        log.info("image %s released", rec.id)

    def _forget_image(self, rec: ImageRecord) -> None:
        with self._lock:
            self.images.pop(rec.id, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec.config_path)

    # -- recovery --------------------------------------------------------------------------------

    def recover(self, mounts: Sequence[RecoveredMount]) -> None:
        """Adopt or restore what the mounts recorded before our restart need; release the rest."""
        try:
            self._recover(mounts)
        finally:
            self._save()
            self._recovered.set()

    def _recover(self, mounts: Sequence[RecoveredMount]) -> None:
        wanted: dict[str, list[RecoveredMount]] = {}
        for m in mounts:
            wanted.setdefault(self.image_id(m.bootstrap_path), []).append(m)
        # images nobody uses any more; the others take the digest the snapshots recorded
        for rec in list(self.images.values()):
            refs = [m.snapshot_id for m in wanted.get(rec.id, [])]
            recorded = next(
                (m.bootstrap_digest for m in wanted.get(rec.id, []) if m.bootstrap_digest), None
            )
            if recorded:
                rec.bootstrap_digest = recorded
                d0 = self.daemons.get(rec.daemon_id)
                if d0 is not None and d0.mode == "dedicated":
                    d0.bootstrap_digest = recorded
            with self._locked(f"image:{rec.id}"):
                rec.snapshots = refs
                if not refs:
                    log.info("image %s: no snapshot uses it any more", rec.id)
                    self._release(rec)
        # daemons without images (a dedicated daemon whose image is gone; a lost record)
        for d in list(self.daemons.values()):
            if d.mode == "dedicated" and not self._images_of(d.id):
                with self._locked(f"daemon:{d.id}"):
                    d.stop()
                    with self._lock:
                        self.daemons.pop(d.id, None)
        # adopt or restore the daemons that serve images
        for d in list(self.daemons.values()):
            with self._locked(f"daemon:{d.id}"):
                if d.adopt():
                    log.info("adopted running nydusd %s (pid %d)", d.id, d.pid)
                    if self.policy == "failover":
                        d.supervisor = d.supervisor or str(self.sock_dir / f"{d.id}.sup")
                        self._collect(d)
                    if d.mode == "shared":
                        self._reattach_missing(d)
                elif self._images_of(d.id):
                    try:
                        self._restore(d, "is gone after the snapshotter restarted")
                    except NydusError as e:
                        log.error("cannot restore nydusd %s: %s", d.id, e)
                else:  # a shared daemon that served nothing: started again when needed
                    d.release_mount()
                    with self._lock:
                        self.daemons.pop(d.id, None)
        # mounts we have no record of (state file lost): serve them again
        for image_id, ms in wanted.items():
            with self._lock:
                known = image_id in self.images
            if known:
                continue
            m = ms[0]
            mode = "shared" if Path(m.lower_dir).parent.name == SHARED_ID else "dedicated"
            with self._locked(f"image:{image_id}"):
                try:
                    rec = self._serve(
                        image_id,
                        m.bootstrap_path,
                        m.image_ref,
                        {},
                        mode,
                        bootstrap_digest=m.bootstrap_digest,
                    )
                except NydusError as e:
                    log.error("cannot serve recovered image %s again: %s", image_id, e)
                    continue
                rec.snapshots = [x.snapshot_id for x in ms]
                if rec.lower_dir != str(m.lower_dir):
                    log.error(
                        "image %s: lower dir is now %s, containers expect %s",
                        image_id,
                        rec.lower_dir,
                        m.lower_dir,
                    )

    def _reattach_missing(self, d: DaemonProcess) -> None:
        try:
            mounted = set((d.client.info().get("backend_collection") or {}).keys())
        except (OSError, NydusError) as e:
            log.warning("nydusd %s: cannot list its mounts: %s", d.id, e)
            return
        for rec in self._images_of(d.id):
            if rec.fs_id not in mounted:
                try:
                    self._attach(d, rec)
                except (OSError, NydusError) as e:
                    log.error("nydusd %s: cannot attach image %s: %s", d.id, rec.id, e)

    # -- supervision -----------------------------------------------------------------------------

    def _watch(self) -> None:
        warned: set[tuple[str, int]] = set()
        backoff: dict[str, tuple[int, float]] = {}  # daemon id -> (failures, next attempt)
        while not self._stop.wait(self.cfg.daemon_check_interval):
            if not self._recovered.is_set():
                continue
            for d in self._daemon_list():
                if self._stop.is_set():
                    return
                if d.alive():
                    backoff.pop(d.id, None)
                    continue
                if self.policy == "none":
                    if (d.id, d.pid) not in warned:
                        warned.add((d.id, d.pid))
                        log.warning("nydusd %s (pid %d) died (recover policy none)", d.id, d.pid)
                    continue
                failures, when = backoff.get(d.id, (0, 0.0))
                if time.monotonic() < when:
                    continue
                try:
                    self._restore_if_dead(d)
                    backoff.pop(d.id, None)
                except Exception:
                    delay = min(60.0, 2.0**failures)
                    backoff[d.id] = (failures + 1, time.monotonic() + delay)
                    log.exception("restoring nydusd %s failed; next attempt in %.0fs", d.id, delay)

    def check_now(self) -> None:
        """Restore dead daemons now (tests; the watcher does it periodically)."""
        for d in self._daemon_list():
            self._restore_if_dead(d)

    def _restore_if_dead(self, d: DaemonProcess) -> None:
        with self._locked(f"daemon:{d.id}"):
            if self.daemons.get(d.id) is d and not d.alive():
                self._restore(d, "died")

    def _daemon_list(self) -> list[DaemonProcess]:
        with self._lock:
            return list(self.daemons.values())

    # -- GC, metrics, shutdown -------------------------------------------------------------------

    def collect_garbage(self, live_bootstraps: Sequence[Path]) -> None:
        with self._lock:
            served = [Path(r.bootstrap) for r in self.images.values()]
        with self._gc_lock:
            res = cachegc.collect_garbage(self.cache_dir, [*live_bootstraps, *served])
            self.gc_freed_bytes += res.freed_bytes
            self.gc_deleted_blobs += len(res.deleted_blobs)

    def image_metrics(self) -> list[ImageMetrics]:
        """Per image: bytes its daemon fetched from the backend and bytes read through FUSE."""
        with self._lock:
            recs = [(r, self.daemons.get(r.daemon_id)) for r in self.images.values()]
        out = []
        for rec, d in recs:
            fetched = read = None
            if d is not None and d.alive():
                client = d.client
                client.timeout = 2.0
                with contextlib.suppress(OSError, NydusError, ValueError, TypeError):
                    fetched = int(client.metrics("backend", rec.fs_id)["read_amount_total"])
                with contextlib.suppress(OSError, NydusError, ValueError, TypeError):
                    read = int(client.metrics("", rec.fs_id)["data_read"])
            out.append(ImageMetrics(rec.id, rec.image_ref or "", rec.daemon_id, fetched, read))
        return out

    def daemon_counts(self) -> dict[str, int]:
        """Live daemons per mode."""
        counts = {"dedicated": 0, "shared": 0}
        for d in self._daemon_list():
            if d.alive():
                counts[d.mode] = counts.get(d.mode, 0) + 1
        return counts

    def close(self) -> None:
        """Stop watching (daemons keep running: containers use them)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(10)
        self._save()
        self.supervisor.close()
        self.spares.close()
        if self.sock_dir.parent == _RUN_SOCK_DIR:  # ours alone: remove it when nothing is left
            with contextlib.suppress(OSError):
                self.sock_dir.rmdir()
                _RUN_SOCK_DIR.rmdir()  # and the shared parent, when no other root uses it

    def shutdown_all(self) -> None:
        """Stop every daemon (tests and tools; the snapshotter itself never does this)."""
        for d in self._daemon_list():
            with self._locked(f"daemon:{d.id}"):
                d.stop()
                self.supervisor.forget(d.id)
        with self._lock:
            self.daemons.clear()
            for rec in list(self.images.values()):
                self._forget_image(rec)
        self._save()
