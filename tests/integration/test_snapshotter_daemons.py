"""The daemon manager with real nydusd processes, without containerd.

Images are built with our ``nydus-image`` and served from a ``localfs`` template, so these
tests look at the manager alone: one dedicated daemon per image shared by its snapshots and
stopped with the last one, the shared daemon's sub-mounts, SIGKILL restored by restart and by
failover (an open file keeps reading), adoption by a new manager after a restart, a daemon that
cannot start, and cache GC with real bootstraps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from containerd import stop_recorded_daemons
from nydus.kernel_mount import nydusd_serving
from nydus.snapshotter.config import SnapshotterConfig
from nydus.snapshotter.containerd.errdefs import DaemonError
from nydus.snapshotter.daemons.manager import DaemonManager, resolve_nydusd
from nydus.snapshotter.snapshots.mounter import MountRequest, RecoveredMount

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


def nydus_image(*args: str | os.PathLike[str]) -> None:
    boot = (
        "import sys; from nydus.cli.nydus_image import main; "
        "sys.argv[0] = 'nydus-image'; sys.exit(main())"
    )
    subprocess.run([sys.executable, "-c", boot, *map(str, args)], check=True, capture_output=True)


def build(tmp: Path, snap: int, files: dict[str, bytes]) -> Path:
    """A bootstrap at ``tmp/snapshots/<snap>/fs/image/image.boot``, blobs in ``tmp/blobs``."""
    src = tmp / f"src{snap}"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    boot = tmp / "snapshots" / str(snap) / "fs" / "image" / "image.boot"
    boot.parent.mkdir(parents=True)
    nydus_image("create", "--bootstrap", boot, "--blob-dir", tmp / "blobs", src)
    return boot


FILES_A = {"etc/hello": b"image a\n", "data/big": os.urandom(3 << 20)}
FILES_B = {"etc/hello": b"image b\n", "lib/x": b"x" * 10000}


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    return build(tmp_path, 4, FILES_A), build(tmp_path, 9, FILES_B)


def make(
    tmp: Path,
    mode: str = "dedicated",
    policy: str = "restart",
    fs_driver: str | None = None,
    nydusd_path: str = "nydusd",
) -> DaemonManager:
    tpl: dict[str, object] = {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": str(tmp / "blobs")}},
            "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
        },
        "enable_xattr": True,
    }
    if fs_driver is not None:
        tpl["fs_driver"] = fs_driver
    cfg = SnapshotterConfig(
        root=tmp / "root",
        nydusd_config=tpl,
        cache_dir=tmp / "cache",
        daemon_mode=mode,
        recover_policy=policy,
        daemon_check_interval=0,  # the tests call check_now()
        nydusd_path=nydusd_path,
    )
    return DaemonManager(cfg)


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[list[DaemonManager]]:
    made: list[DaemonManager] = []
    yield made
    for m in made:
        m.shutdown_all()
        m.close()
    stop_recorded_daemons(tmp_path / "root")


def pids(m: DaemonManager) -> dict[str, int]:
    return {d.id: d.pid for d in m.daemons.values() if d.alive()}


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_mount_share_release(
    mode: str, images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, b = images
    m = make(tmp_path, mode)
    managers.append(m)
    la1 = m.mount(MountRequest("10", a, None, {}))
    la2 = m.mount(MountRequest("11", a, None, {}))
    lb = m.mount(MountRequest("12", b, None, {}))
    assert la1 == la2 and (la1 / "etc/hello").read_bytes() == b"image a\n"
    assert (lb / "etc/hello").read_bytes() == b"image b\n"
    assert (la1 / "data/big").read_bytes() == FILES_A["data/big"]
    expected = {"4", "9"} if mode == "dedicated" else {"shared"}
    assert set(pids(m)) == expected
    assert json.loads(m.state_path.read_text())["images"][0]["snapshots"] == ["10", "11"]
    assert (os.stat(m.images["4"].config_path).st_mode & 0o777) == 0o600
    m.umount("10")
    assert (la1 / "etc/hello").read_bytes() == b"image a\n"  # "11" still uses it
    m.umount("11")
    m.umount("11")  # not mounted any more: no-op
    assert set(m.images) == {"9"}
    assert set(pids(m)) == ({"9"} if mode == "dedicated" else {"shared"})
    if mode == "shared":
        assert not la1.exists()
        assert sorted(os.listdir(tmp_path / "root" / "mnt" / "shared")) == ["9"]
    else:
        assert not os.path.ismount(la1)
    m.umount("12")
    assert m.images == {}


def test_cache_gc_with_real_bootstraps(
    images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, b = images
    m = make(tmp_path)
    managers.append(m)
    for sid, boot in (("1", a), ("2", b)):
        lower = m.mount(MountRequest(sid, boot, None, {}))
        for f in lower.rglob("*"):
            if f.is_file():
                f.read_bytes()
    cached = {p.name.split(".")[0] for p in (tmp_path / "cache").glob("*.blob.data")}
    assert len(cached) == 2
    m.umount("2")
    m.collect_garbage([a])  # image b is gone
    left = {p.name.split(".")[0] for p in (tmp_path / "cache").glob("*.blob.*")}
    assert len(left) == 1 and left < cached
    assert m.gc_deleted_blobs == 1 and m.gc_freed_bytes > 0


@pytest.mark.parametrize(
    "mode,policy",
    [("dedicated", "restart"), ("shared", "restart"), ("dedicated", "failover"),
     ("shared", "failover")],
)  # fmt: skip
def test_sigkill_restored(
    mode: str,
    policy: str,
    images: tuple[Path, Path],
    tmp_path: Path,
    managers: list[DaemonManager],
) -> None:
    a, b = images
    m = make(tmp_path, mode, policy)
    managers.append(m)
    la = m.mount(MountRequest("1", a, None, {}))
    lb = m.mount(MountRequest("2", b, None, {}))
    # A reader in another process, like a container's: this process must not hold files on
    # the mount while it spawns the new daemon (a fork closing such a file sends FUSE FLUSH,
    # which waits for a daemon that the fork itself was to become).
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(la / "data" / "big")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline() == "ready\n"
        (did, pid), *_ = pids(m).items()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while m.daemons[did].alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        m.check_now()
        assert pids(m)[did] != pid and m.restarts == 1
        # new readers work in both policies, every image of a shared daemon included
        assert (la / "etc" / "hello").read_bytes() == b"image a\n"
        assert (lb / "etc" / "hello").read_bytes() == b"image b\n"
        out, _ = reader.communicate("go\n", timeout=30)
    finally:
        reader.kill()
        reader.wait()
    if policy == "failover":
        # the open file survived: same FUSE connection, now served by the new daemon
        assert out == hashlib.sha256(FILES_A["data/big"]).hexdigest() + "\n"
    else:
        assert out.startswith("error")


READER = """
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    head = f.read(4096)
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        print(hashlib.sha256(head + f.read()).hexdigest())
    except OSError as e:
        print("error", e)
"""


def _mount_types(path: Path) -> list[str]:
    """File system types mounted at ``path`` (bottom to top), from mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if pre.split(" ")[4] == str(path):
                found.append(post.split(" ")[0])
    return found


def _erofs_supported() -> bool:
    from nydus import kernel_mount

    return kernel_mount.erofs_supported()


@pytest.mark.skipif(not _erofs_supported(), reason="needs kernel EROFS")
@pytest.mark.parametrize("mode", ["dedicated", "shared"])
@pytest.mark.parametrize("policy", ["restart", "failover"])
def test_sigkill_restored_erofs_mode(
    mode: str,
    policy: str,
    images: tuple[Path, Path],
    tmp_path: Path,
    managers: list[DaemonManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A nydusd serving kernel EROFS mounts dies: its stale EROFS mounts and its blob fs are
    detached, a new daemon mounts the images again (failover: restart semantics, said why)."""
    caplog.set_level(logging.INFO, logger="nydus.snapshotter.daemons.manager")
    a, b = images
    m = make(tmp_path, mode, policy, fs_driver="erofs")
    managers.append(m)
    la = m.mount(MountRequest("1", a, None, {}))
    lb = m.mount(MountRequest("2", b, None, {}))
    did = next(iter(pids(m)))
    d = m.daemons[did]
    old_blobfs = d.blobfs
    assert d.erofs and old_blobfs and os.path.ismount(old_blobfs)
    assert _mount_types(la)[-1] == "erofs" and _mount_types(lb)[-1] == "erofs"
    assert not m.supervisor.has_state(did)  # nothing held that a takeover could misuse
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(la / "data" / "big")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline() == "ready\n"
        pid = d.pid
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while d.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        m.check_now()
        assert pids(m)[did] != pid and m.restarts == 1
        assert "restored by restart" in caplog.text
        if policy == "failover":
            assert "failover cannot keep them; restarting it instead" in caplog.text
        # the dead daemon's blob fs is gone; the new one serves fresh EROFS mounts
        assert old_blobfs not in Path("/proc/self/mountinfo").read_text()
        assert d.blobfs and d.blobfs != old_blobfs and os.path.ismount(d.blobfs)
        assert _mount_types(la)[-1] == "erofs" and _mount_types(lb)[-1] == "erofs"
        assert (la / "etc" / "hello").read_bytes() == b"image a\n"
        assert (lb / "etc" / "hello").read_bytes() == b"image b\n"
        assert (la / "data" / "big").read_bytes() == FILES_A["data/big"]
        # the old open file: an error or the right bytes, never a hang or wrong bytes
        out, _ = reader.communicate("go\n", timeout=30)
    finally:
        reader.kill()
        reader.wait()
    assert out.startswith("error") or out == hashlib.sha256(FILES_A["data/big"]).hexdigest() + "\n"


@pytest.mark.parametrize("policy", ["restart", "failover"])
def test_adopted_after_restart_and_released_when_unused(
    policy: str,
    images: tuple[Path, Path],
    tmp_path: Path,
    managers: list[DaemonManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nydus.snapshotter.daemons.manager")
    a, b = images
    m1 = make(tmp_path, policy=policy)
    la = m1.mount(MountRequest("1", a, "reg/a:1", {}))
    lb = m1.mount(MountRequest("2", b, "reg/b:1", {}))
    before = pids(m1)
    m1.close()  # the snapshotter exits; daemons keep running
    assert pids(m1) == before
    m2 = make(tmp_path, policy=policy)
    managers.append(m2)
    # only image a is still used by a snapshot the snapshotter knows
    m2.recover([RecoveredMount("1", a, "reg/a:1", la)])
    assert pids(m2) == {"4": before["4"]}  # adopted, same process; b's daemon was stopped
    assert (la / "etc" / "hello").read_bytes() == b"image a\n"
    assert not os.path.ismount(lb)
    assert m2.images["4"].snapshots == ["1"] and "9" not in m2.images
    if policy == "failover":
        # the new snapshotter holds the adopted daemon's FUSE connection again
        assert m2.supervisor.has_state("4")
        os.kill(before["4"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while m2.daemons["4"].alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        m2.check_now()
        assert os.path.ismount(la) and (la / "data" / "big").read_bytes() == FILES_A["data/big"]
        assert m2.restarts == 1 and pids(m2)["4"] != before["4"]
        assert "nydusd 4 restored by failover" in caplog.text


def test_recover_restores_dead_daemons_and_lost_records(
    images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, b = images
    m1 = make(tmp_path)
    la = m1.mount(MountRequest("1", a, None, {}))
    lb = m1.mount(MountRequest("2", b, None, {}))
    dead, orphan = pids(m1)["4"], pids(m1)["9"]
    m1.close()
    os.kill(dead, signal.SIGKILL)
    time.sleep(0.3)
    (tmp_path / "root" / "daemons" / "state.json").unlink()  # and the records are lost
    stop_recorded_daemons(tmp_path / "root")  # nothing recorded any more: a no-op
    m2 = make(tmp_path)
    managers.append(m2)
    m2.recover([RecoveredMount("1", a, None, la), RecoveredMount("2", b, None, lb)])
    assert set(pids(m2)) == {"4", "9"}
    assert (la / "etc" / "hello").read_bytes() == b"image a\n"
    assert (lb / "etc" / "hello").read_bytes() == b"image b\n"
    assert pids(m2)["9"] != orphan
    # b's old daemon, which no record names any more, lost its mount to the new one: its FUSE
    # session ends and it exits by itself
    deadline = time.monotonic() + 10
    while running(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(orphan):
        os.kill(orphan, signal.SIGKILL)
        pytest.fail("the orphaned daemon kept running")


def running(pid: int) -> bool:
    """Alive and not a zombie (this test process is the parent of the daemons it started)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return False


def test_daemon_that_cannot_start_is_a_clear_error(
    tmp_path: Path, managers: list[DaemonManager]
) -> None:
    bad = tmp_path / "snapshots" / "5" / "fs" / "image" / "image.boot"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage" * 1000)
    (tmp_path / "blobs").mkdir()
    m = make(tmp_path)
    managers.append(m)
    with pytest.raises(DaemonError) as ei:
        m.mount(MountRequest("1", bad, None, {}))
    msg = str(ei.value)
    assert "exited before reaching RUNNING" in msg and "not a RAFS bootstrap" in msg
    assert m.images == {} and pids(m) == {}
    assert not os.path.ismount(tmp_path / "root" / "mnt" / "5")
    assert not list((tmp_path / "root" / "daemons").glob("*.config.json"))


def test_checksums_through_the_mount(
    images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, _ = images
    m = make(tmp_path, "shared")
    managers.append(m)
    lower = m.mount(MountRequest("1", a, None, {}))
    got = hashlib.sha256((lower / "data" / "big").read_bytes()).hexdigest()
    assert got == hashlib.sha256(FILES_A["data/big"]).hexdigest()


def _sha256(p: Path) -> str:
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_recorded_bootstrap_digest_is_passed_and_enforced(
    mode: str,
    images: tuple[Path, Path],
    tmp_path: Path,
    managers: list[DaemonManager],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The digest the snapshotter recorded reaches nydusd at the first mount, after a restart
    of the daemon and after a restart of the snapshotter; a bootstrap whose bytes changed at
    rest is refused; a snapshot without a record is mounted unchecked, said once at info."""
    caplog.set_level(logging.INFO, logger="nydus.snapshotter.daemons.manager")
    a, b = images
    good_a = _sha256(a)
    m1 = make(tmp_path, mode)
    la = m1.mount(MountRequest("1", a, None, {}, bootstrap_digest=good_a))
    assert (la / "etc" / "hello").read_bytes() == b"image a\n"
    pid = pids(m1)["4" if mode == "dedicated" else "shared"]
    if mode == "dedicated":
        cmd = _cmdline(pid)
        assert cmd[cmd.index("--bootstrap-digest") + 1] == good_a
    else:
        info = m1.daemons["shared"].client.info()
        assert info["backend_collection"]["/4"]["bootstrap_digest"] == good_a
    state = json.loads(m1.state_path.read_text())
    assert state["bootstrap_digests"] == {"4": good_a}
    assert "bootstrap_digest" not in state["images"][0]  # older snapshotters read these
    # b: a snapshot from before digests were recorded
    lb = m1.mount(MountRequest("2", b, None, {}))
    assert (lb / "etc" / "hello").read_bytes() == b"image b\n"
    assert caplog.text.count("image 9: no recorded bootstrap digest") == 1
    # the daemon dies: the restarted one gets the digest again
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    m1.check_now()
    pid2 = pids(m1)["4" if mode == "dedicated" else "shared"]
    assert pid2 != pid and (la / "etc" / "hello").read_bytes() == b"image a\n"
    if mode == "dedicated":
        cmd = _cmdline(pid2)
        assert cmd[cmd.index("--bootstrap-digest") + 1] == good_a
    else:
        info = m1.daemons["shared"].client.info()
        assert info["backend_collection"]["/4"]["bootstrap_digest"] == good_a
    m1.close()
    # a new snapshotter adopts it (the digest comes back from the snapshot's record)
    m2 = make(tmp_path, mode)
    managers.append(m2)
    m2.recover([RecoveredMount("1", a, None, la, good_a), RecoveredMount("2", b, None, lb)])
    assert m2.images["4"].bootstrap_digest == good_a and m2.images["9"].bootstrap_digest == ""
    m2.umount("1")
    assert "4" not in m2.images
    # the bootstrap changed at rest (one flipped byte): nydusd refuses it, nothing is served
    data = bytearray(a.read_bytes())
    data[-1] ^= 1
    a.write_bytes(bytes(data))
    with pytest.raises(DaemonError) as ei:
        m2.mount(MountRequest("3", a, None, {}, bootstrap_digest=good_a))
    assert f"is {_sha256(a)}, expected {good_a}: refusing to mount" in str(ei.value)
    assert "4" not in m2.images


def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _ready_spare(m: DaemonManager) -> Any:
    """The manager's spare, once it said it is ready."""
    _until(m.spares.ready)
    spare = m.spares._spare
    assert spare is not None
    return spare


def test_daemons_start_in_warm_spares(
    images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, _ = images
    m = make(tmp_path)
    managers.append(m)
    spare = _ready_spare(m)
    assert os.sched_getscheduler(spare.proc.pid) == os.SCHED_IDLE  # imports on idle CPU only
    la = m.mount(MountRequest("1", a, None, {}))
    d = m.daemons["4"]
    assert d.pid == spare.proc.pid and m.spares.handed == 1
    assert (la / "data" / "big").read_bytes() == FILES_A["data/big"]
    # it shows the daemon's command line, runs at normal priority, logs to the daemon's log
    cmd = _cmdline(d.pid)
    assert "--standby" not in cmd and cmd[cmd.index("--apisock") + 1] == d.apisock
    assert nydusd_serving(d.mountpoint) == [d.pid]
    assert os.sched_getscheduler(d.pid) == os.SCHED_OTHER
    assert "INFO [nydusd] nydusd" in Path(d.log_file).read_text()
    # the next spare is started at once; a second image's daemon takes it
    nxt = _ready_spare(m)
    assert nxt.proc.pid != d.pid
    m.umount("1")
    assert not d.alive() and not os.path.ismount(la)
    m.close()  # the spare exits with the snapshotter
    assert nxt.proc.wait(5) == 0


def test_nydusd_without_standby_starts_afresh(
    images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, _ = images
    wrapper = tmp_path / "nydusd"  # a nydusd that does not know --standby (upstream's, say)
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --standby ]; then\n'
        '  echo "error: unexpected argument --standby" >&2; exit 2\n'
        "fi\n"
        f'exec {resolve_nydusd("nydusd")} "$@"\n'
    )
    wrapper.chmod(0o755)
    m = make(tmp_path, nydusd_path=str(wrapper))
    managers.append(m)
    _until(lambda: not m.spares.enabled)
    assert m.spares._spare is None and not m.spares.ready()
    la = m.mount(MountRequest("1", a, None, {}))
    assert (la / "etc" / "hello").read_bytes() == b"image a\n" and m.spares.handed == 0
    log = (tmp_path / "root" / "daemons" / "standby.log").read_text()
    assert log.count("unexpected argument --standby") == 2


def test_a_dead_spare_is_replaced(
    images: tuple[Path, Path], tmp_path: Path, managers: list[DaemonManager]
) -> None:
    a, b = images
    m = make(tmp_path)
    managers.append(m)
    dead = _ready_spare(m)
    dead.proc.kill()
    dead.proc.wait(10)
    la = m.mount(MountRequest("1", a, None, {}))  # started afresh, a new spare behind it
    assert (la / "etc" / "hello").read_bytes() == b"image a\n"
    assert m.spares.handed == 0 and m.daemons["4"].pid != dead.proc.pid
    _until(m.spares.ready)
    lb = m.mount(MountRequest("2", b, None, {}))
    assert (lb / "etc" / "hello").read_bytes() == b"image b\n" and m.spares.handed == 1
