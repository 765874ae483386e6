"""A warm spare nydusd: a process that has imported the daemon and waits for its arguments.

A fresh ``nydusd`` spends about 0.15 s of CPU on the interpreter and its imports (on the ML
cold-start benchmark, 37-44 % of the daemon's Python CPU before the container's first read)
before it reads its first flag. The containerd snapshotter keeps one spare started ahead
(``nydusd --standby``, at idle CPU priority) and hands it the command line of the next daemon
it needs; the spare is the snapshotter's own child, so it is watched, stopped and adopted like
a daemon it spawned.

The hand-over, over a ``SOCK_SEQPACKET`` socket pair whose child end is the spare's stdin:

- the spare, once its imports are done, sends ``{"ready": true, "room": N, "prefix": P}``:
  ``N`` bytes of command line it can rewrite, ``P`` of them taken by its interpreter and
  script path;
- the parent sends one message, ``{"argv": [...]}``, with the daemon's log file descriptor
  attached (``SCM_RIGHTS``);
- the spare makes that file its stdout and stderr and ``/dev/null`` its stdin, goes back to
  normal CPU priority, rewrites its command line in place to ``<python> <nydusd> ARGV...`` (so
  ``ps``, the snapshotter's adoption check and nydusd's busy-mount-point check see the daemon's
  flags) and runs nydusd's ``main`` with ``ARGV``, exactly as a fresh process would.

An end of file before the message (the parent closed its end, or died) ends the spare with
status 0. The parent only hands over to a spare that said it is ready and whose room holds the
command line; otherwise it starts nydusd afresh.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import socket

from ..errors import FormatError
from ..format.safejson import parse_json_object
from ..libc import set_idle

__all__ = ["PRELOAD", "STANDBY_FLAG", "TITLE_ROOM", "command_bytes", "serve", "standby_command"]

STANDBY_FLAG = "--standby"
#: Bytes of command line a spare keeps for the daemon's (a padding argument of spaces).
TITLE_ROOM = 4096
_MSG_MAX = 1 << 16

#: What a daemon imports on its way to RUNNING (the FUSE and EROFS paths, every backend).
PRELOAD = (
    "nydus.cli.nydusd",
    "nydus.daemon",
    "nydus.daemon.failover",
    "nydus.daemon.logsetup",
    "nydus.metadata.v5",
    "nydus.metadata.v6",
    "nydus.storage.localfs",
    "nydus.storage.registry",
    "nydus.storage.objectstore",
    "nydus.storage.httpproxy",
)


def standby_command(nydusd: str) -> list[str]:
    """The command that starts a spare of ``nydusd``."""
    return [nydusd, STANDBY_FLAG, " " * TITLE_ROOM]


def command_bytes(argv: list[str]) -> int:
    """Bytes ``argv`` takes in a command line (each argument and its NUL)."""
    return sum(len(os.fsencode(a)) + 1 for a in argv)


def _arg_area() -> tuple[int, int, bytes]:
    """This process's command-line area: start address, end address, contents."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rpartition(b")")[2].split()
    # fields[0] is field 3 (state); arg_start and arg_end are fields 48 and 49
    start, end = int(fields[45]), int(fields[46])
    with open("/proc/self/cmdline", "rb") as f:
        text = f.read()
    return start, end, text


def _prefix(text: bytes) -> list[bytes]:
    """The arguments before ``--standby``: the interpreter and the script."""
    args = text.split(b"\0")
    flag = os.fsencode(STANDBY_FLAG)
    return args[: args.index(flag)] if flag in args else args[:1]


def _retitle(argv: list[str]) -> None:
    """Rewrite the command line the kernel shows for this process in place (no capability is
    needed for that, only room: the spare's padding argument)."""
    start, end, text = _arg_area()
    new = b"\0".join(_prefix(text) + [os.fsencode(a) for a in argv]) + b"\0"
    if len(new) > end - start:
        raise OSError(f"{len(new)} bytes of command line do not fit in {end - start}")
    ctypes.memmove(start, new + b"\0" * (end - start - len(new)), end - start)


def _title_room() -> tuple[int, int]:
    """Bytes of command line this process can rewrite, and how many its interpreter and script
    take; (0, 0) when the area is not where /proc says."""
    try:
        start, end, text = _arg_area()
        if end - start != len(text) or ctypes.string_at(start, end - start) != text:
            return 0, 0
        return end - start, command_bytes([os.fsdecode(a) for a in _prefix(text)])
    except (OSError, ValueError, IndexError):
        return 0, 0


def serve(sock_fd: int = 0) -> list[str] | None:
    """Be a spare: import, say ready on ``sock_fd``, wait for the daemon's arguments.

    Returns the daemon's argv with the process set up to run it, or None when the parent went
    away first; :class:`~nydus.errors.FormatError` for a malformed hand-over."""
    set_idle(True)
    for name in PRELOAD:
        importlib.import_module(name)
    room, prefix = _title_room()
    sock = socket.socket(fileno=os.dup(sock_fd))
    try:
        sock.send(json.dumps({"ready": True, "room": room, "prefix": prefix}).encode())
        data, fds, _flags, _addr = socket.recv_fds(sock, _MSG_MAX, 1)
    finally:
        sock.close()
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    argv = parse_json_object(data, "standby hand-over").get("argv")
    if len(fds) != 1 or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise FormatError(
            f"standby hand-over: want an argv list of strings and one fd, got {len(fds)} fds"
        )
    log_fd = fds[0]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    set_idle(False)
    _retitle(argv)
    t = os.times()
    os.write(
        2,
        f"standby: pid {os.getpid()} takes over, {t.user + t.system:.3f} CPU s spent "
        f"before (imports)\n".encode(),
    )
    return argv
