"""The hostile-layer corpus (``tests/hostile_tars.py``) through ``nydus-image create``.

Every case must give a correct image or a clear FormatError (exit 3) within a time and memory
budget, and write nothing but the requested outputs: the output directory holds exactly the
bootstrap, the JSON report and at most one blob, no temporary file is left anywhere under the
private TMPDIR, and no path named in a tar appears on the host.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from pathlib import Path

import pytest

from hostile_tars import DEFAULT_OUTSIDE, Case, hostile_cases
from nydus.metadata import open_bootstrap

TIME_BUDGET = 60.0  # seconds per case (the slowest, a 1 GiB gzip bomb, takes a few)
RSS_BUDGET_MIB = 300
GNU_TIME = "/usr/bin/time"  # scripts/setup.sh installs it (Debian package "time")
HOST_CANARIES = [
    "/tmp/nydus-hostile-abs",
    "/tmp/nydus-hostile-through",
    "/evil",
    "/tmp/evil",
    DEFAULT_OUTSIDE.decode(),
]


@pytest.mark.skipif(not os.access(GNU_TIME, os.X_OK), reason="GNU time (/usr/bin/time) needed")
@pytest.mark.parametrize("case", hostile_cases(), ids=lambda c: c.name)
def test_hostile_layer(case: Case, tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    for canary in HOST_CANARIES:
        assert not os.path.lexists(canary), f"{canary} exists before the test"
    layer = tmp_path / "layer"
    layer.write_bytes(case.make())
    out = tmp_path / "out"
    out.mkdir()
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    cmd = nydus_image.command(
        "create",
        "-t",
        "tar-rafs",
        "-B",
        "boot",
        "-D",
        "blobs",
        "-J",
        "out.json",
        "--compressor",
        "zstd",
        layer,
    )
    # Peak RSS from GNU time: the ru_maxrss wait4 gives a direct child includes this pytest
    # process's own high-water mark, inherited through fork and kept across exec.
    rss_file = tmp_path / "rss"
    cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd]
    # stop a runaway long before it hurts the machine
    signal_limit = int(TIME_BUDGET * 2)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (signal_limit, signal_limit))

    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limits
    )
    _pid, status, _usage = os.wait4(p.pid, 0)
    seconds = time.monotonic() - t0
    assert p.stderr is not None
    stderr = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    rc = os.waitstatus_to_exitcode(status)
    rss = int(rss_file.read_text().split()[-1]) / 1024  # GNU time %M is KiB
    assert seconds < TIME_BUDGET, f"{case.name}: {seconds:.1f}s"
    assert rss < RSS_BUDGET_MIB, f"{case.name}: peak RSS {rss:.0f} MiB"

    if case.expect == "error":
        assert rc == 3, f"{case.name}: exit {rc}\n{stderr[-2000:]}"
        assert case.match in stderr, stderr[-2000:]
        assert "Traceback" not in stderr
        assert sorted(os.listdir(out)) == ["blobs"]  # the partial blob was removed
        assert os.listdir(out / "blobs") == []
    else:
        assert rc == 0, f"{case.name}: exit {rc}\n{stderr[-2000:]}"
        names = sorted(os.listdir(out))
        assert names == ["blobs", "boot", "out.json"], names
        j = json.loads((out / "out.json").read_text())
        assert len(os.listdir(out / "blobs")) == (1 if j["blob"] else 0)
        with open_bootstrap(out / "boot") as md:
            for path in case.paths:
                md.resolve(path)
            for path in case.absent:
                with pytest.raises(Exception, match="not found"):
                    md.resolve(path)
        nydus_image("check", out / "boot", "-D", out / "blobs")
    assert os.listdir(tmp) == []
    for canary in HOST_CANARIES:
        assert not os.path.lexists(canary), f"{case.name} wrote {canary}"


def test_bombs_store_one_chunk(tmp_path: Path, nydus_image) -> None:  # type: ignore[no-untyped-def]
    """1 GiB of zeros in a ~1 MiB tar.gz costs one stored chunk, not 1 GiB."""
    case = next(c for c in hostile_cases() if c.name == "gzip-bomb-tar")
    layer = tmp_path / "bomb.tgz"
    layer.write_bytes(case.make())
    out = tmp_path / "o"
    out.mkdir()
    nydus_image(
        "create",
        "-t",
        "targz-rafs",
        "-B",
        out / "boot",
        "-D",
        out / "blobs",
        "-J",
        out / "j.json",
        layer,
    )
    j = json.loads((out / "j.json").read_text())
    assert j["new_chunks"] == 1 and j["deduped_chunks"] == 1023
    assert j["tar_size"] == 512 + (1 << 30) + 1024  # header, data, end marker
    assert j["blob_size"] < 64 << 10
