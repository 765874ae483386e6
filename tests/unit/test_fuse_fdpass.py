"""SCM_RIGHTS fd passing between sockets (and processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest

from nydus.fuse.fdpass import MAX_FDS, recv_fds, send_fds


def test_fds_and_payload_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "x"
    f.write_bytes(b"shared file")
    a, b = socket.socketpair()
    with a, b:
        fd = os.open(f, os.O_RDONLY)
        send_fds(a, b'{"state": 1}' * 10000, [fd])
        os.close(fd)
        payload, fds = recv_fds(b, timeout=5)
        assert payload == b'{"state": 1}' * 10000
        assert len(fds) == 1
        assert os.pread(fds[0], 100, 0) == b"shared file"
        assert os.get_inheritable(fds[0]) is False
        os.close(fds[0])


def test_no_fds_and_limits() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_fds(a, b"", [])
        assert recv_fds(b, timeout=5) == (b"", [])
        with pytest.raises(ValueError):
            send_fds(a, b"", list(range(MAX_FDS + 1)))


def test_peer_closing_mid_message_is_an_error() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(b"\x10\x00\x00\x00abc")  # announces 16 bytes, sends 3
        a.close()
        with pytest.raises(ConnectionError):
            recv_fds(b, timeout=5)


def test_fd_crosses_a_process_boundary() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import os, socket, sys\n"
                    "from nydus.fuse.fdpass import recv_fds\n"
                    "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                    "payload, fds = recv_fds(s, 10)\n"
                    "os.write(fds[0], payload.upper())\n"
                ),
                path,
            ]
        )
        conn, _ = srv.accept()
        r, w = os.pipe()
        with conn:
            send_fds(conn, b"through the child", [w])
        os.close(w)
        assert child.wait(20) == 0
        assert os.read(r, 100) == b"THROUGH THE CHILD"
        os.close(r)
        srv.close()
