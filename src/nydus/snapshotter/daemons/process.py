"""One ``nydusd`` process the snapshotter runs: start, wait for RUNNING, watch, adopt, stop.

A :class:`DaemonProcess` is a record (persisted by the daemon manager as JSON) plus, while this
snapshotter process started it, the :class:`subprocess.Popen` handle:

- :meth:`spawn` starts ``nydusd`` in its own session (so neither a signal to the snapshotter's
  process group nor the snapshotter's exit reaches it: containers keep their file systems),
  with ``--apisock``, ``--log-file`` and stdout/stderr appended to the same log file;
- :meth:`wait_state` polls ``GET /api/v1/daemon`` until the wanted state, and fails fast with
  the log's tail when the process exits first or the time is up;
- :meth:`alive` tells a live daemon from a dead one without being its parent (after a
  snapshotter restart the daemons are adopted from their recorded pid): the pid must exist, not
  be a zombie, and its command line must name this daemon's API socket (pid reuse);
- :meth:`stop` asks the daemon to exit (``PUT /api/v1/daemon/exit``), then SIGTERM, then
  SIGKILL, and detaches a mount left behind;
- :meth:`release_mount` (before a dead daemon is restarted, and after a stop) aborts the dead
  daemon's FUSE connections still up (:mod:`nydus.fusectl`: one stuck in the kernel cannot
  close them), then detaches its mounts.

Threading: a record is owned by the daemon manager, which serializes operations on one daemon;
:meth:`alive` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ... import fusectl
from ...config import FsDriver
from ...credentials import private_file
from ...daemon.client import NydusdClient
from ...daemon.erofs_mode import BLOBFS_BASE
from ...errors import NydusError
from ...fusectl import host_path
from ...kernel_mount import umount
from ..containerd.errdefs import DaemonError
from ..snapshots.fsutil import mount_table
from .spare import Spares

__all__ = ["DaemonProcess", "log_tail"]

log = logging.getLogger(__name__)


def log_tail(path: str | os.PathLike[str], lines: int = 25) -> str:
    """The last ``lines`` lines of a log file ('' if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _is_mounted(path: str) -> bool:
    """Whether ``path`` is a mount point, without touching it: a dead FUSE daemon's mount
    answers ENOTCONN, and one whose connection a supervisor holds would not answer at all."""
    return host_path(path) in mount_table()


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ')'
    rest = stat.rpartition(")")[2].split()
    return rest[0] if rest else "?"


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


@dataclass
class DaemonProcess:
    """A nydusd the snapshotter runs (see the module docstring)."""

    id: str
    mode: str  # "dedicated" or "shared"
    mountpoint: str
    apisock: str
    log_file: str
    supervisor: str = ""
    bootstrap: str = ""  # dedicated: the image served at /
    bootstrap_digest: str = ""  # dedicated: its recorded sha256 ("" for older snapshots)
    config_path: str = ""  # dedicated: its config file
    blobfs: str = ""  # kernel EROFS mode: the daemon's blob fs (``GET /api/v1/daemon``)
    erofs: bool = False  # whether it serves any kernel EROFS mount
    pid: int = 0
    starts: int = 0
    started_at: float = 0.0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    # -- persistence ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "proc"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DaemonProcess:
        names = set(cls.__dataclass_fields__) - {"proc"}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def client(self) -> NydusdClient:
        return NydusdClient(self.apisock, timeout=10.0)

    # -- starting ------------------------------------------------------------------------------

    def command(self, nydusd: str, log_level: str, *, upgrade: bool = False) -> list[str]:
        cmd = [
            nydusd,
            "--mountpoint", self.mountpoint,
            "--apisock", self.apisock,
            "--id", self.id,
            "--log-file", self.log_file,
            "--log-level", log_level,
        ]  # fmt: skip
        if self.supervisor:
            cmd += ["--supervisor", self.supervisor]
        if upgrade:
            cmd.append("--upgrade")
        else:
            if self.config_path:
                cmd += ["--config", self.config_path]
            if self.bootstrap:
                cmd += ["--bootstrap", self.bootstrap]
                if self.bootstrap_digest:
                    cmd += ["--bootstrap-digest", self.bootstrap_digest]
        return cmd

    def spawn(
        self, nydusd: str, log_level: str, *, upgrade: bool = False, spares: Spares | None = None
    ) -> None:
        """Start the process (returns at once; see :meth:`wait_state`), in a ready spare of
        ``spares`` when there is one."""
        Path(self.mountpoint).parent.mkdir(parents=True, exist_ok=True)
        # Not Path.mkdir(exist_ok=True): on EEXIST it stats the path, and a mount point whose
        # FUSE connection a supervisor holds for a takeover would not answer until after it.
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.mountpoint)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.apisock)
        cmd = self.command(nydusd, log_level, upgrade=upgrade)
        private_file(self.log_file)  # 0600: nydusd logs name hosts and images
        with open(self.log_file, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {cmd}\n".encode())
            out.flush()
            proc = spares.take(cmd, out.fileno()) if spares is not None else None
            how = "in a warm spare, " if proc is not None else ""
            if proc is None:
                try:
                    proc = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        close_fds=True,
                    )
                except OSError as e:
                    raise DaemonError(f"cannot start nydusd ({nydusd}): {e}") from e
        self.proc = proc
        self.pid = proc.pid
        self.starts += 1
        self.started_at = time.time()
        log.info("nydusd %s started %spid %d: %s", self.id, how, self.pid, " ".join(cmd))

    def wait_state(self, want: str, timeout: float) -> None:
        """Until ``GET /api/v1/daemon`` says ``want``; :class:`DaemonError` otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        client = NydusdClient(self.apisock, timeout=2.0)
        while True:
            if not self.alive():
                raise DaemonError(
                    f"nydusd {self.id} (pid {self.pid}) exited before reaching {want}"
                    f"{self._exit_text()}; log {self.log_file}:\n{log_tail(self.log_file)}"
                )
            try:
                last = client.state()
                if last == want:
                    return
            except (OSError, NydusError) as e:
                last = f"no answer ({e})"
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"nydusd {self.id} (pid {self.pid}) not {want} after {timeout:.0f}s "
                    f"(last: {last}); log {self.log_file}:\n{log_tail(self.log_file)}"
                )
            time.sleep(0.02)

    def _exit_text(self) -> str:
        if self.proc is not None and self.proc.returncode is None:
            # a zombie is reaped at once; one with a thread stuck in the kernel is not
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(0.5)
        if self.proc is not None and self.proc.returncode is not None:
            rc = self.proc.returncode
            return f" with status {rc}" if rc >= 0 else f" killed by signal {-rc}"
        return ""

    # -- watching ------------------------------------------------------------------------------

    def alive(self) -> bool:
        if self.proc is not None:
            # not reaped yet, yet dead: a process whose main thread exited while another
            # thread is stuck in the kernel (killed, it cannot finish exiting until its FUSE
            # connections are aborted: release_mount does that)
            return self.proc.poll() is None and _proc_state(self.pid) not in ("Z", "X", "x")
        if self.pid <= 0:
            return False
        state = _proc_state(self.pid)
        if state is None or state in ("Z", "X", "x"):
            return False
        return self.apisock in _cmdline(self.pid)

    def adopt(self) -> bool:
        """Whether the recorded pid is this daemon, alive and RUNNING (after our restart)."""
        if not self.alive():
            return False
        try:
            return self.client.state() == "RUNNING"
        except (OSError, NydusError):
            return False

    # -- stopping ------------------------------------------------------------------------------

    def _signal(self, sig: int) -> None:
        if self.pid > 0 and self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.02)
        return not self.alive()

    def kill(self, *, keep_mount: bool = False) -> None:
        """SIGKILL and reap (no goodbye: for a daemon that failed to start)."""
        self._signal(signal.SIGKILL)
        self._wait_gone(5.0)
        if self.proc is not None:
            self.proc.poll()
        if not keep_mount:
            self.release_mount()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the daemon to exit, then insist; detach its mount if it is still there."""
        if self.alive():
            try:
                NydusdClient(self.apisock, timeout=2.0).exit()
            except (OSError, NydusError) as e:
                log.debug("nydusd %s: exit request failed (%s); sending SIGTERM", self.id, e)
                self._signal(signal.SIGTERM)
            if not self._wait_gone(timeout):
                log.warning("nydusd %s (pid %d) did not exit; SIGKILL", self.id, self.pid)
                self._signal(signal.SIGKILL)
                self._wait_gone(5.0)
        self.release_mount()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.apisock)
        log.info("nydusd %s stopped", self.id)

    def note_mounts(self) -> None:
        """Record whether the daemon serves kernel EROFS mounts and where its blob fs is, so a
        dead daemon's blob fs can be detached before a new one starts."""
        try:
            info = self.client.info()
        except (OSError, NydusError) as e:
            log.warning("nydusd %s: cannot read its mounts: %s", self.id, e)
            return
        backends = info.get("backend_collection") or {}
        self.erofs = any(b.get("fs_driver") == FsDriver.EROFS for b in backends.values())
        self.blobfs = info.get("blobfs") or self.blobfs

    def release_mount(self) -> None:
        """Detach what a dead daemon leaves: kernel EROFS mounts at or below its mount point
        (their blob files answer EIO) and its FUSE mount (ENOTCONN), then its blob fs.

        First its FUSE connections (the mount point's, any FUSE mount below it, the blob fs)
        are aborted through fusectl if still up: a daemon that died with a thread stuck in
        the kernel keeps them open, its readers wait, and so would ``umount -l`` and the
        process itself, until then. (Never called while a supervisor holds the connection
        for a takeover.)"""
        if self.proc is not None:
            self.proc.poll()
        blobfs = self.blobfs or (
            os.path.join(BLOBFS_BASE, str(self.pid), "blobs") if self.pid > 0 else ""
        )
        for m in fusectl.abort_mounts([self.mountpoint] + ([blobfs] if blobfs else []), below=True):
            log.warning(
                "nydusd %s (pid %d): aborted FUSE connection %d of %s, still up after "
                "the daemon died",
                self.id,
                self.pid,
                m.conn,
                m.mountpoint,
            )
        if self.proc is not None:
            self.proc.poll()
        base = os.path.join(
            os.path.realpath(os.path.dirname(self.mountpoint)), os.path.basename(self.mountpoint)
        )
        # lazily, deepest first, never stat'ing a path below a possibly held FUSE mount
        for mp in sorted(
            {m for m in mount_table() if m.startswith(base + "/")},
            key=lambda m: m.count("/"),
            reverse=True,
        ):
            with contextlib.suppress(OSError):
                umount(mp, lazy=True)
                log.info("detached %s", mp)
        self._release(self.mountpoint)
        if self.blobfs:
            self._release(self.blobfs)
            with contextlib.suppress(OSError):  # the daemon's /run/nydusd-blobfs/<pid>/blobs
                os.rmdir(self.blobfs)
                os.rmdir(os.path.dirname(self.blobfs))
            self.blobfs = ""

    def _release(self, mountpoint: str) -> None:
        for _ in range(3):
            if not _is_mounted(mountpoint):
                return
            try:
                umount(mountpoint, lazy=True)
                log.info("detached %s", mountpoint)
            except OSError as e:
                log.warning("cannot detach %s: %s", mountpoint, e)
                return
