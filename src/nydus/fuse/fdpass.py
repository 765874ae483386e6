"""Hand file descriptors (the ``/dev/fuse`` fd) to another process over a unix socket.

``send_fds(sock, payload, fds)`` sends one message carrying ``payload`` bytes and the fds as
SCM_RIGHTS ancillary data; ``recv_fds(sock)`` returns ``(payload, fds)``. The payload is
length-prefixed (4 bytes, little-endian) so it may exceed one datagram's natural chunk on a
stream socket; the fds ride on the first segment. Received fds are close-on-exec.

This is the primitive the failover/hot-upgrade work builds on: the kernel keeps the FUSE
connection (and the mount) alive as long as any process holds a device fd, so a supervisor
can keep it while nydusd restarts, and a new nydusd can resume serving it.

Threading contract: stateless; one message per call, callers serialize use of a socket.
"""

from __future__ import annotations

import array
import os
import socket
import struct

__all__ = ["send_fds", "recv_fds", "MAX_FDS", "MAX_PAYLOAD"]

MAX_FDS = 16
MAX_PAYLOAD = 64 << 20
_LEN = struct.Struct("<I")


def send_fds(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    """Send ``payload`` and ``fds`` (at most MAX_FDS) in one logical message."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per message")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload too large")
    data = _LEN.pack(len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_fds(sock: socket.socket, timeout: float | None = None) -> tuple[bytes, list[int]]:
    """Receive one message sent by :func:`send_fds`: ``(payload, fds)``.

    Raises ConnectionError if the peer closed before a whole message arrived.
    """
    if timeout is not None:
        sock.settimeout(timeout)
    fds: list[int] = []
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    msg, anc, flags, _addr = sock.recvmsg(_LEN.size, space, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    try:
        if flags & socket.MSG_CTRUNC:
            raise ConnectionError("file descriptors were truncated (too many fds)")
        header = msg + _recv_exact(sock, _LEN.size - len(msg))
        (size,) = _LEN.unpack(header)
        if size > MAX_PAYLOAD:
            raise ConnectionError(f"payload of {size} bytes announced: too large")
        return _recv_exact(sock, size), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("peer closed the socket mid-message")
        out += chunk
    return bytes(out)
