"""Cold start benchmark: from pull start to the container's first output, Nydus (our snapshotter)
against containerd's default overlayfs pull of the OCI image, at loopback speed and through
bandwidth-limited links.

    .venv/bin/python bench/coldstart.py                    # loopback, 1000 and 100 Mbit/s, 3 rounds
    .venv/bin/python bench/coldstart.py --rates 1000 --rounds 5 --no-loopback
    .venv/bin/python bench/coldstart.py --image ml --rounds 1     # issue 17: bench/coldstart_ml.py

The image is the Debian-based test image (``debootstrap --variant=minbase`` of bookworm plus
python3, perl, git, curl, ...; the rootfs tarball is cached in /var/tmp/nydus-e2e and shared
with the slow end-to-end test), pushed with skopeo as a one-layer gzip OCI image and converted by
our ``nydusify`` (zstd, 1 MiB chunks) into a registry storage directory under ``--work``.

Each round starts from nothing: a fresh containerd (its own root, content store and snapshots)
and, for Nydus, a fresh ``containerd-nydus-grpc`` with an empty blob cache; dirty pages of
earlier rounds are written back first (``sync``). Then, timed from the start of the pull:

* ``nydus``: stock ``ctr image pull --snapshotter nydus REF-nydus`` with containerd's content
  store proxied to the snapshotter (``--content-store``: the data blobs are not downloaded, only
  the manifest, config and bootstrap layer), then stock
  ``ctr run --snapshotter nydus REF-nydus ID sh -c WORKLOAD``; ``--pull nydus-pull`` uses
  ``nydus-pull REF-nydus`` (the labelled pull) instead, without the content store;
* ``oci``: stock ``ctr image pull REF`` (containerd's default overlayfs snapshotter: every
  layer downloaded and unpacked), then stock ``ctr run REF ID sh -c WORKLOAD``.

The workload prints ``/etc/os-release``'s first line, starts python3 (importing json, sqlite3
and email), runs git and perl: a realistic start. Reported per method and link: time to the
container's first output line and to the workload's end (medians over ``--rounds``), and bytes:

* ``fetched``: what left the registry for this image. Nydus: the manifest, config and bootstrap
  layer of the pull plus the daemon's backend ``read_amount_total`` (every blob range and the
  blobs' chunk-info arrays), read from the snapshotter's Prometheus endpoint; OCI: manifest,
  config and layer sizes (containerd downloads every layer once). On the limited links the veth
  counters of the namespace side are reported too (``wire``: TCP/HTTP included).
* ``read``: bytes nydusd served to the kernel for the workload (its ``data_read``: FUSE reads
  with kernel readahead in FUSE RAFS mode; blob-device reads plus the rest of each chunk pushed
  into the page cache in kernel EROFS mode): what lazy loading had to serve.

Links: ``loopback`` (registry on 127.0.0.1) and ``N mbit``: the registry runs in a network
namespace behind a veth pair shaped with ``tc tbf`` at N Mbit/s on both ends (only the namespace
addresses 10.202.0.1/24 and .2 are used; created here and removed on exit). bench/fetch.py's
namespace helpers are reused with this benchmark's own names and addresses.

Writes ``bench/results/coldstart-<date>.md`` and ``.json``. Needs root (containerd, mounts,
network namespaces).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "src"))

import fetch  # noqa: E402
from plot import plot_after_run  # noqa: E402  # bench/plot.py: PNG beside the report

from containerd import (  # type: ignore[import-not-found]  # noqa: E402
    NydusStack,
    containerd_skip_reason,
    debian_layout,
    nydusify_convert,
    skopeo_push,
    venv_tool,
)

# bench/fetch.py's link helpers, with names and addresses of our own
fetch.NETNS = "nydus-coldstart"
fetch.VETH_HOST, fetch.VETH_NS = "ncs-host", "ncs-ns"
fetch.HOST_ADDR, fetch.NS_ADDR = "10.202.0.1", "10.202.0.2"

WORKLOAD = (
    "head -n 1 /etc/os-release; "
    "python3 -c 'import json, sqlite3, email.mime.text; "
    'print("python", json.dumps(sqlite3.sqlite_version))\'; '
    "git --version; perl -e 'print \"perl ok\\n\"'"
)
EXPECT = ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"', "python", "git version", "perl ok")

NYDUSD_TEMPLATE = {
    # the seed article's /etc/nydus/config.json, with fs_prefetch off: the article's config
    # prefetches whole images in the background, which would hide what the workload needs
    "device": {
        "backend": {
            "type": "registry",
            "config": {"scheme": "http", "timeout": 30, "connect_timeout": 5, "retry_limit": 2},
        },
        "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
    },
    "mode": "direct",
    "digest_validate": False,
    "enable_xattr": True,
    "fs_prefetch": {"enable": False},
}


@dataclass
class Round:
    link: str
    method: str
    first_output_s: float
    done_s: float
    fetched: int
    read: int | None = None
    wire: int | None = None
    load: float = 0.0  # 1-minute load average when the round started
    output: str = ""


@dataclass
class Image:
    oci: str
    nydus: str
    oci_bytes: int  # manifest + config + layers
    nydus_meta_bytes: int  # manifest + config + bootstrap layer
    nydus_blob_bytes: int
    rootfs_bytes: int


# --------------------------------------------------------------------------- image


def prepare_image(work: Path) -> tuple[Path, Image]:
    """Registry storage holding debian:12 (OCI) and debian:12-nydus (our nydusify)."""
    storage = work / "registry" / "storage"
    info_path = work / "image.json"
    reg = fetch.Registry(storage, "127.0.0.1:5056")
    try:
        if info_path.is_file():
            img = Image(**json.loads(info_path.read_text()))
        else:
            layout = work / "layout"
            shutil.rmtree(layout, ignore_errors=True)
            print("building the Debian image (cached rootfs tarball) ...", flush=True)
            size = debian_layout(layout, "12")
            skopeo_push(layout, "12", f"{reg.addr}/debian:12")
            print("converting it with nydusify ...", flush=True)
            t0 = time.monotonic()
            nydusify_convert(f"{reg.addr}/debian:12", f"{reg.addr}/debian:12-nydus",
                             work / "convert")  # fmt: skip
            print(f"  converted in {time.monotonic() - t0:.1f}s", flush=True)
            c = fetch.client(reg.addr)
            oci_body, _, _ = c.get_manifest("debian", "12")
            nydus_body, _, _ = c.get_manifest("debian", "12-nydus")
            c.close()
            oci, nyd = json.loads(oci_body), json.loads(nydus_body)
            blob_type = "application/vnd.oci.image.layer.nydus.blob.v1"
            img = Image(
                oci="debian:12",
                nydus="debian:12-nydus",
                oci_bytes=len(oci_body)
                + oci["config"]["size"]
                + sum(ly["size"] for ly in oci["layers"]),
                nydus_meta_bytes=len(nydus_body)
                + nyd["config"]["size"]
                + sum(ly["size"] for ly in nyd["layers"] if ly["mediaType"] != blob_type),
                nydus_blob_bytes=sum(
                    ly["size"] for ly in nyd["layers"] if ly["mediaType"] == blob_type
                ),
                rootfs_bytes=size,
            )
            info_path.write_text(json.dumps(asdict(img), indent=1))
    finally:
        reg.stop()
    shutil.rmtree(work / "layout", ignore_errors=True)
    shutil.rmtree(work / "convert", ignore_errors=True)
    return storage, img


# --------------------------------------------------------------------------- one round


def veth_bytes() -> int:
    """Bytes sent by the namespace side of the veth pair (what the registry served)."""
    counter = f"/sys/class/net/{fetch.VETH_NS}/statistics/tx_bytes"
    p = subprocess.run(["ip", "netns", "exec", fetch.NETNS, "cat", counter],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return int(p.stdout)


def run_workload(stack: NydusStack, argv: list[str], t0: float) -> tuple[float, float, str]:
    """Run ``ctr ARGV`` (a ``ctr run``); seconds from ``t0`` to its first line and its end."""
    cmd = ["ctr", "-a", str(stack.ctd.address), "-n", stack.ctd.namespace, *argv]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})  # fmt: skip
    assert p.stdout is not None
    first = p.stdout.readline()
    t_first = time.monotonic() - t0
    rest, err = p.communicate(timeout=600)
    t_done = time.monotonic() - t0
    out = first + rest
    if p.returncode != 0 or not all(e in out for e in EXPECT):
        raise RuntimeError(f"workload failed ({p.returncode}): {out!r} {err[-2000:]}")
    return t_first, t_done, out


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0) + float(value)
    return out


def one_round(
    method: str,
    link: str,
    host: str,
    img: Image,
    work: Path,
    limited: bool,
    idx: int,
    pull: str = "ctr",
) -> Round:
    tmp = work / "rounds" / f"{link}-{method}-{idx}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Write back what earlier rounds left dirty (an OCI unpack writes the whole rootfs), so
    # that no round is throttled by another one's writeback.
    os.sync()
    load = os.getloadavg()[0]
    cfg = tmp / "nydusd.json"
    nydusd_cfg = dict(NYDUSD_TEMPLATE)
    if method == "nydus-pf":  # the same with background prefetch of the whole image
        nydusd_cfg["fs_prefetch"] = {"enable": True, "prefetch_all": True}
    cfg.write_text(json.dumps(nydusd_cfg))
    port = fetch_free_port()
    nydus = method in ("nydus", "nydus-pf")
    stock = nydus and pull == "ctr"
    stack = NydusStack(tmp, ["--config-path", str(cfg), "--metrics-address",
                             f"127.0.0.1:{port}", "--log-level", "info"],
                       content_store=stock)  # fmt: skip
    stack.start()
    try:
        wire0 = veth_bytes() if limited else 0
        cid = f"cold-{idx}"
        if nydus:
            ref = f"{host}/{img.nydus}"
            t0 = time.monotonic()
            if stock:
                stack.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref,
                          timeout=1800).check()  # fmt: skip
            else:
                p = subprocess.run([venv_tool("nydus-pull"), "-q", "-a", str(stack.ctd.address),
                                    "-n", stack.ctd.namespace, "--plain-http", ref],
                                   capture_output=True, text=True)  # fmt: skip
                if p.returncode != 0:
                    raise RuntimeError(f"nydus-pull failed: {p.stderr[-2000:]}")
            argv = ["run", "--snapshotter", "nydus", ref, cid, "/bin/sh", "-c", WORKLOAD]
            first, done, out = run_workload(stack, argv, t0)
            m = metrics(port)
            fetched = img.nydus_meta_bytes + int(m["nydus_snapshotter_image_fetch_bytes"])
            read = int(m["nydus_snapshotter_image_read_bytes"])
        else:
            ref = f"{host}/{img.oci}"
            t0 = time.monotonic()
            stack.ctr("image", "pull", "--plain-http", ref, timeout=1800).check()
            argv = ["run", ref, cid, "/bin/sh", "-c", WORKLOAD]
            first, done, out = run_workload(stack, argv, t0)
            fetched, read = img.oci_bytes, None
        wire = veth_bytes() - wire0 if limited else None
        stack.ctr("containers", "delete", cid)
        return Round(link, method, first, done, fetched, read, wire, load, out)
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


NYDUS_PULLS = {
    "ctr": "stock `ctr image pull --snapshotter nydus` (content store proxied to the snapshotter)",
    "nydus-pull": "`nydus-pull`",
}


def fetch_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- report


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(args: argparse.Namespace, img: Image, rounds: list[Round]) -> str:
    links: list[str] = []
    for r in rounds:
        if r.link not in links:
            links.append(r.link)
    lines = [
        f"# Cold start benchmark, {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Image: Debian 12 (debootstrap minbase + python3, perl, git, curl, less, procps, "
        f"vim-tiny): rootfs {mib(img.rootfs_bytes)}; OCI image {mib(img.oci_bytes)} (one gzip "
        f"layer); Nydus image: blobs {mib(img.nydus_blob_bytes)} (zstd, 1 MiB chunks), "
        f"manifest + config + bootstrap layer {mib(img.nydus_meta_bytes)}.",
        f"Workload: `sh -c '{WORKLOAD}'`.",
        f"Rounds: {args.rounds} per method and link, each from a fresh containerd and "
        f"snapshotter (empty content store, snapshots and blob cache); medians.",
        f"Nydus: {NYDUS_PULLS[args.pull]} + stock `ctr run --snapshotter nydus` (dedicated nydusd, "
        "fs_prefetch off (nydus-pf: on, prefetch_all), amplify_io 1 MiB). "
        "OCI: stock `ctr image pull` + `ctr run` "
        "(containerd 1.6.20's default overlayfs snapshotter).",
        f"Machine: python {platform.python_version()}, kernel {platform.release()}, "
        f"cpus {os.cpu_count()}, shared with other sessions' test runs.",
        "",
        "| link | method | first output s | workload done s | fetched | of OCI image | "
        "read | fetched / read | wire | speed-up (first output) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, Any] = {}
    for link in links:
        per: dict[str, dict[str, float | None]] = {}
        for method in ("nydus", "nydus-pf", "oci"):
            rs = [r for r in rounds if r.link == link and r.method == method]
            if not rs:
                continue
            reads = [r.read for r in rs if r.read is not None]
            wires = [r.wire for r in rs if r.wire is not None]
            per[method] = {
                "first": med([r.first_output_s for r in rs]),
                "done": med([r.done_s for r in rs]),
                "fetched": med([r.fetched for r in rs]),
                "read": med(reads) if reads else None,
                "wire": med(wires) if wires else None,
                "load": med([r.load for r in rs]),
            }
        summary[link] = per
        for method, v in per.items():
            first, done, fetched = v["first"], v["done"], v["fetched"]
            assert first is not None and done is not None and fetched is not None
            read, wire, load = v["read"], v["wire"], v["load"]
            speedup = ""
            if method.startswith("nydus") and "oci" in per:
                oci_first = per["oci"]["first"]
                assert oci_first is not None
                speedup = f"{oci_first / first:.1f}x"
            lines.append(
                f"| {link} | {method} | {first:.2f} | {done:.2f} | {mib(fetched)} | "
                f"{fetched / img.oci_bytes:.1%} | {mib(read) if read else '-'} | "
                f"{f'{fetched / read:.2f}' if read else '-'} | {mib(wire) if wire else '-'} | "
                f"{speedup} | {load:.1f} |"
            )
    lines += [
        "",
        "`fetched`: bytes the registry served for the image (Nydus: pull metadata + the "
        "daemon's backend bytes, from the snapshotter's metrics; OCI: the image's blobs). "
        "`read`: bytes nydusd served to the kernel for the workload (FUSE reads with kernel "
        "readahead, or in kernel EROFS mode blob-device reads plus the pushed rest of each "
        "chunk). `wire`: bytes the namespace side of the veth sent (limited links "
        "only; TCP/HTTP overhead included). `load`: median 1-minute load average when the "
        "rounds started (2 CPUs; other sessions' test runs share them: the OCI unpack and "
        "nydusd are both CPU-bound, so both slow down under load).",
        "",
        "Per round (seconds to first output / to the end, fetched):",
        "",
    ]
    for r in rounds:
        lines.append(
            f"- {r.link} {r.method}: {r.first_output_s:.2f} / {r.done_s:.2f} s, "
            f"{mib(r.fetched)}"
            + (f", read {mib(r.read)}" if r.read else "")
            + f", load {r.load:.1f}"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--rates",
        default=None,
        help="limited links in Mbit/s (comma list; default 1000,100, ml 1000,200)",
    )
    ap.add_argument(
        "--image",
        choices=["debian", "ml"],
        default="debian",
        help="ml: the 1.3 GB ML image of issue 17 (bench/coldstart_ml.py)",
    )
    ap.add_argument(
        "--scenarios",
        default="lazy,prefetch_all,lazy+hog,prefetch_all+hog,optimized,oci",
        help="ml: scenarios to run (comma list; modifiers +hog, +amp=N: bench/coldstart_ml.py)",
    )
    ap.add_argument("--tag", default="", help="ml: the report is coldstart-DATE-ml-TAG.md")
    base_help = "ml: the src/ directory the +base scenarios run the snapshotter and nydusd from"
    ap.add_argument("--base-src", type=Path, help=base_help)
    ap.add_argument("--workloads", default="W1,W2", help="ml: workloads (comma list)")
    ap.add_argument(
        "--rtt-ms",
        type=float,
        default=2.0,
        help="ml: round-trip time the delay proxy adds on the limited links",
    )
    ap.add_argument("--no-loopback", action="store_true")
    ap.add_argument(
        "--methods",
        default="nydus,oci",
        help="nydus, nydus-pf (fs_prefetch on, prefetch_all), oci (comma list)",
    )
    ap.add_argument(
        "--pull",
        choices=["ctr", "nydus-pull"],
        default="ctr",
        help="how the Nydus image is pulled: stock ctr image pull through the snapshotter's "
        "content store (default), or nydus-pull",
    )
    ap.add_argument(
        "--work", type=Path, default=None, help="default /var/tmp/nydus-bench-coldstart[-ml]"
    )
    args = ap.parse_args()
    ml = args.image == "ml"
    args.rates = args.rates if args.rates is not None else ("1000,200" if ml else "1000,100")
    args.work = args.work or Path("/var/tmp/nydus-bench-coldstart" + ("-ml" if ml else ""))
    why = containerd_skip_reason()
    if why:
        sys.exit(f"coldstart: {why}")
    if ml:
        import coldstart_ml

        handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
        try:
            return coldstart_ml.main_ml(args, veth_bytes, fetch_free_port)
        finally:
            fetch.teardown_link()
            signal.signal(signal.SIGTERM, handler)
    args.work.mkdir(parents=True, exist_ok=True)
    storage, img = prepare_image(args.work)
    methods = [m for m in args.methods.split(",") if m]
    rounds: list[Round] = []

    def run_link(link: str, host: str, limited: bool) -> None:
        for i in range(args.rounds):
            for method in methods:  # interleaved, so that load changes hit both alike
                r = one_round(method, link, host, img, args.work, limited, i, args.pull)
                rounds.append(r)
                print(f"  {link:10} {method:6} round {i}: first output {r.first_output_s:6.2f}s, "
                      f"done {r.done_s:6.2f}s, fetched {mib(r.fetched)}"
                      + (f", read {mib(r.read)}" if r.read else ""), flush=True)  # fmt: skip

    if not args.no_loopback:
        reg = fetch.Registry(storage, "127.0.0.1:5056")
        try:
            run_link("loopback", reg.addr, False)
        finally:
            reg.stop()
    handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    try:
        for rate in [int(x) for x in args.rates.split(",") if x]:
            fetch.setup_link(rate)
            reg = fetch.Registry(storage, f"{fetch.NS_ADDR}:5000", netns=fetch.NETNS)
            try:
                run_link(f"{rate} mbit", reg.addr, True)
            finally:
                reg.stop()
                fetch.teardown_link()
    finally:
        fetch.teardown_link()
        signal.signal(signal.SIGTERM, handler)

    text = report(args, img, rounds)
    print()
    print(text)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"coldstart-{dt.date.today():%Y-%m-%d}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()},
        "image": asdict(img),
        "workload": WORKLOAD,
        "rounds": [{k: v for k, v in asdict(r).items() if k != "output"} for r in rounds],
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {stem}.md and .json")
    plot_after_run(stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
