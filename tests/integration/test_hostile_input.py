"""Hostile input against the real processes (issue 12, point 5): nydusd given a FIFO as its
bootstrap (on the command line and through the API), and nydusify converting an index whose
platform names come from a hostile registry.

The outside probe saw nydusd hang on a FIFO bootstrap, ignore SIGTERM and block its whole API,
and ``nydusify convert`` write into the parent of ``--work-dir``. Every wait here has a timeout
and every FIFO gets a writer at the end, so the old code fails these tests instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import oci_images as oi
import registry
from nydus.daemon.client import ApiClientError, NydusdClient
from nydus.format import oci

registry_plain = registry.registry_plain

_BOOT = "import sys\nfrom nydus.cli.nydusd import main\nsys.exit(main())"


def _unblock_fifo(fifo: Path) -> None:
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _stop(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for args in (["umount", str(mnt)], ["umount", "-l", str(mnt)]):
        if _mounted(mnt):  # os.path.ismount is False for a dead FUSE mount (ENOTCONN)
            subprocess.run(args, capture_output=True, check=False)


def _mounted(mnt: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f)


def _config(tmp_path: Path) -> Path:
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(
        json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}}})
    )
    return cfg


def test_nydusd_refuses_a_fifo_bootstrap_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "boot.fifo"
    os.mkfifo(fifo)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BOOT,
            "--config",
            str(_config(tmp_path)),
            "--mountpoint",
            str(mnt),
            "--bootstrap",
            str(fifo),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
                pytest.fail("nydusd hung on a FIFO bootstrap (SIGTERM ended it)")
            except subprocess.TimeoutExpired:
                pytest.fail("nydusd hung on a FIFO bootstrap and ignored SIGTERM")
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        assert proc.returncode == 3, err
        assert "Traceback" not in err
        line = f"bootstrap {fifo} is a FIFO, not a regular file"
        assert sum(line in ln for ln in err.splitlines()) == 1, err  # said once, one line
    finally:
        _unblock_fifo(fifo)
        _stop(proc, mnt)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


@pytest.mark.kernel
def test_nydusd_api_survives_a_fifo_mount_and_sigterm_works(tmp_path: Path) -> None:
    fifo = tmp_path / "api.fifo"
    os.mkfifo(fifo)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "api.sock"
    log = tmp_path / "nydusd.log"
    cfg = _config(tmp_path)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _BOOT,
                "--mountpoint",
                str(mnt),
                "--apisock",
                str(sock),
                "--fs-driver",
                "fusedev",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        client = NydusdClient(str(sock), timeout=5)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(Exception):
                if client.state() == "RUNNING":
                    break
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        for source, why in ((fifo, "is a FIFO"), (Path("/dev/zero"), "is a device")):
            try:
                client.mount("/x", str(source), cfg.read_text())
                pytest.fail(f"mounting {source} succeeded")
            except ApiClientError as e:
                assert e.status == 400 and why in e.message
            except TimeoutError:
                pytest.fail(f"the API hung on a mount of {source}")
        assert client.state() == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0, log.read_text(errors="replace")
        except subprocess.TimeoutExpired:
            pytest.fail("nydusd ignored SIGTERM")
    finally:
        _unblock_fifo(fifo)
        _stop(proc, mnt)


def test_nydusify_platform_names_never_escape_the_work_dir(
    registry_plain: registry.RegistryServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An index entry with platform ``os: ".."`` made the per-platform work dir the parent of
    ``--work-dir``; platform names from a registry are now sanitized."""
    from nydus.cli.nydusify import main

    client = registry_plain.client()
    entries = []
    for i, plat in enumerate(
        ({"os": "..", "architecture": ""}, {"os": "linux", "architecture": "../../x"})
    ):
        layers = [oi.layer([oi.T("file", f"f{i}", b"data %d\n" % i)])]
        config = oi.config_for(layers)
        body, mt = oi.image_manifest(tmp_path / "blobs", layers, config)
        for b in [config, *(ly.blob for ly in layers)]:
            client.push_blob("hostile", oci.sha256_digest(b), b)
        digest = client.put_manifest("hostile", oci.sha256_digest(body), body, mt)
        entries.append({"mediaType": mt, "digest": digest, "size": len(body), "platform": plat})
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": oci.MEDIA_TYPE_OCI_INDEX, "manifests": entries}
    ).encode()
    client.put_manifest("hostile", "multi", index, oci.MEDIA_TYPE_OCI_INDEX)

    outer = tmp_path / "outer"
    work = outer / "work"
    work.mkdir(parents=True)
    host = registry_plain.host
    rc = main(
        [
            "convert",
            "--source",
            f"{host}/hostile:multi",
            "--target",
            f"{host}/hostile:nydus",
            "--all-platforms",
            "--work-dir",
            str(work),
        ]
    )
    out = capsys.readouterr()
    assert sorted(os.listdir(outer)) == ["work"], (os.listdir(outer), out.err[-2000:])
    assert rc == 0, out.err[-2000:]
    subdirs = sorted(os.listdir(work))
    assert len(subdirs) == 2 and all(d[0].isalnum() for d in subdirs), subdirs
