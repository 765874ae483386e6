"""bench/plot.py reads the numbers of a report's table and draws its PNG (issue 16)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import plot  # noqa: E402


def test_table_and_numbers() -> None:
    rows = plot.parse_table(
        "# t\n\n| target | time s | out |\n|---|---:|---|\n"
        "| tar \\| zstd | 3,133 (0.97x) | 1.0 GiB |\n| x | - | 512 KiB |\n"
    )
    assert rows[0]["target"] == "tar | zstd"
    assert plot.number(rows[0]["time s"]) == 3133
    assert plot.number(rows[0]["out"]) == 1024
    assert plot.number(rows[1]["out"]) == 0.5
    assert plot.number("**1.83** (2.2x)") == 1.83
    assert plot.number(rows[1]["time s"]) is None
    with pytest.raises(ValueError):
        plot.parse_table("no table")


@pytest.mark.parametrize("name", sorted(p.name for p in (BENCH / "results").glob("*.md")))
def test_every_report_plots(name: str, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    md = tmp_path / name
    shutil.copy(BENCH / "results" / name, md)
    out = plot.plot_report(md)
    assert out is not None and out.read_bytes().startswith(b"\x89PNG")
