"""The bootstrap digest check (nydusd ``--bootstrap-digest``, the API's ``bootstrap_digest``)
and the snapshotter recording a bootstrap layer's digest at commit and passing it at every
mount, also after a restart."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from test_snapshotter_service import CHAIN3, FakeResolver, RecordingMounter

from nydus.cli import nydusd as nydusd_cli
from nydus.daemon.nydusd import DaemonOptions, ImageSource, Nydusd
from nydus.errors import ConfigError, FormatError, IntegrityError
from nydus.metadata import (
    parse_bootstrap_digest,
    read_verified_bootstrap,
    verify_bootstrap_digest,
)
from nydus.snapshotter.daemons.process import DaemonProcess
from nydus.snapshotter.snapshots.core import Snapshotter
from nydus.snapshotter.snapshots.labels import NYDUS_BOOTSTRAP, SNAPSHOT_REF


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def boot(fixtures_dir: Path, tmp_path: Path) -> Path:
    p = tmp_path / "image.boot"
    shutil.copyfile(fixtures_dir / "v6" / "rafs-v6-2.2.boot", p)
    return p


def test_digest_match_mismatch_and_malformed(boot: Path) -> None:
    data = boot.read_bytes()
    good = _sha(data)
    assert read_verified_bootstrap(boot, good) == data
    assert read_verified_bootstrap(boot, good.upper().replace("SHA256", "sha256")) == data
    flipped = bytearray(data)
    flipped[2000] ^= 0x40
    bad = boot.with_name("flipped.boot")
    bad.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError) as ei:
        read_verified_bootstrap(bad, good)
    assert str(ei.value) == (
        f"bootstrap {bad} is {_sha(bytes(flipped))}, expected {good}: refusing to mount"
    )
    with pytest.raises(IntegrityError):
        verify_bootstrap_digest(bytes(flipped), good, "x")
    for wrong in (
        "",
        "sha256:",
        "sha256:abc",
        "sha512:" + "0" * 64,
        "0" * 64,
        "sha256:" + "z" * 64,
        "sha256:" + "0" * 65,
    ):
        with pytest.raises(ConfigError, match="is not of the form sha256:<64 hex digits>"):
            parse_bootstrap_digest(wrong)
        with pytest.raises(ConfigError):
            read_verified_bootstrap(boot, wrong)


def test_daemon_open_image_checks_the_bytes_it_parses(
    boot: Path, fixtures_dir: Path, tmp_path: Path
) -> None:
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), blobfs_dir=str(tmp_path / "bfs")))
    cfg = {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": str(fixtures_dir / "v6" / "blobs")}}
        }
    }
    good = _sha(boot.read_bytes())
    im = d.open_image("/", ImageSource(str(boot), cfg, bootstrap_digest=good))
    try:
        assert im.verified == boot.read_bytes() and im.bootstrap_digest == good
        assert im.describe()["bootstrap_digest"] == good
    finally:
        im.close()
    with pytest.raises(IntegrityError, match="refusing to mount"):
        d.open_image("/", ImageSource(str(boot), cfg, bootstrap_digest="sha256:" + "0" * 64))
    with pytest.raises(ConfigError):
        d.open_image("/", ImageSource(str(boot), cfg, bootstrap_digest="sha256:nothex"))


def test_nydusd_cli_refuses_malformed_digest(
    boot: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc = nydusd_cli.main(
        [
            "--mountpoint",
            str(mnt),
            "--bootstrap",
            str(boot),
            "--localfs-dir",
            str(tmp_path),
            "--bootstrap-digest",
            "sha256:12",
        ]
    )
    assert rc == ConfigError.exit_code
    assert "is not of the form sha256:<64 hex digits>" in capsys.readouterr().err
    rc = nydusd_cli.main(
        [
            "--mountpoint",
            str(mnt),
            "--apisock",
            str(tmp_path / "s"),
            "--bootstrap-digest",
            _sha(b""),
        ]
    )
    assert rc == ConfigError.exit_code
    assert "--bootstrap-digest needs --bootstrap" in capsys.readouterr().err
    assert "not an upstream flag" in " ".join(nydusd_cli._parser().format_help().split())


def test_dedicated_daemon_command_passes_the_digest() -> None:
    d = DaemonProcess(
        "4",
        "dedicated",
        "/m",
        "/s",
        "/l",
        bootstrap="/b/image.boot",
        config_path="/c",
        bootstrap_digest="sha256:" + "a" * 64,
    )
    cmd = d.command("nydusd", "info")
    i = cmd.index("--bootstrap-digest")
    assert cmd[i + 1] == "sha256:" + "a" * 64 and "--bootstrap" in cmd
    d.bootstrap_digest = ""
    assert "--bootstrap-digest" not in d.command("nydusd", "info")
    # an older state file (no such key) loads; the key round-trips
    assert (
        DaemonProcess.from_json(
            {"id": "4", "mode": "dedicated", "mountpoint": "/m", "apisock": "/s", "log_file": "/l"}
        ).bootstrap_digest
        == ""
    )


def _pull(sn: Snapshotter, data: bytes) -> tuple[str, int]:
    """The bootstrap layer as containerd's unpacker makes it: prepare, write, commit."""
    labels = {SNAPSHOT_REF: CHAIN3, NYDUS_BOOTSTRAP: "true"}
    key = f"default/3/extract-3 {CHAIN3}"
    sn.prepare(key, "", labels)
    with sn.store.transaction() as tx:
        sid = tx.get_info(key)[0]
    fs = sn.upper_path(sid)
    (fs / "image").mkdir()
    (fs / "image" / "image.boot").write_bytes(data)
    sn.commit(f"default/4/{CHAIN3}", key, labels)
    return f"default/4/{CHAIN3}", sid


def test_snapshotter_records_digest_at_commit_and_passes_it(boot: Path, tmp_path: Path) -> None:
    data = boot.read_bytes()
    mounter = RecordingMounter(tmp_path / "mnt")
    sn = Snapshotter(tmp_path / "root", mounter, FakeResolver("reg/img:1"), index_off=True)
    try:
        name, sid = _pull(sn, data)
        rec = tmp_path / "root" / "snapshots" / str(sid) / "bootstrap.sha256"
        assert rec.read_text().strip() == _sha(data)
        assert os.stat(rec).st_mode & 0o777 == 0o600
        # beside the layer's files, not among them
        assert not (sn.upper_path(sid) / "bootstrap.sha256").exists()
        sn.prepare("default/5/ctr", name, {})
        sn.view("default/6/view", name, {})
        assert set(mounter.digests.values()) == {_sha(data)} and len(mounter.digests) == 2
    finally:
        sn.close()
    # after a restart, the recovered mounts carry it too
    mounter2 = RecordingMounter(tmp_path / "mnt")
    sn2 = Snapshotter(tmp_path / "root", mounter2, FakeResolver("reg/img:1"), index_off=True)
    try:
        assert [m.bootstrap_digest for m in mounter2.recovered] == [_sha(data)] * 2
    finally:
        sn2.close()


def test_snapshot_without_record_mounts_without_digest(boot: Path, tmp_path: Path) -> None:
    mounter = RecordingMounter(tmp_path / "mnt")
    sn = Snapshotter(tmp_path / "root", mounter, FakeResolver("reg/img:1"), index_off=True)
    try:
        name, sid = _pull(sn, boot.read_bytes())
        rec = tmp_path / "root" / "snapshots" / str(sid) / "bootstrap.sha256"
        rec.unlink()  # as an older snapshotter left it
        sn.prepare("default/5/ctr", name, {})
        assert list(mounter.digests.values()) == [None]
        # a damaged record is an error, never "no digest"
        rec.write_text("sha256:12\n")
        with pytest.raises(FormatError, match=r"bootstrap digest record .* is damaged"):
            sn.prepare("default/6/ctr", name, {})
    finally:
        sn.close()
