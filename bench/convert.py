"""Convert benchmark: ``nydusify convert`` registry to registry, beside ``skopeo copy`` of the
same image between the same two registries (the time just to move the bytes), in one run.

    .venv/bin/python bench/convert.py                      # the cold-start ml image (issue 15)
    .venv/bin/python bench/convert.py --before /work/main/src --rounds 2 --perf
    .venv/bin/python bench/convert.py --image synthetic --size 128M   # generated, a quick check
    .venv/bin/python bench/convert.py --check              # also time nydusify check

Two Debian ``docker-registry`` processes on 127.0.0.1 (source and target, so that neither
tool can cross-repository mount its way out of moving the bytes). ``--image ml`` (default) is
the cold-start benchmark's image: bench/mlimage.py's cached gzip layers (built when missing)
hard-linked into an OCI layout. ``--image synthetic`` generates one (tests/oci_images-style PAX
tars, gzip level 1: random files, hex text, many small files). Layouts are cached under
``--work`` (default /var/tmp/nydus-bench/convert), and so is the source registry's storage
(pushed once with ``skopeo copy --preserve-digests``).

Measured per tool: wall time, CPU time (user + system, children included) and peak RSS (the
process's own ``VmHWM``, polled from /proc; for nydusify that is the whole converter).
``--before SRC`` also converts with the nydus package under SRC (old code, same run);
``--variant ARGS`` also converts with the code under test and extra convert arguments;
``--perf`` runs one more convert under ``perf record`` and attributes its CPU samples to the
stages by library and symbol (inflate, zstd, blake3, sha256, kernel, Python). Throughput is
MB/s (10^6 bytes) of the source image's compressed layer bytes.

Writes ``bench/results/convert-<date>[-ml|-<size>].md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from plot import plot_after_run  # bench/plot.py: PNG beside the report

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
VENV_BIN = Path(sys.executable).parent


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s[-1].upper() in mult:
        return int(float(s[:-1]) * mult[s[-1].upper()])
    return int(s)


class _Data(io.RawIOBase):
    """Deterministic file content generated on the fly (never held whole)."""

    def __init__(self, size: int, seed: int, kind: str) -> None:
        self.left = size
        self.rng = random.Random(seed)
        self.kind = kind

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.left, 1 << 20)
        if n <= 0:
            return 0
        if self.kind == "random":
            data = self.rng.randbytes(n)
        else:
            data = self.rng.randbytes((n + 1) // 2).hex().encode()[:n]
        b[:n] = data
        self.left -= n
        return n


def make_layer(path: Path, size: int, seed: int) -> None:
    """One layer of about ``size`` bytes: 45% random, 45% hex text, 10% small files."""
    rng = random.Random(seed)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):

        def add(name: str, n: int, kind: str) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = n, 0o644, 1_700_000_000
            tf.addfile(ti, _Data(n, rng.randrange(1 << 30), kind))

        d = tarfile.TarInfo(f"layer{seed}")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        tf.addfile(d)
        big = int(size * 0.45)
        k = 0
        while big > 0:
            n = min(big, rng.randrange(8 << 20, 64 << 20))
            add(f"layer{seed}/random{k}.bin", n, "random")
            big -= n
            k += 1
        text = int(size * 0.45)
        k = 0
        while text > 0:
            n = min(text, rng.randrange(1 << 20, 16 << 20))
            add(f"layer{seed}/text{k}.txt", n, "hex")
            text -= n
            k += 1
        small = size - int(size * 0.45) * 2
        k = 0
        while small > 0:
            n = min(small, rng.randrange(512, 64 << 10))
            add(f"layer{seed}/small/{k // 500}/f{k}", n, "hex" if k % 2 else "random")
            small -= n
            k += 1


def make_image(work: Path, total: int, layers: int) -> Path:
    """An OCI layout (cached) with ``layers`` layers of ``total`` bytes in all."""
    from nydus.format import oci

    layout = work / f"layout-{total}-{layers}"
    if (layout / "index.json").exists():
        return layout
    tmp = work / "layout.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = tmp / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descs, diff_ids = [], []
    sizes = [total // layers] * layers
    for i, sz in enumerate(sizes):
        p = tmp / f"layer{i}.tar.gz"
        t0 = time.monotonic()
        make_layer(p, sz, i)
        data_digest = _sha256_file(p)
        with gzip.open(p, "rb") as f:
            diff_ids.append(_sha256_stream(f))
        os.replace(p, blobs / data_digest[7:])
        descs.append(
            {
                "mediaType": oci.MEDIA_TYPE_OCI_LAYER_GZIP,
                "digest": data_digest,
                "size": (blobs / data_digest[7:]).stat().st_size,
            }
        )
        print(
            f"  layer {i}: {sz / 1e6:.0f} MB -> {descs[-1]['size'] / 1e6:.0f} MB gz "
            f"in {time.monotonic() - t0:.0f}s",
            flush=True,
        )
    _finish_layout(tmp, descs, diff_ids)
    os.replace(tmp, layout)
    return layout


def _finish_layout(tmp: Path, descs: list[dict[str, Any]], diff_ids: list[str]) -> None:
    """Config, manifest and index of a one-image OCI layout (tag ``v1``) in ``tmp``."""
    from nydus.format import oci

    blobs = tmp / "blobs" / "sha256"
    layers = len(descs)
    cfg = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"layer {i}"} for i in range(layers)],
        }
    ).encode()
    (blobs / oci.sha256_digest(cfg)[7:]).write_bytes(cfg)
    man = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": oci.MEDIA_TYPE_OCI_CONFIG,
                "digest": oci.sha256_digest(cfg),
                "size": len(cfg),
            },
            "layers": descs,
        }
    ).encode()
    (blobs / oci.sha256_digest(man)[7:]).write_bytes(man)
    (tmp / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
                        "digest": oci.sha256_digest(man),
                        "size": len(man),
                        "annotations": {"org.opencontainers.image.ref.name": "v1"},
                    }
                ],
            }
        )
    )


def _sha256_file(p: Path) -> str:
    with open(p, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    while piece := f.read(1 << 20):
        h.update(piece)
    return "sha256:" + h.hexdigest()


def ml_layout(work: Path) -> tuple[Path, int]:
    """An OCI layout of the cold-start benchmark's ml image (bench/mlimage.py's cached gzip
    layers, hard-linked in); returns it and its uncompressed size."""
    from mlimage import ml_layers

    from nydus.format import oci

    layout = work / "layout-ml"
    layers = ml_layers()
    total = sum(_gunzipped_size(p) for p, _ in layers)
    if (layout / "index.json").exists():
        return layout, total
    tmp = work / "layout-ml.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = tmp / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descs = []
    for p, _ in layers:
        digest = _sha256_file(p)
        try:
            os.link(p, blobs / digest[7:])
        except OSError:
            shutil.copyfile(p, blobs / digest[7:])
        descs.append(
            {"mediaType": oci.MEDIA_TYPE_OCI_LAYER_GZIP, "digest": digest, "size": p.stat().st_size}
        )
    _finish_layout(tmp, descs, [d for _, d in layers])
    os.replace(tmp, layout)
    return layout, total


def _gunzipped_size(p: Path) -> int:
    tar = p.with_suffix("")  # mlimage keeps layerN.tar beside layerN.tar.gz
    if tar.is_file():
        return tar.stat().st_size
    with gzip.open(p, "rb") as f:
        return sum(len(b) for b in iter(lambda: f.read(1 << 20), b""))


@dataclass
class Result:
    name: str
    command: str
    seconds: float
    cpu_seconds: float
    max_rss_mb: float
    ok: bool
    note: str = ""


def timed(name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> Result:
    """Wall time, CPU time (user + system of the child and its children: the growth of this
    process's RUSAGE_CHILDREN, which only this child adds to meanwhile) and peak RSS (the
    child's own VmHWM, polled: rusage maxrss would include this driver's memory at fork)."""
    import resource

    from oci_images import run_measured  # type: ignore[import-not-found]

    log_path = cwd / f"{name.replace(' ', '-')}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        rc, peak = run_measured(cmd, cwd=cwd, env=env, stdout=log, stderr=log)
        dt_s = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    note = "" if rc == 0 else log_path.read_text(errors="replace")[-500:]
    return Result(name, " ".join(cmd), dt_s, cpu, peak / 2**20, rc == 0, note)


# perf symbol -> stage; first match wins (dso substring, symbol substring)
STAGES: list[tuple[str, str, str]] = [
    ("isal", "", "gunzip"),
    ("zlib_ng", "", "gunzip"),
    ("libz.so", "", "gunzip"),
    ("", "inflate", "gunzip"),
    ("blake3", "", "chunk hash (blake3)"),
    ("zstandard", "", "compress (zstd)"),
    ("backend_c", "", "compress (zstd)"),
    ("libzstd", "", "compress (zstd)"),
    ("libcrypto", "", "sha256 (diff_id, blob digest)"),
    ("_hashlib", "", "sha256 (diff_id, blob digest)"),
    ("", "sha256", "sha256 (diff_id, blob digest)"),
    ("kernel", "copy_", "kernel: copies (socket, file, pipe)"),
    ("kernel", "", "kernel: other (syscalls, page faults, TCP)"),
    ("libc", "mem", "libc memcpy/memset (Python-level copies)"),
    ("python", "", "Python interpreter (tar parse, tree, bootstrap, HTTP, glue)"),
    ("libc", "", "libc other (malloc, locks)"),
]


def perf_breakdown(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Share of CPU samples per stage of one more run of ``cmd`` under ``perf record``."""
    data = cwd / "perf.data"
    subprocess.run(
        ["perf", "record", "-q", "-F", "499", "-o", str(data), "--", *cmd],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = subprocess.run(
        [
            "perf",
            "report",
            "-i",
            str(data),
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "--percent-limit",
            "0",
            "-q",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        pct, dso, sym = float(parts[0][:-1]), parts[1], " ".join(parts[3:])
        stage = next(
            (st for d, sy, st in STAGES if d in dso.lower() and sy in sym.lower()), "other"
        )
        shares[stage] = shares.get(stage, 0.0) + pct
    data.unlink(missing_ok=True)
    return dict(sorted(shares.items(), key=lambda kv: -kv[1]))


def cpu_floor(layout: Path, layers: list[dict[str, Any]]) -> dict[str, float]:
    """CPU seconds of the library work that a conversion with unchanged output bytes cannot
    avoid, on the same layer blobs, one thread: sha256 of each gzip layer (the source's
    digest, verified), inflate (ISA-L, the converter's), then per 1 MiB piece of the tar
    stream a blake3 digest and zstd at the converter's level (``nydus.codec``: upstream's
    default level, which fixes the blob bytes), and sha256 of the output (the blob's digest).
    Pieces of the stream, not of files: the same bytes in ~the same number of pieces. No
    tar parsing, no Python per file, no I/O: a lower bound on the converter's CPU time."""
    import hashlib

    from isal import isal_zlib

    from nydus import codec

    zstd = codec.compressor_by_name("zstd")
    blake3 = codec.digester_by_name("blake3")
    assert zstd.compress_fn is not None
    out = dict.fromkeys(("sha256 in", "inflate", "blake3", "zstd", "sha256 out"), 0.0)

    def timed_cpu(stage: str, fn: Any, *args: Any) -> Any:
        t = time.process_time()
        try:
            return fn(*args)
        finally:
            out[stage] += time.process_time() - t

    piece = 1 << 20

    def chunk(data: bytes | bytearray, h: Any) -> None:
        timed_cpu("blake3", blake3.digest, data)
        timed_cpu("sha256 out", h.update, timed_cpu("zstd", zstd.compress_fn, data))

    for layer in layers:
        blob = memoryview((layout / "blobs" / Path(*layer["digest"].split(":"))).read_bytes())
        timed_cpu("sha256 in", lambda b: hashlib.sha256(b).digest(), blob)
        d = isal_zlib.decompressobj(31)  # streamed, as the converter does (one call: 2.5x slower)
        h = hashlib.sha256()
        pending = bytearray()
        for o in range(0, len(blob), piece):
            pending += timed_cpu("inflate", d.decompress, blob[o : o + piece])
            while len(pending) >= piece:
                chunk(pending[:piece], h)
                del pending[:piece]
        pending += timed_cpu("inflate", d.flush)
        if pending:
            chunk(pending, h)
    return out


def nydusify_cmd(
    src: str, dst: str, run_dir: Path, tag: str, extra: list[str] | None = None
) -> list[str]:
    return [
        str(VENV_BIN / "nydusify"),
        "convert",
        "--source",
        f"{src}/bench:v1",
        "--target",
        f"{dst}/bench:{tag}",
        "--work-dir",
        str(run_dir / f"tmp-{tag}"),
        "--output-json",
        str(run_dir / f"{tag}.json"),
        *(extra or []),
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--image",
        choices=["ml", "synthetic"],
        default="ml",
        help="ml: the cold-start benchmark's image (bench/mlimage.py, default); "
        "synthetic: generated, see --size/--layers",
    )
    ap.add_argument("--size", default="1200M", help="synthetic: uncompressed size")
    ap.add_argument("--layers", type=int, default=6, help="synthetic: layer count")
    ap.add_argument("--work", default="/var/tmp/nydus-bench/convert")
    ap.add_argument(
        "--before",
        metavar="SRC",
        help="also convert with the nydus package under SRC (e.g. /work/main/src), same run",
    )
    ap.add_argument("--rounds", type=int, default=1, help="runs of each tool (best is reported)")
    ap.add_argument(
        "--perf",
        action="store_true",
        help="one more convert under perf record: CPU share per stage",
    )
    ap.add_argument("--check", action="store_true", help="also time nydusify check")
    ap.add_argument(
        "--variant",
        metavar="ARGS",
        help="also convert with the code under test and these extra convert arguments "
        "(e.g. --variant=--stream-push), same run",
    )
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from registry import RegistryServer, os_env_without_proxy  # type: ignore[import-not-found]

    if a.image == "ml":
        layout, total = ml_layout(work)
        a.layers = 3
    else:
        total = parse_size(a.size)
        layout = make_image(work, total, a.layers)
    print(f"image {a.image}: {total / 1e6:.0f} MB uncompressed", flush=True)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    # the source registry's storage is kept between runs (pushing 0.5 GB costs time)
    src_dir = work / f"src-registry-{layout.name}"
    src = RegistryServer("plain", src_dir).start()
    dsts: list[Any] = []

    def fresh_dst() -> str:
        """A new empty target registry (the last one goes): no run finds blobs already there."""
        if dsts:
            dsts[-1].stop()
            shutil.rmtree(dsts[-1].dir, ignore_errors=True)
        dsts.append(RegistryServer("plain", run_dir / f"dst-{len(dsts)}").start())
        return str(dsts[-1].host)

    env = {**os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    after_env = {**env, "PYTHONPATH": str(REPO / "src")}
    before_env = {**env, "PYTHONPATH": a.before} if a.before else None
    results: list[Result] = []
    conv: dict[str, Any] = {}
    stages: dict[str, float] = {}
    floor: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    digests: dict[str, set[str]] = {}  # the target manifest digest of every run, by side

    def convert_once(
        label: str, side: str, tag: str, run_env: dict[str, str], extra: list[str] | None = None
    ) -> None:
        """One timed nydusify convert into a fresh target; its manifest digest is kept by
        side (and the "after" side's result JSON in ``conv``, for the report)."""
        subprocess.run(["sync"], check=False)
        cmd = nydusify_cmd(src.host, fresh_dst(), run_dir, tag, extra)
        results.append(timed(label, cmd, run_dir, run_env))
        out = run_dir / f"{tag}.json"
        if out.exists():
            got = json.loads(out.read_text())
            digests.setdefault(side, set()).add(got.get("digest", "?"))
            if side == "after":
                conv.clear()
                conv.update(got)

    try:
        if not (src_dir / "pushed").exists():
            subprocess.run(
                [
                    "skopeo",
                    "copy",
                    "--quiet",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:v1",
                    f"docker://{src.host}/bench:v1",
                ],
                check=True,
                env=env,
            )
            (src_dir / "pushed").touch()
        man = json.loads(
            subprocess.run(
                [
                    "skopeo",
                    "inspect",
                    "--raw",
                    "--tls-verify=false",
                    f"docker://{src.host}/bench:v1",
                ],
                check=True,
                capture_output=True,
                env=env,
            ).stdout
        )
        compressed = sum(x["size"] for x in man["layers"])
        floor = cpu_floor(layout, man["layers"])
        for rnd in range(a.rounds):
            subprocess.run(["sync"], check=False)
            results.append(
                timed(
                    "skopeo copy",
                    [
                        "skopeo",
                        "copy",
                        "--quiet",
                        "--src-tls-verify=false",
                        "--dest-tls-verify=false",
                        f"docker://{src.host}/bench:v1",
                        f"docker://{fresh_dst()}/skopeo:v1",
                    ],
                    run_dir,
                    env,
                )
            )
            convert_once("nydusify convert", "after", f"after{rnd}", after_env)
            if a.variant:
                label = f"nydusify convert {a.variant}"
                convert_once(label, "variant", f"variant{rnd}", after_env, a.variant.split())
            if before_env is not None:
                convert_once("nydusify convert (before)", "before", f"before{rnd}", before_env)
        if a.perf:
            stages = perf_breakdown(
                nydusify_cmd(src.host, fresh_dst(), run_dir, "perf"), run_dir, after_env
            )
        if a.check:
            dst = fresh_dst()
            subprocess.run(
                nydusify_cmd(src.host, dst, run_dir, "after0"), env=after_env, check=True
            )
            results.append(
                timed(
                    "nydusify check",
                    [
                        str(VENV_BIN / "nydusify"),
                        "check",
                        "--source",
                        f"{src.host}/bench:v1",
                        "--target",
                        f"{dst}/bench:after0",
                        "--work-dir",
                        str(run_dir / "tmp-check"),
                    ],
                    run_dir,
                    after_env,
                )
            )
    finally:
        src.stop()
        if dsts:
            dsts[-1].stop()
    a.load = (load_before, os.getloadavg()[0])
    a.digests = digests
    report(results, total, compressed, a, conv, stages, floor)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


def report(
    results: list[Result],
    total: int,
    compressed: int,
    a: argparse.Namespace,
    conv: dict[str, Any],
    stages: dict[str, float],
    floor: dict[str, float],
) -> None:
    date = dt.date.today().isoformat()
    suffix = "-ml" if a.image == "ml" else ("" if a.size == "1200M" else f"-{a.size}")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    mans = conv.get("manifests") or [{}]
    target = mans[0].get("target_size", 0)
    best: dict[str, Result] = {}
    for r in results:
        if r.name not in best or (r.ok and r.seconds < best[r.name].seconds):
            best[r.name] = r
    ref = best.get("skopeo copy")
    what = (
        "the cold-start benchmark's ml image (bench/mlimage.py)"
        if a.image == "ml"
        else "a synthetic image"
    )
    lines = [
        f"# Convert benchmark ({date})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Image: {what}, {total / 1e6:.0f} MB uncompressed in "
        f"{a.layers} layers, {compressed / 1e6:.0f} MB as tar.gz; Nydus target "
        f"{target / 1e6:.0f} MB (zstd chunks). Two docker-registry processes on 127.0.0.1, "
        "source and target, so no cross-repository mounts. "
        f"{a.rounds} round(s), best of each tool shown. Load average (1 min) "
        f"{a.load[0]:.1f} before, {a.load[1]:.1f} after: other work on the machine "
        "shares its 2 CPUs.",
        "",
        "| tool | wall time (s) | x skopeo | CPU (s) | MB/s of compressed layers | "
        "peak RSS (MB) | ok |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in best.values():
        mbps = compressed / 1e6 / r.seconds if r.seconds else 0
        ratio = r.seconds / ref.seconds if ref and ref.seconds else 0
        lines.append(
            f"| {r.name} | {r.seconds:.1f} | {ratio:.2f} | {r.cpu_seconds:.1f} | {mbps:.1f} | "
            f"{r.max_rss_mb:.0f} | {'yes' if r.ok else 'NO'} |"
        )
    cpus = os.cpu_count() or 1
    if floor and ref and ref.seconds:
        fsum = sum(floor.values())
        lines.append(
            f"| CPU floor: library work / {cpus} CPUs (below) | {fsum / cpus:.1f} | "
            f"{fsum / cpus / ref.seconds:.2f} | {fsum:.1f} | | | |"
        )
    if a.rounds > 1:
        lines += ["", "Every run: " + "; ".join(f"{r.name} {r.seconds:.1f} s" for r in results)]
    digests = getattr(a, "digests", {})
    if digests:
        every = sorted(d for ds in digests.values() for d in ds)
        same = "the same in every run" if len(set(every)) == 1 else "NOT the same in every run"
        lines += [
            "",
            "Target manifest digest: "
            + "; ".join(f"{side} {', '.join(sorted(ds))}" for side, ds in sorted(digests.items()))
            + f" ({same}).",
        ]
    if conv:
        lines += [
            "",
            f"nydusify: {conv.get('new_chunks')} chunks stored, "
            f"{conv.get('deduped_chunks')} deduplicated; its own timer "
            f"{conv.get('seconds')} s.",
        ]
    if floor:
        lines += [
            "",
            "CPU floor, measured in this run on the same layer blobs (one thread, CPU s): "
            + ", ".join(f"{k} {v:.2f}" for k, v in floor.items())
            + f"; {sum(floor.values()):.2f} in all. The library work a conversion with "
            "unchanged output bytes cannot avoid (`cpu_floor`: no tar parsing, no Python per "
            "file, no I/O), spread perfectly over the CPUs: no converter on this machine "
            "finishes sooner.",
        ]
    if stages:
        cpu = best["nydusify convert"].cpu_seconds
        lines += [
            "",
            "CPU by stage of one more convert under `perf record -F 499` (samples of every "
            "thread, attributed by library and symbol), "
            f"in CPU seconds of the best run's {cpu:.1f}:",
            "",
            "| stage | share of CPU | CPU s |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v:.1f}% | {v * cpu / 100:.1f} |" for k, v in stages.items()]
    for r in results:
        if not r.ok:
            lines += ["", f"{r.name} failed: ```{r.note}```"]
    text = "\n".join(lines) + "\n"
    (out / f"convert-{date}{suffix}.md").write_text(text)
    (out / f"convert-{date}{suffix}.json").write_text(
        json.dumps(
            {
                "date": date,
                "image": a.image,
                "size": total,
                "layers": a.layers,
                "compressed": compressed,
                "target_size": target,
                "load": list(a.load),
                "results": [asdict(r) for r in results],
                "cpu_stages_percent": stages,
                "cpu_floor_seconds": floor,
            },
            indent=2,
        )
        + "\n"
    )
    print(text)
    plot_after_run(out / f"convert-{date}{suffix}.md")


if __name__ == "__main__":
    sys.exit(main())
