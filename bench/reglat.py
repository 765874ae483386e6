"""Registry request latency: what one blob range GET costs, before any byte of a lazy read
is decoded, beside a minimal HTTP server on the same machine in the same run.

    .venv/bin/python bench/reglat.py                 # 300 GETs per size, 4 KiB, 128 KiB, 1 MiB
    .venv/bin/python bench/reglat.py --count 100 --tag quick

A lazy read that misses the cache costs one range GET. When a workload's reads are serial
(python imports are), the number of misses times this figure is a floor under its run time
that no client-side change removes: only fewer requests (larger, better placed ones) do.

Servers, both on 127.0.0.1, each a process of its own, serving one random 128 MiB blob:

* ``docker-registry``: Debian's registry (distribution 2.8), filesystem storage, no auth:
  what the cold-start benchmark and the tests fetch from;
* ``static``: this script's own minimal server (Python's ``http.server`` answering
  ``Range`` with ``os.pread``): the floor of an HTTP round trip on this machine, the anchor.

Clients: ``ours`` is ``nydus.registry.RegistryClient.get_blob_range`` (the path nydusd's
registry backend takes: ``nydus.http``, its connection pool, auth and retry policy);
``raw`` is one keep-alive ``http.client`` connection (no library on top). Offsets are random
(fixed seed) over the blob; each (server, client, size) runs ``--count`` GETs in sequence
after 10 unmeasured ones. The blob file sits in the page cache: no disk reads are timed.

Writes ``bench/results/reglat-<date>[-<tag>].md`` (and its PNG) and prints the table.
Needs Debian's ``docker-registry`` (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import http.server
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from plot import plot_after_run  # noqa: E402
from tests.registry import RegistryServer, free_port  # noqa: E402

BLOB_SIZE = 128 << 20
SIZES = (4 << 10, 128 << 10, 1 << 20)
REPO_NAME = "bench/reglat"
WARMUP = 10


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    fd = -1
    size = 0

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        spec = self.headers.get("Range", "")
        start, _, end = spec.removeprefix("bytes=").partition("-")
        lo, hi = int(start), min(int(end), self.size - 1)
        data = os.pread(self.fd, hi - lo + 1, lo)
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Range", f"bytes {lo}-{hi}/{self.size}")
        self.end_headers()
        self.wfile.write(data)


def serve_static(path: str, port: int) -> None:
    """The anchor server (run as ``reglat.py --serve PATH PORT`` in a process of its own)."""
    _RangeHandler.fd = os.open(path, os.O_RDONLY)
    _RangeHandler.size = os.fstat(_RangeHandler.fd).st_size
    http.server.ThreadingHTTPServer(("127.0.0.1", port), _RangeHandler).serve_forever()


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the static server exited")
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the static server did not listen")


def timed(get: Callable[[int, int], bytes], size: int, blob_size: int, count: int) -> list[float]:
    rnd = random.Random(size)
    out: list[float] = []
    for i in range(WARMUP + count):
        off = rnd.randrange(0, blob_size - size)
        t = time.perf_counter()
        data = get(off, off + size)
        dt_ = time.perf_counter() - t
        if len(data) != size:
            raise RuntimeError(f"short read: {len(data)} of {size} bytes at {off}")
        if i >= WARMUP:
            out.append(dt_)
    return out


def raw_getter(host: str, path: str) -> Callable[[int, int], bytes]:
    conn = http.client.HTTPConnection(host, timeout=30)

    def get(lo: int, hi: int) -> bytes:
        conn.request("GET", path, headers={"Range": f"bytes={lo}-{hi - 1}"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 206:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}")
        return data

    return get


def human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=300, help="measured GETs per row")
    p.add_argument("--tag", default="", help="report name suffix")
    p.add_argument("--serve", nargs=2, metavar=("PATH", "PORT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve_static(a.serve[0], int(a.serve[1]))
        return 0
    if shutil.which("docker-registry") is None:
        print("docker-registry is missing: run scripts/setup.sh", file=sys.stderr)
        return 2

    load0 = os.getloadavg()[0]
    rows: list[tuple[str, str, int, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="reglat-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        blob = random.Random(0).randbytes(BLOB_SIZE)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        blob_file = work / "blob"
        blob_file.write_bytes(blob)
        del blob
        reg = RegistryServer("plain", work / "registry").start()
        port = free_port()
        static = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(blob_file), str(port)],
            stdin=subprocess.DEVNULL,
        )
        try:
            client = reg.client()
            client.push_blob(REPO_NAME, digest, blob_file)
            _wait_port(port, static)
            getters: list[tuple[str, str, Callable[[int, int], bytes]]] = [
                (
                    "docker-registry",
                    "ours",
                    lambda lo, hi: client.get_blob_range(REPO_NAME, digest, lo, hi),
                ),
                (
                    "docker-registry",
                    "raw",
                    raw_getter(reg.host, f"/v2/{REPO_NAME}/blobs/{digest}"),
                ),
                ("static", "raw", raw_getter(f"127.0.0.1:{port}", "/blob")),
            ]
            for size in SIZES:
                for server, kind, get in getters:
                    ts = timed(get, size, BLOB_SIZE, a.count)
                    rows.append((server, kind, size, ts))
                    print(
                        f"{server:16} {kind:5} {human(size):>8}: "
                        f"median {statistics.median(ts) * 1e3:.2f} ms",
                        flush=True,
                    )
        finally:
            static.terminate()
            static.wait(10)
            reg.stop()
    load1 = os.getloadavg()[0]

    date = dt.date.today().isoformat()
    name = f"reglat-{date}" + (f"-{a.tag}" if a.tag else "")
    lines = [
        f"# Registry request latency ({date})",
        "",
        "| server / client / size | median ms | p90 ms | MB/s at the median | vs static |",
        "|---|---:|---:|---:|---:|",
    ]
    floor = {s: statistics.median(ts) for srv, _, s, ts in rows if srv == "static"}
    for server, kind, size, ts in rows:
        ts = sorted(ts)
        med = statistics.median(ts)
        lines.append(
            f"| {server} / {kind} / {human(size)} | {med * 1e3:.2f} | "
            f"{ts[int(0.9 * len(ts))] * 1e3:.2f} | {size / med / 1e6:.0f} | "
            f"{med / floor[size]:.2f}x |"
        )
    med = {(srv, kind, size): statistics.median(ts) for srv, kind, size, ts in rows}
    own = ", ".join(
        f"{(med['docker-registry', 'raw', s] - med['static', 'raw', s]) * 1e3:.2f} ms at {human(s)}"
        for s in SIZES
    )
    ours = ", ".join(
        f"{(med['docker-registry', 'ours', s] - med['docker-registry', 'raw', s]) * 1e3:+.2f} ms "
        f"at {human(s)}"
        for s in SIZES
    )
    lines += [
        "",
        "Where the time goes: the registry's own time per GET (docker-registry minus the static "
        f"anchor, raw client): {own}. Our client's cost over a bare connection (ours minus raw, "
        f"docker-registry): {ours}. A serial lazy workload pays the first once per cache miss, "
        "on top of the link's round trip and transfer time.",
        "",
        f"{a.count} sequential range GETs per row at random offsets of a 128 MiB blob, after "
        f"{WARMUP} unmeasured; both servers on 127.0.0.1 (no shaping, no added RTT). "
        f"`ours` = nydus.registry.RegistryClient.get_blob_range, `raw` = one keep-alive "
        f"http.client connection; `static` = a minimal Python range server (the anchor).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, kernel {platform.release()}; load average (1 min) "
        f"{load0:.1f} before, {load1:.1f} after.",
        "",
    ]
    text = "\n".join(lines)
    out = REPO / "bench" / "results" / f"{name}.md"
    out.write_text(text)
    print(text)
    print(f"report: {out}")
    plot_after_run(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
