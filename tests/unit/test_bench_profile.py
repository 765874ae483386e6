"""bench/nydusd_profile.py: which processes are nydusd, and how py-spy's raw stacks add up."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import nydusd_profile as prof  # noqa: E402


def test_is_nydusd() -> None:
    assert prof.is_nydusd(["/v/bin/python3", "/v/bin/nydusd", "--mountpoint", "/m"])
    assert prof.is_nydusd(["python3", "-m", "nydus.cli.nydusd", "--apisock", "/s"])
    assert not prof.is_nydusd(["/v/bin/python3", "/v/bin/containerd-nydus-grpc", "nydusd"])
    assert not prof.is_nydusd(["/usr/bin/nydusd"])  # not a Python process: py-spy can't read it
    assert not prof.is_nydusd([])


def test_aggregate_phases_and_own(tmp_path: Path) -> None:
    raw = tmp_path / "1.txt"
    raw.write_text(
        "thread (0x1): MainThread;<module> (a.py:1);_find_and_load (<frozen>:2) 6\n"
        "thread (0x2): w;Thread.run (t.py:3);BlobFetcher.prefetch (f.py:4);"
        "_zstd_decompress (codec.py:59) 3\n"
        "thread (0x3): w;FuseSession._worker (s.py:5);FuseSession._reply (s.py:6) 1\n"
        "thread (0x4): MainThread 9\n"  # a thread with no Python frame: not counted
    )
    total, own, incl, phase = prof.aggregate([raw])
    assert total == 10
    assert phase == {"imports": 6, "prefetch": 3, "blob device / FUSE serving": 1}
    assert own["_zstd_decompress (codec.py:59)"] == 3
    assert incl["Thread.run"] == 3
    text = prof.report([raw], top=5)
    assert "| imports | 60.0 % | 0.024 |" in text
