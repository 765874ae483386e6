"""The failover supervisor: keeps each nydusd's ``/dev/fuse`` fd and state (``recover_policy``
``failover``, nydus-reference.md §4 "Failover / hot upgrade").

nydusd is started with ``--supervisor <sock>``. After it is RUNNING (and after every change to
what it serves), :meth:`FdSupervisor.collect` asks it to ``PUT /api/v1/daemon/fuse/sendfd``: the
daemon connects to ``<sock>`` and sends its serialized state with the FUSE fd (SCM_RIGHTS); we
keep both. While we hold the fd, the kernel keeps the FUSE connection -- and every overlay mount
built on it -- alive even if nydusd dies. A new ``nydusd --upgrade --supervisor <sock>`` then
gets them back through :meth:`FdSupervisor.give_back` when asked to ``PUT .../takeover``, and
running containers carry on reading.

The state is opaque here. What we hold lives in this process only: after a snapshotter restart
the daemons are asked to send again (:meth:`collect` on adoption).

Threading: one listening socket per daemon; :meth:`collect` and :meth:`give_back` for one daemon
are serialized by the caller (the daemon manager's per-image lock); different daemons may be
handled concurrently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ...fuse.fdpass import recv_fds, send_fds
from ..containerd.errdefs import DaemonError

__all__ = ["FdSupervisor"]

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    sock: socket.socket
    payload: bytes | None = None
    fds: list[int] = field(default_factory=list)


class FdSupervisor:
    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()

    def listen(self, daemon_id: str, path: str) -> None:
        """Bind ``path`` for ``daemon_id`` (a stale socket file is replaced)."""
        with self._lock:
            if daemon_id in self._slots:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.bind(path)
                os.chmod(path, 0o600)
                s.listen(4)
            except OSError:
                s.close()
                raise
            self._slots[daemon_id] = _Slot(s)

    def has_state(self, daemon_id: str) -> bool:
        with self._lock:
            slot = self._slots.get(daemon_id)
            return slot is not None and slot.payload is not None and bool(slot.fds)

    def _slot(self, daemon_id: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(daemon_id)
        if slot is None:
            raise DaemonError(f"no supervisor socket for nydusd {daemon_id}")
        return slot

    def _serve_one(
        self, slot: _Slot, work: Callable[[socket.socket], None], cancel: threading.Event
    ) -> tuple[threading.Thread, list[BaseException]]:
        """Accept one connection on the slot's socket (until ``cancel``) and run ``work``."""
        errors: list[BaseException] = []

        def run() -> None:
            deadline = time.monotonic() + self.timeout
            try:
                slot.sock.settimeout(0.1)
                while True:
                    try:
                        conn, _ = slot.sock.accept()
                        break
                    except TimeoutError:
                        if cancel.is_set() or time.monotonic() > deadline:
                            raise TimeoutError("no connection from nydusd") from None
                with conn:
                    conn.settimeout(self.timeout)
                    work(conn)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=run, name="nydus-supervisor", daemon=True)
        t.start()
        return t, errors

    def _exchange(
        self, slot: _Slot, work: Callable[[socket.socket], None], request: Callable[[], None]
    ) -> list[BaseException]:
        cancel = threading.Event()
        t, errors = self._serve_one(slot, work, cancel)
        try:
            request()
        except BaseException:
            cancel.set()
            raise
        finally:
            t.join(self.timeout + 1)
        return errors

    def collect(self, daemon_id: str, request: Callable[[], None]) -> None:
        """Have the daemon send its fd and state (``request`` makes the API call)."""
        slot = self._slot(daemon_id)
        got: list[tuple[bytes, list[int]]] = []

        def receive(conn: socket.socket) -> None:
            got.append(recv_fds(conn, self.timeout))

        errors = self._exchange(slot, receive, request)
        if errors or not got:
            raise DaemonError(
                f"nydusd {daemon_id} did not send its FUSE fd: {errors[0] if errors else 'timeout'}"
            )
        payload, fds = got[0]
        with self._lock:
            old = slot.fds
            slot.payload, slot.fds = payload, list(fds)
        for fd in old:
            with contextlib.suppress(OSError):
                os.close(fd)
        log.debug("supervisor: holding the FUSE fd of nydusd %s", daemon_id)

    def give_back(self, daemon_id: str, request: Callable[[], None]) -> None:
        """Hand the held fd and state to the daemon that ``request`` asks to take over."""
        slot = self._slot(daemon_id)
        with self._lock:
            payload, fds = slot.payload, list(slot.fds)
        if payload is None or not fds:
            raise DaemonError(f"no FUSE fd held for nydusd {daemon_id}")

        def send(conn: socket.socket) -> None:
            send_fds(conn, payload, fds)

        errors = self._exchange(slot, send, request)
        if errors:
            raise DaemonError(f"handing the FUSE fd to nydusd {daemon_id}: {errors[0]}")

    def forget(self, daemon_id: str) -> None:
        """Close the socket and the held fds of ``daemon_id`` (the daemon is gone for good)."""
        with self._lock:
            slot = self._slots.pop(daemon_id, None)
        if slot is None:
            return
        for fd in slot.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        path = ""
        with contextlib.suppress(OSError):
            path = str(slot.sock.getsockname())
        slot.sock.close()
        if path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        """Close and remove everything (at snapshotter exit the daemons keep their own fds; the
        next snapshotter listens again and asks them to send)."""
        with self._lock:
            ids = list(self._slots)
        for i in ids:
            self.forget(i)
