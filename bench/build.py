"""Build benchmark: nydus-image create against mkfs.erofs and tar | zstd on one large tree.

    .venv/bin/python bench/build.py                        # 1 GiB, 20,000 files (the real run)
    .venv/bin/python bench/build.py --size 64M --files 2000  # a quick check
    .venv/bin/python bench/build.py --mode tar             # from a tar.gz layer through a pipe
    .venv/bin/python bench/build.py --tree DIR --baseline-src /tmp/main/src --repeat 3 --profile
                                                           # a real tree, old code vs new (A/B)

``--mode tar`` turns the tree into a layer once (``tar | gzip -6``, and ``| zstd`` for the zstd
target; both cached beside the tree) and times ``nydus-image create -t targz-rafs -`` reading it
from a pipe, against ``gzip -d`` alone and ``tar -xzf`` (unpacking it to disk) as baselines.
The report's max RSS column is the acceptance number for streaming builds.

The tree is made by ``tests/corpus.make_large_tree`` and cached under ``--work`` (default
/var/tmp/nydus-bench), keyed by size, file count and seed. Every target runs twice: cold (after
``sync; echo 3 > /proc/sys/vm/drop_caches``, root only) and warm (right after, tree in the page
cache). Times are wall-clock for the command alone; outputs are left in the page cache (no
final sync), the same for every target. Throughput is MB/s (10^6 bytes) of *input* file data.
A target that fails (e.g. a CLI still being written) is reported with its error; the others run.

``--tree`` builds an existing tree instead (e.g. an unpacked image rootfs). ``--baseline-src``
adds ``nydus-image zstd (baseline)``: the same CLI with ``PYTHONPATH`` on another checkout's
``src`` (e.g. main's), in the same run; every nydus-image output's bootstrap and blob digests
must then agree with the baseline's (the run fails loudly if not). ``--repeat N`` runs every
target N times (in turn) and reports the median. ``--profile`` adds where the time of one warm
build goes: per stage (walk, blob loop, bootstrap, check) and per CPU consumer from ``perf``
(zstd, blake3, sha256, kernel, interpreter). nydus-image runs with bytecode caching on (as an
installed tool has), after one untimed start to write the cache.

Writes ``bench/results/build-<date>[-<size>x<files>].md`` and ``.json`` and prints the table.
Single-threaded driver; targets run one at a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


from plot import plot_after_run  # noqa: E402  # bench/plot.py: PNG beside the report

from corpus import make_large_tree  # noqa: E402

DEFAULT_SIZE = 1 << 30
DEFAULT_FILES = 20_000


@dataclass
class Run:
    """One timed execution of a target."""

    mode: str  # "cold" or "warm"
    seconds: float
    cpu_seconds: float
    max_rss_mib: float
    output_bytes: int
    ok: bool
    error: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # output file -> sha256 (nydus-image)

    def mbps(self, input_bytes: int) -> float:
        return input_bytes / 1e6 / self.seconds if self.ok and self.seconds > 0 else 0.0


@dataclass
class Target:
    """A build command; ``{tree}`` and ``{out}`` in its argv are replaced before running."""

    name: str
    pipeline: list[list[str]]  # one argv, or several piped stdout -> stdin
    runs: list[Run] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to the environment

    def median(self, mode: str) -> Run | None:
        """The run of the (lower) median time among this mode's runs (a failure if any failed)."""
        runs = [r for r in self.runs if r.mode == mode]
        if not runs or not all(r.ok for r in runs):
            return next((r for r in runs if not r.ok), None)
        return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G, 1048576)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def is_root() -> bool:
    return os.geteuid() == 0


def drop_caches() -> bool:
    """Flush and drop the page cache; False if not permitted."""
    os.sync()
    if not is_root():
        return False
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def tree_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes of regular files, number of regular files) under root."""
    total = count = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size
            count += 1
    return total, count


def ensure_tree(work: Path, size: int, nfiles: int, seed: int) -> tuple[Path, dict[str, int]]:
    """The cached benchmark tree, generated if missing (a marker file says it is complete)."""
    tree = work / f"tree-{size}-{nfiles}-s{seed}"
    marker = tree.with_suffix(".json")
    if tree.is_dir() and marker.is_file():
        print(f"reusing tree {tree}")
        return tree, json.loads(marker.read_text())
    if tree.exists():
        shutil.rmtree(tree)
    print(f"generating {human(size)} in {nfiles} files under {tree} ...", flush=True)
    t0 = time.monotonic()
    stats = make_large_tree(tree, size, nfiles, seed)
    stats["generate_seconds"] = round(time.monotonic() - t0, 1)
    os.sync()
    marker.write_text(json.dumps(stats, indent=2) + "\n")
    print(f"  done in {stats['generate_seconds']} s: {stats}")
    return tree, stats


def du_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


GNU_TIME = "/usr/bin/time"


def run_pipeline(
    argvs: list[list[str]], log: Path, env: dict[str, str] | None = None
) -> tuple[float, float, float, int]:
    """Run argv[0] | argv[1] | ...; returns (wall s, cpu s, max rss MiB, worst exit code).

    Peak RSS comes from GNU time wrapped around each command: a child's ru_maxrss from wait4
    would include this driver's own memory high-water mark, inherited through fork/exec.
    """
    procs: list[subprocess.Popen[bytes]] = []
    rss_files = [log.with_suffix(f".rss{i}") for i in range(len(argvs))]
    use_time = os.access(GNU_TIME, os.X_OK)
    t0 = time.monotonic()
    with open(log, "wb") as err:
        prev = None
        for i, argv in enumerate(argvs):
            last = i == len(argvs) - 1
            if use_time:
                argv = [GNU_TIME, "-f", "%M", "-o", str(rss_files[i]), *argv]
            p = subprocess.Popen(
                argv,
                stdin=prev.stdout if prev else subprocess.DEVNULL,
                stdout=err if last else subprocess.PIPE,
                stderr=err,
                env=env,
            )
            if prev and prev.stdout:
                prev.stdout.close()  # so the writer sees SIGPIPE if the reader dies
            procs.append(p)
            prev = p
        cpu = rss = 0.0
        worst = 0
        for p in procs:
            _pid, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            worst = worst or p.returncode
    wall = time.monotonic() - t0
    for f in rss_files:
        try:
            rss = max(rss, int(f.read_text().split()[-1]) / 1024)  # GNU time %M is KiB
            f.unlink()
        except (OSError, ValueError, IndexError):
            rss = float("nan")
    return wall, cpu, rss, worst


def measure(
    target: Target, tree: Path, out_root: Path, mode: str, layers: dict[str, Path] | None = None
) -> Run:
    out = out_root / target.name.replace(" ", "_").replace("/", "_").replace("|", "")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    keys = {"tree": tree, "out": out, **(layers or {})}
    argvs = [[a.format(**keys) for a in argv] for argv in target.pipeline]
    if mode == "cold":
        drop_caches()
    else:
        os.sync()
    log = out_root / f"{out.name}.{mode}.log"
    secs, cpu, rss, rc = run_pipeline(argvs, log, child_env(target))
    error = ""
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        error = f"exit {rc}: " + " | ".join(tail)
    digests = output_digests(out) if target.name.startswith("nydus-image") else {}
    run = Run(mode, round(secs, 3), round(cpu, 2), round(rss, 1), du_bytes(out), rc == 0, error)
    run.digests = digests
    return run


def child_env(target: Target) -> dict[str, str]:
    env = {**os.environ, **target.env}
    if target.env:  # nydus-image: cached bytecode, as an installed tool has
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def output_digests(out: Path) -> dict[str, str]:
    """sha256 of the bootstrap and of every blob a nydus-image run wrote (by blob id)."""
    import hashlib

    files = [out / "image.boot", *sorted((out / "blobs").glob("*"))]
    found = {}
    for f in files:
        if f.is_file():
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while b := fh.read(1 << 20):
                    h.update(b)
            found[f.name if f.parent.name == "blobs" else "bootstrap"] = h.hexdigest()
    return found


def check_digests(results: list[Target]) -> list[str]:
    """Lines saying whether every nydus-image output of one compressor is byte-identical."""
    lines = []
    for comp in ("zstd", "none"):
        runs = [
            (t.name, r)
            for t in results
            if t.name.startswith(f"nydus-image {comp}")
            for r in t.runs
            if r.ok
        ]
        if len(runs) < 2:
            continue
        ref_name, ref = runs[0]
        bad = [f"{n} ({r.mode})" for n, r in runs if r.digests != ref.digests]
        boot = ref.digests.get("bootstrap", "?")[:16]
        if bad:
            lines.append(f"- {comp}: DIFFERENT outputs: {', '.join(bad)} vs {ref_name}")
        else:
            names = sorted({n for n, _r in runs})
            lines.append(
                f"- {comp}: {len(runs)} builds ({', '.join(names)}) byte-identical: "
                f"bootstrap sha256 {boot}..., {len(ref.digests) - 1} blob(s) "
                + ", ".join(k[:16] + "..." for k in ref.digests if k != "bootstrap")
            )
    return lines


def nydus_image_argv() -> list[str]:
    script = Path(sys.executable).parent / "nydus-image"
    if script.exists():
        return [str(script)]
    boot = "import sys; from nydus.cli.nydus_image import main; sys.exit(main())"
    return [sys.executable, "-c", boot]


def targets(skip_nydus: bool, baseline: Path | None = None) -> list[Target]:
    nyd = nydus_image_argv()
    out: list[Target] = []
    if not skip_nydus:
        here = {"PYTHONPATH": str(REPO / "src")}
        argv = [*nyd, "create", "--bootstrap", "{out}/image.boot", "--blob-dir", "{out}/blobs"]
        for comp in ("zstd", "none"):
            cmd = [[*argv, "--compressor", comp, "{tree}"]]
            out.append(Target(f"nydus-image {comp}", cmd, env=here))
            if baseline is not None and comp == "zstd":
                base_env = {"PYTHONPATH": str(baseline)}
                out.append(Target(f"nydus-image {comp} (baseline)", cmd, env=base_env))
    out.append(
        Target(
            "mkfs.erofs 1m chunks",
            [
                [
                    "mkfs.erofs",
                    "--quiet",
                    "--chunksize=1048576",
                    "--blobdev={out}/blob.img",
                    "{out}/meta.img",
                    "{tree}",
                ]
            ],
        )
    )
    out.append(
        Target(
            "tar | zstd -T0",
            [["tar", "-C", "{tree}", "-cf", "-", "."], ["zstd", "-q", "-T0", "-o", "{out}/t.zst"]],
        )
    )
    # GNU tar skips reading file data when writing straight to /dev/null: pipe it through dd.
    drain = ["dd", "of=/dev/null", "bs=1M", "status=none"]
    out.append(Target("tar (read only)", [["tar", "-C", "{tree}", "-cf", "-", "."], drain]))
    return out


def tar_targets(skip_nydus: bool) -> list[Target]:
    """Targets of ``--mode tar``: ``{tgz}`` and ``{tzst}`` are the cached layers."""
    nyd = nydus_image_argv()
    out: list[Target] = []
    if not skip_nydus:
        create = [*nyd, "create", "--bootstrap", "{out}/image.boot", "--blob-dir", "{out}/blobs"]
        for comp in ("zstd", "none"):
            out.append(
                Target(
                    f"cat tgz | nydus-image {comp}",
                    [["cat", "{tgz}"], [*create, "-t", "targz-rafs", "--compressor", comp, "-"]],
                )
            )
        out.append(
            Target(
                "cat tzst | nydus-image zstd",
                [["cat", "{tzst}"], [*create, "-t", "tarzstd-rafs", "-"]],
            )
        )
    drain = ["dd", "of=/dev/null", "bs=1M", "status=none"]
    out.append(Target("gzip -d (read only)", [["gzip", "-dc", "{tgz}"], drain]))
    out.append(Target("tar -xzf (unpack)", [["tar", "-C", "{out}", "-xzf", "{tgz}"]]))
    return out


def ensure_layers(tree: Path) -> dict[str, Path]:
    """The tree as tar.gz and tar.zst layers, made once and cached beside the tree."""
    layers = {"tgz": tree.with_suffix(".tar.gz"), "tzst": tree.with_suffix(".tar.zst")}
    tar = ["tar", "-C", str(tree), "--sort=name", "-cf", "-", "."]
    for key, comp in (("tgz", ["gzip", "-6"]), ("tzst", ["zstd", "-q", "-3", "-T0"])):
        path = layers[key]
        if path.is_file():
            continue
        print(f"making layer {path} ...", flush=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            t = subprocess.Popen(tar, stdout=subprocess.PIPE)
            c = subprocess.run(comp, stdin=t.stdout, stdout=f, check=False)
            assert t.stdout is not None
            t.stdout.close()
            if t.wait() != 0 or c.returncode != 0:
                raise SystemExit(f"could not make {path}")
        tmp.rename(path)
    return layers


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
        text = (p.stdout or p.stderr).strip().splitlines()
        return text[0] if text else "?"

    git = first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    mkfs = first_line(["dpkg-query", "-W", "-f=${Version}", "erofs-utils"])
    return {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "mem": human(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        "erofs-utils": mkfs,
        "zstd": first_line(["zstd", "--version"]).strip("* "),
        "tar": first_line(["tar", "--version"]),
        "git": git,
    }


def describe_stats(stats: dict[str, int]) -> str:
    if not stats:
        return "an existing tree"
    pct = 100 * stats.get("compressible_bytes", 0) / max(1, stats.get("bytes", 1))
    return (
        f"{stats.get('files')} files in {stats.get('dirs')} dirs, "
        f"{stats.get('duplicates')} duplicate files, {pct:.0f}% compressible bytes"
    )


def render(
    results: list[Target],
    input_bytes: int,
    nfiles: int,
    stats: dict[str, int],
    meta: dict[str, object],
) -> tuple[str, str]:
    """(plain table for the terminal, Markdown report); medians when runs were repeated."""
    header = ["target", "mode", "time s", "MB/s in", "vs tar|zstd", "cpu s", "max RSS MiB"]
    header += ["output", "out/in"]
    ref = next((t for t in results if t.name == "tar | zstd -T0"), None)
    rows: list[list[str]] = []
    for t in results:
        for mode in ("cold", "warm"):
            r = t.median(mode)
            if r is None:
                continue
            if not r.ok:
                rows.append([t.name, r.mode, "-", "FAILED", "-", "-", "-", "-", r.error[:60]])
                continue
            base = ref.median(mode) if ref is not None else None
            vs = f"{base.seconds / r.seconds:.2f}x" if base is not None and base.ok else "-"
            rows.append(
                [
                    t.name,
                    r.mode,
                    f"{r.seconds:.2f}",
                    f"{r.mbps(input_bytes):.0f}",
                    vs,
                    f"{r.cpu_seconds:.1f}",
                    f"{r.max_rss_mib:.0f}",
                    human(r.output_bytes),
                    f"{r.output_bytes / input_bytes:.3f}",
                ]
            )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    table = "\n".join(fmt.format(*r) for r in [header, ["-" * w for w in widths], *rows])
    md = [
        f"# Build benchmark, {meta['date']}",
        "",
        f"Input: {human(input_bytes)} ({input_bytes} bytes) in {nfiles} regular files, "
        f"tree `{meta['tree']}` ({describe_stats(stats)}).",
        *([f"Layers: {meta['layers']}."] if meta.get("layers") else []),
        f"Cold runs: {meta['cold']}. Machine: {meta['machine']}.",
        f"Load average (1 min) before / after: {meta['load']}. Runs per target and mode: "
        f"{meta['repeat']} (the median is shown, the faster of two; targets take turns).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows),
        "",
        "MB/s is 10^6 bytes of input file data per wall-clock second; output is the total size "
        "written (bootstrap + blobs, meta + blob, or the archive); page cache not flushed after. "
        "vs tar|zstd is tar | zstd -T0's time over this target's (above 1 is faster).",
    ]
    if meta.get("digests"):
        md += ["", "Output digests:", "", *meta["digests"]]  # type: ignore[misc]
    if meta.get("profile"):
        md += ["", str(meta["profile"])]
    errors = [f"- {t.name} ({r.mode}): {r.error}" for t in results for r in t.runs if not r.ok]
    if errors:
        md += ["", "Failures:", "", *errors]
    return table, "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/nydus-bench"))
    ap.add_argument("--size", type=parse_size, default=DEFAULT_SIZE, help="e.g. 64M, 1G")
    ap.add_argument("--files", type=int, default=DEFAULT_FILES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--skip-nydus", action="store_true", help="run the baselines only")
    ap.add_argument("--keep-outputs", action="store_true", help="keep built images in --work")
    ap.add_argument(
        "--mode",
        choices=["dir", "tar"],
        default="dir",
        help="build from the tree (dir) or from its tar.gz layer through a pipe",
    )
    ap.add_argument("--tree", type=Path, help="an existing tree to build (instead of generating)")
    ap.add_argument("--baseline-src", type=Path, help="also run nydus-image from this src dir")
    ap.add_argument("--repeat", type=int, default=1, help="runs per target and mode (median)")
    ap.add_argument("--only", help="comma-separated target name prefixes to run")
    ap.add_argument("--modes", default="cold,warm", help="cold,warm (cold drops caches: root)")
    ap.add_argument("--profile", action="store_true", help="where one warm build's time goes")
    ap.add_argument("--stem", help="report file name stem (default: build-<date>[-<what>])")
    args = ap.parse_args(argv)

    for tool in ("mkfs.erofs", "zstd", "tar"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: run scripts/setup.sh first", file=sys.stderr)
            return 2
    args.work.mkdir(parents=True, exist_ok=True)
    if args.tree:
        tree, stats = args.tree.resolve(), dict[str, int]()
    else:
        tree, stats = ensure_tree(args.work, args.size, args.files, args.seed)
    input_bytes, nfiles = tree_bytes(tree)
    out_root = args.work / "out"
    cold = "yes (root: drop_caches before each)" if is_root() else "no (not root: all warm)"
    print(f"input: {human(input_bytes)} in {nfiles} files; cold runs: {cold}")

    layers: dict[str, Path] = {}
    if args.mode == "tar":
        layers = ensure_layers(tree)
        results = tar_targets(args.skip_nydus)
    else:
        results = targets(args.skip_nydus, args.baseline_src)
    if args.only:
        prefixes = [p.strip() for p in args.only.split(",")]
        results = [t for t in results if any(t.name.startswith(p) for p in prefixes)]
    for t in results:
        if t.env:  # one untimed start: the bytecode cache
            subprocess.run([*nydus_image_argv(), "--version"], env=child_env(t), check=False)
    load0 = os.getloadavg()[0]
    failed: set[str] = set()
    for i in range(args.repeat):
        for t in results:
            for mode in args.modes.split(","):
                if t.name in failed:
                    continue
                print(f"  [{i + 1}] {t.name:<28} {mode} ...", end=" ", flush=True)
                r = measure(t, tree, out_root, mode, layers)
                t.runs.append(r)
                msg = f"{r.seconds:.2f} s, {r.mbps(input_bytes):.0f} MB/s" if r.ok else r.error
                print(msg, flush=True)
                if not r.ok:
                    failed.add(t.name)  # no more runs after a failure
    load1 = os.getloadavg()[0]
    digest_lines = check_digests(results)
    profile = ""
    if args.profile and args.mode == "dir":
        from build_profile import profile_build

        profile = profile_build(tree, out_root / "profile", REPO / "src", nydus_image_argv())
    if not args.keep_outputs and out_root.exists():
        shutil.rmtree(out_root)

    now = dt.datetime.now()
    meta: dict[str, object] = {
        "date": now.strftime("%Y-%m-%d %H:%M"),
        "tree": str(tree),
        "tree_stats": stats,
        "cold": cold,
        "mode": args.mode,
        "layers": ", ".join(f"`{p.name}` {human(p.stat().st_size)}" for p in layers.values()),
        "load": f"{load0:.2f} / {load1:.2f}"
        + (" (above 1.5: preliminary, the machine was shared)" if max(load0, load1) > 1.5 else ""),
        "repeat": args.repeat,
        "digests": digest_lines,
        "profile": profile,
    }
    versions = tool_versions()
    meta["versions"] = versions
    meta["machine"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    table, md = render(results, input_bytes, nfiles, stats, meta)
    print()
    print(table)
    stem = f"build-{now:%Y-%m-%d}"
    if (args.size, args.files) != (DEFAULT_SIZE, DEFAULT_FILES):
        stem += f"-{human(args.size).replace(' ', '').replace('.0', '')}x{args.files}"
    if args.mode == "tar":
        stem += "-tar"
    if args.tree:
        stem = f"build-{now:%Y-%m-%d}-{args.tree.resolve().parent.name}"
    stem = args.stem or stem
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.md").write_text(md)
    payload = {
        **meta,
        "input_bytes": input_bytes,
        "files": nfiles,
        "targets": [
            {"name": t.name, "argv": t.pipeline, "runs": [asdict(r) for r in t.runs]}
            for t in results
        ],
    }
    (args.results / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nreport: {args.results / (stem + '.md')}")
    plot_after_run(args.results / f"{stem}.md")
    if any("DIFFERENT" in ln for ln in digest_lines):
        print("outputs differ between nydus-image runs:", *digest_lines, sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
