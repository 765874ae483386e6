"""Secrets (issue 12, point 4): credentials never in logs, never readable by other users.

The outside probe found the snapshotter root 0755, ``metadata.db`` and the log 0644, and the
``containerd.io/snapshot/pullsecret`` label printed in the log at debug level. These tests run
the real ``containerd-nydus-grpc`` (and nydusd's logging) and look at the files it leaves.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

SECRET = "s3cr3t-PULL-token-4711"
LABELS = {
    "containerd.io/snapshot/pullusername": "robot",
    "containerd.io/snapshot/pullsecret": SECRET,
    "containerd.io/snapshot/cri.image-ref": "registry.example/app:1",
}


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _readable_by_others(path: Path, root: Path) -> bool:
    """Whether a user who is neither owner nor group could read ``path`` under ``root``."""
    if not _mode(path) & stat.S_IROTH:
        return False
    d = path.parent
    while True:
        if not _mode(d) & stat.S_IXOTH:
            return False
        if d == root or d == d.parent:
            return True
        d = d.parent


@pytest.fixture
def snapshotter(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """``containerd-nydus-grpc --log-level debug`` on a root that existed with mode 0755."""
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    sock = tmp_path / "snap.sock"
    code = "import sys\nfrom nydus.cli.snapshotter import main\nsys.exit(main())"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--root",
            str(root),
            "--address",
            str(sock),
            "--log-level",
            "debug",
            "--daemon-mode",
            "none",
            "--containerd-address",
            str(tmp_path / "no-containerd.sock"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"snapshotter did not start:\n{out}")
            time.sleep(0.1)
        yield root, sock, root / "logs" / "containerd-nydus-grpc.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_snapshotter_keeps_credentials_private(snapshotter: tuple[Path, Path, Path]) -> None:
    from nydus.snapshotter.containerd.proto import SNAPSHOTS_SERVICE, snapshots_pb2
    from nydus.snapshotter.containerd.rpc import ServiceClient

    root, sock, log_file = snapshotter
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        client = ServiceClient(channel, SNAPSHOTS_SERVICE, [("containerd-namespace", "t")], 10)
        client.unary(
            "Prepare",
            snapshots_pb2.PrepareSnapshotRequest(key="t/1/active", parent="", labels=LABELS),
            snapshots_pb2.PrepareSnapshotResponse,
        )
        info = client.unary(
            "Stat",
            snapshots_pb2.StatSnapshotRequest(key="t/1/active"),
            snapshots_pb2.StatSnapshotResponse,
        )
    assert info.info.labels["containerd.io/snapshot/pullsecret"] == SECRET  # kept for later
    # modes: the root tightened, its db and log private
    assert _mode(root) == 0o700
    assert _mode(root / "logs") == 0o700
    assert _mode(log_file) == 0o600
    assert _mode(root / "metadata.db") == 0o600
    for extra in ("metadata.db-wal", "metadata.db-shm"):
        if (root / extra).exists():
            assert _mode(root / extra) == 0o600
    # the label was logged at debug level, with its secret redacted
    text = log_file.read_text()
    assert "Prepare key=t/1/active" in text
    assert SECRET not in text
    assert "<redacted>" in text
    # wherever the secret is stored, no other user can read it
    holders = [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert holders, "the pull secret is stored somewhere (metadata.db) for later mounts"
    for p in holders:
        assert not _readable_by_others(p, root), p
        assert _mode(p) & 0o077 == 0, p


def test_nydusd_log_file_is_private_and_redacted(tmp_path: Path) -> None:
    from nydus.daemon.logsetup import setup_logging

    log_file = tmp_path / "nydusd.log"
    log_file.write_text("")
    os.chmod(log_file, 0o644)  # a file left by an older run is tightened too
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        handler = setup_logging("debug", str(log_file))
        config = {
            "device": {
                "backend": {
                    "type": "registry",
                    "config": {
                        "host": "r.example",
                        "auth": "dXNlcjpwYXNz",
                        "registry_token": SECRET,
                    },
                }
            }
        }
        logging.getLogger("secrets.test").debug("config %s", config)
        logging.getLogger("secrets.test").debug("labels %s", LABELS)
        logging.getLogger("secrets.test").debug("headers Authorization: Bearer %s", SECRET)
        handler.flush()
        handler.close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert _mode(log_file) == 0o600
    text = log_file.read_text()
    assert "r.example" in text and "robot" in text
    assert SECRET not in text and "dXNlcjpwYXNz" not in text


def test_rotated_nydusd_logs_are_private(tmp_path: Path) -> None:
    from nydus.daemon.logsetup import setup_logging

    log_file = tmp_path / "rot.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        handler = setup_logging("info", str(log_file), rotation_size_mb=1)
        for _ in range(3000):
            logging.getLogger("secrets.test").info("x" * 600)
        handler.close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    logs = sorted(tmp_path.glob("rot.log*"))
    assert len(logs) >= 2
    assert all(_mode(p) == 0o600 for p in logs), [(p.name, oct(_mode(p))) for p in logs]


def test_daemon_manager_state_is_private(tmp_path: Path) -> None:
    from nydus.snapshotter.config import SnapshotterConfig
    from nydus.snapshotter.daemons.manager import DaemonManager

    root = tmp_path / "root"
    (root / "daemons").mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / "daemons", 0o755)
    cfg = SnapshotterConfig(root=root, cache_dir=tmp_path / "cache")
    m = DaemonManager(cfg, start_watcher=False)
    try:
        m._save()
    finally:
        m.close()
    assert _mode(root) == 0o700
    assert _mode(root / "daemons") == 0o700
    assert _mode(root / "daemons" / "state.json") == 0o600
    assert _mode(m.sock_dir) == 0o700


def test_credential_helper_output_is_not_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nydus.registry import auth

    helper = tmp_path / "docker-credential-leaky"
    helper.write_text(f'#!/bin/sh\necho \'{{"Secret": "{SECRET}"}}\'\nexit 1\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with caplog.at_level(logging.DEBUG, logger="nydus"):
        assert auth._run_credential_helper("leaky", "r.example") is None
    assert SECRET not in caplog.text


def test_redaction_helpers() -> None:
    from nydus.credentials import (
        REDACTED,
        RedactingFilter,
        redact_config,
        redact_headers,
        redact_labels,
        redact_url,
    )

    assert redact_labels(LABELS) == {**LABELS, "containerd.io/snapshot/pullsecret": REDACTED}
    assert redact_labels({"org.opencontainers.image.authors": "me"}) == {
        "org.opencontainers.image.authors": "me"
    }
    cfg = redact_config(
        {"device": {"backend": {"config": {"auth": "x", "host": "h", "password": "p"}}}}
    )
    assert cfg == {"device": {"backend": {"config": {"auth": "", "host": "h", "password": ""}}}}
    assert redact_headers({"Authorization": "Bearer t", "Accept": "a"}) == {
        "Authorization": REDACTED,
        "Accept": "a",
    }
    url = redact_url("https://u:p@s3.example/b/o?X-Amz-Signature=abc&partNumber=1")
    assert "abc" not in url and "u:p" not in url and "partNumber=1" in url
    record = logging.LogRecord(
        "n",
        logging.INFO,
        __file__,
        1,
        "got %s and %s",
        ({"containerd.io/snapshot/pullsecret": SECRET}, '{"registry_token": "' + SECRET + '"}'),
        None,
    )
    assert RedactingFilter().filter(record)
    assert SECRET not in record.getMessage() and "pullsecret" in record.getMessage()


def test_private_dir_tightens(tmp_path: Path) -> None:
    from nydus.credentials import private_dir

    d = tmp_path / "a" / "b"
    private_dir(d)
    assert _mode(d) == 0o700
    os.chmod(d, 0o755)
    private_dir(d)
    assert _mode(d) == 0o700
