"""The rig of ``bench/fault.py``: the test image, the registry, nydusd runs and tree reads that
never hang the bench, mount clean-up, and the per-finding tally.

* :func:`make_image` writes a source tree (compressible and incompressible files, 64 KiB
  chunks, zstd) and builds it with ``nydus-image create``; :class:`Image` knows every chunk's
  place in the blob (from the bootstrap) so trials can corrupt distinct chunks.
* :func:`publish` puts the blob in a real ``docker-registry`` (tests/registry.py) under
  ``sha256:<blob id>`` (what a converter publishing blobs under their ids gives nydusd).
* :class:`Daemon` runs ``nydusd`` (either ``fs_driver``); :meth:`Daemon.stop` and
  :func:`cleanup_mounts` always leave no mount behind: FUSE connections under the work
  directory (and the daemon's blob fs) are aborted through fusectl, then ``umount -l``.
* :func:`read_tree` reads every file in a worker thread with a deadline; a read still blocked
  then is a hang (the caller aborts the mounts, which unblocks it). Each file must read back
  as the source bytes or fail with an error; anything else counts wrong bytes.

Single-threaded use by the bench driver (``read_tree`` owns its worker threads).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "src", REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
# Every child (the snapshotter, nydusd, nydus-image) must run this checkout's code, not the
# package the virtualenv happens to point at.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)

from nydus.daemon.client import NydusdClient  # noqa: E402
from nydus.metadata import open_bootstrap  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
HANG_SECONDS = 10.0
BLOBFS_BASE = "/run/nydusd-blobfs"


def py_cli(module: str, prog: str) -> list[str]:
    """argv running one of our console scripts with this interpreter."""
    return [
        sys.executable,
        "-c",
        f"import sys; from nydus.cli.{module} import main; sys.argv[0] = {prog!r}; "
        "sys.exit(main())",
    ]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = str(REPO / "src")
    return env


@dataclass
class Tally:
    """One row of the report."""

    finding: str
    trials: int = 0
    wrong_bytes: int = 0
    hangs: int = 0
    escapes: int = 0
    tracebacks: int = 0
    secrets: int = 0
    notes: list[str] = field(default_factory=list)
    errors_clean: int = 0  # trials that ended in a clean error (EIO, exit code, NydusError)
    wrong_files: int = 0
    seconds: float = 0.0

    def note(self, text: str) -> None:
        if text not in self.notes and len(self.notes) < 12:
            self.notes.append(text)

    def traceback_in(self, text: str, what: str) -> None:
        if "Traceback" in text:
            self.tracebacks += 1
            last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:]
            self.note(f"traceback in {what}: {last[0][:160] if last else '?'}")


# --------------------------------------------------------------------------- the image


@dataclass(frozen=True)
class Chunk:
    offset: int  # compressed offset in the blob
    size: int  # compressed size


@dataclass
class Image:
    src: Path
    bootstrap: Path
    blob_dir: Path
    blob_id: str
    files: dict[str, bytes]  # relative path -> content
    chunks: list[Chunk]  # distinct chunks, by offset

    @property
    def blob(self) -> Path:
        return self.blob_dir / self.blob_id

    def chunk_of(self, offset: int) -> int | None:
        """Index of the chunk holding blob byte ``offset``, None outside every chunk."""
        for i, c in enumerate(self.chunks):
            if c.offset <= offset < c.offset + c.size:
                return i
        return None


def make_tree(root: Path, files: int, seed: int) -> dict[str, bytes]:
    """``files`` files of 1 KiB-512 KiB, half incompressible, half text-like, in 4 dirs."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(2, 9)).hex().encode() for _ in range(300)]
    out: dict[str, bytes] = {}
    for i in range(files):
        size = rng.choice((1 * KiB, 7 * KiB, 64 * KiB, 130 * KiB, 300 * KiB, 512 * KiB))
        size = rng.randrange(size // 2, size + 1)
        if i % 2:
            data = rng.randbytes(size)
        else:
            parts: list[bytes] = []
            n = 0
            while n < size:
                w = rng.choice(words) + b" "
                parts.append(w)
                n += len(w)
            data = b"".join(parts)[:size]
        rel = f"d{i % 4}/f{i:03d}.{'bin' if i % 2 else 'txt'}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        out[rel] = data
    return out


def make_image(work: Path, files: int = 48, seed: int = 7) -> Image:
    src = work / "src"
    shutil.rmtree(work, ignore_errors=True)
    src.mkdir(parents=True)
    content = make_tree(src, files, seed)
    blob_dir = work / "blobs"
    blob_dir.mkdir()
    boot = work / "image.boot"
    subprocess.run(
        [
            *py_cli("nydus_image", "nydus-image"),
            "create",
            "--bootstrap",
            str(boot),
            "--blob-dir",
            str(blob_dir),
            "--compressor",
            "zstd",
            "--chunk-size",
            "0x10000",
            str(src),
        ],
        check=True,
        capture_output=True,
        env=child_env(),
    )
    seen: set[tuple[int, int]] = set()
    with open_bootstrap(boot) as md:
        [info] = md.blobs
        for _path, nid in md.walk():
            if md.getattr(nid).is_reg:
                for c in md.chunks(nid):
                    seen.add((c.compressed_offset, c.compressed_size))
    chunks = [Chunk(o, s) for o, s in sorted(seen)]
    return Image(src, boot, blob_dir, info.blob_id, content, chunks)


def pick_offsets(
    img: Image, rng: random.Random, n: int, batch: int, blob_size: int
) -> list[list[int]]:
    """``n`` byte offsets of the blob in batches of up to ``batch``, each offset of a batch
    in a different chunk (offsets outside every chunk, the blob's metadata, one per batch)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    used: set[int | None] = set()
    while n > 0:
        if rng.random() < 0.9:  # mostly chunk data, sometimes anywhere (ci array, ToC)
            c = img.chunks[rng.randrange(len(img.chunks))]
            off = c.offset + rng.randrange(c.size)
        else:
            off = rng.randrange(blob_size)
        key = img.chunk_of(off)
        if key in used:
            if len(used) >= min(batch, len(img.chunks)):
                batches.append(cur)
                cur, used = [], set()
            continue
        used.add(key)
        cur.append(off)
        n -= 1
        if len(cur) >= batch:
            batches.append(cur)
            cur, used = [], set()
    if cur:
        batches.append(cur)
    return batches


def flip(path: Path, offsets: list[int], rng: random.Random) -> dict[int, int]:
    """XOR a random non-zero byte into each offset; returns the old bytes (for restore)."""
    old: dict[int, int] = {}
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)[0]
            old[off] = b
            f.seek(off)
            f.write(bytes([b ^ rng.randrange(1, 256)]))
    return old


def restore(path: Path, old: dict[int, int]) -> None:
    with open(path, "r+b") as f:
        for off, b in old.items():
            f.seek(off)
            f.write(bytes([b]))


# --------------------------------------------------------------------------- registry


def publish(reg: Any, img: Image, repo: str) -> Path:
    """Push the blob and file it under ``sha256:<blob id>``; returns that storage file."""
    from nydus.format import oci

    data = img.blob.read_bytes()
    real = oci.sha256_digest(data)
    with reg.client() as c:
        c.push_blob(repo, real, data)
    want = f"sha256:{img.blob_id}"
    dst: Path = reg.blob_path(want)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reg.blob_path(real), dst)
    link = (
        reg.storage
        / "docker/registry/v2/repositories"
        / repo
        / "_layers"
        / "sha256"
        / img.blob_id
        / "link"
    )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_text(want)
    return dst


def registry_config(host: str, repo: str, work_dir: Path, **extra: Any) -> dict[str, Any]:
    """The default nydusd config for a registry image (blob cache, digest_validate off)."""
    return {
        "device": {
            "backend": {
                "type": "registry",
                "config": {"scheme": "http", "host": host, "repo": repo},
            },
            "cache": {"type": "blobcache", "config": {"work_dir": str(work_dir)}},
        },
        "mode": "direct",
        **extra,
    }


def localfs_config(blob_dir: Path, work_dir: Path) -> dict[str, Any]:
    return {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
            "cache": {"type": "blobcache", "config": {"work_dir": str(work_dir)}},
        },
        "mode": "direct",
    }


# --------------------------------------------------------------------------- mounts


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fstype, major:minor) of every mount, in mount order."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        f = left.split()
        mp = f[4].replace("\\040", " ")
        out.append((mp, right.split()[0], f[2]))
    return out


def mounts_under(prefixes: list[str]) -> list[tuple[str, str, str]]:
    return [
        m
        for m in _mountinfo()
        if any(m[0] == p or m[0].startswith(p.rstrip("/") + "/") for p in prefixes)
    ]


def cleanup_mounts(prefixes: list[str]) -> int:
    """Abort every FUSE connection mounted under ``prefixes`` and lazily unmount all mounts
    there, deepest first; returns how many mounts there were."""
    found = mounts_under(prefixes)
    for _mp, fstype, dev in found:
        if fstype.startswith("fuse"):
            minor = dev.split(":")[1]
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")
    for mp, _fstype, _dev in sorted(found, key=lambda m: -len(m[0])):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    return len(found)


class Daemon:
    """One nydusd process serving ``bootstrap`` at ``mnt``."""

    def __init__(
        self,
        work: Path,
        config: dict[str, Any],
        bootstrap: Path,
        driver: str,
        name: str = "nydusd",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.work = work
        self.extra = extra  # more nydusd flags (e.g. --bootstrap-digest)
        self.mnt = work / f"{name}-mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.cfg = work / f"{name}.json"
        self.cfg.write_text(json.dumps(config))
        self.sock = work / f"{name}.sock"
        self.log = work / f"{name}.log"
        self.bootstrap = bootstrap
        self.driver = driver
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> bool:
        """Start and wait for the mount; False (daemon stopped, log kept) if it did not come
        up: a clean refusal when the log has no traceback."""
        self.sock.unlink(missing_ok=True)
        with open(self.log, "wb") as lf:
            self.proc = subprocess.Popen(
                [
                    *py_cli("nydusd", "nydusd"),
                    "--config",
                    str(self.cfg),
                    "--mountpoint",
                    str(self.mnt),
                    "--bootstrap",
                    str(self.bootstrap),
                    "--apisock",
                    str(self.sock),
                    "--fs-driver",
                    self.driver,
                    "--log-level",
                    "info",
                    *self.extra,
                ],
                stdout=lf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
                cwd=self.work,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                return False
            if (
                os.path.ismount(self.mnt)
                and self.state() == "RUNNING"
                and (self.driver != "erofs" or self._erofs_ready())
            ):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def state(self) -> str:
        try:
            return NydusdClient(str(self.sock), timeout=2).state()
        except Exception:
            return ""

    def _erofs_ready(self) -> bool:
        try:
            info = NydusdClient(str(self.sock), timeout=2).info()
            return info["backend_collection"].get("/", {}).get("erofs") is not None
        except Exception:
            return False

    def prefixes(self) -> list[str]:
        out = [str(self.mnt)]
        if self.proc is not None:
            out.append(f"{BLOBFS_BASE}/{self.proc.pid}")
        return out

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM (SIGKILL after ``timeout``), then clean every mount; True if it exited on
        its own within the timeout."""
        clean = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                clean = False
                cleanup_mounts(self.prefixes())
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        cleanup_mounts(self.prefixes())
        return clean


# --------------------------------------------------------------------------- reads


@dataclass
class ReadResult:
    wrong_bytes: int = 0
    wrong_files: int = 0
    errors: int = 0  # files that failed with an error (the allowed outcome under faults)
    hung: bool = False
    seconds: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)


def diff_bytes(got: bytes, want: bytes) -> int:
    n = min(len(got), len(want))
    a = int.from_bytes(got[:n], "big") ^ int.from_bytes(want[:n], "big")
    differing = 0
    if a:
        raw = a.to_bytes(n, "big")
        differing = n - raw.count(0)
    return differing + abs(len(got) - len(want))


def read_tree(
    mnt: Path,
    files: dict[str, bytes],
    *,
    timeout: float = 60.0,
    on_hang: Callable[[], object] | None = None,
    threads: int = 1,
) -> ReadResult:
    """Read every file (``threads`` workers); wrong bytes against ``files``. If the reads
    are not done within ``timeout`` (at least :data:`HANG_SECONDS` with no progress), it is a
    hang: ``on_hang`` is called (it should abort the mounts) and the workers are given 20 s
    more to come back."""
    res = ReadResult()
    lock = threading.Lock()
    names = sorted(files)
    progress = [time.monotonic()]

    def work(mine: list[str]) -> None:
        for rel in mine:
            try:
                with open(mnt / rel, "rb") as f:
                    got = f.read()
            except OSError as e:
                with lock:
                    res.errors += 1
                    k = e.strerror or type(e).__name__
                    res.error_kinds[k] = res.error_kinds.get(k, 0) + 1
                    progress[0] = time.monotonic()
                continue
            d = diff_bytes(got, files[rel])
            with lock:
                progress[0] = time.monotonic()
                if d:
                    res.wrong_bytes += d
                    res.wrong_files += 1

    t0 = time.monotonic()
    workers = [
        threading.Thread(target=work, args=(names[i::threads],), daemon=True)
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    while any(w.is_alive() for w in workers):
        now = time.monotonic()
        if now - progress[0] > HANG_SECONDS or now - t0 > timeout:
            res.hung = True
            if on_hang is not None:
                on_hang()
            for w in workers:
                w.join(20)
            break
        time.sleep(0.02)
    res.seconds = time.monotonic() - t0
    return res
