"""SIGKILL nydusd while threads read its mount, many times over: nothing may hang.

:func:`kill_during_reads` is the loop the kernel tests (tests/integration/test_daemon_death.py)
and the fault suite (bench/fault.py) run. Per round: start ``nydusd`` (the real CLI, one image,
a fresh blob cache) with ``fs_driver`` ``erofs`` or ``fusedev``; start a reader process whose
threads read random page-aligned ranges of the image's files (checking every byte they get);
SIGKILL the daemon after a random moment; then measure how long the process takes to be gone,
and how long until every reader thread has returned (with data or an error: the readers stop
at their first error, or when told to after the kill); unmount with ``umount -l`` (in a
subprocess with a timeout: a hung unmount is measured, never waited for) and check that no
mount is left. A round that hangs is cleaned up by aborting the daemon's FUSE connections
(:mod:`nydus.fusectl`), so a failing run never leaves a stuck process behind; it is reported.

Needs root, /dev/fuse and (for ``erofs``) a kernel with file-backed EROFS. No pytest: a plain
function with a plain result (:class:`DeathReport`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
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

from nydus import fusectl
from nydus.daemon.client import NydusdClient

__all__ = ["DeathReport", "RoundResult", "build_image", "kill_during_reads"]

_BOOT = "import sys; from nydus.cli.{mod} import main; sys.argv[0] = '{prog}'; sys.exit(main())"

# The reader process: argv = image root, source root, threads, seed, directories whose files'
# cached pages a thread keeps dropping (comma-separated). Threads read until their first error
# or until stdin reaches EOF; prints one JSON line, exits 0.
_READER = r"""
import errno, json, os, random, sys, threading
root, src, nthreads, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
drops = [d for d in sys.argv[5].split(",") if d]
names = sorted(os.listdir(src))
want = {n: open(os.path.join(src, n), 'rb').read() for n in names}
stop = threading.Event()
res = [None] * nthreads
def reader(t):
    rnd = random.Random(seed * 1000 + t)
    ok = bad = 0
    err = None
    where = []
    while not stop.is_set():
        n = rnd.choice(names)
        size = len(want[n])
        off = rnd.randrange(0, max(1, size // 4096)) * 4096
        ln = rnd.choice((4096, 16384, 65536, 262144))
        try:
            fd = os.open(os.path.join(root, n), os.O_RDONLY)
            try:
                got = os.pread(fd, ln, off)
            finally:
                os.close(fd)
        except OSError as e:
            err = e.errno
            break
        exp = want[n][off:off + ln]
        if got != exp[:len(got)]:  # a short read (an error after some bytes) is not wrong
            bad += 1
            i = next(i for i in range(len(got)) if got[i] != exp[i])
            where.append(f"{n}@{off}+{ln}: got {len(got)}, first wrong byte at +{i}, "
                         f"{'zeros' if not any(got[i:i + 4096]) else 'other bytes'}")
        ok += 1
    res[t] = {"ok": ok, "mismatch": bad, "errno": err, "where": where[:3]}
ths = [threading.Thread(target=reader, args=(t,), daemon=True) for t in range(nthreads)]
for th in ths:
    th.start()
def eof():
    sys.stdin.buffer.read()
    stop.set()
threading.Thread(target=eof, daemon=True).start()
def drop():  # keep data out of the page cache, so reads keep reaching the daemon
    while not stop.wait(0.05):
        for d in drops:
            try:
                for n in os.listdir(d):
                    fd = os.open(os.path.join(d, n), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
            except OSError:
                pass
threading.Thread(target=drop, daemon=True).start()
for th in ths:
    th.join()
print(json.dumps(res), flush=True)
"""


def _cli(prog: str) -> list[str]:
    return [sys.executable, "-c", _BOOT.format(mod=prog.replace("-", "_"), prog=prog)]


@dataclass
class RoundResult:
    """One SIGKILL. Times in seconds; None where the thing did not happen in time (a hang)."""

    round: int
    delay: float  # readers' start -> SIGKILL
    exit_s: float | None  # SIGKILL -> the process gone (reaped)
    readers_s: float | None  # SIGKILL -> every reader thread returned
    reads: int = 0  # successful reads (all bytes checked)
    mismatches: int = 0  # reads that returned wrong bytes (must be 0)
    wrong: list[str] = field(default_factory=list)  # a few of them: where, what
    errnos: dict[str, int] = field(default_factory=dict)  # errno name -> threads ending on it
    umount_ok: bool = True
    left_mounts: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)  # connections the clean-up had to abort
    seconds: float = 0.0  # the whole round, start-up and clean-up included
    note: str = ""

    @property
    def hung(self) -> bool:
        return (
            self.exit_s is None
            or self.readers_s is None
            or not self.umount_ok
            or bool(self.left_mounts)
            or bool(self.aborted)
        )


@dataclass
class DeathReport:
    driver: str
    death_watch: bool
    rounds: list[RoundResult] = field(default_factory=list)

    @property
    def hangs(self) -> list[RoundResult]:
        return [r for r in self.rounds if r.hung]

    @property
    def mismatches(self) -> int:
        return sum(r.mismatches for r in self.rounds)

    def summary(self) -> str:
        n = len(self.rounds)
        exits = [r.exit_s for r in self.rounds if r.exit_s is not None]
        readers = [r.readers_s for r in self.rounds if r.readers_s is not None]
        return (
            f"{self.driver} (death watch {'on' if self.death_watch else 'off'}): {n} SIGKILLs,"
            f" {len(self.hangs)} hung, {self.mismatches} wrong reads, exit max "
            f"{max(exits, default=0):.2f}s, readers max {max(readers, default=0):.2f}s, "
            f"{sum(r.reads for r in self.rounds)} reads"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "death_watch": self.death_watch,
            "rounds": [asdict(r) for r in self.rounds],
            "summary": self.summary(),
        }


def build_image(work: Path, files: int = 12, size: int = 3 << 20) -> tuple[Path, Path, Path]:
    """A one-blob image of ``files`` random files of ``size`` bytes under ``work``:
    (source dir, bootstrap, blob dir). Built once; reused when already there."""
    src, boot, blobs = work / "src", work / "boot", work / "blobs"
    if boot.is_file() and src.is_dir() and any(blobs.iterdir()):
        return src, boot, blobs
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(blobs, ignore_errors=True)
    src.mkdir(parents=True)
    blobs.mkdir()
    rnd = random.Random(1)
    for i in range(files):
        (src / f"f{i:02d}").write_bytes(rnd.randbytes(size))
    r = subprocess.run(
        [
            *_cli("nydus-image"),
            "create",
            "--bootstrap",
            str(boot),
            "--blob-dir",
            str(blobs),
            "--compressor",
            "zstd",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        raise RuntimeError(f"nydus-image create failed: {r.stderr[-2000:]}")
    return src, boot, blobs


def _mounted(mnt: str) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == mnt or parts[4].startswith(mnt + "/"):
                out.append(f"{parts[4]} ({parts[parts.index('-') + 1]})")
    return out


def _umount_lazy(path: str, timeout: float) -> bool:
    """``umount -l`` every mount at or under ``path`` (deepest first), each in a subprocess
    with a timeout: False if one of them did not return in time."""
    ok = True
    for _ in range(4):
        left = sorted({m.split(" (")[0] for m in _mounted(path)}, key=len, reverse=True)
        if not left:
            break
        for m in left:
            try:
                subprocess.run(
                    ["umount", "-l", m], capture_output=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired:
                ok = False
    return ok


def _wait_ready(
    proc: subprocess.Popen[bytes],
    sock: Path,
    mnt: str,
    driver: str,
    log: Path,
    timeout: float = 30.0,
) -> dict[str, Any]:
    client = NydusdClient(str(sock), timeout=2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"nydusd exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if client.state() == "RUNNING":
                info = client.info()
                kinds = [m.rsplit(" (", 1)[1] for m in _mounted(mnt) if m.startswith(mnt + " (")]
                if (driver == "erofs" and "erofs)" in kinds) or (
                    driver == "fusedev" and any(k.startswith("fuse") for k in kinds)
                ):
                    return dict(info)
        except Exception:  # not up yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nydusd not ready in {timeout}s: {log.read_text(errors='replace')[-3000:]}")


def _one_round(
    n: int,
    work: Path,
    src: Path,
    boot: Path,
    blobs: Path,
    driver: str,
    rnd: random.Random,
    threads: int,
    death_watch: bool,
    exit_timeout: float,
    reader_timeout: float,
) -> RoundResult:
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    mp = fusectl.host_path(mnt)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = work / "nydusd.json"
    cfg.write_text(
        json.dumps(
            {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                    "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}},
                },
                "mode": "direct",
                "fs_driver": driver,
            }
        )
    )
    sock = work / "api.sock"
    log = work / f"nydusd-{n}.log"
    env = dict(os.environ)
    env["NYDUSD_DEATH_WATCH"] = "1" if death_watch else "0"
    with open(log.with_suffix(".err"), "wb") as err:  # the death watcher's line lands here
        proc = subprocess.Popen(
            [
                *_cli("nydusd"),
                "--config",
                str(cfg),
                "--mountpoint",
                mp,
                "--bootstrap",
                str(boot),
                "--apisock",
                str(sock),
                "--log-file",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    readers: subprocess.Popen[bytes] | None = None
    res = RoundResult(n, 0.0, None, None)
    blobfs = ""
    try:
        info = _wait_ready(proc, sock, mp, driver, log)
        blobfs = str(info.get("blobfs") or "")
        drops = ",".join([mp] + ([blobfs] if blobfs else []))
        readers = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _READER,
                mp,
                str(src),
                str(threads),
                str(rnd.randrange(1 << 30)),
                drops,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        res.delay = rnd.uniform(0.05, 0.8)
        time.sleep(res.delay)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(exit_timeout)
            res.exit_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            res.note = _stuck_threads(proc.pid)
        assert readers.stdin is not None
        readers.stdin.close()  # readers stop at their next read (or ended at their first error)
        try:
            readers.wait(max(0.0, reader_timeout - (time.monotonic() - t0)))
            res.readers_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            pass
        else:
            assert readers.stdout is not None and readers.stderr is not None
            out = readers.stdout.read()
            try:
                for r in json.loads(out or b"[]"):
                    res.reads += r["ok"]
                    res.mismatches += r["mismatch"]
                    res.wrong += r["where"]
                    if r["errno"] is not None:
                        name = errno.errorcode.get(r["errno"], str(r["errno"]))
                        res.errnos[name] = res.errnos.get(name, 0) + 1
            except (ValueError, KeyError, TypeError):
                res.note += f" reader output unreadable: {readers.stderr.read()[-500:]!r}"
        if res.exit_s is not None and res.readers_s is not None:
            # the daemon is gone: unmounting its dead mounts must work, without help
            res.umount_ok = _umount_lazy(mp, 10.0) and (not blobfs or _umount_lazy(blobfs, 10.0))
            res.left_mounts = _mounted(mp) + (_mounted(blobfs) if blobfs else [])
    except Exception as e:  # not a hang: a failure to set up the round
        res.note += f" {type(e).__name__}: {e}"
        res.umount_ok = False
    finally:
        _clean_up(res, proc, readers, mp, blobfs)
    return res


def _stuck_threads(pid: int) -> str:
    """Where the threads of a process that would not die are waiting (kernel stacks)."""
    lines = []
    try:
        for tid in sorted(os.listdir(f"/proc/{pid}/task"))[:16]:
            try:
                stack = Path(f"/proc/{pid}/task/{tid}/stack").read_text().split("\n")[:6]
            except OSError:
                stack = []
            frames = [s.split("] ", 1)[-1].split("+")[0] for s in stack if s]
            state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()[0]
            lines.append(f"{tid} {state} {' < '.join(frames)}")
    except OSError:
        pass
    return "; ".join(lines)


def _clean_up(
    res: RoundResult,
    proc: subprocess.Popen[bytes],
    readers: subprocess.Popen[bytes] | None,
    mp: str,
    blobfs: str,
) -> None:
    if proc.poll() is None:
        proc.kill()
    hung = res.exit_s is None or res.readers_s is None
    for _ in range(2):
        try:
            proc.wait(3)
            break
        except subprocess.TimeoutExpired:  # stuck in the kernel: abort its connections
            res.aborted += [
                f"{m.mountpoint}:{m.conn}"
                for m in fusectl.abort_mounts([mp] + ([blobfs] if blobfs else []), below=True)
            ]
    if readers is not None and readers.poll() is None:
        if hung:
            res.aborted += [
                f"{m.mountpoint}:{m.conn}"
                for m in fusectl.abort_mounts([mp] + ([blobfs] if blobfs else []), below=True)
            ]
        readers.kill()
        try:
            readers.wait(10)
        except subprocess.TimeoutExpired:
            res.note += " reader process would not die"
    if readers is not None:
        for pipe in (readers.stdout, readers.stderr):
            if pipe is not None:
                pipe.close()
    _umount_lazy(mp, 10.0)
    if blobfs:
        _umount_lazy(blobfs, 10.0)
        for d in (blobfs, os.path.dirname(blobfs)):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def kill_during_reads(
    work: Path,
    driver: str = "erofs",
    rounds: int = 10,
    *,
    threads: int = 8,
    seed: int = 0,
    death_watch: bool = True,
    exit_timeout: float = 5.0,
    reader_timeout: float = 10.0,
    progress: Callable[[RoundResult], None] | None = None,
) -> DeathReport:
    """SIGKILL nydusd ``rounds`` times while ``threads`` threads read its mount (see the
    module docstring). ``work`` holds the image (built once), the cache and logs.
    ``death_watch`` False runs the daemons with ``NYDUSD_DEATH_WATCH=0``: whether the daemon
    alone never hangs. ``progress`` is called after each round."""
    if driver not in ("erofs", "fusedev"):
        raise ValueError(f"driver must be erofs or fusedev, not {driver!r}")
    work.mkdir(parents=True, exist_ok=True)
    src, boot, blobs = build_image(work)
    rnd = random.Random(seed)
    report = DeathReport(driver, death_watch)
    for n in range(rounds):
        t0 = time.monotonic()
        r = _one_round(
            n,
            work,
            src,
            boot,
            blobs,
            driver,
            rnd,
            threads,
            death_watch,
            exit_timeout,
            reader_timeout,
        )
        r.seconds = time.monotonic() - t0
        report.rounds.append(r)
        if progress is not None:
            progress(r)
    return report


if __name__ == "__main__":  # python tests/daemon_death.py WORK [DRIVER] [ROUNDS] [watch|nowatch]
    a = sys.argv[1:]
    rep = kill_during_reads(
        Path(a[0]),
        a[1] if len(a) > 1 else "erofs",
        int(a[2]) if len(a) > 2 else 10,
        death_watch=(a[3] != "nowatch") if len(a) > 3 else True,
        progress=lambda r: print(json.dumps(asdict(r)), flush=True),
    )
    print(rep.summary())
    sys.exit(1 if rep.hangs or rep.mismatches else 0)
