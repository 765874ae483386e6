"""Hand a live FUSE connection to a supervisor and take it back (upstream's sendfd/takeover).

``PUT /api/v1/daemon/fuse/sendfd``: connect to the ``--supervisor`` unix socket and send one
message (:mod:`nydus.fuse.fdpass`): a JSON state (session negotiation, images with their
bootstrap, config and mount path, the VFS slot layout) plus the ``/dev/fuse`` fd. The kernel
keeps the mount alive while the supervisor holds the fd.

``PUT /api/v1/daemon/fuse/takeover`` (a new ``nydusd --upgrade --supervisor S``): connect to the
supervisor, receive that message, reopen every image in the same VFS slots (so node ids the
kernel holds stay valid), resume serving the fd, state READY; ``/start`` then makes it RUNNING.
With ``--failover-policy resend`` (the default) the kernel is then asked to resend requests the
old daemon had read but not answered (FUSE_NOTIFY_RESEND, kernel 7.40+); with ``flush`` or
``none`` those fail as the kernel decides (requests read through a dead process's cloned fd
are aborted with ECONNABORTED either way).

A daemon serving kernel EROFS mounts refuses ``sendfd`` (those mounts depend on its blob fs,
which is not handed over), so no takeover of it can be attempted.

The state is our own JSON, opaque to the supervisor (which only stores and returns it).
Threading contract: called from API threads; the daemon's ``handover``/``adopt`` take its lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket

from ..config import FsDriver
from ..errors import ConfigError, NydusError, UnsupportedError
from ..format.safejson import parse_json_object
from ..fuse import FuseSession, SessionState
from ..fuse.fdpass import recv_fds, send_fds
from .nydusd import Nydusd
from .state import DaemonEvent

__all__ = ["Failover", "STATE_VERSION"]

log = logging.getLogger("nydus.daemon")

STATE_VERSION = 1


class Failover:
    def __init__(self, daemon: Nydusd, timeout: float = 10.0) -> None:
        self.d = daemon
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        path = self.d.opts.supervisor
        if not path:
            raise ConfigError("no supervisor socket (--supervisor)")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            raise NydusError(f"cannot connect to supervisor {path}: {e}") from e
        return s

    def send(self) -> None:
        d = self.d
        s, layout, images = d.handover()
        erofs = sorted(im.path for im in images if im.driver.kind == FsDriver.EROFS)
        if erofs:  # they hang on this process's blob fs, which no fd hand-over keeps alive
            raise UnsupportedError(
                f"failover of kernel EROFS mounts ({', '.join(erofs)}) is not supported: "
                "restart the daemon and mount them again (or use fs_driver fusedev)"
            )
        st = {
            "version": STATE_VERSION,
            "id": d.id,
            "session": s.export_state().to_dict(),
            "vfs": layout,
            "images": [
                {
                    "path": im.path,
                    "bootstrap": im.bootstrap,
                    "config": im.config.to_dict(),
                    "prefetch_files": im.prefetch_files,
                    # the new daemon checks the bootstrap again before serving it
                    **({"bootstrap_digest": im.bootstrap_digest} if im.bootstrap_digest else {}),
                }
                for im in images
            ],
        }
        with self._connect() as sock:
            send_fds(sock, json.dumps(st).encode(), [s.device_fd])
        log.info("sent the FUSE fd and state to supervisor %s", d.opts.supervisor)

    def takeover(self) -> None:
        d = self.d
        with self._connect() as sock:
            payload, fds = recv_fds(sock, self.timeout)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise NydusError(f"supervisor sent {len(fds)} fds, expected 1")
        fd = fds[0]
        try:
            st = parse_json_object(payload, "failover state", error=NydusError)
            if st.get("version") != STATE_VERSION:
                raise NydusError(f"unknown failover state version {st.get('version')}")
            state = SessionState.from_dict(st["session"])
            state.mountpoint = d.opts.mountpoint
            s = d.adopt(
                st["images"],
                st["vfs"],
                lambda vfs: FuseSession.resume(vfs, fd, state, d.opts.session),
            )
            if d.opts.failover_policy == "resend" and s.notify_resend():
                log.info("asked the kernel to resend requests the old daemon left")
            d.sm.fire(DaemonEvent.TAKEOVER)
        except BaseException:
            if d.session is None or d.session.device_fd != fd:
                os.close(fd)
            raise
        log.info(
            "took over the FUSE connection of %s (%d images)", d.opts.mountpoint, len(st["images"])
        )
