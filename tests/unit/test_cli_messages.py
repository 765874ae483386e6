"""What a newcomer meets first: help texts, one-line errors with the right exit code and
nothing left behind, consistent numbers, upstream's inline blobs (issue 16)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nydus.cli import nydus_image, nydusctl, nydusd, nydusify, run_guarded
from nydus.errors import ConfigError
from nydus.metadata import open_bootstrap
from upstream_style import upstream_inline_blob


def _tree(root: Path) -> Path:
    src = root / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello\n" * 1000)
    (src / "d" / "b").write_bytes(b"other\n")
    os.link(src / "a.txt", src / "d" / "hard")
    os.symlink("a.txt", src / "l")
    return src


def _ni(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = nydus_image.main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Path]:
    src = _tree(tmp_path)
    rc, _out, err = _ni(capsys, "create", "-B", tmp_path / "x.boot", "-D", tmp_path / "blobs", src)
    assert rc == 0, err
    return tmp_path / "x.boot", tmp_path / "blobs"


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error" in ln.lower()]


# --- help -------------------------------------------------------------------------------------


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for act in p._actions:
        if isinstance(act, argparse._SubParsersAction):
            return dict(act.choices)
    return {}


@pytest.mark.parametrize(
    "make", [nydus_image._parser, nydusify._parser, nydusd._parser, nydusctl._parser]
)
def test_every_flag_has_help(make: object) -> None:
    p = make()  # type: ignore[operator]
    parsers = {"": p, **_subparsers(p)}
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, sp in parsers.items()
        for a in sp._actions
        if not isinstance(a, argparse._SubParsersAction) and not a.help
    ]
    assert missing == []


def test_help_names_choices_defaults_and_formats() -> None:
    text = _subparsers(nydus_image._parser())["create"].format_help()
    assert "{zstd,lz4_block,none}" in text and "(default: zstd)" in text
    assert "1M" in text and "0x100000" in text
    assert "ls [PATH]" in _subparsers(nydus_image._parser())["inspect"].format_help()
    check = _subparsers(nydusify._parser())["check"].format_help()
    assert "the target's data blobs (not the source's)" in check


def test_chunk_size_accepts_suffixes_and_explains_the_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert nydus_image._int("1M") == nydus_image._int("0x100000") == 1048576
    assert nydus_image._int("512K") == 512 << 10
    with pytest.raises(SystemExit) as e:
        nydus_image.main(["create", "--chunk-size", "1X", "-B", str(tmp_path / "b"), str(tmp_path)])
    assert e.value.code == 2
    assert "1M/512K" in capsys.readouterr().err


def test_compressor_choices_refuse_gzip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        nydus_image.main(
            ["create", "--compressor", "gzip", "-B", str(tmp_path / "b"), str(tmp_path)]
        )
    assert e.value.code == 2
    assert "choose from 'zstd', 'lz4_block', 'none'" in capsys.readouterr().err


def test_nydusctl_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        nydusctl.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("nydusctl ")


# --- nydus-image errors ----------------------------------------------------------------------


def test_create_bootstrap_in_missing_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _tree(tmp_path)
    rc, _out, err = _ni(
        capsys, "create", "-B", "/nonexistent/x.boot", "-D", tmp_path / "blobs", src
    )
    assert rc == 2
    (line,) = _error_lines(err)
    assert "directory /nonexistent does not exist" in line and ".tmp" not in line
    assert not (tmp_path / "blobs").exists() or not os.listdir(tmp_path / "blobs")


def test_create_json_in_missing_dir_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _tree(tmp_path)
    rc, _out, err = _ni(
        capsys,
        "create",
        "-B",
        tmp_path / "y.boot",
        "-D",
        tmp_path / "blobs",
        "-J",
        "/nonexistent/dir/x.json",
        src,
    )
    assert rc == 2
    (line,) = _error_lines(err)
    assert "-J/--output-json /nonexistent/dir/x.json" in line and "Errno" not in line
    assert not (tmp_path / "y.boot").exists()
    assert not (tmp_path / "blobs").exists() or not os.listdir(tmp_path / "blobs")


def test_unpack_missing_blob_names_the_dir_and_leaves_no_tar(
    image: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boot, _blobs = image
    empty = tmp_path / "out"
    empty.mkdir()
    rc, _out, err = _ni(capsys, "unpack", "-B", boot, "-D", empty, "--output", tmp_path / "o.tar")
    assert rc == 2
    (line,) = _error_lines(err)
    assert f"in {empty}" in line and "give -D" not in line
    assert not (tmp_path / "o.tar").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".unpack-")]


def test_unpack_writes_the_tar_with_the_umask_mode(
    image: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    boot, blobs = image
    rc, _out, err = _ni(capsys, "unpack", "-B", boot, "-D", blobs, "--output", tmp_path / "o.tar")
    assert rc == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "o.tar").stat().st_mode) == 0o666 & ~umask


def test_check_missing_blob_dir(
    image: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _out, err = _ni(capsys, "check", "-B", image[0], "-D", "/nonexistent")
    assert rc == 2
    (line,) = _error_lines(err)
    assert "blob directory /nonexistent does not exist" in line


def test_stat_dir_says_what_it_skips(
    image: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "boots"
    d.mkdir()
    (d / "one").write_bytes(image[0].read_bytes())
    (d / "two.boot").write_bytes(image[0].read_bytes())
    rc, out, err = _ni(capsys, "stat", "-D", d)
    assert rc == 0, err
    assert json.loads(out)["images"] == 1
    assert "skipping" in err and "two.boot" in err and "extension" in err


def test_check_counts_like_inspect_and_names_features(
    image: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _ni(capsys, "check", "-B", image[0], "-D", image[1])
    assert rc == 0, err
    rc, stats, err = _ni(capsys, "inspect", image[0], "-R", "stats")
    s = json.loads(stats)
    # root, d, a.txt (= d/hard), d/b, l: 5 inodes, 6 names
    assert s["inodes"] == 5 and s["files"] == 2
    assert (
        f"{s['inodes']} inodes ({s['files']} files, {s['dirs']} dirs, "
        f"{s['symlinks']} symlinks, 0 others; 6 paths)"
    ) in out
    assert "features aligned inlined_chunk_digest" in out and "0x" not in out.split("features")[1]


# --- upstream's inline blobs -------------------------------------------------------------------


@pytest.mark.parametrize("toc", [True, False], ids=["blob-toc-zstd", "no-toc"])
def test_upstream_inline_blob_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toc: bool
) -> None:
    src = _tree(tmp_path)
    ours = tmp_path / "ours.blob"
    rc, _out, err = _ni(capsys, "create", "--blob-inline-meta", "-b", ours, src)
    assert rc == 0, err
    up = tmp_path / "up.blob"
    up.write_bytes(upstream_inline_blob(ours.read_bytes(), toc=toc))
    with open_bootstrap(str(up)) as md:
        assert md.blobs[0].compressed_size < up.stat().st_size  # the table's shorter size
        assert md.readlink(md.resolve("/l")) == b"a.txt"
    rc, out, err = _ni(capsys, "check", up, "--blob", up)
    assert rc == 0, out + err
    assert "verified 3 chunks" in out or "verified" in out
    rc, out, err = _ni(capsys, "inspect", up, "-R", "ls /d")
    assert rc == 0, err
    assert {e["name"] for e in json.loads(out)} == {"b", "hard"}
    rc, out, err = _ni(capsys, "unpack", up, "--blob", up, "--output", tmp_path / "u.tar")
    assert rc == 0, err


def test_plain_blob_size_mismatch_is_still_an_error(
    image: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    boot, blobs = image
    (blob,) = blobs.iterdir()
    with open(blob, "ab") as f:
        f.write(b"\0" * 512)
    rc, _out, err = _ni(capsys, "check", "-B", boot, "-D", blobs)
    assert rc == 4 and "table says" in err


# --- errors printed once ------------------------------------------------------------------------


def test_run_guarded_prints_once_when_logging_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("test-once")
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    try:

        def fail() -> int:
            raise ConfigError("the reason")

        assert run_guarded("tool", fail, log) == 2
    finally:
        root.handlers[:] = saved
    assert capsys.readouterr().err.count("the reason") == 1


def test_nydusd_refuses_missing_localfs_dir_once(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    boot = tmp_path / "x.boot"
    boot.write_bytes(b"")
    code = "import sys; from nydus.cli.nydusd import main; sys.exit(main())"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--localfs-dir",
            "/nonexistent",
            "--bootstrap",
            str(boot),
            "--mountpoint",
            str(mnt),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("--localfs-dir /nonexistent: no such directory") == 1
    lines = r.stderr.splitlines()
    assert "exits" in lines[-1]  # after the reason, not before
    assert not os.path.ismount(mnt)


def test_busy_mountpoint_says_how_to_clear_a_dead_daemons_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nydus.kernel_mount as km

    monkeypatch.setattr(km, "mounts_at", lambda p: ["fuse.rafs", "erofs"])
    monkeypatch.setattr(km, "nydusd_serving", lambda p: [])
    with pytest.raises(
        ConfigError,
        match=r"one was killed; clear them with 'umount -l /m' "
        r"\(2 times\)",
    ):
        nydusd._refuse_busy_mountpoint("/m")
    monkeypatch.setattr(km, "nydusd_serving", lambda p: [4242])
    with pytest.raises(ConfigError, match=r"in use .* by nydusd pid 4242"):
        nydusd._refuse_busy_mountpoint("/m")
    monkeypatch.setattr(km, "mounts_at", lambda p: [])
    nydusd._refuse_busy_mountpoint("/m")


def test_nydusd_serving_reads_command_lines(tmp_path: Path) -> None:
    from nydus.kernel_mount import nydusd_serving

    def proc(pid: int, *argv: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv))

    proc(10, "/usr/bin/python3", "/v/bin/nydusd", "--mountpoint", "/srv/m", "-B", "b")
    proc(11, "/usr/local/bin/nydusd", "-M", "/srv/other")
    proc(12, "/bin/sleep", "--mountpoint", "/srv/m")
    assert nydusd_serving("/srv/m", proc=str(tmp_path)) == [10]


# --- nydusify parsing and lookups -------------------------------------------------------------


def test_target_suffix_with_a_leading_dash() -> None:
    argv = nydusify._join_dash_values(["convert", "--source", "r/a:1", "--target-suffix", "-nydus"])
    a = nydusify._parser().parse_args(argv)
    assert a.target_suffix == "-nydus"


def test_nydusd_found_next_to_the_running_program(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nydus.convert.mount import find_tool

    exe = tmp_path / "nydusd"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "nydusify")])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_tool("nydusd") == str(exe)
    with pytest.raises(ConfigError, match="not found"):
        find_tool("/nonexistent/nydusd")


def test_snapshotter_prints_a_fatal_error_once(tmp_path: Path) -> None:
    code = "import sys; from nydus.cli.snapshotter import main; sys.exit(main())"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--shared-daemon",
            "--daemon-mode",
            "dedicated",
            "--root",
            str(tmp_path / "root"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert r.stderr.count("--shared-daemon contradicts --daemon-mode dedicated") == 1
    assert r.stderr.startswith("containerd-nydus-grpc: error: ")
