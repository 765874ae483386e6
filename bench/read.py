"""Read benchmark: our FUSE mount (nydusd) against the native source tree and the kernel EROFS
mount of the same bootstrap, in one run.

    .venv/bin/python bench/read.py                       # 1 GiB file, 50k files, 20k small
    .venv/bin/python bench/read.py --big 128M --files 5000 --small 2000   # a quick check

Workloads (each on every target):

* ``seq``: ``dd bs=1M`` of one big incompressible file to /dev/null, cold then warm (MB/s);
* ``walk``: ``find -printf`` with stat fields over the whole tree (50k files), cold (files/s);
* ``small``: ``tar cf - small | cat > /dev/null`` over 20k small files (1-32 KiB), cold (files/s).

Cold means ``sync; echo 3 > /proc/sys/vm/drop_caches`` right before (root only); warm is the
same command again at once. Targets: ``native`` (the source directory), ``erofs`` (kernel
EROFS, file-backed bootstrap with the blob as ``device=``) and ``fuse`` (nydusd in FUSE RAFS
mode, ``fs_driver: fusedev``, serving the same bootstrap through FUSE from the local blob, i.e.
a fully cached image: no backend fetches) and ``erofs-mode`` (nydusd with ``fs_driver:
erofs``: the kernel mounts the bootstrap, the blob device is a file on the daemon's blob fs,
localfs backend with an empty blob cache).
``erofs-mode`` gives two rows: ``erofs-mode-lazy`` (cold reads go through the daemon, which
fills the blob cache) and ``erofs-mode-native`` (after the rest of the tree has been read, the
blob is complete, the daemon switches the mount to the local ``.blob.data`` file and the same
workloads run again with no daemon in the path). The image is built with ``--compressor none``
so the kernel can mount it too.

``verify`` (no root needed) measures what "nothing unverified is served" costs, in process, on
the same blob (localfs backend): a cold read of the whole blob through ``BlobDevice.read_range``
(fetch, verify, write the cache) against the same reads with the digest check replaced by a
no-op; the hash alone (the image's digester over every chunk); ``verify_blob`` after a restart
(what a daemon hashes before it hands a complete cache file to the kernel in EROFS mode); and
reading a complete cache after a restart with a matching ``.verified`` record (trusted: no
hashing) against without one (every chunk hashed on its first read). Best of three each.

The tree is cached under ``--work`` (default /var/tmp/nydus-bench-read), keyed by its shape.
Writes ``bench/results/read-<date>.md`` and ``.json`` and prints the table. Single-threaded
driver; targets run one at a time; each measurement runs once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


from plot import plot_after_run  # noqa: E402  # bench/plot.py: PNG beside the report

from nydus.kernel_mount import mount_erofs, umount  # noqa: E402
from nydus.metadata import open_bootstrap  # noqa: E402

MiB = 1 << 20


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@dataclass
class Shape:
    big: int
    files: int
    small: int
    seed: int = 0

    @property
    def key(self) -> str:
        return f"big{self.big}-f{self.files}-s{self.small}-seed{self.seed}"


def make_tree(root: Path, shape: Shape) -> dict[str, int]:
    """big.bin, ``small/`` (shape.small files of 1-32 KiB in dirs of 100) and ``meta/``
    (the rest of shape.files, 0-2 KiB, in dirs of 500). Deterministic for a seed."""
    rng = random.Random(shape.seed)
    pool = rng.randbytes(64 * MiB)
    root.mkdir(parents=True)
    with open(root / "big.bin", "wb") as f:
        left = shape.big
        while left:
            n = min(left, 8 * MiB)
            off = rng.randrange(0, len(pool) - n + 1)
            f.write(pool[off : off + n])
            left -= n
    small_bytes = 0
    for i in range(shape.small):
        d = root / "small" / f"d{i // 100:04d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        n = rng.randrange(1024, 32 * 1024 + 1)
        off = rng.randrange(0, len(pool) - n)
        (d / f"f{i:06d}").write_bytes(pool[off : off + n])
        small_bytes += n
    rest = max(0, shape.files - shape.small - 1)
    for i in range(rest):
        d = root / "meta" / f"d{i // 500:04d}"
        if i % 500 == 0:
            d.mkdir(parents=True)
        n = rng.randrange(0, 2048)
        (d / f"m{i:06d}").write_bytes(pool[i : i + n])
    return {
        "files": shape.small + rest + 1,
        "small_files": shape.small,
        "small_bytes": small_bytes,
        "big_bytes": shape.big,
    }


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(cmd: str, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True)
    t = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed: {proc.stderr[-2000:]}")
    return t


@dataclass
class Result:
    target: str
    seq_cold_mbps: float = 0.0
    seq_warm_mbps: float = 0.0
    walk_cold_files_per_s: float = 0.0
    walk_warm_files_per_s: float = 0.0
    small_cold_files_per_s: float = 0.0
    small_cold_mbps: float = 0.0
    small_warm_files_per_s: float = 0.0
    daemon_cpu_s: float = 0.0
    warm_requests: dict[str, int] = field(default_factory=dict)  # FUSE requests, warm runs
    notes: list[str] = field(default_factory=list)


def prime(paths: list[Path]) -> None:
    """Read the target's backing files once, so that every target starts "guest-cold,
    host-warm" (the VM's disk is cached by the host; without this the first target read
    pays for the host's misses and the comparison measures the host cache, not us)."""
    for p in paths:
        subprocess.run(
            ["bash", "-c", f"tar cf - -C {p.parent} {p.name} | cat > /dev/null"], check=True
        )


def measure(
    target: str,
    root: Path,
    info: dict[str, int],
    cold: bool,
    cpu: Callable[[], float] | None = None,
    requests: Callable[[], int] | None = None,
) -> Result:
    r = Result(target)
    cpu0 = cpu() if cpu else 0.0

    def warm(name: str, cmd: str, cwd: Path | None = None) -> float:
        n0 = requests() if requests else 0
        t = timed(cmd, cwd)
        if requests:
            r.warm_requests[name] = requests() - n0
        return t

    big = info["big_bytes"]
    dd = f"dd if={root}/big.bin of=/dev/null bs=1M status=none"
    if cold:
        drop_caches()
    r.seq_cold_mbps = big / 1e6 / timed(dd)
    r.seq_warm_mbps = big / 1e6 / warm("seq", dd)
    walk = f"find {root} -printf '%i %s %m %u %T@\\n' > /dev/null"
    if cold:
        drop_caches()
    r.walk_cold_files_per_s = info["files"] / timed(walk)
    r.walk_warm_files_per_s = info["files"] / warm("find+stat", walk)
    tar = "tar cf - small | cat > /dev/null"
    if cold:
        drop_caches()
    t = timed(tar, cwd=root)
    r.small_cold_files_per_s = info["small_files"] / t
    r.small_cold_mbps = info["small_bytes"] / 1e6 / t
    r.small_warm_files_per_s = info["small_files"] / warm("small", tar, root)
    if cpu:
        r.daemon_cpu_s = cpu() - cpu0
    return r


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fuse_requests(sock: Path) -> int:
    """Requests the daemon has received (its Prometheus counter)."""
    from nydus.daemon.client import NydusdClient

    text = NydusdClient(str(sock)).get("/api/v1/metrics/prometheus")
    for line in str(text).splitlines():
        if line.startswith("nydusd_fuse_requests_total"):
            return int(float(line.split()[-1]))
    return 0


def _wait_mount(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nydusd died:\n{log.read_text()[-3000:]}")
        if os.path.ismount(path):
            return
        time.sleep(0.05)
    raise RuntimeError("nydusd did not mount in 60 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--big", type=_size, default=1 << 30)
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/nydus-bench-read"))
    ap.add_argument("--fuse-threads", type=int, default=4)
    ap.add_argument("--targets", default="native,erofs,fuse,erofs-mode,verify")
    ap.add_argument("--nydusd-args", default="", help="extra nydusd flags")
    ap.add_argument("--tag", default="", help="suffix for the report file names")
    ap.add_argument(
        "--amplify-io",
        type=_size,
        default=None,
        help="amplify_io of the erofs-mode config (also its blob fs readahead)",
    )
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args()
    cold = os.geteuid() == 0
    if not cold:
        print(
            "warning: not root: no drop_caches, no mounts; only 'native' warm numbers",
            file=sys.stderr,
        )
    shape = Shape(a.big, a.files, a.small)
    base = a.work / shape.key
    tree = base / "tree"
    info_path = base / "tree.json"
    if not info_path.exists():
        shutil.rmtree(base, ignore_errors=True)
        print(f"making tree {tree} ...", file=sys.stderr)
        info = make_tree(tree, shape)
        info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())
    img = base / "image"
    boot = img / "bootstrap"
    if not boot.exists():
        shutil.rmtree(img, ignore_errors=True)
        (img / "blobs").mkdir(parents=True)
        print("building image ...", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from nydus.cli.nydus_image import main; sys.exit(main())",
                "create",
                "--bootstrap",
                str(boot),
                "--blob-dir",
                str(img / "blobs"),
                "--compressor",
                "none",
                str(tree),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    with open_bootstrap(boot) as md:
        blob_ids = [b.blob_id for b in md.blobs]
    blobs = [str(img / "blobs" / b) for b in blob_ids]
    targets = a.targets.split(",")
    results: list[Result] = []
    extra: list[str] = []
    load_before = os.getloadavg()
    mnt = base / "mnt"
    mnt.mkdir(exist_ok=True)
    for t in targets:
        print(f"measuring {t} ...", file=sys.stderr)
        if t == "native":
            prime([tree])
            results.append(measure("native", tree, info, cold))
        elif t == "erofs" and cold:
            prime([boot, *map(Path, blobs)])
            mount_erofs(str(boot), str(mnt), blobs)
            try:
                results.append(measure("erofs", mnt, info, cold))
            finally:
                umount(str(mnt))
        elif t == "fuse" and cold:
            prime([boot, *map(Path, blobs)])
            cfg = base / "localfs.json"
            cfg.write_text(
                json.dumps(
                    {
                        "device": {
                            "backend": {"type": "localfs", "config": {"dir": str(img / "blobs")}}
                        },
                        "mode": "direct",
                        "fs_driver": "fusedev",
                    }
                )
            )  # FUSE RAFS mode (nydusd's default is erofs)
            log = base / "nydusd.log"
            with open(log, "wb") as lf:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        "import sys; from nydus.cli.nydusd import main; sys.exit(main())",
                        "--config",
                        str(cfg),
                        "--mountpoint",
                        str(mnt),
                        "--bootstrap",
                        str(boot),
                        "--apisock",
                        str(base / "api.sock"),
                        "--fuse-threads",
                        str(a.fuse_threads),
                        *a.nydusd_args.split(),
                    ],
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_mount(mnt, proc, log)
                r = measure(
                    "fuse",
                    mnt,
                    info,
                    cold,
                    functools.partial(_proc_cpu, proc.pid),
                    functools.partial(_fuse_requests, base / "api.sock"),
                )
                r.notes.append(
                    f"nydusd (fs_driver fusedev) --fuse-threads {a.fuse_threads} "
                    f"{a.nydusd_args}".strip()
                )
                results.append(r)
            finally:
                _stop_nydusd(proc, mnt)
        elif t == "erofs-mode" and cold:
            prime([boot, *map(Path, blobs)])
            results.extend(_erofs_mode(a, base, img, boot, mnt, info))
        elif t == "verify":
            prime([boot, *map(Path, blobs)])
            extra.extend(verify_cost(base, img, boot))
    report(a, shape, info, results, (load_before, os.getloadavg()), extra)
    return 0


def _daemon_info(sock: Path) -> Any:
    from nydus.daemon.client import NydusdClient

    return dict(NydusdClient(str(sock)).get("/api/v1/daemon"))


def _erofs_mode(
    a: argparse.Namespace, base: Path, img: Path, boot: Path, mnt: Path, info: dict[str, int]
) -> list[Result]:
    """nydusd in kernel EROFS mode: cold reads through the daemon, then after the switch."""
    cache = base / "erofs-mode-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = base / "erofs-mode.json"
    cfg.write_text(
        json.dumps(
            {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": str(img / "blobs")}},
                    "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}},
                },
                "mode": "direct",
                "fs_driver": "erofs",
                **({"amplify_io": a.amplify_io} if a.amplify_io is not None else {}),
            }
        )
    )
    sock = base / "api-erofs.sock"
    log = base / "nydusd-erofs.log"
    with open(log, "wb") as lf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from nydus.cli.nydusd import main; sys.exit(main())",
                "--config",
                str(cfg),
                "--mountpoint",
                str(mnt),
                "--bootstrap",
                str(boot),
                "--apisock",
                str(sock),
                "--fuse-threads",
                str(a.fuse_threads),
            ],
            stdout=lf,
            stderr=subprocess.STDOUT,
        )
    out: list[Result] = []
    try:
        _wait_mount(mnt, proc, log)
        deadline = time.monotonic() + 30
        while _daemon_info(sock)["backend_collection"].get("/", {}).get("erofs") is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no EROFS mount:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        cpu = functools.partial(_proc_cpu, proc.pid)
        r = measure("erofs-mode-lazy", mnt, info, True, cpu)
        di = _daemon_info(sock)
        files = di["blob_files"]
        r.notes.append(
            f"pages prefilled {di.get('blobfs_prefilled_pages')}, prefills dropped "
            f"{di.get('blobfs_prefill_dropped')}"
        )
        r.notes.append(
            "blob fs reads during the run: "
            + ", ".join(
                f"{v['reads']} reads / {v['bytes_read'] / 1e6:.0f} MB" for v in files.values()
            )
            + "; the seq and small *cold* columns are the daemon's lazy path (localfs "
            "backend, cache filled on the way), warm columns are the page cache"
        )
        out.append(r)
        t0 = time.perf_counter()
        timed("tar cf - . | cat > /dev/null", cwd=mnt)  # completes the blob in the cache
        while True:
            be = _daemon_info(sock)["backend_collection"]["/"]
            if be["erofs"]["mode"] == "native":
                break
            if time.perf_counter() - t0 > 120:
                raise RuntimeError("no switch to native within 120 s")
            time.sleep(0.1)
        prime([Path(p) for p in be["erofs"]["devices"]])  # host-warm like the others
        reads0 = sum(v["reads"] for v in _daemon_info(sock)["blob_files"].values())
        r2 = measure("erofs-mode-native", mnt, info, True, cpu)
        reads1 = sum(v["reads"] for v in _daemon_info(sock)["blob_files"].values())
        r2.notes.append(
            f"switched to native {time.perf_counter() - t0:.1f} s after starting "
            f"to read the rest; blob fs reads during this run: {reads1 - reads0} "
            f"(devices {be['erofs']['devices']})"
        )
        out.append(r2)
    finally:
        _stop_nydusd(proc, mnt)
    return out


def verify_cost(base: Path, img: Path, boot: Path) -> list[str]:
    """Markdown lines: the cost of chunk verification (module docstring, ``verify``)."""
    from nydus import codec
    from nydus.config import DaemonConfig
    from nydus.storage import open_device
    from nydus.storage.fetcher import BlobFetcher

    md = open_bootstrap(boot)
    info = md.blobs[0]
    size = info.uncompressed_size
    cache = base / "verify-cache"

    def cfg() -> DaemonConfig:
        return DaemonConfig.from_json(
            {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": str(img / "blobs")}},
                    "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}},
                }
            },
            environ={},
        )

    def read_all(fresh: bool) -> float:
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
        dev = open_device(md.blobs, cfg(), chunk_lookup=md.chunk_record)
        try:
            dev.read_range(0, 0, 4096)  # the ci array and ToC, outside the timing
            t0 = time.perf_counter()
            for off in range(0, size, 4 * MiB):
                dev.read_range(0, off, min(4 * MiB, size - off))
            return time.perf_counter() - t0
        finally:
            dev.close()

    def best(fn: Callable[[], float]) -> float:
        return min(fn() for _ in range(3))

    rows: list[tuple[str, float]] = []
    rows.append(("cold read, fetch + verify + cache (always on)", best(lambda: read_all(True))))
    real = BlobFetcher.verify
    BlobFetcher.verify = lambda self, c, data: None
    try:
        rows.append(
            ("cold read, digest check skipped (for comparison only)", best(lambda: read_all(True)))
        )
    finally:
        BlobFetcher.verify = real
    data = (cache / f"{info.blob_id}.blob.data").read_bytes()
    dig = codec.digester_by_name(info.digester)
    step = info.chunk_size

    def hash_all() -> float:
        t0 = time.perf_counter()
        for off in range(0, len(data), step):
            dig.digest(data[off : off + step])
        return time.perf_counter() - t0

    rows.append((f"{info.digester} over every chunk, in memory (the check alone)", best(hash_all)))

    def verify_blob() -> float:
        record = cache / f"{info.blob_id}.blob.data.verified"
        record.unlink(missing_ok=True)
        dev = open_device(md.blobs, cfg(), chunk_lookup=md.chunk_record)
        try:
            dev.read_range(0, 0, 0)
            dev._blob(0).fetcher.meta()
            t0 = time.perf_counter()
            assert dev.verify_blob(0)
            return time.perf_counter() - t0
        finally:
            dev.close()

    rows.append(("verify_blob after a restart (before an EROFS native switch)", best(verify_blob)))

    def cached(record: bool) -> Callable[[], float]:
        def run() -> float:
            if not record:
                os.utime(cache / f"{info.blob_id}.blob.data")  # the record no longer matches
            return read_all(False)

        return run

    read_all(False)  # leaves a record behind
    rows.append(
        ("restart, read the complete cache with a matching record (trusted)", best(cached(True)))
    )
    rows.append(
        (
            "restart, read the complete cache without one (each chunk hashed once)",
            best(cached(False)),
        )
    )
    md.close()
    shutil.rmtree(cache, ignore_errors=True)
    out = [
        "## Verification cost",
        "",
        f"Blob: {size / MiB:.0f} MiB uncompressed, {info.chunk_count} chunks of "
        f"{info.chunk_size // 1024} KiB, digester {info.digester}; in process, localfs "
        f"backend (page-cache warm), `read_range` in 4 MiB reads; best of three.",
        "",
        "| what | s | MB/s | ms per GiB |",
        "|---|---|---|---|",
    ]
    for name, t in rows:
        per_gib = t * 1000 * (1 << 30) / size
        out.append(f"| {name} | {t:.3f} | {size / 1e6 / t:,.0f} | {per_gib:,.0f} |")
    out.append("")
    return out


def _stop_nydusd(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    if os.path.ismount(mnt):
        umount(str(mnt), lazy=True)


def _fmt(v: float, base: float | None) -> str:
    if not v:
        return "-"
    s = f"{v:,.0f}"
    if base:
        s += f" ({v / base:.2f}x)"
    return s


def report(
    a: argparse.Namespace,
    shape: Shape,
    info: dict[str, int],
    results: list[Result],
    load: tuple[tuple[float, ...], tuple[float, ...]],
    extra: list[str],
) -> None:
    now = dt.datetime.now()
    native = next((r for r in results if r.target == "native"), None)
    cols = [
        ("seq cold MB/s", "seq_cold_mbps"),
        ("seq warm MB/s", "seq_warm_mbps"),
        ("find+stat cold files/s", "walk_cold_files_per_s"),
        ("find+stat warm files/s", "walk_warm_files_per_s"),
        ("small cold files/s", "small_cold_files_per_s"),
        ("small cold MB/s", "small_cold_mbps"),
        ("small warm files/s", "small_warm_files_per_s"),
    ]
    head = "| target | " + " | ".join(c for c, _ in cols) + " | daemon cpu s |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for r in results:
        cells = [
            _fmt(getattr(r, k), getattr(native, k) if native and r is not native else None)
            for _c, k in cols
        ]
        lines.append(
            f"| {r.target} | " + " | ".join(cells) + f" | {r.daemon_cpu_s:.1f} |"
            if r.daemon_cpu_s
            else f"| {r.target} | " + " | ".join(cells) + " | - |"
        )
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    md = [
        f"# Read benchmark, {now:%Y-%m-%d %H:%M}",
        "",
        f"Tree: one {info['big_bytes'] / MiB:.0f} MiB incompressible file, {info['files']:,} "
        f"files in all, {info['small_files']:,} small files (1-32 KiB, "
        f"{info['small_bytes'] / 1e6:.0f} MB). Image: `nydus-image create --compressor none` "
        f"(1 MiB chunks), one blob on local disk.",
        f"Machine: python {platform.python_version()}, kernel {platform.release()}, cpus "
        f"{os.cpu_count()}, git {git}. Cold = `sync; echo 3 > drop_caches` before the "
        f"command; warm = the same command again. One run each. Before each target its "
        f"backing files are read once (tree, or bootstrap + blob), so all targets start "
        f"guest-cold and host-warm (this is a VM). Load average before/after: "
        f"{load[0][0]:.1f}/{load[1][0]:.1f} (other work on the machine adds noise).",
        "",
        *lines,
        "",
        "Ratios in parentheses are against `native`. seq = `dd bs=1M` of the big file; "
        "find+stat = `find -printf '%i %s %m %u %T@'`; small = `tar cf - small | cat`.",
        "",
    ]
    for r in results:
        for n in r.notes:
            md.append(f"- {r.target}: {n}")
        if r.warm_requests:
            md.append(
                f"- {r.target}: FUSE requests that reached the daemon during the warm "
                f"runs: "
                + ", ".join(f"{k} {v}" for k, v in r.warm_requests.items())
                + " (0 = served entirely by the kernel's caches)"
            )
    md.extend(["", *extra])
    text = "\n".join(md) + "\n"
    print(text)
    if a.no_report:
        return
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"read-{now:%Y-%m-%d}" + (f"-{a.tag}" if a.tag else "")
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {
                "date": now.isoformat(timespec="seconds"),
                "shape": asdict(shape),
                "tree": info,
                "git": git,
                "loadavg": [list(load[0]), list(load[1])],
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    plot_after_run(out / f"{stem}.md")


if __name__ == "__main__":
    sys.exit(main())
