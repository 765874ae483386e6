"""nydus.fusectl and nydus.deathwatch without a kernel mount: the mount table's FUSE
connections, which mounts an abort picks, the watcher's protocol and its test for a dying
process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nydus import deathwatch, fusectl

TABLE = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 0:40 / /run/a\\040b rw,nosuid,nodev - fuse.rafs rafs rw,user_id=0\n"
    "41 40 0:52 / /run/a\\040b/sub ro - erofs /boot ro\n"
    "44 22 0:44 / /run/nydusd-blobfs/7/blobs ro - fuse.nydus-blobfs nydus-blobfs rw\n"
    "45 22 7:3 / /media/x rw - fuseblk /dev/loop3 rw\n"
    "46 22 0:21 / /sys/fs/fuse/connections rw - fusectl fusectl rw\n"
    "garbage\n"
)


def test_fuse_mounts_and_connection_ids() -> None:
    ms = fusectl.fuse_mounts(TABLE)
    assert [(m.mountpoint, m.fstype, m.conn) for m in ms] == [
        ("/run/a b", "fuse.rafs", 40),
        ("/run/nydusd-blobfs/7/blobs", "fuse.nydus-blobfs", 44),
        ("/media/x", "fuseblk", (7 << 20) | 3),  # the kernel's dev_t, as fusectl names it
    ]
    assert fusectl.conn_id(0, 52) == 52
    fusectl.fuse_mounts()  # this machine's own table parses


def test_host_path_resolves_the_parent_only(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert fusectl.host_path(tmp_path / "link" / "mnt") == str(real / "mnt")
    assert fusectl.host_path("/") == "/"


def test_abort_mounts_picks_by_path_subtree_and_type(monkeypatch: pytest.MonkeyPatch) -> None:
    aborted: list[int] = []
    table = fusectl.fuse_mounts(TABLE)
    monkeypatch.setattr(fusectl, "fuse_mounts", lambda text=None: list(table))
    monkeypatch.setattr(fusectl, "abort_connection", lambda c: aborted.append(c) or True)
    assert [m.conn for m in fusectl.abort_mounts(["/run/a b"])] == [40]
    assert [m.conn for m in fusectl.abort_mounts(["/run"], below=True)] == [40, 44]
    assert fusectl.abort_mounts(["/run"], below=True, fstypes=["fuse.nope"]) == []
    assert fusectl.abort_mounts(["/run/a"]) == []  # a prefix of a name is not a parent
    assert aborted == [40, 40, 44]


def test_abort_of_a_connection_that_is_not_there() -> None:
    if os.geteuid() != 0:
        pytest.skip("fusectl needs root")
    assert fusectl.abort_connection(987654321) is False


def test_watcher_protocol_lines() -> None:
    guarded: dict[str, tuple[int, str]] = {}
    path = "/run/with space/ü"
    deathwatch._apply(f"+ 44 fuse.nydus-blobfs {deathwatch._encode(path)}", guarded)
    assert guarded == {path: (44, "fuse.nydus-blobfs")}
    deathwatch._apply("+ x fuse zz", guarded)  # malformed: ignored
    deathwatch._apply(f"- {deathwatch._encode(path)}", guarded)
    assert guarded == {}


def test_dying_means_a_zombie_main_thread_or_sigkill_pending() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not deathwatch._dying(p.pid)
        p.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not deathwatch._dying(p.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert deathwatch._dying(p.pid)  # killed, not reaped: a zombie
    finally:
        p.kill()
        p.wait()
    assert not deathwatch._dying(p.pid)  # gone: not "dying" (getppid/EOF tell that)


def test_watcher_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NYDUSD_DEATH_WATCH", "0")
    assert deathwatch.DeathWatch().guard("/") is None


def test_watcher_process_exits_on_eof_without_acting() -> None:
    w = deathwatch.DeathWatch()
    with w._lock:
        w._guarded["/nonexistent/mnt"] = (987654321, "fuse.x")
        w._send(f"+ 987654321 fuse.x {deathwatch._encode('/nonexistent/mnt')}\n")
    pid = w.pid
    assert pid is not None
    w.close()
    assert w.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
