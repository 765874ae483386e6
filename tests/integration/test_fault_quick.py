"""The quick subset of the fault suite (``bench/fault.py --quick``), one test per kind of trial.

Each test runs ``bench/fault.py --quick --only KIND`` in a subprocess (a few trials: corrupted
registry blobs and caches served by nydusd with both drivers, corrupted bootstraps, a fault
proxy, SIGKILLs during reads, the hostile tars through every layer consumer, secrets left by
the snapshotter) and asserts that every row of its report is all zeros: no wrong bytes, no
hang over 10 s, no write outside a target, no traceback, no secret readable by other users.
The full suite (``bench/fault.py`` without ``--quick``) is the measuring instrument; this is
its smoke test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ("wrong_bytes", "hangs", "escapes", "tracebacks", "secrets")

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

NEEDS_REGISTRY = pytest.mark.skipif(
    shutil.which("docker-registry") is None, reason="docker-registry not installed"
)
KINDS = [
    pytest.param("registry", marks=NEEDS_REGISTRY),
    pytest.param("proxy", marks=NEEDS_REGISTRY),
    "cache",
    "bootstrap",
    "sigkill",
    pytest.param(
        "tar",
        marks=pytest.mark.skipif(
            shutil.which("unshare") is None, reason="needs unshare (util-linux)"
        ),
    ),
    "secrets",
]


@pytest.mark.parametrize("kind", KINDS)
def test_fault_quick(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "fault.py"),
            "--quick",
            "--only",
            kind,
            "--no-report",
            "--json",
            str(out),
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["trials"] > 0 for r in rows), rows
    bad = [r for r in rows if any(r[c] for c in COLUMNS)]
    assert not bad, "\n".join(
        f"{r['finding']}: "
        + ", ".join(f"{c} {r[c]}" for c in COLUMNS if r[c])
        + f" ({r['trials']} trials) -- "
        + "; ".join(r["notes"])
        for r in bad
    )
