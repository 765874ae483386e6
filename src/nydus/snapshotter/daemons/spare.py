"""The snapshotter's warm spare nydusd (the hand-over is :mod:`nydus.daemon.standby`).

:class:`Spares` keeps one ``nydusd --standby`` started ahead. :meth:`Spares.take` hands the next
daemon's command line and log file to it when it has said it is ready, so the daemon skips the
interpreter's start and its imports (~0.15 s of CPU on the container's critical path), and
starts the next spare at once: a spare imports at idle CPU priority, so it takes no CPU from a
container starting beside it. A spare is this process's child like any daemon it spawns
(``subprocess.Popen``), started in its own session; it exits when this process closes its end of
the socket pair, or dies.

When the configured nydusd does not know ``--standby`` (upstream's, say), spares exit without
saying they are ready; after two in a row the keeper turns itself off and daemons are started
afresh, as they would be without it.

Threading: every method may be called from any thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from ...credentials import private_file
from ...daemon.standby import command_bytes, standby_command
from ...errors import NydusError
from ...format.safejson import parse_json_object

__all__ = ["Spares"]

log = logging.getLogger(__name__)

_GIVE_UP_AFTER = 2  # spares in a row that exit without saying they are ready
_READY_TIMEOUT = 120.0  # seconds a spare may take to import (it runs at idle priority)


class _Spare:
    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.started = time.monotonic()
        self.room = 0  # bytes of command line it can show; > 0 once it said it is ready
        self.prefix = 0

    def close(self, wait: float) -> None:
        with contextlib.suppress(OSError):  # wakes a reader blocked on it; the spare reads EOF
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2.0)


class Spares:
    """One warm spare of ``nydusd`` (see the module docstring)."""

    def __init__(self, nydusd: str, log_file: Path, *, enabled: bool = True) -> None:
        self.nydusd = nydusd
        self.log_file = log_file
        self.enabled = enabled
        self.handed = 0  # daemons started by a spare
        self._failed = 0
        self._spare: _Spare | None = None
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start a spare unless one is there (returns at once)."""
        with self._lock:
            if self._closed or not self.enabled or self._spare is not None:
                return
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            private_file(self.log_file)
            try:
                with child, open(self.log_file, "ab") as out:
                    proc = subprocess.Popen(
                        standby_command(self.nydusd),
                        stdin=child.fileno(),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        close_fds=True,
                    )
            except OSError as e:
                parent.close()
                log.warning("cannot start a spare nydusd (%s): %s", self.nydusd, e)
                self.enabled = False
                return
            spare = self._spare = _Spare(proc, parent)
        threading.Thread(
            target=self._wait_ready, args=(spare,), name="nydusd-spare", daemon=True
        ).start()

    def _wait_ready(self, spare: _Spare) -> None:
        spare.sock.settimeout(_READY_TIMEOUT)
        info: dict[str, Any] = {}
        try:
            data = spare.sock.recv(4096)
            if data:
                info = parse_json_object(data, "spare nydusd")
        except (OSError, NydusError) as e:  # not ready: handled below like an exit
            log.debug("spare nydusd %d: %s", spare.proc.pid, e)
        room, prefix = info.get("room"), info.get("prefix")
        with self._lock:
            if self._spare is not spare:
                return  # closed meanwhile
            if info.get("ready") is True and isinstance(room, int) and isinstance(prefix, int):
                spare.room, spare.prefix = room, prefix
                self._failed = 0
                log.info(
                    "spare nydusd %d ready in %.2fs",
                    spare.proc.pid,
                    time.monotonic() - spare.started,
                )
                return
            self._spare = None
            self._failed += 1
            if self._failed >= _GIVE_UP_AFTER:
                self.enabled = False
        spare.close(2.0)
        log.warning(
            "spare nydusd %d (%s --standby) did not become ready (status %s; log %s)%s",
            spare.proc.pid,
            self.nydusd,
            spare.proc.returncode,
            self.log_file,
            "; daemons start afresh from now on" if not self.enabled else "",
        )
        if self.enabled:
            self.start()

    def ready(self) -> bool:
        """Whether a spare is waiting for a daemon's command line."""
        with self._lock:
            sp = self._spare
            return sp is not None and sp.room > 0 and sp.proc.poll() is None

    def take(self, cmd: list[str], log_fd: int) -> subprocess.Popen[bytes] | None:
        """Run ``cmd`` (``[nydusd, args...]``) in the spare with ``log_fd`` as its stdout and
        stderr; None when no ready spare of this nydusd can show that command line (start it
        afresh then). A spare is started for the next daemon either way."""
        dead: _Spare | None = None
        with self._lock:
            spare = self._spare
            if spare is not None and spare.room > 0 and spare.proc.poll() is not None:
                dead, spare = spare, None  # it was ready, then died (killed, say)
                self._spare = None
            if (
                spare is None
                or cmd[0] != self.nydusd
                or spare.room <= 0
                or spare.prefix + command_bytes(cmd[1:]) > spare.room
            ):
                spare = None
            else:
                self._spare = None
        if dead is not None:
            log.warning(
                "spare nydusd %d died (status %s); starting another",
                dead.proc.pid,
                dead.proc.returncode,
            )
            dead.close(0.5)
        if spare is None:
            self.start()
            return None
        try:
            socket.send_fds(spare.sock, [json.dumps({"argv": cmd[1:]}).encode()], [log_fd])
        except OSError as e:
            log.warning("spare nydusd %d: hand-over failed: %s", spare.proc.pid, e)
            spare.close(0.5)
            self.start()
            return None
        spare.sock.close()
        with self._lock:
            self.handed += 1
        self.start()
        return spare.proc

    def close(self) -> None:
        """Stop the spare (daemons it became are not touched)."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close(2.0)
