"""PNG plots of the benchmark reports, drawn from the table each report already holds.

    .venv/bin/python bench/plot.py                    # every bench/results/*.md without a plot
    .venv/bin/python bench/plot.py --force            # redraw them all
    .venv/bin/python bench/plot.py REPORT.md ...      # these reports

Each ``bench/*.py`` calls :func:`plot_report` on the report it has just written, so a new run
gets its pictures beside its Markdown (``<stem>.png``); this script draws them for reports
written before that. The numbers come from the report's first Markdown table (the one each
bench prints), so a plot shows exactly what its report says. The kind of plot follows the
report's name: ``coldstart-*``, ``read-*``, ``build-*``, ``fetch-*``, ``convert-*``,
``readpath-*``.

Needs matplotlib (``pip install -e '.[bench]'``; scripts/setup.sh installs it). Single-threaded.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

Table = list[dict[str, str]]


def parse_table(md: str) -> Table:
    """The first Markdown table of ``md`` as rows of header -> cell text."""
    lines = [ln.strip() for ln in md.splitlines()]
    for i, ln in enumerate(lines):
        if ln.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header = _cells(ln)
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                cells = _cells(row)
                rows.append(
                    dict(zip(header, cells + [""] * (len(header) - len(cells)), strict=True))
                )
            return rows
    raise ValueError("no Markdown table found")


def _cells(line: str) -> list[str]:
    # a literal pipe inside a cell is written \| (e.g. "tar \| zstd")
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def number(cell: str) -> float | None:
    """The leading number of a cell: ``3,133 (0.97x)`` -> 3133, ``25.9 MiB`` -> 25.9 (MiB),
    ``1.0 GiB`` -> 1024 (MiB), ``**1.83**`` (bold) -> 1.83; None for ``-`` or text."""
    m = re.match(r"^\s*\**\s*([-+]?[\d,]*\.?\d+)\s*(B|KiB|MiB|GiB)?", cell)
    if not m:
        return None
    v = float(m.group(1).replace(",", ""))
    scale = {"B": 1 / (1 << 20), "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}
    return v * scale.get(m.group(2) or "", 1.0)


def _pyplot() -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(
    ax: object,
    groups: list[str],
    series: dict[str, list[float | None]],
    ylabel: str,
    title: str,
    log: bool = False,
) -> None:
    """Grouped bars: one group per x label, one bar per series, values written on top."""
    n = len(series)
    width = 0.8 / max(n, 1)
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ys = [v if v is not None else 0.0 for v in vals]
        bars = ax.bar(xs, ys, width, label=name)  # type: ignore[attr-defined]
        for b, v in zip(bars, vals, strict=True):
            if v is not None:
                ax.annotate(
                    f"{v:.3g}",
                    (b.get_x() + b.get_width() / 2, b.get_height()),  # type: ignore[attr-defined]
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(groups)), groups, fontsize=8)  # type: ignore[attr-defined]
    ax.set_ylabel(ylabel)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=10)  # type: ignore[attr-defined]
    if log:
        ax.set_yscale("log")  # type: ignore[attr-defined]
    if n > 1:
        ax.legend(fontsize=8)  # type: ignore[attr-defined]


def _coldstart(rows: Table, plt: object, title: str) -> object:
    if "scenario" in rows[0]:  # the ml image's report: one table per workload and link
        return _coldstart_scenarios(rows, plt, title)
    links = list(dict.fromkeys(r["link"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def col(name: str) -> dict[str, list[float | None]]:
        return {
            m: [
                next((number(r[name]) for r in rows if r["link"] == ln and r["method"] == m), None)
                for ln in links
            ]
            for m in methods
        }

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))  # type: ignore[attr-defined]
    _bars(
        a,
        links,
        col("first output s"),
        "seconds",
        "pull start to the container's first output (lower is better)",
    )
    _bars(b, links, col("fetched"), "MiB", "bytes fetched from the registry")
    fig.suptitle(title, fontsize=10)
    return fig


def _coldstart_scenarios(rows: Table, plt: object, title: str) -> object:
    """The first table of ``coldstart.py --image ml``: one row per scenario."""
    names = [r["scenario"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))  # type: ignore[attr-defined]
    _bars(
        a,
        names,
        {
            "pull s": [number(r["pull s"]) for r in rows],
            "run s": [number(r["run s"]) for r in rows],
            "total s": [number(r["total s"]) for r in rows],
        },
        "seconds",
        "pull start to the workload's exit (lower is better)",
    )
    _bars(
        b,
        names,
        {"registry": [number(r["registry"]) for r in rows]},
        "MiB",
        "bytes fetched from the registry",
    )
    fig.suptitle(title, fontsize=10)
    return fig


def _fault(rows: Table, plt: object, title: str) -> object:
    """bench/fault.py: per finding, its trials and every kind of failure (all should be 0)."""
    names = [textwrap.fill(r["finding"], 17) for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(13, 7))  # type: ignore[attr-defined]
    _bars(a, names, {"trials": [number(r["trials"]) for r in rows]}, "trials", "trials per finding")
    kinds = ["wrong bytes", "hangs > 10 s", "escapes", "tracebacks", "secrets readable by others"]
    _bars(
        b,
        names,
        {k: [number(r[k]) for r in rows] for k in kinds if k in rows[0]},
        "count (symlog)",
        "failures (every bar should be 0)",
    )
    b.set_yscale("symlog")  # type: ignore[attr-defined]
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=6)  # type: ignore[attr-defined]
    fig.suptitle(title, fontsize=10)
    return fig


def _read(rows: Table, plt: object, title: str) -> object:
    metrics = [h for h in rows[0] if h not in ("target", "daemon cpu s")]
    native = next(r for r in rows if r["target"] == "native")
    fig, ax = plt.subplots(figsize=(12, 4.5))  # type: ignore[attr-defined]
    series = {}
    for r in rows:
        if r["target"] == "native":
            continue
        series[r["target"]] = [(number(r[m]) or 0.0) / (number(native[m]) or 1.0) for m in metrics]
    _bars(
        ax,
        [m.replace(" files/s", "\nfiles/s").replace(" MB/s", "\nMB/s") for m in metrics],
        series,
        "x native (1.0 = the plain directory)",
        "reads against the native directory (higher is better)",
    )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    fig.suptitle(title, fontsize=10)
    return fig


def _build(rows: Table, plt: object, title: str) -> object:
    targets = list(dict.fromkeys(r["target"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))  # type: ignore[attr-defined]
    for ax, col, label in (
        (a, "MB/s in", "MB/s of input (higher is better)"),
        (b, "max RSS MiB", "peak RSS MiB"),
    ):
        series = {
            m: [
                next((number(r[col]) for r in rows if r["target"] == t and r["mode"] == m), None)
                for t in targets
            ]
            for m in modes
        }
        _bars(ax, [t.replace(" ", "\n", 1) for t in targets], series, col, label)
    fig.suptitle(title, fontsize=10)
    return fig


def _fetch(rows: Table, plt: object, title: str) -> object:
    rows = [r for r in rows if "ranged GETs" not in r["method"]]
    if rows and "time s" not in rows[0]:
        return _fetch_ab(rows, plt, title)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))  # type: ignore[attr-defined]
    for ax, col, label in (
        (a, "time s", "seconds to read the working set (lower is better)"),
        (b, "bytes", "MiB fetched"),
    ):
        series = {
            ln: [
                next((number(r[col]) for r in rows if r["link"] == ln and r["method"] == m), None)
                for m in methods
            ]
            for ln in links
        }
        _bars(
            ax,
            [m.replace(", ", "\n") for m in methods],
            series,
            "MiB" if col == "bytes" else col,
            label,
        )
    fig.suptitle(title, fontsize=10)
    return fig


def _fetch_ab(rows: Table, plt: object, title: str) -> object:
    """An A/B fetch report: columns ``time s <tree>`` and ``client CPU s <tree>``."""
    trees = [c.removeprefix("time s ") for c in rows[0] if c.startswith("time s ")]
    groups = [f"{r['link']}\n{r['method'].replace(', ', chr(10))}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5))  # type: ignore[attr-defined]
    for ax, what, label in (
        (a, "time s", "seconds (lower is better)"),
        (b, "client CPU s", "CPU s"),
    ):
        series = {t: [number(r[f"{what} {t}"]) for r in rows] for t in trees}
        _bars(ax, groups, series, label, what)
    fig.suptitle(title, fontsize=10)
    return fig


def _convert(rows: Table, plt: object, title: str) -> object:
    tools = [r["tool"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))  # type: ignore[attr-defined]
    _bars(
        a,
        tools,
        {"wall time": [number(r["wall time (s)"]) for r in rows]},
        "seconds",
        "wall time (lower is better)",
    )
    _bars(b, tools, {"peak RSS": [number(r["peak RSS (MB)"]) for r in rows]}, "MB", "peak RSS")
    fig.suptitle(title, fontsize=10)
    return fig


def _readpath(rows: Table, plt: object, title: str) -> object:
    """The read-path report's first table: per variant, the workload's run and where the
    daemon's time went."""
    variants = [r["variant"] for r in rows]
    cols = ["median run s", "daemon READ s", "user fetch s", "backend s"]
    fig, ax = plt.subplots(figsize=(9, 4))  # type: ignore[attr-defined]
    _bars(
        ax,
        cols,
        {v: [number(r[c]) for c in cols] for v, r in zip(variants, rows, strict=True)},
        "seconds",
        title,
    )
    return fig


def _phases(rows: Table, plt: object, title: str) -> object:
    """A phase report's first table: one row per phase (its first column names it), one
    numeric column per variant (seconds from the pull's start); the rows after the one that
    names the total (counts, CPU sums) are left out."""
    label = next(iter(rows[0]))
    end = next((i for i, r in enumerate(rows) if "total" in r[label]), len(rows) - 1)
    rows = rows[: end + 1]
    variants = [c for c in rows[0] if c != label]
    phases = [r[label].split("(")[0].strip()[:28] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 4))  # type: ignore[attr-defined]
    _bars(
        ax,
        phases,
        {v: [number(r[v]) for r in rows] for v in variants},
        "seconds",
        title,
    )
    ax.tick_params(axis="x", labelrotation=30)  # type: ignore[attr-defined]
    return fig


def _reglat(rows: Table, plt: object, title: str) -> object:
    """The registry-latency report's first table: median ms per request size (groups), one bar
    per server / client pair."""
    label = next(iter(rows[0]))
    parts = [[p.strip() for p in r[label].split("/")] for r in rows]
    sizes = list(dict.fromkeys(p[-1] for p in parts))
    pairs = list(dict.fromkeys(" / ".join(p[:-1]) for p in parts))
    med = {
        (" / ".join(p[:-1]), p[-1]): number(r["median ms"])
        for p, r in zip(parts, rows, strict=True)
    }
    fig, ax = plt.subplots(figsize=(9, 4))  # type: ignore[attr-defined]
    _bars(ax, sizes, {k: [med.get((k, s)) for s in sizes] for k in pairs}, "ms per GET", title)
    return fig


def _nydusd(rows: Table, plt: object, title: str) -> object:
    """A nydusd profile's first table: each phase's share of the GIL-held samples (%)."""
    label = next(iter(rows[0]))
    fig, ax = plt.subplots(figsize=(11, 4))  # type: ignore[attr-defined]
    shares = [number(r["share"]) for r in rows]
    _bars(ax, [r[label][:28] for r in rows], {"share": shares}, "% of samples", title)
    return fig


def _native(rows: Table, plt: object, title: str) -> object:
    """The native-switch warm-up A/B's first table: seconds of each container (c1 lazy, c2
    first after the switch, c3), one group per sequence."""
    label = next(iter(rows[0]))
    cols = [c for c in rows[0] if c != label and c.endswith(" s")]
    groups = [f"{i}: {r[label]}" for i, r in enumerate(rows, 1)]
    fig, ax = plt.subplots(figsize=(9, 4))  # type: ignore[attr-defined]
    _bars(ax, groups, {c: [number(r[c]) for r in rows] for c in cols}, "seconds", title)
    return fig


PLOTTERS: dict[str, Callable[[Table, object, str], object]] = {
    "native": _native,
    "nydusd": _nydusd,
    "reglat": _reglat,
    "readpath": _readpath,
    "phases": _phases,
    "coldstart": _coldstart,
    "read": _read,
    "build": _build,
    "fetch": _fetch,
    "convert": _convert,
    "fault": _fault,
}


def plot_report(md_path: Path) -> Path | None:
    """Draw ``<stem>.png`` beside the report ``md_path``; returns its path (None when the
    report's kind has no plot). Raises ValueError for a report without a table."""
    kind = md_path.name.split("-", 1)[0]
    draw = PLOTTERS.get(kind)
    if draw is None:
        return None
    text = md_path.read_text()
    rows = parse_table(text)
    heading = next(
        (ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), md_path.stem
    )
    plt = _pyplot()
    fig = draw(rows, plt, f"{heading} ({md_path.name})")
    fig.tight_layout()  # type: ignore[attr-defined]
    out = md_path.with_suffix(".png")
    fig.savefig(out, dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return out


def plot_after_run(md_path: Path) -> None:
    """What each bench calls after writing its report: a plot, or a note why not."""
    try:
        out = plot_report(md_path)
    except ImportError:
        print("no plot: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return
    if out is not None:
        print(f"plot: {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="*", type=Path, help="reports (default: bench/results)")
    p.add_argument("--force", action="store_true", help="redraw plots that exist")
    a = p.parse_args(argv)
    reports = a.reports or sorted(RESULTS.glob("*.md"))
    for md in reports:
        if not a.force and md.with_suffix(".png").exists() and not a.reports:
            continue
        out = plot_report(md)
        print(f"{md.name}: {out.name if out else 'no plot for this kind'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
