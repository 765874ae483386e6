"""Where nydusd's CPU goes inside another benchmark: py-spy on every nydusd that run starts.

    .venv/bin/python bench/nydusd_profile.py -- \\
        .venv/bin/python bench/coldstart.py --image ml --scenarios optimized \\
        --workloads W1 --rates 1000 --rounds 3 --tag prof

The command after ``--`` runs as given. While it runs, this script watches the process table
every few milliseconds and attaches ``py-spy record --gil`` to each new ``nydusd`` (a Python
process whose command line runs a ``nydusd`` script or ``nydus.cli.nydusd``). ``--gil`` samples
only the thread that holds the GIL: Python work, not time blocked in ``read(2)`` on
``/dev/fuse`` or a socket, and not the C work that releases the GIL (zstd, blake3, sha256,
pread/pwrite), so its total is the daemon's Python CPU. The first few milliseconds of each
daemon (interpreter start, before the attach) are not seen.

Prints, and with ``--out`` writes as markdown, the samples' total in seconds per daemon, the
top functions by own samples and by inclusive samples, and a coarse split by phase (imports,
prefetch, blob-device/FUSE serving, HTTP, other). py-spy runs ``--nonblocking`` (it does not
stop the daemon per sample): it slows the daemon little, but loses samples (more in a busy
daemon), so read the shares, not the absolute seconds, and compare two profiles, not a profile
with an unprofiled run. (The blocking mode stopped a nydusd for good in one of our runs: the
container's reads then waited until py-spy was killed.)

Needs py-spy (``.venv/bin/pip install py-spy``; ``--py-spy PATH`` to use another).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RATE = 250  # samples per second
# coarse phases, first match wins, by a function name anywhere in the stack
PHASES = [
    ("imports", ("_find_and_load", "_load_unlocked", "dataclass.<locals>.wrap")),
    ("prefetch", ("FetchScheduler._prefetch_slot", "BlobFetcher.prefetch")),
    ("blob device / FUSE serving", ("FuseSession._worker", "FuseSession._dispatch")),
    ("HTTP API", ("ApiServer", "BaseHTTPRequestHandler")),
]


def is_nydusd(cmdline: list[str]) -> bool:
    if not cmdline or "python" not in Path(cmdline[0]).name:
        return False
    rest = cmdline[1:]
    return (bool(rest) and Path(rest[0]).name == "nydusd") or "nydus.cli.nydusd" in rest[:2]


# a process first seen less than this long ago may still exec nydusd (the snapshotter forks,
# then execs): its command line is read again until then
EXEC_GRACE = 0.5


def watch(spy: str, out: Path, stop: threading.Event, procs: list[subprocess.Popen[bytes]]) -> None:
    done: set[int] = set()  # attached, or older than EXEC_GRACE and not a nydusd
    young: dict[int, float] = {}  # pid -> when first seen
    while not stop.is_set():
        now = time.monotonic()
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) in done:
                continue
            pid = int(d)
            try:
                raw = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                young.pop(pid, None)
                continue
            if not is_nydusd(raw.decode(errors="replace").split("\0")[:-1]):
                if now - young.setdefault(pid, now) > EXEC_GRACE:
                    done.add(pid)
                    del young[pid]
                continue
            done.add(pid)
            young.pop(pid, None)
            cmd = [spy, "record", "--pid", d, "--rate", str(RATE), "--gil", "--nonblocking"]
            cmd += ["--threads"]  # each stack starts with its thread: dropped below
            cmd += ["--format", "raw", "-o", str(out / f"{d}.txt")]
            with open(out / f"{d}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        stop.wait(0.003)


Counts = collections.Counter[str]


def aggregate(files: list[Path]) -> tuple[int, Counts, Counts, Counts]:
    own: Counts = collections.Counter()
    incl: Counts = collections.Counter()
    phase: Counts = collections.Counter()
    total = 0
    for f in files:
        for line in f.read_text().splitlines():
            if " " not in line:
                continue
            stack, n_s = line.rsplit(" ", 1)
            n = int(n_s)
            frames = stack.split(";")[1:]  # [0] is the thread
            if not frames:
                continue
            total += n
            own[frames[-1]] += n
            names = {re.sub(r" \(.*\)$", "", fr) for fr in frames}
            for name in names:
                incl[name] += n
            for ph, marks in PHASES:
                if any(m in name for name in names for m in marks):
                    phase[ph] += n
                    break
            else:
                phase["other"] += n
    return total, own, incl, phase


def report(files: list[Path], top: int) -> str:
    own: Counts = collections.Counter()
    incl: Counts = collections.Counter()
    phase: Counts = collections.Counter()
    per_file = []  # samples per daemon; each file read once
    for f in files:
        n, f_own, f_incl, f_phase = aggregate([f])
        per_file.append(n)
        own.update(f_own)
        incl.update(f_incl)
        phase.update(f_phase)
    total = sum(per_file)
    if not total:
        return "no samples (was a nydusd started, and py-spy allowed to attach?)\n"
    per = total / RATE / len(files)

    def pct(n: int) -> str:
        return f"{n / total * 100:.1f} %"

    out = [
        f"{len(files)} nydusd profile(s), {total} GIL-held samples at {RATE} Hz: "
        f"{per:.3f} s of Python CPU per daemon (mean).",
        "",
        "Per daemon (s): "
        + ", ".join(f"{n / RATE:.3f}" for n in per_file)
        + " (a short-lived nydusd, e.g. a version probe, counts too).",
        "",
        "| phase | share | s per daemon |",
        "|---|---|---|",
    ]
    out += [f"| {k} | {pct(n)} | {n / RATE / len(files):.3f} |" for k, n in phase.most_common()]
    out += ["", "| own samples | function |", "|---|---|"]
    out += [f"| {pct(n)} | `{k}` |" for k, n in own.most_common(top)]
    out += ["", "| inclusive | function |", "|---|---|"]
    out += [f"| {pct(n)} | `{k}` |" for k, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    ap.add_argument("--out", type=Path, help="write the report (markdown) here too")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark to run")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to profile after --")
    if not (os.path.isfile(args.py_spy) or shutil.which(args.py_spy)):
        sys.exit(f"nydusd_profile: no py-spy at {args.py_spy} (.venv/bin/pip install py-spy)")
    with tempfile.TemporaryDirectory(prefix="nydusd-profile-") as tmp:
        out = Path(tmp)
        stop = threading.Event()
        spies: list[subprocess.Popen[bytes]] = []
        watcher = threading.Thread(target=watch, args=(args.py_spy, out, stop, spies))
        watcher.start()
        t0 = time.monotonic()
        try:
            rc = subprocess.call(cmd)
        finally:
            stop.set()
            watcher.join()
            for p in spies:  # each ends when its nydusd exits; a daemon left running: stop it
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.terminate()
                    p.wait()
        files = sorted(p for p in out.glob("*.txt") if p.stat().st_size)
        text = f"Command: `{' '.join(cmd)}` (rc {rc}, {time.monotonic() - t0:.0f} s)\n\n"
        text += report(files, args.top)
    print(text)
    if args.out:
        args.out.write_text(text)
        from plot import plot_after_run  # bench/plot.py: the PNG beside the report

        plot_after_run(args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
