"""Where one warm ``nydus-image create`` of a directory spends its time (bench/build.py --profile).

Two views of the same build, both on the code under test (``src``):

- per stage, wall and process CPU (all threads): the CLI run in a child process with the walk,
  the blob loop (reads, digests, compression, blob writes), the blob trailer, the bootstrap
  writer and the bootstrap check wrapped in timers;
- per CPU consumer: ``perf record`` of the CLI (when perf is installed and usable), samples
  grouped by the shared object that ran: zstd (zstandard), blake3, sha256 (OpenSSL, the blob
  id), the kernel (read/write syscalls, page cache, scheduling), the Python interpreter (walk,
  bootstrap, per-file and per-chunk bookkeeping) and libc.

Returns Markdown. Single-threaded driver.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_STAGES = r"""
import json, sys, time
import nydus.builder.build as build
import nydus.cli.nydus_image as cli
from nydus.builder.blob import BlobWriter

stages = {}

def timed(name, fn):
    def run(*a, **k):
        t0, c0 = time.monotonic(), time.process_time()
        try:
            return fn(*a, **k)
        finally:
            w, c = stages.get(name, (0.0, 0.0))
            stages[name] = (w + time.monotonic() - t0, c + time.process_time() - c0)
    return run

cli.load_directory = timed("walk (scandir, lstat, xattrs)", cli.load_directory)
BlobWriter.add_files = timed("blob loop (read, digest, compress, write)", BlobWriter.add_files)
BlobWriter.finish = timed("blob trailer (ci table, digests, ToC)", BlobWriter.finish)
build.write_bootstrap = timed("bootstrap writer", build.write_bootstrap)
class Checked:
    def __init__(self, md):
        self.md = md
    def __enter__(self):
        self.md.__enter__()
        return self
    def __exit__(self, *exc):
        return self.md.__exit__(*exc)
    def walk(self):
        return iter(timed(CHECK, lambda: list(self.md.walk()))())

CHECK = "bootstrap check (parse + walk)"
open_bootstrap = timed(CHECK, cli.open_bootstrap)
cli.open_bootstrap = lambda *a, **k: Checked(open_bootstrap(*a, **k))
t0, c0 = time.monotonic(), time.process_time()
rc = cli.main(sys.argv[1:])
stages["total (after imports)"] = (time.monotonic() - t0, time.process_time() - c0)
print("STAGES " + json.dumps(stages))
sys.exit(rc)
"""

# shared object (substring) -> what it does in a build
_CONSUMERS = [
    ("backend_c", "zstd compression (zstandard)"),
    ("blake3", "blake3 chunk digests"),
    ("libcrypto", "sha256 of the blob id (OpenSSL)"),
    ("kernel", "kernel: read/write syscalls, page cache, scheduling"),
    ("python", "Python interpreter: walk, bootstrap, per-file/chunk bookkeeping"),
    ("libc", "libc: memcpy, malloc, locks"),
]


def _create_argv(nyd: list[str], tree: Path, out: Path) -> list[str]:
    boot, blobs = str(out / "image.boot"), str(out / "blobs")
    return [*nyd, "create", "--bootstrap", boot, "--blob-dir", blobs, str(tree)]


def _fresh(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def profile_build(tree: Path, out: Path, src: Path, nyd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    lines = ["## Where the time goes (one warm build of the code under test)", ""]
    _fresh(out)
    argv = _create_argv(nyd, tree, out)[len(nyd) :]
    p = subprocess.run(
        [sys.executable, "-c", _STAGES, *argv], env=env, capture_output=True, text=True
    )
    m = re.search(r"^STAGES (.*)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        lines.append(f"stage profile failed: {p.stderr.strip()[-300:]}")
    else:
        stages: dict[str, tuple[float, float]] = json.loads(m.group(1))
        total = stages.pop("total (after imports)")
        lines += ["| stage | wall s | CPU s (all threads) |", "|---|---|---|"]
        for name, (w, c) in stages.items():
            lines.append(f"| {name} | {w:.2f} | {c:.2f} |")
        rest_w = total[0] - sum(w for w, _c in stages.values())
        rest_c = total[1] - sum(c for _w, c in stages.values())
        lines.append(f"| other (CLI, tree order, output files) | {rest_w:.2f} | {rest_c:.2f} |")
        lines.append(f"| **total** (imports not counted) | {total[0]:.2f} | {total[1]:.2f} |")
    lines.append("")
    lines += _perf(tree, out, nyd, env)
    shutil.rmtree(out, ignore_errors=True)
    return "\n".join(lines) + "\n"


def _perf(tree: Path, out: Path, nyd: list[str], env: dict[str, str]) -> list[str]:
    perf = shutil.which("perf")
    if perf is None:
        return ["(no perf: CPU consumers not measured)"]
    _fresh(out)
    data = out.parent / "perf.data"
    freq = 499
    argv = [perf, "record", "-q", "-F", str(freq), "-o", str(data), "--"]
    rec = subprocess.run(
        [*argv, *_create_argv(nyd, tree, out)], env=env, capture_output=True, text=True
    )
    if rec.returncode != 0:
        return [f"(perf record failed: {rec.stderr.strip()[-200:]})"]
    argv = [perf, "report", "-i", str(data), "--stdio", "--no-children", "-n"]
    argv += ["--sort", "dso,sym", "-g", "none", "--percent-limit", "0"]
    rep = subprocess.run(argv, capture_output=True, text=True)
    data.unlink(missing_ok=True)
    groups: dict[str, int] = {}
    top: dict[str, list[tuple[int, str]]] = {}
    total = 0
    for ln in rep.stdout.splitlines():
        m = re.match(r"^\s+[\d.]+%\s+(\d+)\s+(\S+)\s+\[[.k]\]\s+(.*)$", ln)
        if not m:
            continue
        n, dso, sym = int(m.group(1)), m.group(2), m.group(3).strip()
        total += n
        label = next((lab for key, lab in _CONSUMERS if key in dso), f"other ({dso})")
        if label.startswith("other"):
            label = "other"
        groups[label] = groups.get(label, 0) + n
        top.setdefault(label, []).append((n, sym))
    if not total:
        return ["(perf found no samples)"]
    lines = [
        f"CPU by consumer (perf, {freq} Hz, all threads; {total / freq:.1f} CPU s sampled):",
        "",
        "| consumer | CPU s | share | top symbols |",
        "|---|---|---|---|",
    ]
    for label, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        syms = ", ".join(s[:40] for _n, s in sorted(top[label], reverse=True)[:3])
        lines.append(f"| {label} | {n / freq:.2f} | {100 * n / total:.0f}% | {syms} |")
    return lines
