"""``bench/coldstart.py --image ml``: cold start of the 1.3 GB ``ml`` image (issue 17, point 1).

The image (bench/mlimage.py, cached under /var/tmp/nydus-bench-ml): Debian 12 minbase; python3;
numpy pandas scipy scikit-learn matplotlib sympy and the CPU torch wheel, three gzip layers.
Pushed with skopeo into a registry storage under ``--work``, converted with our ``nydusify
convert`` (zstd, 1 MiB chunks) and optimized with our ``nydusify optimize`` from the access
pattern of W1 recorded by our snapshotter (``access_pattern`` in the daemon config; ``nydusify
access-pattern --snapshotter-root``): all cached in ``--work``.

Workloads: W1 ``python3 -c "import numpy, pandas"``, W2 ``python3 -c "import torch;
print(torch.ones(2).sum())"``. Scenarios, each from a fresh containerd and snapshotter:

* ``lazy``: the Nydus image, no prefetch;
* ``prefetch_all``: the Nydus image, ``fs_prefetch`` with ``prefetch_all`` (whole blobs in the
  background while the workload runs);
* ``optimized``: the optimized image (prefetch blob + prefetch table from W1's pattern),
  ``fs_prefetch`` on (the table's files, no ``prefetch_all``);
* ``oci``: containerd's overlayfs pull of the OCI image, then ``ctr run``; a second ``ctr run``
  on the unpacked image gives the warm run time.

Links: ``tc tbf`` at each ``--rates`` Mbit/s into a network namespace (bench/fetch.py), and a
2 ms RTT (``--rtt-ms``) added by :class:`DelayProxy`, a userspace TCP proxy in the host
namespace (this kernel has no netem): every byte is held ``rtt/2`` in each direction.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fetch
import mlimage

from containerd import (  # type: ignore[import-not-found]
    NydusStack,
    venv_tool,
    write_oci_layout,
)

WORKLOADS = {
    "W1": ("python3 -c 'import numpy, pandas; print(\"ok\")'", "ok"),
    "W2": ("python3 -c 'import torch; print(torch.ones(2).sum())'", "tensor(2.)"),
}
SCENARIOS = ("lazy", "prefetch_all", "optimized", "oci")
PREFETCH = {"enable": True, "threads_count": 4, "merging_size": 1 << 20}
BLOB_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"


def nydusd_config(scenario: str) -> dict[str, Any]:
    """The snapshotter's nydusd config template for a scenario (the Debian bench's);
    ``record``: lazy, with the access pattern recorded (the blob fs then pushes no chunks
    ahead, so it is not a timed scenario)."""
    cfg: dict[str, Any] = {
        "device": {
            "backend": {
                "type": "registry",
                "config": {"scheme": "http", "timeout": 60, "connect_timeout": 5, "retry_limit": 2},
            },
            "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
        },
        "mode": "direct",
        "digest_validate": False,
        "enable_xattr": True,
        "access_pattern": scenario == "record",
        "fs_prefetch": {"enable": False},
    }
    if scenario == "prefetch_all":
        cfg["fs_prefetch"] = {**PREFETCH, "prefetch_all": True}
    elif scenario == "optimized":
        cfg["fs_prefetch"] = {**PREFETCH, "prefetch_all": False}
    return cfg


# --------------------------------------------------------------------------- 2 ms RTT


class DelayProxy:
    """TCP proxy 127.0.0.1:port -> ``upstream``, delaying each direction by ``delay`` s.

    Per connection and direction a reader thread stamps what it receives and a writer thread
    sends it once the stamp is ``delay`` old: latency is added, throughput is not capped."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream, self.delay = upstream, delay
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="delay-accept").start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            for a, b in ((c, u), (u, c)):
                a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._pipe(a, b)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: deque[tuple[float, bytes]] = deque()
        ready = threading.Condition()

        def read() -> None:
            try:
                while data := src.recv(1 << 18):
                    with ready:
                        q.append((time.monotonic() + self.delay, data))
                        ready.notify()
            except OSError:
                pass
            with ready:
                q.append((0.0, b""))
                ready.notify()

        def write() -> None:
            try:
                while True:
                    with ready:
                        while not q:
                            ready.wait()
                        due, data = q.popleft()
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
            except OSError:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.close()

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


# --------------------------------------------------------------------------- the image


@dataclass
class MlImage:
    oci: str = "ml:1"
    nydus: str = "ml:1-nydus"
    opt: str = "ml:1-opt"
    oci_bytes: int = 0  # manifest + config + layers
    meta: dict[str, int] = field(default_factory=dict)  # tag -> manifest+config+bootstrap
    blobs: dict[str, int] = field(default_factory=dict)  # tag -> data blob bytes
    rootfs_bytes: int = 0
    entries: int = 0
    convert_s: float = 0.0
    optimize_s: float = 0.0
    prefetch_files: int = 0
    optimize_report: dict[str, Any] = field(default_factory=dict)


def _sizes(host: str, repo_tag: str) -> tuple[int, int]:
    repo, tag = repo_tag.split(":")
    c = fetch.client(host)
    try:
        body, _, _ = c.get_manifest(repo, tag)
    finally:
        c.close()
    m = json.loads(body)
    meta = (
        len(body)
        + m["config"]["size"]
        + sum(ly["size"] for ly in m["layers"] if ly["mediaType"] != BLOB_TYPE)
    )
    return meta, sum(ly["size"] for ly in m["layers"] if ly["mediaType"] == BLOB_TYPE)


def _has(host: str, repo_tag: str) -> bool:
    repo, tag = repo_tag.split(":")
    from nydus.errors import NotFoundError

    c = fetch.client(host)
    try:
        c.head_manifest(repo, tag)
        return True
    except NotFoundError:
        return False
    finally:
        c.close()


def bootstrap_of(host: str, repo_tag: str, out: Path) -> Path:
    from nydus.convert.image import read_bootstrap_layer

    repo, tag = repo_tag.split(":")
    c = fetch.client(host)
    try:
        m = json.loads(c.get_manifest(repo, tag)[0])
        gz = c.get_blob(repo, m["layers"][-1]["digest"], max_size=1 << 30)
    finally:
        c.close()
    out.write_bytes(read_bootstrap_layer(gz))
    return out


def _run(argv: list[str], what: str, timeout: float = 3600) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}): {p.stderr[-3000:]}")
    return p.stdout


def prepare(work: Path, record: Any) -> tuple[Path, MlImage]:
    """Registry storage with ml:1, ml:1-nydus and ml:1-opt (built once, cached in ``work``).
    ``record(host, work, workload) -> Path`` runs a workload lazily, recording, and returns
    the prefetch list; W1's makes ml:1-opt, every workload's gives its needed bytes."""
    storage = work / "registry" / "storage"
    info_path = work / "ml-image.json"
    if info_path.is_file():
        return storage, MlImage(**json.loads(info_path.read_text()))
    img = MlImage()
    layers = mlimage.ml_layers()
    img.entries, img.rootfs_bytes = mlimage.entries_and_size()
    reg = fetch.Registry(storage, "127.0.0.1:5057")
    try:
        layout = work / "layout"
        if not _has(reg.addr, img.oci):
            shutil.rmtree(layout, ignore_errors=True)
            print("ml: OCI layout and skopeo push ...", flush=True)
            write_oci_layout(layout, "1", [(p.read_bytes(), d) for p, d in layers])
            _run(
                [
                    "skopeo",
                    "copy",
                    "--dest-tls-verify=false",
                    f"oci:{layout}:1",
                    f"docker://{reg.addr}/{img.oci}",
                ],
                "skopeo copy",
            )
            shutil.rmtree(layout, ignore_errors=True)
        img.oci_bytes = _sizes(reg.addr, img.oci)[0]  # the gzip layers are not Nydus blobs
        print("ml: nydusify convert ...", flush=True)
        t0 = time.monotonic()
        _run(
            [
                venv_tool("nydusify"),
                "convert",
                "--plain-http",
                "--source",
                f"{reg.addr}/{img.oci}",
                "--target",
                f"{reg.addr}/{img.nydus}",
                "--work-dir",
                str(work / "convert"),
            ],
            "nydusify convert",
        )  # ~1 min: redone, to time it
        img.convert_s = time.monotonic() - t0
        shutil.rmtree(work / "convert", ignore_errors=True)
        print(f"  converted in {img.convert_s:.0f}s; recording W1's access pattern ...", flush=True)
        plists = {wl: record(reg.addr, work, wl) for wl in WORKLOADS}
        plist = plists["W1"]
        img.prefetch_files = len(plist.read_text().splitlines())
        print(f"  {img.prefetch_files} files; nydusify optimize ...", flush=True)
        t0 = time.monotonic()
        rep = work / "optimize.json"
        _run(
            [
                venv_tool("nydusify"),
                "optimize",
                "--plain-http",
                "--source",
                f"{reg.addr}/{img.nydus}",
                "--target",
                f"{reg.addr}/{img.opt}",
                "--prefetch-files",
                str(plist),
                "--work-dir",
                str(work / "convert"),
                "--output-json",
                str(rep),
            ],
            "nydusify optimize",
        )
        img.optimize_s = time.monotonic() - t0
        img.optimize_report = json.loads(rep.read_text())
        for tag in (img.nydus, img.opt):
            img.meta[tag], img.blobs[tag] = _sizes(reg.addr, tag)
        bootstrap_of(reg.addr, img.nydus, work / "nydus.boot")
    finally:
        reg.stop()
    info_path.write_text(json.dumps(asdict(img), indent=1))
    return storage, img


def needed_bytes(boot: Path, pattern: list[dict[str, Any]]) -> tuple[int, int]:
    """(compressed bytes, chunks) of the Nydus image's chunks that hold the ranges a pattern
    lists (each chunk once): what the workload needs over the link, without amplification."""
    from nydus.errors import NydusError
    from nydus.metadata import open_bootstrap

    seen: set[tuple[int, int]] = set()
    total = 0
    with open_bootstrap(str(boot)) as md:
        for e in pattern:
            try:
                nid = md.resolve(e["file_path"])
            except NydusError:  # a path this image does not have: not counted
                continue
            for c in md.chunks(nid):
                key = (c.blob_index, c.index)
                if key in seen:
                    continue
                lo, hi = c.file_offset, c.file_offset + c.uncompressed_size
                if any(off < hi and lo < off + n for off, n in e.get("ranges", [])):
                    seen.add(key)
                    total += c.compressed_size
    return total, len(seen)


def daemon_counters(stack: NydusStack) -> dict[str, int]:
    """READs the daemon served (FUSE or blob device), backend requests and bytes."""
    from nydus.daemon.client import NydusdClient

    out = {"reads": 0, "backend_requests": 0, "backend_bytes": 0, "prefetch_bytes": 0}
    state = json.loads((stack.sn_root / "daemons" / "state.json").read_text())
    for d in state.get("daemons", []):
        c = NydusdClient(d["apisock"], timeout=10)
        g = c.metrics("")
        out["reads"] += int(g["fop_hits"][4])
        b = c.metrics("backend")
        out["backend_requests"] += int(b.get("read_count", 0))
        out["backend_bytes"] += int(b.get("read_amount_total", 0))
        bc = c.metrics("blobcache")
        out["prefetch_bytes"] += int(bc.get("prefetch_data_amount", 0))
    return out


def export_pattern(stack: NydusStack, out: Path) -> Path:
    """``nydusify access-pattern --snapshotter-root``: the list, and its JSON beside it."""
    _run(
        [
            venv_tool("nydusify"),
            "access-pattern",
            "--snapshotter-root",
            str(stack.sn_root),
            "--output",
            str(out),
            "--output-json",
            str(out.with_suffix(".json")),
        ],
        "nydusify access-pattern",
    )
    return out


def env_path() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


# --------------------------------------------------------------------------- rounds


class LinkSampler:
    """Bytes the registry side sent, sampled every ``period`` s from the host end of the veth
    pair (its rx counter: no subprocess per sample), as ``[(s since start, bytes)]``."""

    def __init__(self, period: float = 0.1) -> None:
        self.path = Path(f"/sys/class/net/{fetch.VETH_HOST}/statistics/rx_bytes")
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._b0 = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True, name="link-sampler")
        self._thread.start()

    def _read(self) -> int:
        try:
            return int(self.path.read_text())
        except (OSError, ValueError):
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, self._read() - self._b0))
            self._stop.wait(self.period)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic() - self._t0, self._read() - self._b0))
        return [(round(t, 3), b) for t, b in self.samples]


@dataclass
class MlRound:
    link: str
    scenario: str
    workload: str
    pull_s: float
    run_s: float
    total_s: float
    registry_bytes: int
    wire: int | None = None
    reads: int | None = None  # READs the daemon served (FUSE or blob device)
    backend_requests: int | None = None
    backend_bytes: int | None = None
    needed: int | None = None  # lazy: compressed bytes of the chunks the workload read
    warm_run_s: float | None = None  # oci: a second run on the unpacked image
    load: float = 0.0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s, registry bytes)


def _ctr_run(stack: NydusStack, argv: list[str], expect: str) -> None:
    cmd = ["ctr", "-a", str(stack.ctd.address), "-n", stack.ctd.namespace, *argv]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env=env_path(), stdin=subprocess.DEVNULL
    )
    if p.returncode != 0 or expect not in p.stdout:
        raise RuntimeError(
            f"workload failed ({p.returncode}): {p.stdout[-500:]!r} {p.stderr[-2000:]}"
        )


def start_stack(tmp: Path, scenario: str, port: int) -> NydusStack:
    cfg = tmp / "nydusd.json"
    cfg.write_text(json.dumps(nydusd_config(scenario)))
    stack = NydusStack(
        tmp,
        [
            "--config-path",
            str(cfg),
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--log-level",
            "info",
        ],
        content_store=True,
    )
    return stack.start()


def record(host: str, work: Path, workload: str) -> Path:
    """``workload`` on the Nydus image (lazy, recording), its access pattern exported from
    the snapshotter: ``work/<workload>.list`` and ``.json``."""
    tmp = work / "rounds" / "record"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    stack = start_stack(tmp, "record", port)
    try:
        ref = f"{host}/ml:1-nydus"
        stack.ctr(
            "image", "pull", "--plain-http", "--snapshotter", "nydus", ref, timeout=1800
        ).check()
        cmd, expect = WORKLOADS[workload]
        _ctr_run(
            stack, ["run", "--snapshotter", "nydus", ref, "rec", "/bin/sh", "-c", cmd], expect
        )  # no --rm: the image's daemon must outlive the run for the export
        return export_pattern(stack, work / f"{workload}.list")
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def ml_round(
    scenario: str,
    workload: str,
    link: str,
    host: str,
    img: MlImage,
    work: Path,
    limited: bool,
    idx: int,
    veth_bytes: Any,
    free_port: Any,
) -> MlRound:
    tmp = work / "rounds" / f"{link.replace(' ', '')}-{scenario}-{workload}-{idx}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.sync()
    load = os.getloadavg()[0]
    stack = start_stack(tmp, scenario, free_port())
    cmd, expect = WORKLOADS[workload]
    try:
        wire0 = veth_bytes() if limited else 0
        sampler = LinkSampler() if limited else None
        if scenario == "oci":
            ref = f"{host}/{img.oci}"
            t0 = time.monotonic()
            stack.ctr("image", "pull", "--plain-http", ref, timeout=1800).check()
            t1 = time.monotonic()
            _ctr_run(stack, ["run", "--rm", ref, "c1", "/bin/sh", "-c", cmd], expect)
            t2 = time.monotonic()
            wire = veth_bytes() - wire0 if limited else None
            tl = sampler.stop() if sampler else []
            _ctr_run(stack, ["run", "--rm", ref, "c2", "/bin/sh", "-c", cmd], expect)
            warm = time.monotonic() - t2
            return MlRound(
                link,
                scenario,
                workload,
                t1 - t0,
                t2 - t1,
                t2 - t0,
                img.oci_bytes,
                wire,
                warm_run_s=warm,
                load=load,
                timeline=tl,
            )
        tag = img.opt if scenario == "optimized" else img.nydus
        ref = f"{host}/{tag}"
        t0 = time.monotonic()
        stack.ctr(
            "image", "pull", "--plain-http", "--snapshotter", "nydus", ref, timeout=1800
        ).check()
        t1 = time.monotonic()
        _ctr_run(
            stack, ["run", "--snapshotter", "nydus", ref, "c1", "/bin/sh", "-c", cmd], expect
        )  # no --rm: the daemon's counters and pattern are read after
        t2 = time.monotonic()
        wire = veth_bytes() - wire0 if limited else None
        tl = sampler.stop() if sampler else []
        ctr = daemon_counters(stack)
        r = MlRound(
            link,
            scenario,
            workload,
            t1 - t0,
            t2 - t1,
            t2 - t0,
            img.meta[tag] + ctr["backend_bytes"],
            wire,
            ctr["reads"],
            ctr["backend_requests"],
            ctr["backend_bytes"],
            load=load,
            timeline=tl,
        )
        return r
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- report


def _med(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else float("nan")


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def summarize(
    rounds: list[MlRound], img: MlImage, rates: dict[str, int]
) -> dict[str, dict[str, dict[str, Any]]]:
    """link -> workload -> scenario (and ``limit``) -> medians."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for link in dict.fromkeys(r.link for r in rounds):
        for wl in dict.fromkeys(r.workload for r in rounds if r.link == link):
            per: dict[str, Any] = {}
            for sc in SCENARIOS:
                rs = [r for r in rounds if (r.link, r.workload, r.scenario) == (link, wl, sc)]
                if not rs:
                    continue
                v: dict[str, Any] = {"n": len(rs)}
                for k in (
                    "pull_s",
                    "run_s",
                    "total_s",
                    "registry_bytes",
                    "wire",
                    "reads",
                    "backend_requests",
                    "needed",
                    "warm_run_s",
                    "load",
                ):
                    xs = [getattr(r, k) for r in rs if getattr(r, k) is not None]
                    v[k] = _med(xs) if xs else None
                per[sc] = v
            warm = (per.get("oci") or {}).get("warm_run_s")
            needed = (per.get("lazy") or {}).get("needed")
            if warm is not None and needed is not None:
                bytes_ = needed + img.meta[img.nydus]
                per["limit"] = {
                    "bytes": bytes_,
                    "transfer_s": bytes_ * 8 / (rates[link] * 1e6),
                    "warm_run_s": warm,
                }
                per["limit"]["total_s"] = per["limit"]["transfer_s"] + warm
            out.setdefault(link, {})[wl] = per
    return out


COLORS = {"lazy": "#1b9e77", "prefetch_all": "#d95f02", "optimized": "#7570b3", "oci": "#666666"}


def plot(
    summary: dict[str, dict[str, dict[str, Any]]], rounds: list[MlRound], stem: Path
) -> list[Path]:
    """Per link: for each workload, the pull/run bars of every scenario (medians) and the
    physical limit; beside them the timeline of bytes the registry sent (first round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for link, per_wl in summary.items():
        wls = list(per_wl)
        fig, axes = plt.subplots(
            len(wls),
            2,
            figsize=(13, 0.6 + 2.6 * len(wls)),
            squeeze=False,
            gridspec_kw={"width_ratios": [1, 1]},
        )
        for row, wl in enumerate(wls):
            ax, tax = axes[row, 0], axes[row, 1]
            per = per_wl[wl]
            scs = [s for s in SCENARIOS if s in per]
            top = max(per[s]["total_s"] for s in scs)
            for y, sc in enumerate(scs):
                v = per[sc]
                ax.barh(y, v["pull_s"], color="#8da0cb", label="pull" if y == 0 else None)
                ax.barh(
                    y,
                    v["run_s"],
                    left=v["pull_s"],
                    color="#fc8d62",
                    label="run" if y == 0 else None,
                )
                ax.text(v["total_s"], y, f" {v['total_s']:.1f}s", va="center", fontsize=8)
            lim = per.get("limit")
            if lim:
                ax.axvline(
                    lim["total_s"],
                    color="k",
                    ls="--",
                    lw=1,
                    label=f"physical limit {lim['total_s']:.2f}s",
                )
            ax.set_xlim(0, top * 1.15)
            ax.set_yticks(range(len(scs)), scs)
            ax.invert_yaxis()
            ax.set_title(f"{wl} ({link}): {WORKLOADS[wl][0]}", fontsize=9)
            ax.set_xlabel("seconds from pull start (median)")
            ax.legend(fontsize=7, loc="upper right")
            for sc in scs:
                r = next(
                    (
                        r
                        for r in rounds
                        if (r.link, r.workload, r.scenario) == (link, wl, sc) and r.timeline
                    ),
                    None,
                )
                if r is None:
                    continue
                ts = [t for t, _b in r.timeline]
                bs = [b / 2**20 for _t, b in r.timeline]
                tax.plot(ts, bs, color=COLORS[sc], label=sc, lw=1.4)
                tax.axvline(r.pull_s, color=COLORS[sc], ls=":", lw=0.8)
            nyd = [per[s]["total_s"] for s in scs if s != "oci"]
            right = min(top * 1.05, 2.5 * max(nyd)) if nyd else top * 1.05
            tax.set_xlim(0, right)
            if right < top:
                tax.text(
                    0.99,
                    0.02,
                    f"(oci goes on to {per['oci']['total_s']:.0f}s)",
                    transform=tax.transAxes,
                    ha="right",
                    fontsize=7,
                )
            tax.set_ylabel("MiB sent by the registry")
            tax.set_xlabel("seconds from pull start (round 0; dotted: pull done)")
            tax.set_title(f"{wl} ({link}): registry bytes over time", fontsize=9)
            tax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        p = stem.parent / f"{stem.name}-{link.replace(' ', '')}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def report(
    args: Any,
    img: MlImage,
    rounds: list[MlRound],
    summary: dict[str, dict[str, dict[str, Any]]],
    pngs: list[Path],
    loads: tuple[float, float],
) -> str:
    import datetime as dt
    import platform

    o = img.optimize_report
    lines = [
        f"# Cold start benchmark, ml image, {dt.datetime.now():%Y-%m-%d %H:%M} (preliminary)",
        "",
        "**Preliminary figures**: one shared machine (2 cores) on which other sessions ran "
        f"tests during the runs: 1-minute load average {loads[0]:.1f} at the start and "
        f"{loads[1]:.1f} at the end; {args.rounds} round(s) per scenario (medians when more). "
        "CPU-bound steps (OCI unpack, nydusd's decompression, python imports) slow down under "
        "that load, so absolute times are pessimistic and noisy.",
        "",
        f"Image (bench/mlimage.py): Debian 12 minbase; python3 + python3-pip (apt); pip "
        f"{' '.join(mlimage.PIP_PACKAGES)} + the CPU torch wheel from /opt/wheels. "
        f"{img.entries} tar entries, {_mib(img.rootfs_bytes)} of file data; OCI image "
        f"{_mib(img.oci_bytes)} (3 gzip layers). Nydus (our nydusify, zstd, 1 MiB chunks, "
        f"converted in {img.convert_s:.0f}s): blobs {_mib(img.blobs[img.nydus])}, pull "
        f"metadata (manifest, config, bootstrap layer) {_mib(img.meta[img.nydus])}. Optimized "
        f"(our `nydusify optimize` in {img.optimize_s:.0f}s from W1's access pattern recorded by "
        f"our snapshotter, {img.prefetch_files} files): + prefetch blob "
        f"{_mib(o.get('prefetch_blob_size', 0))} ({o.get('files', 0)} files, "
        f"{_mib(o.get('bytes', 0))} uncompressed), pull metadata {_mib(img.meta[img.opt])}.",
        "",
        "Workloads: " + "; ".join(f"{k} `{v[0]}`" for k, v in WORKLOADS.items()) + ".",
        "",
        "Scenarios, each round from a fresh containerd 1.6 + runc and a fresh "
        "`containerd-nydus-grpc` (kernel EROFS mode, empty blob cache): `lazy` (no prefetch), "
        "`prefetch_all` (`fs_prefetch` with `prefetch_all`), `optimized` (the optimized image, "
        "`fs_prefetch` on: the prefetch table's files, fetched from the front of the prefetch "
        "blob), `oci` (stock `ctr image pull`: containerd's overlayfs, every layer downloaded "
        "and unpacked). Nydus pulls are stock `ctr image pull --snapshotter nydus` with the "
        "content store proxied to the snapshotter. The optimized image is made from W1's pattern; "
        "W2 runs on it too (a workload it was not made for).",
        "",
        f"Links: Debian's docker-registry in a network namespace behind `tc tbf` at the rate "
        f"given (both veth ends), plus a {args.rtt_ms:g} ms RTT added by a userspace TCP proxy "
        "(bench/coldstart_ml.py DelayProxy: this kernel has no netem; the proxy costs CPU).",
        "",
        "Columns: `pull` = `ctr image pull` (s), `run` = `ctr run` to the workload's exit (s), "
        "`total` = both; `registry` = bytes the registry served for the image (OCI: manifest, "
        "config, layers; Nydus: pull metadata + nydusd's backend `read_amount_total` when the "
        "workload ended: `prefetch_all` keeps fetching after that); `wire` = bytes the "
        "namespace side of the veth sent (TCP/HTTP included); `reads` = READ requests nydusd "
        "served (blob-device reads in EROFS mode); `backend req` = nydusd's backend requests.",
        "",
        "**Physical limit** (per link and workload, computed in the same run): (the Nydus "
        "pull metadata + the compressed bytes of every chunk holding a byte the workload read, "
        "from the workload's access pattern recorded by a separate lazy run with "
        "`access_pattern` on (blob-device reads mapped to files and file ranges), each chunk "
        "once) * 8 / link rate + "
        "the warm run time (the workload run again in a container on the already unpacked "
        "OCI image, files in the page cache). It ignores the RTT, request overheads and "
        "decompression: no lazy scheme can start the workload faster over that link.",
        "",
    ]
    for link, per_wl in summary.items():
        for wl, per in per_wl.items():
            lines += [
                f"## {link}, {wl}",
                "",
                "| scenario | pull s | run s | total s | registry | wire | reads | "
                "backend req | vs OCI | vs limit | load |",
                "|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            oci_total = (per.get("oci") or {}).get("total_s")
            lim = per.get("limit")
            for sc in SCENARIOS:
                v = per.get(sc)
                if not v:
                    continue
                vs_oci = f"{oci_total / v['total_s']:.1f}x" if oci_total and sc != "oci" else ""
                vs_lim = f"{v['total_s'] / lim['total_s']:.1f}x" if lim else ""
                reads = "-" if v["reads"] is None else f"{v['reads']:.0f}"
                breq = "-" if v["backend_requests"] is None else f"{v['backend_requests']:.0f}"
                lines.append(
                    f"| {sc} | {v['pull_s']:.2f} | {v['run_s']:.2f} | {v['total_s']:.2f} | "
                    f"{_mib(v['registry_bytes'])} | {_mib(v['wire'])} | {reads} | {breq} | "
                    f"{vs_oci} | {vs_lim} | {v['load']:.1f} |"
                )
            if lim:
                lines.append(
                    f"| physical limit | | | {lim['total_s']:.2f} | {_mib(lim['bytes'])} | | | | "
                    f"| 1.0x | |"
                )
                lines += [
                    "",
                    f"Limit: {_mib(lim['bytes'])} at the link rate = "
                    f"{lim['transfer_s']:.2f}s + warm run {lim['warm_run_s']:.2f}s.",
                ]
            lines.append("")
    for p in pngs:
        lines += [f"![timeline {p.stem}]({p.name})", ""]
    lines += ["Per round:", ""]
    for r in rounds:
        lines.append(
            f"- {r.link} {r.workload} {r.scenario}: pull {r.pull_s:.2f}s, run "
            f"{r.run_s:.2f}s, registry {_mib(r.registry_bytes)}, reads {r.reads}, "
            f"backend requests {r.backend_requests}, load {r.load:.1f}"
        )
    lines += [
        "",
        f"Machine: python {platform.python_version()}, kernel {platform.release()}, "
        f"{os.cpu_count()} cpus.",
    ]
    return "\n".join(lines) + "\n"


def main_ml(args: Any, veth_bytes: Any, free_port: Any) -> int:
    import datetime as dt

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    loads0 = os.getloadavg()[0]
    storage, img = prepare(work, record)
    needed = {
        wl: needed_bytes(work / "nydus.boot", json.loads((work / f"{wl}.json").read_text()))[0]
        for wl in WORKLOADS
    }
    scenarios = [s for s in args.scenarios.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    rates = {f"{int(x)} mbit": int(x) for x in args.rates.split(",") if x}
    rounds: list[MlRound] = []
    for link, rate in rates.items():
        fetch.setup_link(rate)
        reg = fetch.Registry(storage, f"{fetch.NS_ADDR}:5000", netns=fetch.NETNS)
        proxy = DelayProxy((fetch.NS_ADDR, 5000), args.rtt_ms / 2000)
        try:
            for i in range(args.rounds):
                for wl in workloads:
                    for sc in scenarios:
                        r = ml_round(
                            sc, wl, link, proxy.addr, img, work, True, i, veth_bytes, free_port
                        )
                        if sc == "lazy":
                            r.needed = needed[wl]
                        rounds.append(r)
                        print(
                            f"  {link} {wl} {sc:12} round {i}: pull {r.pull_s:6.2f}s run "
                            f"{r.run_s:6.2f}s registry {_mib(r.registry_bytes)} reads "
                            f"{r.reads} backend req {r.backend_requests} load {r.load:.1f}",
                            flush=True,
                        )
        finally:
            proxy.stop()
            reg.stop()
            fetch.teardown_link()
    summary = summarize(rounds, img, rates)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"coldstart-{dt.date.today():%Y-%m-%d}-ml"
    pngs = plot(summary, rounds, stem)
    text = report(args, img, rounds, summary, pngs, (loads0, os.getloadavg()[0]))
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "image": asdict(img),
                "rounds": [asdict(r) for r in rounds],
                "summary": summary,
            },
            indent=1,
        )
        + "\n"
    )
    print(text)
    print(f"wrote {stem}.md, .json and {len(pngs)} PNG(s)")
    return 0
