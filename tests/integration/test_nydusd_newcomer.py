"""nydusd as a newcomer meets it (issue 16): upstream's inline blobs served, a killed daemon's
mounts explained on restart, a shared daemon for ``nydusctl mount``, a ``--compressor none``
image mounted by the kernel with ``nydus-image mount``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_nydusd import Nydusd, cli, nydus_image, run

from nydus.kernel_mount import mounts_at
from upstream_style import upstream_inline_blob

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mounts"),
]


def _tree(root: Path) -> Path:
    src = root / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n" * 100_000)
    (src / "d" / "b").write_bytes(b"other\n")
    return src


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    for _ in range(4):
        if os.path.ismount(m):
            subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)


@pytest.mark.parametrize("toc", [True, False], ids=["blob-toc-zstd", "no-toc"])
def test_nydusd_serves_an_upstream_inline_blob(tmp_path: Path, mnt: Path, toc: bool) -> None:
    src = _tree(tmp_path)
    nydus_image(tmp_path, "create", "--blob-inline-meta", "-b", tmp_path / "ours", src)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    from nydus.metadata import open_bootstrap

    data = upstream_inline_blob((tmp_path / "ours").read_bytes(), toc=toc)
    (tmp_path / "up").write_bytes(data)
    with open_bootstrap(str(tmp_path / "up")) as md:
        blob_id = md.blobs[0].blob_id
    (blobs / blob_id).write_bytes(data)
    with Nydusd(
        ["--bootstrap", blobs / blob_id, "--localfs-dir", blobs, "--mountpoint", mnt],
        mnt,
        cwd=tmp_path,
    ).start() as d:
        assert (mnt / "a.txt").read_bytes() == b"hello\n" * 100_000
        assert (mnt / "d" / "b").read_bytes() == b"other\n"
        assert "is a data blob with the bootstrap inlined" in d.log_text()


def test_restart_after_kill_explains_the_left_mounts(tmp_path: Path, mnt: Path) -> None:
    src = _tree(tmp_path)
    nydus_image(tmp_path, "create", "-B", tmp_path / "x.boot", "-D", tmp_path / "blobs", src)
    args: list[str | os.PathLike[str]] = [
        "--bootstrap",
        tmp_path / "x.boot",
        "--localfs-dir",
        tmp_path / "blobs",
        "--mountpoint",
        mnt,
    ]
    d = Nydusd(args, mnt, cwd=tmp_path).start()
    try:
        live = run([*cli("nydusd"), *map(os.fspath, args)], tmp_path, timeout=60)
        assert live.returncode == 2
        assert "by nydusd pid" in live.stderr and live.stderr.count("ERROR") == 1
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        assert mounts_at(mnt)  # what a killed daemon leaves (stat may fail on it: ENOTCONN)
        dead = run([*cli("nydusd"), *map(os.fspath, args)], tmp_path, timeout=60)
        assert dead.returncode == 2
        assert "one was killed" in dead.stderr and f"umount -l {mnt}" in dead.stderr
        # following the hint clears it, and nydusd starts again
        for _ in mounts_at(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=True)
        with Nydusd(args, mnt, cwd=tmp_path).start():
            assert (mnt / "d" / "b").read_bytes() == b"other\n"
    finally:
        d.stop()
        for _ in mounts_at(mnt):  # what a failed run left (a dead mount fails stat)
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_nydusctl_mount_needs_a_shared_daemon_and_says_so(tmp_path: Path, mnt: Path) -> None:
    src = _tree(tmp_path)
    nydus_image(tmp_path, "create", "-B", tmp_path / "x.boot", "-D", tmp_path / "blobs", src)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        '{"device": {"backend": {"type": "localfs", "config": {"dir": "%s"}}}}'
        % (tmp_path / "blobs")
    )
    sock = tmp_path / "api.sock"
    with Nydusd(
        [
            "--bootstrap",
            tmp_path / "x.boot",
            "--config",
            cfg,
            "--mountpoint",
            mnt,
            "--apisock",
            sock,
        ],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start():
        r = run(
            [
                *cli("nydusctl"),
                "--sock",
                str(sock),
                "mount",
                "--source",
                str(tmp_path / "x.boot"),
                "--config",
                str(cfg),
                "--mountpoint",
                "/sub",
            ],
            tmp_path,
        )
        assert r.returncode != 0
        assert "start nydusd without --bootstrap" in r.stdout + r.stderr


def test_nydus_image_mount_of_an_uncompressed_image(tmp_path: Path, mnt: Path) -> None:
    from nydus.kernel_mount import erofs_supported

    if not erofs_supported():
        pytest.skip("no erofs in /proc/filesystems")
    src = _tree(tmp_path)
    nydus_image(
        tmp_path,
        "create",
        "--compressor",
        "none",
        "-B",
        tmp_path / "x.boot",
        "-D",
        tmp_path / "blobs",
        src,
    )
    r = run(
        [
            *cli("nydus-image"),
            "mount",
            "-B",
            str(tmp_path / "x.boot"),
            "-D",
            str(tmp_path / "blobs"),
            str(mnt),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "a.txt").read_bytes() == b"hello\n" * 100_000
    finally:
        deadline = time.monotonic() + 10
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    # a compressed image is refused with the reason
    nydus_image(tmp_path, "create", "-B", tmp_path / "z.boot", "-D", tmp_path / "zb", src)
    r = run(
        [
            *cli("nydus-image"),
            "mount",
            "-B",
            str(tmp_path / "z.boot"),
            "-D",
            str(tmp_path / "zb"),
            str(mnt),
        ],
        tmp_path,
    )
    assert r.returncode == 3 and "--compressor none" in r.stderr
    assert not os.path.ismount(mnt)
