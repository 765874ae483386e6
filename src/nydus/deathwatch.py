"""nydusd's death watcher: a small process that aborts the daemon's FUSE connections when the
daemon dies without the kernel doing it.

When a daemon exits, its ``/dev/fuse`` fds close and the kernel aborts its connections: readers
get ENOTCONN (EIO through kernel EROFS) at once. That needs the whole process to exit. A daemon
killed (SIGKILL, OOM) while one of its threads is in an uninterruptible wait in the kernel that
only the daemon itself could end -- a system call into its own FUSE mount whose request a worker
had read but not answered (mount(2) of a kernel EROFS image opening its blob files; in older
versions, a page pushed with FUSE_NOTIFY_STORE into a page a READ held locked, see
:mod:`nydus.daemon.blobdev`) -- never finishes exiting: its fds stay open, the connections stay
up with nobody serving them, and readers and ``umount -l`` hang. Nothing inside the process can
help (SIGKILL runs no code), so a process of its own does it, from outside, with fusectl
(:mod:`nydus.fusectl`).

The watcher (``python -m nydus.deathwatch <pid>``) is started by the daemon with the first
mount it guards, in a session of its own (a signal to the daemon's process group does not
reach it), and learns on its stdin which mounts to guard: ``+ <conn> <fstype> <mount point>``
after a mount, ``- <mount point>`` before a clean unmount. Every 100 ms it looks at the daemon:

- stdin at EOF (the daemon exited and its fds closed: the kernel aborted what was left) or the
  daemon no longer its parent: it exits, doing nothing;
- the daemon dying (its main thread a zombie while another thread lives on, or SIGKILL
  pending): for every guarded mount still in the mount table with the same connection id (so
  never a later mount that reused the number), it aborts the connection, logs one line on
  stderr (the daemon's), waits up to 10 s for the daemon to go, and exits.

Mounts handed to a supervisor for failover are not guarded (their connection must outlive the
daemon). ``NYDUSD_DEATH_WATCH=0`` in the environment turns the watcher off (a diagnostic knob:
the regression tests use it to show that the daemon itself no longer needs it).

Threading contract (daemon side): :func:`guard` and :func:`release` may be called from any
thread; one lock serializes them and the watcher's spawning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import subprocess
import sys
import threading
import time

from . import fusectl
from .singleflight import Once

__all__ = ["DeathWatch", "enabled", "guard", "release"]

log = logging.getLogger("nydus.deathwatch")

_POLL = 0.1  # s between looks at the daemon
_GONE_WAIT = 10.0  # s to wait for the daemon to go after aborting
_SIGKILL_BIT = 1 << 8  # signal 9 in a /proc pending-signal mask


def enabled() -> bool:
    return os.environ.get("NYDUSD_DEATH_WATCH", "1") != "0"


def _encode(path: str) -> str:
    return path.encode("utf-8", "surrogateescape").hex()


def _decode(text: str) -> str:
    return bytes.fromhex(text).decode("utf-8", "surrogateescape")


class DeathWatch:
    """The daemon's handle on its watcher process (started on the first :meth:`guard`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._guarded: dict[str, tuple[int, str]] = {}  # mount point -> (conn, fstype)

    def guard(self, mountpoint: str) -> int | None:
        """Have the watcher abort the FUSE connection mounted at ``mountpoint`` if the daemon
        dies. Returns the connection id, or None (no FUSE mount there, watcher off)."""
        if not enabled():
            return None
        path = fusectl.host_path(mountpoint)
        found = [m for m in fusectl.fuse_mounts() if m.mountpoint == path]
        if not found:
            log.warning("death watch: no FUSE mount at %s to guard", path)
            return None
        m = found[-1]  # the top one: what was just mounted
        with self._lock:
            self._guarded[path] = (m.conn, m.fstype)
            self._send(f"+ {m.conn} {m.fstype} {_encode(path)}\n")
        log.debug("death watch guards %s (FUSE connection %d)", path, m.conn)
        return m.conn

    def release(self, mountpoint: str) -> None:
        """Stop guarding ``mountpoint`` (before unmounting it cleanly)."""
        path = fusectl.host_path(mountpoint)
        with self._lock:
            if self._guarded.pop(path, None) is not None:
                self._send(f"- {_encode(path)}\n")

    @property
    def pid(self) -> int | None:
        p = self._proc
        return p.pid if p is not None and p.poll() is None else None

    def close(self) -> None:
        """End the watcher (EOF on its stdin): the daemon is exiting cleanly."""
        with self._lock:
            p, self._proc = self._proc, None
            self._guarded.clear()
        if p is None:
            return
        if p.stdin is not None:
            with contextlib.suppress(OSError):
                p.stdin.close()
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(2)

    # caller holds the lock
    def _send(self, line: str) -> None:
        for _ in range(2):
            p = self._spawned()
            if p is None or p.stdin is None:
                return
            try:
                p.stdin.write(line.encode())
                p.stdin.flush()
                return
            except OSError as e:  # it died: start another, tell it everything again
                log.warning("death watcher (pid %d) is gone (%s); starting another", p.pid, e)
                with contextlib.suppress(OSError):
                    p.stdin.close()
                p.wait()
                self._proc = None

    def _spawned(self) -> subprocess.Popen[bytes] | None:
        p = self._proc
        if p is not None and p.poll() is None:
            return p
        import nydus

        src = os.path.dirname(os.path.dirname(os.path.abspath(nydus.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (src, env.get("PYTHONPATH", "")) if x)
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "nydus.deathwatch", str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                cwd="/",
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as e:
            log.error(
                "cannot start the death watcher: %s (a daemon killed while stuck in "
                "the kernel would leave its FUSE mounts hanging)",
                e,
            )
            return None
        self._proc = p
        log.info("death watcher started (pid %d)", p.pid)
        assert p.stdin is not None
        for path, (conn, fstype) in self._guarded.items():
            with contextlib.suppress(OSError):
                p.stdin.write(f"+ {conn} {fstype} {_encode(path)}\n".encode())
        return p


_shared: Once[DeathWatch] = Once(DeathWatch)


def guard(mountpoint: str) -> int | None:
    """:meth:`DeathWatch.guard` on this process's watcher."""
    return _shared.get().guard(mountpoint)


def release(mountpoint: str) -> None:
    """:meth:`DeathWatch.release` on this process's watcher."""
    watch = _shared.peek()
    if watch is not None:
        watch.release(mountpoint)


# ---------------------------------------------------------------------- the watcher process


def _dying(pid: int) -> bool:
    """Whether ``pid`` is on its way out: its main thread exited (zombie) while the process
    lives on, or SIGKILL is pending for it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rpartition(b")")[2].split()
    except OSError:
        return False  # gone: the caller sees it through getppid/EOF
    if not rest:
        return False
    if rest[0] in (b"Z", b"X"):
        return True
    try:  # fields 31 (pending, of the main thread); /proc/<pid>/status has the shared set
        if int(rest[28]) & _SIGKILL_BIT:
            return True
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"ShdPnd:"):
                    return bool(int(line.split()[1], 16) & _SIGKILL_BIT)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _abort_guarded(pid: int, guarded: dict[str, tuple[int, str]]) -> list[str]:
    live = {(m.mountpoint, m.conn, m.fstype) for m in fusectl.fuse_mounts()}
    done = []
    for path, (conn, fstype) in guarded.items():
        if (path, conn, fstype) in live and fusectl.abort_connection(conn):
            done.append(f"{path} (connection {conn})")
    return done


def _apply(line: str, guarded: dict[str, tuple[int, str]]) -> None:
    parts = line.split()
    if len(parts) == 4 and parts[0] == "+" and parts[1].isdigit():
        guarded[_decode(parts[3])] = (int(parts[1]), parts[2])
    elif len(parts) == 2 and parts[0] == "-":
        guarded.pop(_decode(parts[1]), None)


def watch(pid: int) -> int:
    """The watcher's loop (see the module docstring); returns its exit status."""
    guarded: dict[str, tuple[int, str]] = {}
    poller = select.poll()
    poller.register(0, select.POLLIN | select.POLLHUP)
    pending = b""
    while True:
        if os.getppid() != pid:
            return 0
        if _dying(pid):
            done = _abort_guarded(pid, guarded) if guarded else []
            if done:
                print(
                    f"nydus death watch: nydusd {pid} died with FUSE connections still up; "
                    f"aborted {', '.join(done)}",
                    file=sys.stderr,
                    flush=True,
                )
            deadline = time.monotonic() + _GONE_WAIT
            while os.getppid() == pid and time.monotonic() < deadline:
                time.sleep(_POLL)
            return 0
        if poller.poll(int(_POLL * 1000)):
            try:
                data = os.read(0, 65536)
            except OSError:
                data = b""
            if not data:
                return 0  # the daemon closed us (clean exit) or exited: the kernel aborted
            pending += data
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                _apply(raw.decode("ascii", "replace"), guarded)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m nydus.deathwatch <daemon pid>", file=sys.stderr)
        return 2
    try:
        return watch(int(args[0]))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
