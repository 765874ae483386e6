"""Convert benchmark: ``nydusify convert`` of a 1 GB+ multi-layer image, registry to registry,
beside ``skopeo copy`` of the same image between the same two registries (the time just to
move the bytes), in one run.

    .venv/bin/python bench/convert.py                  # ~1.2 GB uncompressed, 6 layers
    .venv/bin/python bench/convert.py --size 128M      # a quick check
    .venv/bin/python bench/convert.py --check          # also time nydusify check

Two Debian ``docker-registry`` processes on 127.0.0.1 (source and target, so that neither
tool can cross-repository mount its way out of moving the bytes). The image is generated
here (tests/oci_images-style PAX tars, gzip level 1): per layer a mix of incompressible
random files, hex text (compresses ~2:1) and many small files; it is cached as an OCI layout
under ``--work`` (default /var/tmp/nydus-bench/convert) and pushed to the source registry with
``skopeo copy --preserve-digests``.

Measured per tool: wall time of the command and its peak RSS (its own ``VmHWM``, polled from
/proc; for nydusify that is the whole converter: streaming, building, pushing). Throughput is MB/s
(10^6 bytes) of the source image's compressed layer bytes.

Writes ``bench/results/convert-<date>[-<size>].md`` and ``.json`` and prints the table.
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
    os.replace(tmp, layout)
    return layout


def _sha256_file(p: Path) -> str:
    with open(p, "rb") as f:
        return _sha256_stream(f)


def _sha256_stream(f: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    while piece := f.read(1 << 20):
        h.update(piece)
    return "sha256:" + h.hexdigest()


@dataclass
class Result:
    name: str
    command: str
    seconds: float
    max_rss_mb: float
    ok: bool
    note: str = ""


def timed(name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> Result:
    """Wall time and peak RSS (the child's own VmHWM, polled: rusage maxrss would include
    this driver's memory at fork time)."""
    from oci_images import run_measured  # type: ignore[import-not-found]

    t0 = time.monotonic()
    log = open(cwd / f"{name}.log", "wb")  # noqa: SIM115
    rc, peak = run_measured(cmd, cwd=cwd, env=env, stdout=log, stderr=log)
    dt_s = time.monotonic() - t0
    log.close()
    note = ""
    if rc != 0:
        note = (cwd / f"{name}.log").read_text(errors="replace")[-500:]
    return Result(name, " ".join(cmd), dt_s, peak / (1 << 20), rc == 0, note)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1200M", help="uncompressed image size (default 1200M)")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--work", default="/var/tmp/nydus-bench/convert")
    ap.add_argument("--check", action="store_true", help="also time nydusify check")
    a = ap.parse_args()
    total = parse_size(a.size)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    from registry import RegistryServer, os_env_without_proxy  # type: ignore[import-not-found]

    print(f"image: {total / 1e6:.0f} MB in {a.layers} layers", flush=True)
    layout = make_image(work, total, a.layers)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    src = RegistryServer("plain", run_dir / "src-registry").start()
    dst = RegistryServer("plain", run_dir / "dst-registry").start()
    env = {**os_env_without_proxy(), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    results: list[Result] = []
    load_before = os.getloadavg()[0]
    try:
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
                    f"docker://{dst.host}/skopeo:v1",
                ],
                run_dir,
                env,
            )
        )
        subprocess.run(["sync"], check=False)
        results.append(
            timed(
                "nydusify convert",
                [
                    str(VENV_BIN / "nydusify"),
                    "convert",
                    "--source",
                    f"{src.host}/bench:v1",
                    "--target",
                    f"{dst.host}/bench:v1-nydus",
                    "--work-dir",
                    str(run_dir / "tmp"),
                    "--output-json",
                    str(run_dir / "convert.json"),
                ],
                run_dir,
                env,
            )
        )
        conv: dict[str, Any] = {}
        if (run_dir / "convert.json").exists():
            conv = json.loads((run_dir / "convert.json").read_text())
        if a.check:
            results.append(
                timed(
                    "nydusify check",
                    [
                        str(VENV_BIN / "nydusify"),
                        "check",
                        "--source",
                        f"{src.host}/bench:v1",
                        "--target",
                        f"{dst.host}/bench:v1-nydus",
                        "--work-dir",
                        str(run_dir / "tmp"),
                    ],
                    run_dir,
                    env,
                )
            )
    finally:
        src.stop()
        dst.stop()
    a.load = (load_before, os.getloadavg()[0])
    report(results, total, compressed, a, conv)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


def report(
    results: list[Result], total: int, compressed: int, a: argparse.Namespace, conv: dict[str, Any]
) -> None:
    date = dt.date.today().isoformat()
    suffix = "" if a.size == "1200M" else f"-{a.size}"
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    mans = conv.get("manifests") or [{}]
    target = mans[0].get("target_size", 0)
    lines = [
        f"# Convert benchmark ({date})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Image: {total / 1e6:.0f} MB uncompressed in "
        f"{a.layers} layers, {compressed / 1e6:.0f} MB as tar.gz (gzip -1); Nydus target "
        f"{target / 1e6:.0f} MB (zstd chunks). Two docker-registry processes on 127.0.0.1, "
        "source and target, so no cross-repository mounts. One run each. Load average "
        f"(1 min) {a.load[0]:.1f} before, {a.load[1]:.1f} after: other work on the machine "
        "shares its 2 CPUs.",
        "",
        "| tool | wall time (s) | MB/s of compressed layers | peak RSS (MB) | ok |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        mbps = compressed / 1e6 / r.seconds if r.seconds else 0
        lines.append(
            f"| {r.name} | {r.seconds:.1f} | {mbps:.1f} | {r.max_rss_mb:.0f} | "
            f"{'yes' if r.ok else 'NO'} |"
        )
    if conv:
        lines += [
            "",
            f"nydusify: {conv.get('new_chunks')} chunks stored, "
            f"{conv.get('deduped_chunks')} deduplicated; its own timer "
            f"{conv.get('seconds')} s.",
        ]
    for r in results:
        if not r.ok:
            lines += ["", f"{r.name} failed: ```{r.note}```"]
    text = "\n".join(lines) + "\n"
    (out / f"convert-{date}{suffix}.md").write_text(text)
    (out / f"convert-{date}{suffix}.json").write_text(
        json.dumps(
            {
                "date": date,
                "size": total,
                "layers": a.layers,
                "compressed": compressed,
                "target_size": target,
                "load": list(a.load),
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(text)
    plot_after_run(out / f"convert-{date}{suffix}.md")


if __name__ == "__main__":
    sys.exit(main())
