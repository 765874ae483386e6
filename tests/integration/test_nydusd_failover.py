"""Failover through a supervisor: nydusd hands its /dev/fuse fd and state to a supervisor
(``PUT /api/v1/daemon/fuse/sendfd``), dies hard, and a new ``nydusd --upgrade`` takes the live
connection back (``PUT /api/v1/daemon/fuse/takeover`` then ``/start``): the mount never goes
away and serves the same files again. The test plays the supervisor."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_nydusd import Nydusd, create_image, localfs_config, md5_tree

import registry as harness
from nydus.fuse.fdpass import recv_fds, send_fds

registry_plain = harness.registry_plain
fault_proxy = harness.fault_proxy

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


class Supervisor:
    """Keeps what a daemon sends; gives it to the next daemon that connects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sock.settimeout(30)
        self.payload: bytes | None = None
        self.fds: list[int] = []
        self.errors: list[BaseException] = []

    def _serve_one(self, exchange: Callable[[socket.socket], None]) -> threading.Thread:
        def run() -> None:
            try:
                conn, _ = self.sock.accept()
                with conn:
                    exchange(conn)
            except BaseException as e:
                self.errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        return t

    def _receive(self, conn: socket.socket) -> None:
        self.payload, self.fds = recv_fds(conn, 30)

    def _give_back(self, conn: socket.socket) -> None:
        assert self.payload is not None
        send_fds(conn, self.payload, self.fds)

    def take_state_of(self, d: Nydusd) -> None:
        """Ask ``d`` to send its state and FUSE fd here (the sendfd API), and keep them."""
        t = self._serve_one(self._receive)
        d.client.put("/api/v1/daemon/fuse/sendfd")
        t.join(30)

    def give_back(self) -> threading.Thread:
        """Give what was kept to the next daemon that connects (its takeover API call)."""
        return self._serve_one(self._give_back)

    def hand_over_to(self, d: Nydusd) -> None:
        """Start ``d`` (an ``--upgrade`` daemon) and give it what was kept (the takeover API)."""
        d.start(expect_state="INIT")
        t = self.give_back()
        d.client.put("/api/v1/daemon/fuse/takeover")
        t.join(30)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


def _daemon(
    tmp_path: Path, name: str, mnt: Path, sup: Supervisor, *args: str | os.PathLike[str]
) -> Nydusd:
    """A nydusd (not started) on ``mnt`` with API socket ``<name>.sock``, supervised by ``sup``."""
    sock = tmp_path / f"{name}.sock"
    argv = ["--mountpoint", mnt, "--apisock", sock, "--supervisor", sup.path, *args]
    return Nydusd(argv, mnt, cwd=tmp_path, apisock=sock)


def test_sendfd_crash_takeover(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(20):
        (src / "d" / f"f{i}").write_bytes(os.urandom(1000 * (i + 1)))
    blobs = create_image(tmp_path, src)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(localfs_config(blobs)))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sup = Supervisor(tmp_path / "supervisor.sock")
    a = _daemon(
        tmp_path, "a", mnt, sup, "--config", cfg, "--bootstrap", tmp_path / "boot", "--id", "first"
    )
    b: Nydusd | None = None
    try:
        a.start()
        assert a.client.info()["backend_collection"]["/"]["fs_driver"] == "fusedev"
        # opened before anything was ever closed on this mount: the kernel has not yet learned
        # (from an ENOSYS reply to FLUSH) that flushing is pointless
        held = os.open(mnt / "d" / "f3", os.O_RDONLY)
        assert os.pread(held, 10000, 0) == (src / "d" / "f3").read_bytes()
        want = md5_tree(src)
        # lookups and attributes cached before the crash (no file is closed before it)
        assert {p.name: p.stat().st_size for p in (mnt / "d").iterdir()} == {
            p.name: p.stat().st_size for p in (src / "d").iterdir()
        }
        sup.take_state_of(a)
        assert not sup.errors and len(sup.fds) == 1
        state: dict[str, Any] = json.loads(sup.payload or b"{}")
        assert state["images"][0]["bootstrap"] == str(tmp_path / "boot")
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)  # a crash: no unmount, no goodbye
        a.proc.wait(20)
        assert os.path.ismount(mnt)  # the supervisor's fd keeps the connection alive
        # no daemon serves the connection now: closing a file must not wait for one (OPEN
        # replies carry FOPEN_NOFLUSH when a supervisor is configured: no FLUSH is sent)
        closer = threading.Thread(target=os.close, args=(held,), daemon=True)
        closer.start()
        closer.join(5)
        if closer.is_alive():  # abort the connection, or the clean-up would hang too
            minor = os.minor(os.stat(mnt).st_dev)
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
            pytest.fail("close() blocked on a FLUSH nobody answers")
        b = _daemon(tmp_path, "b", mnt, sup, "--upgrade", "--id", "second")
        sup.hand_over_to(b)
        assert not sup.errors
        assert b.client.state() == "READY"
        b.client.put("/api/v1/daemon/start")
        assert b.client.state() == "RUNNING"
        assert md5_tree(mnt) == want  # cached and new lookups, served by the new daemon
        assert (mnt / "d" / "f19").read_bytes() == (src / "d" / "f19").read_bytes()
        assert sorted(b.client.info()["backend_collection"]) == ["/"]
        assert b.stop() == 0
        deadline = time.time() + 10
        while os.path.ismount(mnt) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        a.stop()
        if b is not None:
            b.stop()
        sup.close()
    assert not os.path.ismount(mnt)


def test_a_read_in_flight_at_the_crash_is_resent(
    tmp_path: Path, registry_plain: Any, fault_proxy: Any
) -> None:
    """One FUSE thread (so the request sits on the fd the supervisor holds), a backend that
    stalls, a crash in the middle of the read: the new daemon gets the request again
    (--failover-policy resend) and the reader receives the right bytes."""
    import shutil

    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    from test_nydusd_registry import REPO, _publish_under_blob_id

    from nydus.metadata import open_bootstrap
    from registry import Fault

    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(3 << 20)
    (src / "big").write_bytes(payload)
    blobs = create_image(tmp_path, src)
    with open_bootstrap(tmp_path / "boot") as md:
        blob_id = md.blobs[0].blob_id
    _publish_under_blob_id(registry_plain, blobs / blob_id, blob_id)
    cfg = tmp_path / "r.json"
    cfg.write_text(
        json.dumps(
            {
                "device": {
                    "backend": {
                        "type": "registry",
                        "config": {"scheme": "http", "host": fault_proxy.host, "repo": REPO},
                    }
                },
                "mode": "direct",
            }
        )
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sup = Supervisor(tmp_path / "supervisor.sock")
    a = _daemon(
        tmp_path,
        "a",
        mnt,
        sup,
        "--config",
        cfg,
        "--bootstrap",
        tmp_path / "boot",
        "--fuse-threads",
        "1",
    )
    b: Nydusd | None = None
    reader: subprocess.Popen[bytes] | None = None
    try:
        a.start()
        assert os.listdir(mnt) == ["big"]
        sup.take_state_of(a)
        fault_proxy.add(Fault("delay", path="/blobs/", seconds=30, times=1))
        # The reader is a process of its own: this process must hold no open file of the
        # mount while the daemon is down, or the fork+exec that starts the new daemon would
        # close (FLUSH) it and wait for an answer from a daemon that is not there yet.
        reader = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import hashlib, sys; "
                "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())",
                str(mnt / "big"),
            ],
            stdout=subprocess.PIPE,
        )
        deadline = time.time() + 10
        while fault_proxy.count("GET", "/blobs/") == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert fault_proxy.count("GET", "/blobs/") >= 1  # the read is stuck in the backend
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(20)
        fault_proxy.clear()
        b = _daemon(tmp_path, "b", mnt, sup, "--upgrade", "--failover-policy", "resend")
        sup.hand_over_to(b)
        b.client.put("/api/v1/daemon/start")
        out, _ = reader.communicate(timeout=60)
        assert reader.returncode == 0
        assert out.decode().strip() == hashlib.sha256(payload).hexdigest()
        assert "resend" in b.log_text()
    finally:
        if reader is not None and reader.poll() is None:
            reader.kill()  # FUSE waits are killable
            reader.wait(10)
        a.stop()
        if b is not None:
            b.stop()
        sup.close()  # the last fd of the connection: nothing can stay blocked on it
