"""Fetch benchmark: lazy reads of a scattered working set through the registry backend, beside
one whole-blob GET, at loopback speed and through a bandwidth-limited link.

    .venv/bin/python bench/fetch.py                          # 1 GiB image, 5% working set
    .venv/bin/python bench/fetch.py --size 64M --files 2000  # a quick check
    .venv/bin/python bench/fetch.py --rate-mbit 50 --no-loopback

The image is built (in process, zstd, 1 MiB chunks) from the same cached tree as
``bench/build.py`` (``tests/corpus.make_large_tree`` under ``--work``) and pushed to Debian's
``docker-registry`` under the blob file's digest. The working set is whole files picked at
random (fixed seed) until they hold ``--working-set`` (default 5%) of the image's file bytes,
and read in that random order: scattered across the blob, as a container's first minutes are.

For each link the benchmark times, with fresh caches:

* ``whole blob GET``: one streaming GET of the whole blob (what a non-lazy pull downloads);
* ``lazy, N threads, amplify A``: ``BlobDevice.read_chunks`` of every working-set file with a
  blob cache, ``amplify_io`` A (upstream's default is 1 MiB; 128 KiB is its v6 minimum) and N
  reader threads; bytes are the backend's ``read_amount_total`` (chunk data plus the blob's
  ci array).

Links: ``loopback`` (registry on 127.0.0.1) and ``limited``: the registry runs in a network
namespace behind a veth pair whose two ends are shaped with ``tc tbf`` to ``--rate-mbit``
(only namespace addresses, 10.201.0.1/24 and .2, are used). The namespace, the veth pair and
the registry are created by this script and removed when it exits, also on errors and Ctrl-C.
This kernel has no ``netem``, so no latency is added: the limited link only caps bandwidth.

Writes ``bench/results/fetch-<date>[-<size>x<files>].md`` and ``.json`` and prints the table.
Needs root for the limited link (skipped otherwise, with a note).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))

from build import ensure_tree, human, parse_size  # type: ignore[import-not-found]  # noqa: E402
from plot import plot_after_run  # noqa: E402  # bench/plot.py: PNG beside the report

from nydus.builder.build import BuildOptions, build_image  # noqa: E402
from nydus.builder.dirsource import load_directory  # noqa: E402
from nydus.config import DaemonConfig  # noqa: E402
from nydus.metadata import BlobInfo, RafsMetadata, open_bootstrap  # noqa: E402
from nydus.registry import RegistryClient  # noqa: E402
from nydus.storage import open_device  # noqa: E402

REPO_NAME = "bench/fetch"
NETNS = "nydus-fetch-bench"
VETH_HOST, VETH_NS = "nfb-host", "nfb-ns"
HOST_ADDR, NS_ADDR = "10.201.0.1", "10.201.0.2"


@dataclass
class Result:
    link: str
    method: str
    seconds: float
    bytes: int
    requests: int
    note: str = ""
    cpu: float = 0.0  # CPU seconds of this process (the client side; the registry runs apart)
    read_ms: tuple[float, float] = (0.0, 0.0)  # lazy: median and 90th percentile of a file read
    where: dict[str, float] = dataclasses.field(default_factory=dict)  # lazy: see _where

    @property
    def mbps(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


# ------------------------------------------------------------------------ image


def ensure_image(work: Path, tree: Path, key: str) -> tuple[Path, Path, str]:
    """(bootstrap, blob file, blob file sha256) of the benchmark image, built if missing."""
    out = work / f"fetch-image-{key}"
    boot, meta = out / "boot", out / "image.json"
    if boot.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        blob = out / info["blob_id"]
        if blob.is_file():
            print(f"reusing image {out}")
            return boot, blob, info["digest"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    print(f"building the image from {tree} ...", flush=True)
    t0 = time.monotonic()
    tmp = out / "blob.tmp"
    with open(tmp, "wb") as f:
        res = build_image(load_directory(tree), f, BuildOptions(compressor="zstd"))
    assert res.blob is not None
    blob_id = res.blob.entry.blob_id
    blob = out / blob_id
    tmp.rename(blob)
    boot.write_bytes(res.bootstrap)
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        while piece := f.read(1 << 22):
            h.update(piece)
    meta.write_text(json.dumps({"blob_id": blob_id, "digest": h.hexdigest()}))
    print(f"  built in {time.monotonic() - t0:.1f}s: blob {human(blob.stat().st_size)}")
    return boot, blob, h.hexdigest()


def working_set(md: RafsMetadata, fraction: float, seed: int) -> tuple[list[str], int, int]:
    """(paths, their bytes, all file bytes): random whole files up to ``fraction``."""
    files = []
    for path, nid in md.walk():
        a = md.getattr(nid)
        if a.is_reg and a.size:
            files.append((path.decode(), a.size))
    total = sum(s for _, s in files)
    random.Random(seed).shuffle(files)
    picked, size = [], 0
    for p, s in files:
        if size >= fraction * total:
            break
        picked.append(p)
        size += s
    return picked, size, total  # in random order: the order the files are read


# ------------------------------------------------------------------------ registry


class Registry:
    """``docker-registry serve`` on ``addr`` (optionally inside a network namespace)."""

    def __init__(self, storage: Path, addr: str, netns: str | None = None) -> None:
        exe = shutil.which("docker-registry")
        if exe is None:
            sys.exit("docker-registry is not installed (scripts/setup.sh installs it)")
        self.addr = addr
        storage.mkdir(parents=True, exist_ok=True)
        self.cfg = storage.parent / f"registry-{addr.replace(':', '_')}.yml"
        self.cfg.write_text(
            json.dumps(
                {
                    "version": "0.1",
                    "log": {"level": "error", "accesslog": {"disabled": True}},
                    "storage": {
                        "filesystem": {"rootdirectory": str(storage)},
                        "maintenance": {"uploadpurging": {"enabled": False}},
                    },
                    "http": {"addr": addr, "secret": "bench"},
                }
            )
        )
        argv = [exe, "serve", str(self.cfg)]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                opener.open(f"http://{addr}/v2/", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    sys.exit(f"docker-registry on {addr} did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def client(host: str) -> RegistryClient:
    return RegistryClient(host, scheme="http", docker_config=None, timeout=60, connect_timeout=5)


# ------------------------------------------------------------------------ the link


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True)


def teardown_link() -> None:
    sh("ip", "netns", "del", NETNS, check=False)
    sh("ip", "link", "del", VETH_HOST, check=False)


def setup_link(rate_mbit: int) -> None:
    teardown_link()
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
    sh("ip", "link", "set", VETH_NS, "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", VETH_HOST)
    sh("ip", "link", "set", VETH_HOST, "up")
    ns = ("ip", "netns", "exec", NETNS)
    sh(*ns, "ip", "addr", "add", f"{NS_ADDR}/24", "dev", VETH_NS)
    sh(*ns, "ip", "link", "set", VETH_NS, "up")
    sh(*ns, "ip", "link", "set", "lo", "up")
    tbf = ("root", "tbf", "rate", f"{rate_mbit}mbit", "burst", "256kb", "latency", "100ms")
    sh("tc", "qdisc", "add", "dev", VETH_HOST, *tbf)
    sh(*ns, "tc", "qdisc", "add", "dev", VETH_NS, *tbf)


# ------------------------------------------------------------------------ measurements


def measure_whole(link: str, host: str, digest: str) -> Result:
    c = client(host)
    t0, c0 = time.monotonic(), time.process_time()
    n = sum(len(p) for p in c.get_blob_stream(REPO_NAME, f"sha256:{digest}", verify=False))
    secs, cpu = time.monotonic() - t0, time.process_time() - c0
    c.close()
    return Result(link, "whole blob GET", secs, n, 1, cpu=cpu)


def measure_small_gets(link: str, host: str, digest: str, n: int = 100) -> Result:
    """``n`` sequential ranged GETs of 10 bytes: the per-request cost of the registry."""
    c = client(host)
    c.get_blob_range(REPO_NAME, f"sha256:{digest}", 0, 10)  # connect and ping first
    step = (c.blob_size(REPO_NAME, f"sha256:{digest}") - 10) // n
    t0, c0 = time.monotonic(), time.process_time()
    for i in range(n):
        c.get_blob_range(REPO_NAME, f"sha256:{digest}", i * step, i * step + 10)
    secs, cpu = time.monotonic() - t0, time.process_time() - c0
    c.close()
    return Result(
        link,
        f"{n} ranged GETs of 10 B",
        secs,
        10 * n,
        n,
        note=f"{secs / n * 1000:.1f} ms per request",
        cpu=cpu,
    )


def measure_lazy(
    link: str,
    host: str,
    md: RafsMetadata,
    blobs: list[BlobInfo],
    paths: list[str],
    tree: Path,
    threads: int,
    amplify: int,
) -> Result:
    with tempfile.TemporaryDirectory(prefix="nydus-fetch-") as wd:
        cfg = DaemonConfig.from_json(
            {
                "device": {
                    "backend": {
                        "type": "registry",
                        "config": {
                            "scheme": "http",
                            "host": host,
                            "repo": REPO_NAME,
                            "timeout": 60,
                        },
                    },
                    "cache": {"type": "blobcache", "config": {"work_dir": wd}},
                },
                "amplify_io": amplify,
            },
            environ={},
        )
        dev = open_device(blobs, cfg, id=f"bench-{link}", chunk_lookup=md.chunk_record)
        chunk_lists = [md.chunks(md.resolve(p)) for p in paths]
        got: dict[str, str] = {}
        lat: list[float] = []
        lock = threading.Lock()

        def read(i: int) -> None:
            t = time.perf_counter()
            data = b"".join(dev.read_chunks(chunk_lists[i]))
            dt_ms = (time.perf_counter() - t) * 1000
            with lock:
                got[paths[i]] = hashlib.md5(data).hexdigest()
                lat.append(dt_ms)

        t0, c0 = time.monotonic(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(len(paths))))
        secs, cpu = time.monotonic() - t0, time.process_time() - c0
        m = dev.metrics_backend()
        where = _where(dev.metrics_blobcache())
        dev.close()
    bad = [
        p for p in paths if hashlib.md5((tree / p.lstrip("/")).read_bytes()).hexdigest() != got[p]
    ]
    if bad:
        sys.exit(f"lazy read returned wrong bytes for {len(bad)} files, e.g. {bad[0]}")
    name = f"lazy, {threads} thread{'s' if threads > 1 else ''}, amplify {human(amplify)}"
    lat.sort()
    pct = (lat[len(lat) // 2], lat[len(lat) * 9 // 10]) if lat else (0.0, 0.0)
    return Result(
        link, name, secs, m["read_amount_total"], m["read_count"], cpu=cpu, read_ms=pct, where=where
    )


def _where(bc: dict[str, Any]) -> dict[str, float]:
    """Seconds (summed over threads) of the read path's stages, from the blob-cache metrics'
    ``readpath_*`` counters (absent on code without them): the wall time of user reads that
    went to the backend, and within them and their amplification requests the wait for a
    fetch slot, the backend request, decompression, hashing and the cache write."""
    keys = ("user_fetch", "queue", "backend", "decode", "verify", "cache")
    return {k: bc[f"readpath_{k}_micros"] / 1e6 for k in keys if f"readpath_{k}_micros" in bc}


def run_link(
    link: str,
    host: str,
    md: RafsMetadata,
    blobs: list[BlobInfo],
    paths: list[str],
    tree: Path,
    digest: str,
    runs: list[tuple[int, int]],
) -> list[Result]:
    out = []
    for threads, amplify in runs:
        r = measure_lazy(link, host, md, blobs, paths, tree, threads, amplify)
        print(
            f"  {link:9} {r.method:34} {r.seconds:8.2f}s {human(r.bytes):>10} "
            f"{r.requests:6d} requests, read p50/p90 {r.read_ms[0]:.1f}/{r.read_ms[1]:.1f} ms, "
            + " ".join(f"{k} {v:.2f}s" for k, v in r.where.items()),
            flush=True,
        )
        out.append(r)
    r = measure_whole(link, host, digest)
    print(f"  {link:9} {r.method:34} {r.seconds:8.2f}s {human(r.bytes):>10}", flush=True)
    out.append(r)
    r = measure_small_gets(link, host, digest)
    print(f"  {link:9} {r.method:34} {r.seconds:8.2f}s {r.note}", flush=True)
    out.append(r)
    return out


# ------------------------------------------------------------------------ report


def report(args: argparse.Namespace, results: list[Result], info: dict[str, Any]) -> str:
    lines = [
        f"# Fetch benchmark, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Image: {human(info['file_bytes'])} in {info['files']} files, blob "
        f"{human(info['blob_bytes'])} (zstd, 1 MiB chunks, {info['chunks']} chunks). "
        f"Working set: {len(info['working_set'])} whole files, {human(info['ws_bytes'])} "
        f"({info['ws_bytes'] / info['file_bytes']:.1%} of file bytes), picked at random "
        f"(seed {args.seed}).",
        f"Lazy reads: blob cache, digest_validate off, fresh cache per run. "
        f"Limited link: tc tbf {args.rate_mbit} Mbit/s on both ends of a veth pair into a "
        f"network namespace (no added latency: this kernel has no netem).",
        f"Machine: python {platform.python_version()}, kernel {platform.release()}, "
        f"cpus {os.cpu_count()}.",
        "",
        "| link | method | time s | client CPU s | bytes | of blob | requests | MB/s "
        "| file read p50/p90 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.note:
            lines.append(
                f"| {r.link} | {r.method} | {r.seconds:.2f} | {r.cpu:.2f} | {r.note} | "
                f"| {r.requests} | | |"
            )
            continue
        lines.append(
            f"| {r.link} | {r.method} | {r.seconds:.2f} | {r.cpu:.2f} | {human(r.bytes)} | "
            f"{r.bytes / info['blob_bytes']:.1%} | {r.requests} | {r.mbps:.0f} | "
            + (f"{r.read_ms[0]:.1f} / {r.read_ms[1]:.1f} |" if r.where or r.read_ms[0] else "|")
        )
    where = [r for r in results if r.where]
    if where:
        lines += ["", "Where the lazy runs' time went (s, summed over threads; `_where`):", ""]
        keys = list(where[0].where)
        lines += ["| link | method | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for r in where:
            vals = " | ".join(f"{r.where.get(k, 0):.2f}" for k in keys)
            lines.append(f"| {r.link} | {r.method} | {vals} |")
    lines += [
        "",
        "MB/s is 10^6 bytes transferred per second of wall-clock time. Client CPU is the "
        "benchmark process's CPU time during the run (HTTP client, decompression, "
        "verification; the registry is another process): it moves less than wall time "
        "when the machine is busy. The ranged "
        "GETs of 10 B show docker-registry's fixed cost per request: on loopback the "
        "lazy runs are bound by their number of requests, not by bytes.",
        *([f"Note: {n}" for n in info.get("notes", [])]),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--working-set", type=float, default=0.05)
    ap.add_argument("--rate-mbit", type=int, default=100)
    ap.add_argument(
        "--lazy",
        default="1:1M,8:1M,8:128K",
        help="lazy runs as THREADS:AMPLIFY_IO, comma separated",
    )
    ap.add_argument("--work", type=Path, default=Path("/var/tmp/nydus-bench"))
    ap.add_argument("--no-loopback", action="store_true")
    ap.add_argument("--no-limited", action="store_true")
    args = ap.parse_args()
    runs = [(int(t), parse_size(a)) for t, a in (x.split(":") for x in args.lazy.split(","))]
    args.work.mkdir(parents=True, exist_ok=True)
    tree, _stats = ensure_tree(args.work, args.size, args.files, 0)
    key = f"{args.size}-{args.files}"
    boot, blob, digest = ensure_image(args.work, tree, key)
    md = open_bootstrap(boot)
    blobs = [dataclasses.replace(b, blob_id=digest) for b in md.blobs]
    paths, ws_bytes, file_bytes = working_set(md, args.working_set, args.seed)
    info: dict[str, Any] = {
        "files": sum(1 for _p, n in md.walk() if md.getattr(n).is_reg),
        "file_bytes": file_bytes,
        "blob_bytes": blob.stat().st_size,
        "chunks": md.blobs[0].chunk_count,
        "working_set": paths,
        "ws_bytes": ws_bytes,
        "notes": [],
    }
    storage = args.work / f"fetch-registry-{key}" / "storage"
    results: list[Result] = []

    reg = Registry(storage, "127.0.0.1:5055")
    try:
        c = client(reg.addr)
        if not c.has_blob(REPO_NAME, f"sha256:{digest}"):
            print("pushing the blob ...", flush=True)
            c.push_blob(REPO_NAME, f"sha256:{digest}", str(blob))
        c.close()
        if not args.no_loopback:
            results += run_link("loopback", reg.addr, md, blobs, paths, tree, digest, runs)
    finally:
        reg.stop()

    if not args.no_limited:
        if os.geteuid() != 0:
            info["notes"].append("limited link skipped: needs root for ip netns and tc")
            print(info["notes"][-1])
        else:
            handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
            try:
                setup_link(args.rate_mbit)
                reg = Registry(storage, f"{NS_ADDR}:5000", netns=NETNS)
                try:
                    results += run_link("limited", reg.addr, md, blobs, paths, tree, digest, runs)
                finally:
                    reg.stop()
            finally:
                teardown_link()
                signal.signal(signal.SIGTERM, handler)

    text = report(args, results, info)
    print()
    print(text)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    suffix = (
        ""
        if (args.size, args.files) == (1 << 30, 20_000)
        else f"-{human(args.size).replace(' ', '').replace('.0', '')}x{args.files}"
    )
    stem = out / f"fetch-{dt.date.today():%Y-%m-%d}{suffix}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "image": {k: v for k, v in info.items() if k != "working_set"},
                "working_set_files": len(paths),
                "results": [{**asdict(r), "mbps": round(r.mbps, 1)} for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {stem}.md and .json")
    plot_after_run(stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
