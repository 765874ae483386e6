"""The gRPC server: the Snapshots (and Content) service on one unix socket it owns: it refuses
an address another live server answers on, replaces a stale socket file, removes its socket when
stopped. Threading: grpcio runs each call on a worker thread of the server's pool.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from concurrent import futures
from pathlib import Path

import grpc

from ..errors import ConfigError
from .containerd.rpc import unix_target
from .content.service import ContentService
from .snapshots.core import Snapshotter
from .snapshots.service import SnapshotsService

__all__ = ["SnapshotterServer"]

log = logging.getLogger(__name__)


def _socket_in_use(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


class SnapshotterServer:
    """A gRPC server with the Snapshots service listening on a unix socket."""

    def __init__(
        self,
        snapshotter: Snapshotter,
        address: str | os.PathLike[str],
        max_workers: int = 16,
        *,
        content: ContentService | None = None,
    ) -> None:
        self.snapshotter = snapshotter
        self.address = Path(address).absolute()
        self.service = SnapshotsService(snapshotter)
        self.content = content
        handlers = [self.service.handler()]
        if content is not None:
            handlers.append(content.handler())
            max_workers += 16  # content calls may wait on snapshot calls they cause
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="snapshots"),
            handlers=handlers,
            options=[
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.max_send_message_length", 16 << 20),
            ],
        )
        self._started = False

    def start(self) -> None:
        addr = self.address
        addr.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        try:
            st = addr.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"--address {addr}: exists and is not a socket")
            if _socket_in_use(addr):
                raise ConfigError(f"--address {addr}: another server is listening there")
            addr.unlink()
        try:
            self._server.add_insecure_port(unix_target(str(addr)))
        except RuntimeError as e:
            raise ConfigError(f"--address {addr}: cannot listen: {e}") from e
        self._server.start()
        self._started = True
        try:
            os.chmod(addr, 0o660)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        log.info(
            "snapshots%s service listening on %s",
            " and content" if self.content is not None else "",
            addr,
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout``); True if it stopped."""
        return self._server.wait_for_termination(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop listening; wait (up to ``grace`` + 30 s) for calls still being handled."""
        if self._started:
            self._server.stop(grace).wait()
            counters = [self.service.inflight]
            if self.content is not None:
                counters.append(self.content.inflight)
            if not all(c.wait_idle(30.0 + (grace or 0.0)) for c in counters):
                log.warning("stopping with calls still in progress")
            self._started = False
            try:
                if stat.S_ISSOCK(self.address.lstat().st_mode):
                    self.address.unlink()
            except FileNotFoundError:
                pass
            log.info("snapshots service stopped")
