"""``nydusd --standby``, the warm spare's side of the hand-over (nydus.daemon.standby).

The snapshotter's side, with real daemons serving images, is in
tests/integration/test_snapshotter_daemons.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nydus.daemon.standby import TITLE_ROOM, command_bytes, standby_command

BOOT = "import sys; from nydus.cli.nydusd import main; sys.exit(main())"


@pytest.fixture
def spare(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket, Path]]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out = tmp_path / "spare.log"
    with child, open(out, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOT, *standby_command("nydusd")[1:]],
            stdin=child.fileno(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    parent.settimeout(60)
    yield proc, parent, out
    parent.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_ready_message_says_how_much_command_line_it_can_show(
    spare: tuple[subprocess.Popen[bytes], socket.socket, Path],
) -> None:
    proc, sock, _ = spare
    ready = json.loads(sock.recv(4096))
    assert ready["ready"] is True
    # python -c BOOT --standby <padding>: the padding is the room, the interpreter the prefix
    assert ready["room"] >= TITLE_ROOM + command_bytes(["--standby"])
    assert ready["prefix"] == command_bytes([sys.executable, "-c", BOOT])
    sock.close()  # the parent goes away before handing anything over
    assert proc.wait(10) == 0


def test_a_malformed_hand_over_is_an_error_not_a_traceback(
    spare: tuple[subprocess.Popen[bytes], socket.socket, Path], tmp_path: Path
) -> None:
    proc, sock, out = spare
    sock.recv(4096)
    log = os.open(tmp_path / "daemon.log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        socket.send_fds(sock, [b'{"argv": "not a list"}'], [log])
    finally:
        os.close(log)
    assert proc.wait(10) == 2
    text = out.read_text()
    assert "nydusd: error: standby: " in text and "Traceback" not in text


def test_hand_over_runs_nydusd_with_the_arguments_and_log(
    spare: tuple[subprocess.Popen[bytes], socket.socket, Path], tmp_path: Path
) -> None:
    proc, sock, _ = spare
    sock.recv(4096)
    log = tmp_path / "daemon.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:  # arguments nydusd refuses at once: its own error, in the daemon's log
        msg = {"argv": ["--mountpoint", str(tmp_path / "missing"), "--apisock", "x.sock"]}
        socket.send_fds(sock, [json.dumps(msg).encode()], [fd])
    finally:
        os.close(fd)
    assert proc.wait(30) == 2
    text = log.read_text()
    assert "takes over" in text and "--mountpoint" in text and "not a directory" in text
