"""nydusd with an expected bootstrap digest (``--bootstrap-digest``, the API's
``bootstrap_digest``; our extension): the bootstrap is the root of trust, so a bootstrap whose
bytes are not the recorded ones is refused, in both fs drivers, even when it is a consistent
image (here: a flipped padding byte that nydusd mounts happily without the digest).

In kernel EROFS mode the kernel mounts the daemon's private copy of the checked bytes, not the
caller's path: rewriting the caller's file after the check changes nothing that is served.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_erofs_mode import _cleanup, _mounts, _request
from test_nydusd import Nydusd, cli, localfs_config, md5_tree, nydus_image

from nydus.daemon.client import ApiClientError

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


@pytest.fixture
def mnt(tmp_path: Path) -> Any:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    _cleanup(m)


def _sha(p: Path) -> str:
    return "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """(source tree, good bootstrap, flipped copy, blob dir)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5):
        (src / "d" / f"f{i}.txt").write_bytes(f"file {i}\n".encode() * (i * 300 + 1))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    boot = tmp_path / "boot"
    nydus_image(tmp_path, "create", "--bootstrap", boot, "--blob-dir", blobs, src)
    bad = tmp_path / "boot.flipped"
    data = bytearray(boot.read_bytes())
    data[-1] ^= 0x01  # the last byte: padding; the image stays consistent
    bad.write_bytes(bytes(data))
    return src, boot, bad, blobs


def _md5_src(src: Path) -> dict[str, str]:
    return {
        "/" + str(p.relative_to(src)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file()
    }


def _run_nydusd(
    tmp_path: Path, mnt: Path, cfg: dict[str, Any], boot: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    return subprocess.run(
        [
            *cli("nydusd"),
            "--config",
            str(cfg_path),
            "--mountpoint",
            str(mnt),
            "--bootstrap",
            str(boot),
            *extra,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _erofs_source(mnt: Path) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(mnt) and parts[parts.index("-") + 1] == "erofs":
                return parts[parts.index("-") + 2]
    raise AssertionError(f"no erofs mount at {mnt}")


@pytest.mark.parametrize("driver", ["erofs", "fusedev"])
def test_cli_digest_good_mounts_flipped_refused(
    tmp_path: Path, mnt: Path, driver: str, image: tuple[Path, Path, Path, Path]
) -> None:
    src, boot, bad, blobs = image
    cfg = localfs_config(blobs, digest_validate=True, fs_driver=driver)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    good = _sha(boot)
    with Nydusd(
        [
            "--config",
            tmp_path / "c.json",
            "--mountpoint",
            mnt,
            "--bootstrap",
            boot,
            "--bootstrap-digest",
            good,
        ],
        mnt,
        cwd=tmp_path,
    ).start() as d:
        assert md5_tree(mnt) == _md5_src(src)
        if driver == "erofs":
            assert _mounts(mnt) == ["fuse.rafs", "erofs"]
            # the kernel mounts the daemon's private copy of the checked bytes
            private = _erofs_source(mnt)
            assert private != str(boot) and "/boot/" in private
            st = os.stat(private)
            assert st.st_mode & 0o777 == 0o600 and _sha(Path(private)) == good
            # rewriting the caller's file now changes nothing the kernel reads
            boot.write_bytes(bad.read_bytes())
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
            assert md5_tree(mnt) == _md5_src(src)
            info = d.client.get("/api/v1/daemon")
            assert info["backend_collection"]["/"]["bootstrap_digest"] == good
        else:
            assert _mounts(mnt) == ["fuse.rafs"]
    if driver == "erofs":
        assert not os.path.exists(private)  # removed at unmount
    assert _mounts(mnt) == []
    # the flipped copy: refused with a one-line message, nothing mounted
    proc = _run_nydusd(tmp_path, mnt, cfg, bad, "--bootstrap-digest", good)
    assert proc.returncode == 4, proc.stderr
    want = f"bootstrap {bad} is {_sha(bad)}, expected {good}: refusing to mount"
    assert want in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _mounts(mnt) == []
    # without the digest the same flipped copy mounts: only the digest can tell
    with Nydusd(
        ["--config", tmp_path / "c.json", "--mountpoint", mnt, "--bootstrap", bad],
        mnt,
        cwd=tmp_path,
    ).start():
        assert md5_tree(mnt) == _md5_src(src)


def test_cli_malformed_digest_is_a_usage_error(
    tmp_path: Path, mnt: Path, image: tuple[Path, Path, Path, Path]
) -> None:
    _src, boot, _bad, blobs = image
    for digest in ("sha256:abc", "md5:" + "0" * 64, "0" * 64, "sha256:" + "g" * 64):
        proc = _run_nydusd(tmp_path, mnt, localfs_config(blobs), boot, "--bootstrap-digest", digest)
        assert proc.returncode == 2, proc.stderr
        assert "is not of the form sha256:<64 hex digits>" in proc.stderr
    assert _mounts(mnt) == []


@pytest.mark.parametrize("driver", ["erofs", "fusedev"])
def test_api_mount_with_bootstrap_digest(
    tmp_path: Path, mnt: Path, driver: str, image: tuple[Path, Path, Path, Path]
) -> None:
    src, boot, bad, blobs = image
    cfg = json.dumps(localfs_config(blobs, digest_validate=True))
    good = _sha(boot)
    sock = tmp_path / "api.sock"
    with Nydusd(
        ["--mountpoint", mnt, "--apisock", sock], mnt, cwd=tmp_path, apisock=sock
    ).start() as d:

        def post(path: str, source: Path, digest: Any) -> tuple[int, bytes]:
            return _request(
                d,
                "POST",
                f"/api/v1/mount?mountpoint={path}",
                {
                    "source": str(source),
                    "fs_type": "rafs",
                    "config": cfg,
                    "fs_driver": driver,
                    "bootstrap_digest": digest,
                },
            )

        status, out = post("/good", boot, good)
        assert status == 204, out
        assert md5_tree(mnt / "good") == _md5_src(src)
        if driver == "erofs":
            assert _mounts(mnt / "good") == ["erofs"]
            assert _erofs_source(mnt / "good") != str(boot)
        status, out = post("/bad", bad, good)
        assert status == 422, out
        body = json.loads(out)
        assert body["code"] == "IntegrityError"
        assert body["message"] == (
            f"bootstrap {bad} is {_sha(bad)}, expected {good}: refusing to mount"
        )
        status, out = post("/bad", bad, "sha256:1234")
        assert status == 400 and b"not of the form sha256" in out, out
        assert sorted(os.listdir(mnt)) == ["good"]
        # the client and nydusctl pass it too
        d.client.mount("/viaclient", str(boot), cfg, bootstrap_digest=good)
        cfg_file = tmp_path / "ctl.json"
        cfg_file.write_text(cfg)
        proc = subprocess.run(
            [
                *cli("nydusctl"),
                "--sock",
                str(sock),
                "mount",
                "--source",
                str(bad),
                "--config",
                str(cfg_file),
                "--mountpoint",
                "/ctl",
                "--bootstrap-digest",
                good,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "refusing to mount" in proc.stderr, proc.stderr
        assert sorted(os.listdir(mnt)) == ["good", "viaclient"]


def test_failover_carries_the_digest_and_checks_again(
    tmp_path: Path, mnt: Path, image: tuple[Path, Path, Path, Path]
) -> None:
    """A takeover re-opens the bootstrap from its path: the digest travels in the failover
    state, and a bootstrap changed while no daemon served it is refused by the new daemon."""
    from test_nydusd_failover import Supervisor

    src, boot, bad, blobs = image
    good = _sha(boot)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(localfs_config(blobs)))
    sup = Supervisor(tmp_path / "supervisor.sock")
    daemons: list[Nydusd] = []

    def spawn(name: str, *args: Any, **kw: Any) -> Nydusd:
        sock = tmp_path / f"{name}.sock"
        d = Nydusd(
            ["--mountpoint", mnt, "--apisock", sock, "--supervisor", sup.path, "--id", name, *args],
            mnt,
            cwd=tmp_path,
            apisock=sock,
        )
        daemons.append(d)
        return d.start(**kw)

    def crash(d: Nydusd) -> dict[str, Any]:
        for fd in sup.fds:  # the previous hand-over's copy (the daemon has its own)
            os.close(fd)
        sup.fds = []
        sup.take_state_of(d)
        assert not sup.errors and sup.payload
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(20)
        state: dict[str, Any] = json.loads(sup.payload)
        return state

    try:
        a = spawn("a", "--config", cfg, "--bootstrap", boot, "--bootstrap-digest", good)
        state = crash(a)
        assert state["images"][0]["bootstrap_digest"] == good
        b = spawn("b", "--upgrade", expect_state="INIT")
        t = sup.give_back()
        b.client.put("/api/v1/daemon/fuse/takeover")
        t.join(30)
        b.client.put("/api/v1/daemon/start")
        assert md5_tree(mnt) == _md5_src(src)
        assert b.client.info()["backend_collection"]["/"]["bootstrap_digest"] == good
        crash(b)
        boot.write_bytes(bad.read_bytes())  # changed while no daemon serves it
        c = spawn("c", "--upgrade", expect_state="INIT")
        t = sup.give_back()
        with pytest.raises(ApiClientError) as ei:
            c.client.put("/api/v1/daemon/fuse/takeover")
        t.join(30)
        assert f"is {_sha(bad)}, expected {good}: refusing to mount" in str(ei.value)
        assert c.client.state() == "INIT"
    finally:
        # every holder of the FUSE fd goes first: a connection still held but unserved would
        # block the clean-up's stat and umount of the mount point
        for d in daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait(10)
        sup.close()
        for d in daemons:
            d.stop()
