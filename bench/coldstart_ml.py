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
* ``ociref``: the zran reference image (``nydusify convert --oci-ref``: a bootstrap and meta
  blobs; nydusd reads the original gzip layers with range requests), no prefetch;
* ``oci``: containerd's overlayfs pull of the OCI image, then ``ctr run``; more ``ctr run``s
  on the unpacked image (``WARM_RUNS``, median) give the warm run time.

A scenario name may carry modifiers after ``+``: ``+hog`` runs a CPU hog (a busy loop pinned to
the last CPU) from the pull to the workload's exit; ``+amp=N`` sets the daemon's ``amplify_io``
to N bytes (``128k``, ``1m`` also read), e.g. ``lazy+amp=1m`` beside ``lazy`` to compare the
read amplification of the default config with another in the same run; ``+ra=N`` sets
``fs_prefetch.readahead_size`` (the largest locality readahead window after a miss; 0: off; not
with ``+base`` if the base code predates the key). A ``prefetch_all`` round
(without ``+hog``) also waits, after the workload, until nydusd's prefetch metrics say the
prefetch is done (and, where nydusd reports it, its cache files are on disk:
``durable_wait_s`` after all was in the cache), notes the system's dirty page cache
(``dirty_mib``, and ``writeback_mib`` being written: what the first container's overlayfs
unmount may have to write, the blob cache being on the same file system),
and runs the workload again in second containers (``second_run_s``: the median of
``WARM_RUNS`` containers run one after another), then, once nydusd's log says the image
switched to native (its blobs verified and mounted from the local cache files), in third ones
(``native_run_s``, the same): compared with ``oci``'s warm run (the median of as many).
``ociref+zran=N`` converts and runs the reference image with access points every N compressed
bytes (``256k``, ``1m``; 512 KiB otherwise, as in the first reports: the tools' default is 256 KiB
since), tagged ``ml:1-ref-<N>k``.
``+base`` runs the scenario with the snapshotter and nydusd of ``--base-src`` (another source
tree, e.g. ``git archive main src``): the old-code anchor of an A/B in the same run. Report,
plots and the issue's targets: bench/mlreport.py.

Links: ``tc tbf`` at each ``--rates`` Mbit/s into a network namespace (bench/fetch.py), and a
2 ms RTT (``--rtt-ms``) added by :class:`DelayProxy`, a userspace TCP proxy in the host
namespace (this kernel has no netem): every byte is held ``rtt/2`` in each direction.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fetch
import mlimage
import mlreport
from mlphases import nydusd_time
from mlrecords import WORKLOADS, MlImage, MlRound

from containerd import (  # type: ignore[import-not-found]
    NydusStack,
    venv_tool,
    write_oci_layout,
)

BASES = ("lazy", "prefetch_all", "optimized", "ociref", "oci")
PREFETCH = {"enable": True, "threads_count": 4, "merging_size": 1 << 20}
BLOB_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
PREFETCH_WAIT_S = 600.0  # at most this long for prefetch_all to finish before the 2nd run
NATIVE_WAIT_S = 300.0  # and for the switch to native after it
WARM_RUNS = 5  # warm containers per measurement (2nd, 3rd, oci warm): their median counts


@dataclass(frozen=True)
class Scenario:
    """A scenario name parsed: its base (one of BASES) and modifiers."""

    name: str
    base: str
    hog: bool = False
    amplify_io: int | None = None
    base_src: bool = False  # +base: the snapshotter and nydusd from --base-src (A/B anchor)
    zran_spacing: int | None = None  # ociref+zran=N: the reference image converted with N
    readahead_size: int | None = None  # +ra=N: fs_prefetch.readahead_size

    def tag(self, img: MlImage) -> str:
        if self.base == "ociref" and self.zran_spacing is not None:
            return f"{img.ref}-{self.zran_spacing >> 10}k"
        return {"oci": img.oci, "optimized": img.opt, "ociref": img.ref}.get(self.base, img.nydus)

    @property
    def second_run(self) -> bool:
        """Whether the round runs the workload in a second container after prefetch."""
        return self.base == "prefetch_all" and not self.hog


def parse_scenario(name: str) -> Scenario:
    base, *mods = name.split("+")
    if base not in BASES:
        raise SystemExit(f"coldstart: unknown scenario {name!r} (bases: {', '.join(BASES)})")
    hog, amp, base_src, zran, ra = False, None, False, None, None
    for m in mods:
        if m == "hog":
            hog = True
        elif m == "base":
            base_src = True
        elif m.startswith(("amp=", "zran=", "ra=")):
            key, v = m.split("=", 1)
            v = v.lower()
            n = int(v.rstrip("km")) * {"k": 1 << 10, "m": 1 << 20}.get(v[-1:], 1)
            amp, zran, ra = (
                n if key == "amp" else amp,
                n if key == "zran" else zran,
                n if key == "ra" else ra,
            )
        else:
            raise SystemExit(f"coldstart: unknown scenario modifier {m!r} in {name!r}")
    return Scenario(name, base, hog, amp, base_src, zran, ra)


def nydusd_config(scenario: Scenario | None) -> dict[str, Any]:
    """The snapshotter's nydusd config template for a scenario (the Debian bench's); None:
    lazy, with the access pattern recorded (the blob fs then pushes no chunks ahead, so it is
    not a timed scenario)."""
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
        "access_pattern": scenario is None,
        "fs_prefetch": {"enable": False},
    }
    base = scenario.base if scenario else "record"
    if base == "prefetch_all":
        cfg["fs_prefetch"] = {**PREFETCH, "prefetch_all": True}
    elif base == "optimized":
        cfg["fs_prefetch"] = {**PREFETCH, "prefetch_all": False}
    if scenario is not None and scenario.amplify_io is not None:
        cfg["amplify_io"] = scenario.amplify_io
    if scenario is not None and scenario.readahead_size is not None:
        cfg["fs_prefetch"] = {**cfg["fs_prefetch"], "readahead_size": scenario.readahead_size}
    return cfg


@contextlib.contextmanager
def cpu_hog(on: bool) -> Iterator[None]:
    """A busy loop pinned to the last CPU while the block runs (nothing when not ``on``)."""
    if not on:
        yield
        return
    cpu = max(os.sched_getaffinity(0))
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        os.sched_setaffinity(p.pid, {cpu})
        yield
    finally:
        p.kill()
        p.wait()


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
    from nydus.errors import RegistryNotFound

    c = fetch.client(host)
    try:
        c.head_manifest(repo, tag)
        return True
    except RegistryNotFound:  # a 404 (a BackendError, not a NotFoundError)
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


def prepare_ociref(work: Path, storage: Path, img: MlImage, sc: Scenario) -> None:
    """The scenario's reference image (``ml:1-ref[-Nk]``) converted from ``ml:1`` with
    ``nydusify convert --oci-ref`` (timed; once, cached in ``work/ml-image.json``)."""
    tag, spacing = sc.tag(img), sc.zran_spacing or 0x80000
    if tag in img.meta:
        return
    reg = fetch.Registry(storage, "127.0.0.1:5057")
    try:
        print("ml: nydusify convert --oci-ref ...", flush=True)
        t0 = time.monotonic()
        _run(
            [venv_tool("nydusify"), "convert", "--oci-ref", "--plain-http",
             "--source", f"{reg.addr}/{img.oci}", "--target", f"{reg.addr}/{tag}",
             "--zran-spacing", str(spacing), "--work-dir", str(work / "convert-ref")],
            "nydusify convert --oci-ref",
        )  # fmt: skip
        img.ref_convert[tag] = [time.monotonic() - t0, os.getloadavg()[0], spacing]
        shutil.rmtree(work / "convert-ref", ignore_errors=True)
        img.meta[tag], img.blobs[tag] = _sizes(reg.addr, tag)
    finally:
        reg.stop()
    (work / "ml-image.json").write_text(json.dumps(asdict(img), indent=1))


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

    out = dict.fromkeys(
        ("reads", "backend_requests", "backend_bytes", "prefetch_bytes", "behind", "behind_bytes"),
        0,
    )
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
        out["behind"] += int(bc.get("readpath_behind_prefetch", 0))  # newer daemons only
        out["behind_bytes"] += int(bc.get("readpath_behind_prefetch_bytes", 0))
    return out


_LOG_MARKS = {  # phase name -> a line of nydusd's log that marks it (first occurrence)
    "up": "(python) starting",
    "prefetch": ": prefetching ",
    "running": "daemon state RUNNING",
}


_SPARE_CPU = re.compile(r"standby: pid \d+ takes over, ([0-9.]+) CPU s spent before")


def daemon_phases(stack: NydusStack, wall0: float) -> dict[str, float]:
    """When the (first) daemon started, came up, submitted its prefetch and was RUNNING, and
    its prefetch began and ended, in seconds from ``wall0`` (the pull's start); plus the read
    path's summed times, the CPU seconds the daemon used so far (``nydusd_cpu``) and its
    resident memory now (``rss``, MiB). Best effort: what cannot be read is left out."""
    from nydus.daemon.client import NydusdClient

    out: dict[str, float] = {}
    state = json.loads((stack.sn_root / "daemons" / "state.json").read_text())
    for d in state.get("daemons", [])[:1]:
        if d.get("started_at"):
            out["nydusd"] = float(d["started_at"]) - wall0
        with contextlib.suppress(OSError, ValueError, IndexError):  # CPU it used (user + sys)
            stat = Path(f"/proc/{int(d['pid'])}/stat").read_text()
            ticks = stat[stat.rindex(")") + 2 :].split()[11:13]  # utime, stime
            out["nydusd_cpu"] = sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")
        rss = daemon_rss_mib(stack)
        if rss is not None:
            out["rss"] = rss
        with contextlib.suppress(OSError):
            for line in Path(d["log_file"]).read_text(errors="replace").splitlines():
                m = _SPARE_CPU.match(line)
                if m and "nydusd_cpu" in out:  # a warm spare's imports, done before the pull
                    out["nydusd_cpu"] -= float(m.group(1))
                    out["spare_cpu"] = float(m.group(1))
                for name, mark in _LOG_MARKS.items():
                    if name not in out and mark in line:
                        t = nydusd_time(line)
                        if t is not None:
                            out[name] = t - wall0
        c = NydusdClient(d["apisock"], timeout=10)
        bc = c.metrics("blobcache")
        for name in ("begin", "end"):
            secs = int(bc.get(f"prefetch_{name}_time_secs", 0))
            if secs:
                ms = int(bc.get(f"prefetch_{name}_time_millis", 0))
                out[f"pf_{name}"] = secs + ms / 1000 - wall0
        for name in ("user_fetch", "backend", "decode", "verify", "cache"):
            out[name] = int(bc.get(f"readpath_{name}_micros", 0)) / 1e6
        out["user_fetches"] = float(bc.get("readpath_user_fetches", 0))
        for name in ("windows", "requests", "bytes", "hits", "hit_bytes"):  # newer daemons
            if f"readahead_{name}" in bc:
                out[f"ra_{name}"] = float(bc[f"readahead_{name}"])
        g = c.metrics("")
        lat = g.get("fop_cumulative_latency_total") or []
        if len(lat) > 4:
            out["read"] = int(lat[4]) / 1e6
    return out


def daemon_rss_mib(stack: NydusStack) -> float | None:
    """The (first) daemon's resident memory (VmRSS), MiB; None if it cannot be read."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        state = json.loads((stack.sn_root / "daemons" / "state.json").read_text())
        pid = int(state["daemons"][0]["pid"])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return None


def wait_native(stack: NydusStack, timeout: float) -> bool:
    """Wait until every daemon's log says its image switched to native; False on timeout."""
    logs = [p for p in (stack.sn_root / "daemons").glob("*.log") if p.name != "standby.log"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if logs and all("switched to native" in p.read_text(errors="replace") for p in logs):
            return True
        time.sleep(0.2)
    return False


def wait_prefetch_done(stack: NydusStack, timeout: float) -> float | None:
    """Poll nydusd's blobcache metrics until every daemon's prefetch has ended (an end time
    is set once no batch is pending), its blobs are all in the cache and, where the daemon
    reports it (``data_all_durable``, an extension of newer daemons), their cache files are
    on disk (fdatasync'ed); raises on timeout. Returns the seconds from "all in the cache" to
    "on disk" (None when a daemon does not report durability: older code)."""
    from nydus.daemon.client import NydusdClient

    state = json.loads((stack.sn_root / "daemons" / "state.json").read_text())
    clients = [NydusdClient(d["apisock"], timeout=10) for d in state.get("daemons", [])]
    deadline = time.monotonic() + timeout
    ready_at: float | None = None
    while time.monotonic() < deadline:
        ms = [c.metrics("blobcache") for c in clients]
        if all(int(m.get("prefetch_end_time_secs", 0)) > 0 and m.get("data_all_ready") for m in ms):
            ready_at = ready_at if ready_at is not None else time.monotonic()
            if not all("data_all_durable" in m for m in ms):
                return None
            if all(m["data_all_durable"] for m in ms):
                return time.monotonic() - ready_at
        time.sleep(0.05 if ready_at is not None else 0.2)
    raise RuntimeError(f"prefetch not done (and on disk) {timeout:.0f}s after the workload")


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


class StackSampler:
    """Kernel stacks of the container runtime while a container starts (``NYDUS_BENCH_STACKS``,
    a diagnostic: the sampling costs CPU). Every ``period`` s, each thread of the processes
    whose ``comm`` is in :attr:`COMMS` (containerd, ctr, the shim, runc, the journal thread)
    is looked at (``/proc/<pid>/task/<tid>/stat``); one in uninterruptible sleep (``D``) has
    its ``/proc/.../stack`` recorded: ``[(s since start, comm, tid, stack)]``."""

    COMMS = ("containerd", "ctr", "containerd-shim", "runc", "runc:[2:INIT]", "jbd2/vda-8")

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.samples: list[tuple[float, str, int, str]] = []
        self.ticks = 0
        self._comm: dict[int, str] = {}
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stack-sampler")
        self._thread.start()

    def _pids(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            comm = self._comm.get(pid)
            if comm is None:
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue
                self._comm[pid] = comm
            if comm.startswith(self.COMMS):
                out.append((pid, comm))
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ticks += 1
            t = round(time.monotonic() - self._t0, 3)
            for pid, comm in self._pids():
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    base = f"/proc/{pid}/task/{tid}"
                    try:
                        stat = Path(f"{base}/stat").read_text()
                        if stat[stat.rindex(")") + 2] != "D":
                            continue
                        stack = Path(f"{base}/stack").read_text()
                    except (OSError, ValueError, IndexError):
                        continue
                    frames = [ln.split()[-1].split("+")[0] for ln in stack.splitlines() if ln]
                    self.samples.append((t, comm, int(tid), " < ".join(frames[:12])))
            self._stop.wait(self.period)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"period": self.period, "ticks": self.ticks, "samples": self.samples}


def dirty_mib() -> tuple[float | None, float | None]:
    """The system's page cache not yet on disk (``/proc/meminfo``), MiB: ``Dirty`` (not
    written yet) and ``Writeback`` (being written)."""
    got: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Dirty", "Writeback"):
                    got[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return got.get("Dirty"), got.get("Writeback")


def _bootstrap_apply_s(stack: NydusStack) -> float | None:
    """Seconds the snapshotter took to apply the bootstrap layer from its content store (its
    log line), or None when it did not (containerd applied it: main's code, or a fallback)."""
    try:
        text = stack.sn.log_path.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"applied from the content store in (\d+) ms", text)
    return int(m.group(1)) / 1000 if m else None


def _warm_runs(
    stack: NydusStack, snap: list[str], ref: str, name: str, cmd: str, expect: str
) -> tuple[list[float], tuple[float, float]]:
    """The workload in WARM_RUNS containers one after another (``name``-0, -1, ...): each
    one's seconds, and the first one's wall-clock start and end (for the phase breakdown).
    One warm run alone varied 0.44-0.67 s between rounds of one run; the median of several is
    what the 1.1x target is judged on."""
    secs: list[float] = []
    first = (0.0, 0.0)
    for i in range(WARM_RUNS):
        w0, t0 = time.time(), time.monotonic()
        _ctr_run(stack, ["run", "--rm", *snap, ref, f"{name}-{i}", "/bin/sh", "-c", cmd], expect)
        secs.append(time.monotonic() - t0)
        if i == 0:
            first = (w0, time.time())
    return secs, first


def _ctr_run(stack: NydusStack, argv: list[str], expect: str) -> None:
    cmd = ["ctr", "-a", str(stack.ctd.address), "-n", stack.ctd.namespace, *argv]
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env=env_path(), stdin=subprocess.DEVNULL
    )
    if p.returncode != 0 or expect not in p.stdout:
        raise RuntimeError(
            f"workload failed ({p.returncode}): {p.stdout[-500:]!r} {p.stderr[-2000:]}"
        )


def start_stack(
    tmp: Path, scenario: Scenario | None, port: int, base_src: Path | None = None
) -> NydusStack:
    """A fresh containerd + snapshotter; with ``+base``, the snapshotter (and the nydusd it
    starts, which inherits its environment) imports the nydus package from ``base_src``."""
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
            "debug" if os.environ.get("NYDUS_BENCH_KEEP_LOGS") else "info",  # gRPC call times
        ],
        content_store=True,
    )
    if scenario is None or not scenario.base_src:
        stack.start()
        stack.wait_spare()  # a snapshotter in service has its warm spare nydusd ready
        return stack
    if base_src is None:
        raise SystemExit("coldstart: scenario modifier +base needs --base-src")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(base_src)
    try:
        return stack.start()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def record(host: str, work: Path, workload: str) -> Path:
    """``workload`` on the Nydus image (lazy, recording), its access pattern exported from
    the snapshotter: ``work/<workload>.list`` and ``.json``."""
    tmp = work / "rounds" / "record"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    stack = start_stack(tmp, None, port)
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
    scenario: Scenario,
    workload: str,
    link: str,
    host: str,
    img: MlImage,
    work: Path,
    idx: int,
    veth_bytes: Any,
    free_port: Any,
    base_src: Path | None = None,
) -> MlRound:
    tmp = work / "rounds" / f"{link.replace(' ', '')}-{scenario.name}-{workload}-{idx}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.sync()
    load = os.getloadavg()[0]
    stack = start_stack(tmp, scenario, free_port(), base_src)
    cmd, expect = WORKLOADS[workload]
    oci = scenario.base == "oci"
    tag = scenario.tag(img)
    ref = f"{host}/{tag}"
    snap = [] if oci else ["--snapshotter", "nydus"]
    try:
        wire0 = veth_bytes()
        sampler = LinkSampler()
        with cpu_hog(scenario.hog):
            wall0, t0 = time.time(), time.monotonic()
            stack.ctr("image", "pull", "--plain-http", *snap, ref, timeout=1800).check()
            t1 = time.monotonic()
            # no --rm for Nydus: the daemon's counters and pattern are read after
            _ctr_run(
                stack,
                ["run", *(["--rm"] if oci else snap), ref, "c1", "/bin/sh", "-c", cmd],
                expect,
            )
            t2 = time.monotonic()
        wire = veth_bytes() - wire0
        tl = sampler.stop()
        r = MlRound(link, scenario.name, workload, t1 - t0, t2 - t1, t2 - t0, img.oci_bytes, wire)
        r.load, r.timeline = load, tl
        if oci:
            r.warm_runs, r.second_run_at = _warm_runs(stack, [], ref, "c2", cmd, expect)
            r.warm_run_s = statistics.median(r.warm_runs)
            return r
        ctr = daemon_counters(stack)
        try:
            r.phases = {"pull": t1 - t0, **daemon_phases(stack, wall0), "exit": t2 - t0}
        except (OSError, ValueError, KeyError) as e:  # older daemons: fewer counters
            print(f"  (phases not read: {e})", flush=True)
        applied = _bootstrap_apply_s(stack)
        if applied is not None:  # the snapshotter applied the bootstrap layer itself
            r.phases["boot_apply"] = applied
        r.registry_bytes = img.meta[tag] + ctr["backend_bytes"]
        r.reads, r.backend_requests = ctr["reads"], ctr["backend_requests"]
        r.backend_bytes, r.prefetch_bytes = ctr["backend_bytes"], ctr["prefetch_bytes"]
        r.behind_prefetch = (ctr["behind"], ctr["behind_bytes"])
        if scenario.second_run:
            t3 = time.monotonic()
            r.durable_wait_s = wait_prefetch_done(stack, PREFETCH_WAIT_S)
            r.dirty_mib, r.writeback_mib = dirty_mib()
            reads0 = daemon_counters(stack)["reads"]
            stacks = StackSampler() if os.environ.get("NYDUS_BENCH_STACKS") else None
            t4 = time.monotonic()
            r.second_runs, r.second_run_at = _warm_runs(stack, snap, ref, "c2", cmd, expect)
            t5 = time.monotonic()
            if stacks is not None:
                r.second_run_stacks = stacks.stop()
            r.second_run_reads = daemon_counters(stack)["reads"] - reads0
            r.prefetch_wait_s, r.second_run_s = t4 - t3, statistics.median(r.second_runs)
            if wait_native(stack, NATIVE_WAIT_S):
                t6 = time.monotonic()
                r.native_runs, _ = _warm_runs(stack, snap, ref, "c3", cmd, expect)
                r.native_wait_s, r.native_run_s = t6 - t5, statistics.median(r.native_runs)
            rss = daemon_rss_mib(stack)  # after the warm runs: idle since the last (or prefetch)
            if rss is not None:
                r.phases["rss_end"] = rss
        return r
    finally:
        keep = os.environ.get("NYDUS_BENCH_KEEP_LOGS")
        if keep:  # nydusd's logs, for timelines
            for log_file in (stack.sn_root / "daemons").glob("*.log"):
                (Path(keep) / tmp.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(log_file, Path(keep) / tmp.name / log_file.name)
        stack.stop()
        if keep:  # and the snapshotter's (debug: each gRPC call timed) and containerd's
            (Path(keep) / tmp.name).mkdir(parents=True, exist_ok=True)
            for log_file in (stack.sn.log_path, stack.ctd.log_path):
                with contextlib.suppress(OSError):
                    shutil.copy(log_file, Path(keep) / tmp.name / log_file.name)
        shutil.rmtree(tmp, ignore_errors=True)
        # the round's deletions (cache, snapshots) on disk now, not in the next round's
        # containerd (whose first sync, a journal commit, would wait for them)
        os.sync()


def compile_bytecode(package: Path | None = None) -> None:
    """Byte-compile the nydus package, as an installed one is: with PYTHONDONTWRITEBYTECODE set
    (as on this project's machines) every snapshotter and nydusd start would compile the
    modules it imports from source (~0.1 s of each nydusd start, in the run time)."""
    import compileall

    import nydus

    compileall.compile_dir(package or os.path.dirname(nydus.__file__), quiet=1)


def main_ml(args: Any, veth_bytes: Any, free_port: Any) -> int:
    import datetime as dt

    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    loads0 = os.getloadavg()[0]
    compile_bytecode()
    base: Path | None = args.base_src
    if base is not None:
        compile_bytecode(base / "nydus")
    storage, img = prepare(work, record)
    scenarios = [parse_scenario(s) for s in args.scenarios.split(",") if s]
    for sc in scenarios:
        if sc.base == "ociref":
            prepare_ociref(work, storage, img, sc)
    needed = {
        wl: needed_bytes(work / "nydus.boot", json.loads((work / f"{wl}.json").read_text()))[0]
        for wl in WORKLOADS
    }
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
                            sc, wl, link, proxy.addr, img, work, i, veth_bytes, free_port, base
                        )
                        if sc.base not in ("oci", "ociref"):  # ociref: other chunks
                            r.needed = needed[wl]
                        rounds.append(r)
                        print("  " + mlreport.round_line(r), flush=True)
        finally:
            proxy.stop()
            reg.stop()
            fetch.teardown_link()
    names = [s.name for s in scenarios]
    summary = mlreport.summarize(rounds, img, rates, names)
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"coldstart-{dt.date.today():%Y-%m-%d}-ml{args.tag and '-' + args.tag}"
    pngs = mlreport.plot(summary, rounds, stem, names)
    text = mlreport.report(args, img, rounds, summary, pngs, (loads0, os.getloadavg()[0]), names)
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
