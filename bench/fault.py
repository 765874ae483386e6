"""Fault suite: measures what nydus-py does under corruption, faults, kills and hostile input.

    flock /tmp/nydus-heavy.lock .venv/bin/python bench/fault.py          # full run (root)
    .venv/bin/python bench/fault.py --quick --no-report                  # a few of each
    .venv/bin/python bench/fault.py --only tar,secrets                   # some trials only

Writes ``bench/results/fault-<date>[-tag].md`` and ``.json``: one row per finding with the
number of trials, wrong bytes served, reads hung more than 10 s, writes outside the target
(escapes), Python tracebacks on stderr (or escaping exceptions in-process), secrets readable by
other users, and notes. Every number should be 0 but the trials.

Trials (``--only`` names, each count a flag; defaults in :data:`DEFAULTS`):

* ``registry``: bytes of the data blob stored in a real docker-registry are flipped at random
  offsets (a batch of offsets in distinct chunks per mount), nydusd serves the image with the
  DEFAULT config (blob cache, ``digest_validate`` off), both ``fs_driver``s, every file is
  read and compared with the source tree: each must be right or fail with an error.
* ``cache``: a complete blob cache (``.blob.data``) with flipped bytes, daemon restarted.
* ``bootstrap``: flipped bytes and truncations of the bootstrap. Row 1: each mounted by nydusd
  with the good bootstrap's ``--bootstrap-digest`` (as the snapshotter mounts): must be
  refused. Row 2: ``nydus-image check`` and, every Nth, a plain ``nydusd --bootstrap`` mount
  and full read: structure checks alone cannot see a flip that leaves a consistent image (a
  dirent's nid naming another valid inode), so this row may show wrong bytes: without a digest,
  the bootstrap is the root of trust.
* ``proxy``: a fault proxy in front of the registry. Transport faults (resets, 5xx, 429,
  truncations, stalls, a wrong Content-Range, an ignored Range, a body longer than declared,
  and all of them mixed) on a share of the blob requests: 0 wrong bytes, no hang. And wrong
  bytes behind right headers (a shifted or flipped body): only verification catches those.
* ``sigkill``: nydusd SIGKILLed during 8-thread reads: readers back within 10 s, daemon gone,
  no mount left.
* ``tar``: the hostile tar corpus (tests/hostile_tars.py) through ``nydus-image create``,
  nydusify's layer reader (``OciRootfs``) and the snapshotter's layer extractor, the
  latter two in a chroot jail on a private tmpfs whose sentinel tree is compared after every
  case (``bench/fault_jail.py``).
* ``secrets``: the snapshotter with debug logging prepares a Nydus snapshot carrying a
  pull secret label; every file under its root, its log and the daemons' files are checked
  for other-readable modes holding the secret (``bench/fault_jail.py``).

Needs root, /dev/fuse, docker-registry (Debian's docker-registry package). Every trial has a
deadline and cleans its mounts (fusectl abort + ``umount -l``), so the bench never hangs.
Single-threaded driver.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_jail
from fault_rig import (
    REPO,
    Daemon,
    Image,
    ReadResult,
    Tally,
    child_env,
    cleanup_mounts,
    flip,
    localfs_config,
    make_image,
    pick_offsets,
    publish,
    py_cli,
    read_tree,
    registry_config,
    restore,
)

DRIVERS = ("erofs", "fusedev")
REPO_NAME = "fault/image"
DEFAULTS = {  # full run; --quick uses QUICK
    "registry": 500,
    "cache": 200,
    "bootstrap": 200,
    "proxy": 18,
    "proxy_content": 6,
    "sigkill": 100,
    "batch": 10,
    "bootstrap_mount_every": 5,
}
QUICK = {
    "registry": 6,
    "cache": 4,
    "bootstrap": 8,
    "proxy": 1,
    "proxy_content": 1,
    "sigkill": 2,
    "batch": 3,
    "bootstrap_mount_every": 4,
}
ALL = ("registry", "cache", "bootstrap", "proxy", "sigkill", "tar", "secrets")


def _account(t: Tally, r: ReadResult) -> None:
    t.wrong_bytes += r.wrong_bytes
    t.wrong_files += r.wrong_files
    if r.hung:
        t.hangs += 1


def _daemon_trial(t: Tally, d: Daemon, files: dict[str, bytes], what: str) -> ReadResult | None:
    """Start ``d``, read the tree, stop it; tallies wrong bytes, hangs and tracebacks."""
    try:
        if not d.start():
            t.traceback_in(d.log_text(), f"nydusd ({what})")
            t.errors_clean += 1
            t.note(f"{what}: nydusd did not come up")
            return None
        r = read_tree(d.mnt, files, on_hang=lambda: cleanup_mounts(d.prefixes()))
        _account(t, r)
        if r.hung:
            t.note(f"{what}: reads hung > 10 s")
        if r.errors:
            t.errors_clean += 1
        return r
    finally:
        if not d.stop():
            t.note(f"{what}: nydusd needed SIGKILL to stop")
        t.traceback_in(d.log_text(), f"nydusd ({what})")


# --------------------------------------------------------------------------- registry-side


def trial_registry(
    a: argparse.Namespace, work: Path, img: Image, reg: object, stored: Path
) -> list[Tally]:
    out = []
    rng = random.Random(a.seed)
    size = stored.stat().st_size
    for driver in DRIVERS:
        t = Tally(f"registry blob corruption, default config, {driver}")
        t0 = time.monotonic()
        for batch in pick_offsets(img, rng, a.registry, a.batch, size):
            old = flip(stored, batch, rng)
            try:
                cache = work / "cache-reg"
                shutil.rmtree(cache, ignore_errors=True)
                cfg = registry_config(reg.host, REPO_NAME, cache)  # type: ignore[attr-defined]
                r = _daemon_trial(
                    t, Daemon(work, cfg, img.bootstrap, driver), img.files, f"registry {driver}"
                )
                if r is not None and r.wrong_files:
                    t.note(
                        f"{r.wrong_files} files served wrong in one mount of "
                        f"{len(batch)} corrupted offsets"
                    )
            finally:
                restore(stored, old)
            t.trials += len(batch)
        t.seconds = time.monotonic() - t0
        t.note(f"{t.wrong_files} wrong files in all; {t.errors_clean} mounts had EIO reads")
        out.append(t)
    return out


# --------------------------------------------------------------------------- cache


def trial_cache(a: argparse.Namespace, work: Path, img: Image) -> list[Tally]:
    out = []
    rng = random.Random(a.seed + 1)
    for driver in DRIVERS:
        t = Tally(f"cache corruption (.blob.data), {driver}")
        t0 = time.monotonic()
        golden = work / f"cache-golden-{driver}"
        cache = work / "cache-run"
        shutil.rmtree(golden, ignore_errors=True)
        d = Daemon(work, localfs_config(img.blob_dir, golden), img.bootstrap, driver)
        r = _daemon_trial(t, d, img.files, f"cache fill {driver}")
        data = golden / f"{img.blob_id}.blob.data"
        if r is None or not data.exists():
            t.note(f"no complete cache to corrupt ({driver})")
            out.append(t)
            continue
        size = data.stat().st_size
        left = a.cache
        while left > 0:
            n = min(a.batch, left)
            # the cache holds uncompressed data: any offsets, spread over the file
            offs = sorted(rng.sample(range(size), n))
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(golden, cache)
            flip(cache / data.name, offs, rng)
            rr = _daemon_trial(
                t,
                Daemon(work, localfs_config(img.blob_dir, cache), img.bootstrap, driver),
                img.files,
                f"cache {driver}",
            )
            if rr is not None and rr.wrong_files:
                t.note(f"{rr.wrong_files} files served wrong after one restart with {n} flips")
            t.trials += n
            left -= n
        t.seconds = time.monotonic() - t0
        t.note(f"{t.wrong_files} wrong files in all")
        out.append(t)
    return out


# --------------------------------------------------------------------------- bootstrap


def _corrupt_bootstrap(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    kind = rng.random()
    if kind < 0.2:
        n = rng.randrange(0, len(data))
        return data[:n], f"truncated to {n}"
    buf = bytearray(data)
    flips = 1 if kind < 0.7 else rng.randrange(2, 9)
    used = [i for i, b in enumerate(data) if b]  # most of a small bootstrap is zero padding
    for _ in range(flips):
        # mostly bytes in use (superblock, inodes, dirents, chunk and blob tables)
        off = rng.choice(used) if used and rng.random() < 0.8 else rng.randrange(len(buf))
        buf[off] ^= rng.randrange(1, 256)
    return bytes(buf), f"{flips} byte(s) flipped"


def trial_bootstrap(a: argparse.Namespace, work: Path, img: Image) -> list[Tally]:
    """Two rows. With the digest: every corrupted bootstrap is mounted with the GOOD
    bootstrap's ``--bootstrap-digest`` (what the snapshotter passes, recorded when the layer
    was committed); each must be refused. Without it (plain ``nydusd --bootstrap``, and
    ``nydus-image check``): structure checks only; a flipped nid or name can make a consistent
    image whose every chunk verifies serve another file's bytes under a name; only a digest of
    the whole bootstrap, the root of trust, can see that."""
    t = Tally("bootstrap flips/truncations, no digest (check + plain nydusd --bootstrap)")
    td = Tally(
        "bootstrap flips/truncations, mounted with the recorded digest "
        "(--bootstrap-digest, as the snapshotter does)"
    )
    t0 = time.monotonic()
    rng = random.Random(a.seed + 2)
    good = img.bootstrap.read_bytes()
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    bad = work / "bad.boot"
    rejected = refused = refused_format = 0
    seconds_digest = 0.0
    for i in range(a.bootstrap):
        data, how = _corrupt_bootstrap(good, rng)
        bad.write_bytes(data)
        t.trials += 1
        try:
            p = subprocess.run(
                [*py_cli("nydus_image", "nydus-image"), "check", "--bootstrap", str(bad)],
                capture_output=True,
                text=True,
                timeout=30,
                env=child_env(),
            )
            t.traceback_in(p.stderr, f"nydus-image check ({how})")
            if p.returncode:
                rejected += 1
        except subprocess.TimeoutExpired:
            t.hangs += 1
            t.note(f"nydus-image check hung > 30 s ({how})")
        td0 = time.monotonic()
        td.trials += 1
        dd = Daemon(
            work,
            localfs_config(img.blob_dir, work / "cache-bootd"),
            bad,
            DRIVERS[i % 2],
            name="bootd",
            extra=("--bootstrap-digest", digest),
        )
        if not dd.start():
            td.traceback_in(dd.log_text(), f"nydusd --bootstrap-digest ({how})")
            text = dd.log_text()
            if "refusing to mount" in text:
                refused += 1
                td.errors_clean += 1
            elif "Traceback" not in text and "bootstrap" in text:
                refused_format += 1  # not a bootstrap at all: refused before any hashing
                td.errors_clean += 1
            else:
                td.note(f"{how}: nydusd did not come up, without the digest message")
        else:  # served although its digest differs: count what it serves
            r = read_tree(
                dd.mnt, img.files, on_hang=functools.partial(cleanup_mounts, dd.prefixes())
            )
            _account(td, r)
            td.note(f"{how}: MOUNTED despite --bootstrap-digest; {r.wrong_files} files wrong")
            dd.stop()
        shutil.rmtree(work / "cache-bootd", ignore_errors=True)
        seconds_digest += time.monotonic() - td0
        if i % a.bootstrap_mount_every == 0:
            d = Daemon(
                work,
                localfs_config(img.blob_dir, work / f"cache-boot-{i}"),
                bad,
                DRIVERS[i // a.bootstrap_mount_every % 2],
                name="boot",
            )
            r = _daemon_trial(t, d, img.files, f"mount of a bad bootstrap ({how})")
            shutil.rmtree(work / f"cache-boot-{i}", ignore_errors=True)
            if r is not None and r.wrong_files:
                t.note(f"{how}: {r.wrong_files} files read wrong from the mount")
    td.note(
        f"refused {refused} of {td.trials} ('bootstrap ... is sha256:..., expected "
        f"sha256:...: refusing to mount') and {refused_format} before hashing (too short "
        f"to be a bootstrap: no magic), both drivers in turn"
    )
    t.note(
        f"nydus-image check rejected {rejected} of {t.trials}; a mount was tried for every "
        f"{a.bootstrap_mount_every}th (both drivers in turn); wrong bytes = file content "
        f"differing from the source tree without an error. Without a digest a consistent "
        f"but different image can be served: the bootstrap is the root of trust (the "
        f"snapshotter passes the digest it recorded; see the row above)"
    )
    td.seconds = seconds_digest
    t.seconds = time.monotonic() - t0 - seconds_digest
    return [td, t]


# --------------------------------------------------------------------------- proxy


def _proxy_faults(kind: str, rng: random.Random) -> list[object]:
    from registry import Fault

    blob = r"/blobs/sha256:"
    p = 0.3
    table: dict[str, list[Fault]] = {
        "reset": [Fault("reset", blob, "GET", None, after=rng.randrange(0, 4096), probability=p)],
        "5xx": [
            Fault("status", blob, "GET", None, status=rng.choice((500, 502, 503)), probability=p)
        ],
        "429": [
            Fault(
                "status", blob, "GET", None, status=429, headers={"Retry-After": "1"}, probability=p
            )
        ],
        "truncation": [
            Fault("short", blob, "GET", None, after=rng.randrange(0, 4096), probability=p)
        ],
        "stall": [
            Fault(
                "stall",
                blob,
                "GET",
                None,
                after=rng.randrange(0, 4096),
                seconds=6.0,
                probability=0.15,
            )
        ],
        "bad-content-range": [Fault("bad_range", blob, "GET", None, probability=p)],
        "ignore-range": [Fault("ignore_range", blob, "GET", None, probability=p)],
        "long-body": [Fault("long", blob, "GET", None, probability=p)],
        "shifted-body": [Fault("shift_body", blob, "GET", None, probability=p)],
        "flipped-body": [
            Fault("flip", blob, "GET", None, after=rng.randrange(1 << 20), probability=p)
        ],
    }
    if kind == "mixed":  # every transport kind at once, each on a small share of requests
        mixed = []
        for k in TRANSPORT_KINDS[1:]:
            for f in table[k]:
                f.probability = 0.02 if k == "stall" else 0.05
                mixed.append(f)
        return list(mixed)
    return list(table[kind])


TRANSPORT_KINDS = (
    "mixed",
    "reset",
    "5xx",
    "429",
    "truncation",
    "stall",
    "bad-content-range",
    "ignore-range",
    "long-body",
)
CONTENT_KINDS = ("shifted-body", "flipped-body")


def _proxy_row(
    title: str,
    kinds: tuple[str, ...],
    trials: int,
    rng: random.Random,
    work: Path,
    img: Image,
    reg: object,
    driver: str,
) -> Tally:
    from registry import FaultProxy

    t = Tally(f"{title}, {driver}")
    t0 = time.monotonic()
    requests = 0
    by_kind: dict[str, int] = {}
    for i in range(trials):
        kind = kinds[i % len(kinds)]
        proxy = FaultProxy(reg, seed=rng.randrange(1 << 30))  # type: ignore[arg-type]
        try:
            proxy.add(*_proxy_faults(kind, rng))  # type: ignore[arg-type]
            cache = work / "cache-proxy"
            shutil.rmtree(cache, ignore_errors=True)
            cfg = registry_config(proxy.host, REPO_NAME, cache)
            r = _daemon_trial(
                t, Daemon(work, cfg, img.bootstrap, driver), img.files, f"proxy {kind} {driver}"
            )
            requests += sum(1 for rec in proxy.records if "/blobs/" in rec.path)
            if r is not None and r.wrong_bytes:
                by_kind[kind] = by_kind.get(kind, 0) + r.wrong_bytes
        finally:
            proxy.stop()
        t.trials += 1
    t.seconds = time.monotonic() - t0
    t.note(
        f"{requests} blob requests through the proxy; one kind per mount, in turn: "
        + ", ".join(kinds)
    )
    if by_kind:
        t.note("wrong bytes by kind: " + ", ".join(f"{k} {v}" for k, v in by_kind.items()))
    return t


def trial_proxy(a: argparse.Namespace, work: Path, img: Image, reg: object) -> list[Tally]:
    """Transport faults (must cost retries or EIO only) and wrong bytes behind right headers
    (a broken cache or CDN: only verification can catch them)."""
    out = []
    rng = random.Random(a.seed + 3)
    for driver in DRIVERS:
        out.append(
            _proxy_row(
                "fault proxy, transport faults",
                TRANSPORT_KINDS,
                a.proxy,
                rng,
                work,
                img,
                reg,
                driver,
            )
        )
        out[-1].note(
            "a kind faults about 30 % of blob GETs (stalls: 15 %, 6 s); mixed: "
            "each kind on 5 % (stalls 2 %)"
        )
        out.append(
            _proxy_row(
                "fault proxy, wrong bytes behind right headers",
                CONTENT_KINDS,
                a.proxy_content,
                rng,
                work,
                img,
                reg,
                driver,
            )
        )
        out[-1].note(
            "shifted-body: a 206 with the asked Content-Range over the bytes one "
            "further; flipped-body: one byte of a body inverted; on 30 % of blob GETs"
        )
    return out


# --------------------------------------------------------------------------- SIGKILL


def trial_sigkill(a: argparse.Namespace, work: Path, img: Image) -> list[Tally]:
    """SIGKILLs during 8-thread reads, through the loop the kernel tests run
    (tests/daemon_death.py: readers check every byte and keep dropping cached pages so reads
    reach the daemon; hung = the daemon not gone, a reader not back within 10 s, umount
    failing or a connection the clean-up had to abort). nydusd runs as users run it (its
    death watch on)."""
    sys.path.insert(0, str(REPO / "tests"))
    from daemon_death import kill_during_reads

    out = []
    for k, driver in enumerate(DRIVERS):
        t = Tally(f"SIGKILL of nydusd during 8-thread reads, {driver}")
        t0 = time.monotonic()
        rep = kill_during_reads(
            work / f"death-{driver}",
            driver,
            a.sigkill,
            threads=8,
            seed=a.seed + 4 + k,
            reader_timeout=10.0,
        )
        t.trials = len(rep.rounds)
        t.hangs = len(rep.hangs)
        t.wrong_bytes = rep.mismatches  # reads with wrong bytes (each checked in full)
        t.wrong_files = rep.mismatches
        for r in rep.hangs[:5]:
            t.note(
                f"round {r.round} hung: exit {r.exit_s}, readers {r.readers_s}, umount ok "
                f"{r.umount_ok}, left {r.left_mounts}, aborted {r.aborted} {r.note}"
            )
        t.note(rep.summary())
        t.note(f"mounts left after clean-up: {sum(len(r.left_mounts) for r in rep.rounds)}")
        t.seconds = time.monotonic() - t0
        out.append(t)
    return out


# --------------------------------------------------------------------------- driver


def run(a: argparse.Namespace) -> list[Tally]:
    only = a.only.split(",") if a.only else list(ALL)
    unknown = set(only) - set(ALL)
    if unknown:
        raise SystemExit(f"unknown trials {sorted(unknown)}; choose from {ALL}")
    work = Path(tempfile.mkdtemp(prefix="nydus-fault-", dir=a.work))
    results: list[Tally] = []
    try:
        img = make_image(work / "image", files=a.files)
        needs_registry = {"registry", "proxy"} & set(only)
        reg = None
        steps: list[tuple[str, Callable[[], list[Tally]]]] = []
        if needs_registry:
            from registry import RegistryServer

            reg = RegistryServer("plain", work / "registry").start()
            stored = publish(reg, img, REPO_NAME)
            if "registry" in only:
                steps.append(("registry", lambda: trial_registry(a, work, img, reg, stored)))
            if "proxy" in only:
                steps.append(("proxy", lambda: trial_proxy(a, work, img, reg)))
        if "cache" in only:
            steps.append(("cache", lambda: trial_cache(a, work, img)))
        if "bootstrap" in only:
            steps.append(("bootstrap", lambda: trial_bootstrap(a, work, img)))
        if "sigkill" in only:
            steps.append(("sigkill", lambda: trial_sigkill(a, work, img)))
        if "tar" in only:
            steps.append(("tar", lambda: fault_jail.trial_tar(a, work)))
        if "secrets" in only:
            steps.append(("secrets", lambda: fault_jail.trial_secrets(a, work, img)))
        try:
            for name, step in steps:
                print(f"fault: {name} ...", file=sys.stderr, flush=True)
                rows = step()
                for r in rows:
                    print(
                        f"  {r.finding}: {r.trials} trials, {r.wrong_bytes} wrong bytes, "
                        f"{r.hangs} hangs, {r.escapes} escapes, {r.tracebacks} tracebacks, "
                        f"{r.secrets} secrets ({r.seconds:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
                results.extend(rows)
        finally:
            if reg is not None:
                reg.stop()
    finally:
        cleanup_mounts([str(work)])
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def report(a: argparse.Namespace, results: list[Tally], seconds: float) -> str:
    now = dt.datetime.now()
    git = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"# Fault suite, {now:%Y-%m-%d %H:%M}{' (quick)' if a.quick else ''}",
        "",
        f"git {git}, python {platform.python_version()}, kernel {platform.release()}, "
        f"seed {a.seed}, {seconds / 60:.1f} min. Image: {a.files} files (half incompressible, "
        f"half text, 0.5-512 KiB), zstd, 64 KiB chunks. Command: `{' '.join(sys.argv)}`.",
        "",
        "| finding | trials | wrong bytes | hangs > 10 s | escapes | tracebacks | "
        "secrets readable by others | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        notes = "; ".join(r.notes).replace("|", "/")
        lines.append(
            f"| {r.finding} | {r.trials} | {r.wrong_bytes} | {r.hangs} | {r.escapes} "
            f"| {r.tracebacks} | {r.secrets} | {notes} |"
        )
    lines += [
        "",
        "Trials: registry and cache rows count corrupted byte offsets (several per mount, in "
        "distinct chunks); bootstrap rows count corrupted bootstraps; proxy rows count mounts "
        "read in full through a faulty proxy; SIGKILL rows count kills; tar rows count "
        "hostile layers per consumer; the secrets row counts files checked. Wrong bytes: "
        "bytes of files read without error that differ from the source tree. Hangs: reads "
        "(or a command) blocked more than 10 s. Tracebacks: Python tracebacks on any stderr "
        "or log, or an exception other than a NydusError escaping an in-process consumer.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few trials of each kind")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL)}")
    for k in DEFAULTS:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--files", type=int, default=48, help="files in the test image")
    ap.add_argument(
        "--tar-bombs",
        action="store_true",
        help="also feed the decompression bombs to the extractor and OciRootfs",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default="/var/tmp", help="parent of the work directory")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--tag", default="", help="suffix of the report's file name")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    base = QUICK if a.quick else DEFAULTS
    for k, v in base.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.files = min(a.files, 16)
    if os.geteuid() != 0:
        print("fault: needs root (mounts)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    results = run(a)
    text = report(a, results, time.monotonic() - t0)
    print(text)
    rows = [asdict(r) for r in results]
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if not a.no_report:
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        stem = f"fault-{dt.date.today():%Y-%m-%d}" + (f"-{a.tag}" if a.tag else "")
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
        from plot import plot_after_run  # bench/plot.py: PNG beside the report

        plot_after_run(out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
