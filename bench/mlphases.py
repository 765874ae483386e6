"""Where the second container's time goes, per round of an ml cold start run (issue 17).

    python bench/mlphases.py [--table] bench/results/coldstart-DATE-ml-TAG.json LOGDIR

LOGDIR is the run's ``NYDUS_BENCH_KEEP_LOGS`` directory (one sub-directory per round, named as
the round's work directory: ``1000mbit-prefetch_all-W1-0``, with containerd's, the
snapshotter's and nydusd's logs). For every round that ran a second container (``prefetch_all``)
or a warm run (``oci``, in runs that recorded its window), the
containerd events of that container, as seconds from ``ctr run``'s start (the bench's clock):
``/containers/create``, the snapshot's prepare, ``/tasks/create``, ``/tasks/start``,
``/tasks/exit``, ``/tasks/delete``, and ``ctr`` done; then nydusd's lines about durability and
the native switch near that window, and, with ``NYDUS_BENCH_STACKS``, the kernel stacks of the
runtime's threads in D state summed (samples x period, per process name and stack).
``--table``: one markdown row of phases per round instead.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

CTD_TIME = re.compile(r'time="([0-9T:.\-]+)(Z|[+\-]\d\d:\d\d)"')
NYDUSD_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) \+00:00\]")
EVENTS = (
    ("containers/create", "topic=/containers/create"),
    ("snapshot prepare", "topic=/snapshot/prepare"),
    ("tasks/create", "topic=/tasks/create"),
    ("tasks/start", "topic=/tasks/start"),
    ("tasks/exit", "topic=/tasks/exit"),
    ("tasks/delete", "topic=/tasks/delete"),
    ("containers/delete", "topic=/containers/delete"),
)


def ctd_time(line: str) -> float | None:
    m = CTD_TIME.search(line)
    if not m:
        return None
    stamp, zone = m.groups()
    if "." in stamp:
        head, frac = stamp.split(".")
        stamp = f"{head}.{frac[:6]}"
    zone = "+00:00" if zone == "Z" else zone
    fmt = "%Y-%m-%dT%H:%M:%S.%f%z" if "." in stamp else "%Y-%m-%dT%H:%M:%S%z"
    return dt.datetime.strptime(stamp + zone, fmt).timestamp()


def nydusd_time(line: str) -> float | None:
    m = NYDUSD_TIME.match(line)
    if not m:
        return None
    return (
        dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC).timestamp()
    )


def events(r: dict[str, Any], logs: Path) -> dict[str, float]:
    """The first time of each of :data:`EVENTS` in the 2nd run's window, s from its start."""
    t0, t1 = r["second_run_at"]
    seen: dict[str, float] = {}
    ctd = logs / "containerd.log"
    for line in ctd.read_text(errors="replace").splitlines() if ctd.exists() else []:
        t = ctd_time(line)
        if t is None or not t0 - 0.05 <= t <= t1 + 0.05:
            continue
        for name, key in EVENTS:
            if key in line and name not in seen:
                seen[name] = t - t0
    seen["ctr done"] = t1 - t0
    return seen


def table_row(r: dict[str, Any], logs: Path) -> str:
    """| round | scenario | total | ctr -> prepare | -> task start | workload | exit -> done |"""
    e = events(r, logs)

    def d(a: str, b: str) -> str:
        return f"{e[b] - e.get(a, 0.0):.2f}" if b in e and (a == "" or a in e) else "-"

    return (
        f"| {logs.name.rsplit('-', 1)[1]} | {r['scenario']} | {e['ctr done']:.2f} | "
        f"{d('', 'snapshot prepare')} | {d('snapshot prepare', 'tasks/start')} | "
        f"{d('tasks/start', 'tasks/exit')} | {d('tasks/exit', 'ctr done')} |"
    )


def phases(r: dict[str, Any], logs: Path) -> str:
    t0, t1 = r["second_run_at"]
    out = [f"### {logs.name}: first 2nd run {t1 - t0:.2f} s", ""]
    seen: dict[str, float] = {}
    ctd = logs / "containerd.log"
    lines = ctd.read_text(errors="replace").splitlines() if ctd.exists() else []
    window = []
    for line in lines:
        t = ctd_time(line)
        if t is None or not t0 - 0.05 <= t <= t1 + 0.05:
            continue
        window.append((t - t0, line))
        for name, key in EVENTS:
            if key in line and name not in seen:
                seen[name] = t - t0
    row = " | ".join(f"{name} {seen[name]:.3f}" for name, _ in EVENTS if name in seen)
    out.append(f"containerd events (s from ctr start): {row} | ctr done {t1 - t0:.3f}")
    gaps = sorted(
        ((b[0] - a[0], a[0], a[1], b[1]) for a, b in itertools.pairwise(window)),
        reverse=True,
    )[:3]
    for gap, at, before, after in gaps:
        if gap >= 0.05:
            out.append(
                f"- gap {gap:.3f} s at {at:.3f}: after `{_msg(before)}`, then `{_msg(after)}`"
            )
    for p in sorted(logs.glob("*.log")):
        if p.name == "containerd.log" or p.name.endswith("-snapshotter.log"):
            continue
        for line in p.read_text(errors="replace").splitlines():
            if "durable" in line or "switched to native" in line:
                t = nydusd_time(line)
                if t is not None:
                    out.append(f"- nydusd {t - t0:+.3f} s: {line[line.find(']') + 2 :][:160]}")
    st = r.get("second_run_stacks")
    if st:
        period = float(st["period"])
        c = Counter((comm, stack) for _, comm, _, stack in st["samples"])
        out.append(f"- D-state samples ({st['ticks']} ticks of {period * 1000:.0f} ms):")
        for (comm, stack), n in c.most_common(8):
            out.append(f"  - {comm} ~{n * period:.2f} s: {stack}")
    return "\n".join(out) + "\n"


def _msg(line: str) -> str:
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
    text = m.group(1) if m else line
    for key in ("topic", "key", "id"):
        km = re.search(rf"\b{key}=(\S+)", line)
        if km:
            text += f" {key}={km.group(1)[:40]}"
    return text[:140]


def main() -> int:
    table = "--table" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--table"]
    data = json.loads(Path(args[0]).read_text())
    logdir = Path(args[1])
    if table:
        print(
            "| round | scenario | total | ctr run -> snapshot prepare | -> task start | "
            "workload (task start -> exit) | exit -> ctr done |"
        )
        print("|---|---|---|---|---|---|---|")
    for r in data["rounds"]:
        if not r.get("second_run_at"):
            continue
        idx = sum(
            1
            for q in data["rounds"][: data["rounds"].index(r)]
            if (q["link"], q["scenario"], q["workload"])
            == (r["link"], r["scenario"], r["workload"])
        )
        name = f"{r['link'].replace(' ', '')}-{r['scenario']}-{r['workload']}-{idx}"
        print(table_row(r, logdir / name) if table else phases(r, logdir / name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
