"""Trials of ``bench/fault.py`` that need no mounts of ours: the hostile tar corpus through
every consumer of layer tars, and secrets left readable by the snapshotter.

Hostile tars (``tests/hostile_tars.py``) go to three consumers:

* ``nydus-image create -t tar-rafs`` in a subprocess (time limit, private TMPDIR): the output
  directory must hold only its outputs and no canary path appear on the host;
* nydusify's layer reader (:class:`nydus.convert.rootfs.OciRootfs`) and
* the snapshotter's layer extractor, called through :func:`extract_into` (the one place to
  change when the extractor moves).

The last two run in a child process in its own mount namespace (``unshare --mount``), chrooted
into a fresh tmpfs that holds a sentinel tree (``/etc/passwd``, ``/tmp``, ``/sentinel``,
``/work/outside``) next to the extraction target ``/work/target``: after every case the
whole jail but the target is compared with its snapshot (paths, types, modes, owners, sizes,
link counts, contents), so a write, link or chmod outside the target counts as an escape, and
nothing of the host can be touched. The namespace and its tmpfs vanish with the child.

Secrets: ``containerd-nydus-grpc`` (debug log) gets the calls containerd's unpacker makes for a
Nydus image whose snapshot labels carry a pull user name and secret, then a container
snapshot on it (so it starts nydusd with the credentials); every file under its root, its
log, and the daemons' files are then read: a file holding the secret (or its base64 auth)
that other users can read (o+r and every parent directory o+x) counts.

Single-threaded.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard
from fault_rig import REPO, Image, Tally, child_env, cleanup_mounts, py_cli

HOST_CANARIES = ["/tmp/nydus-hostile-abs", "/tmp/nydus-hostile-through", "/evil", "/tmp/evil"]
QUICK_CASES = {  # --quick: the escapes, and a few that broke consumers before
    "dotdot",
    "dotdot-inner",
    "absolute-path",
    "hardlink-escape",
    "hardlink-absolute-outside",
    "hardlink-through-symlink",
    "file-through-symlink",
    "symlink-absolute",
    "bad-checksum",
    "truncated-gzip",
    "deep-path-ok",
    "duplicate-types",
}
SLOW_CASES = {"gzip-bomb-tar", "zstd-bomb-tar", "gzip-bomb-zeros", "many-entries"}


def layer_diff_id(data: bytes) -> str:
    """``sha256:`` of the uncompressed layer (gzip, zstd or plain)."""
    if data.startswith(b"\x1f\x8b"):
        raw = gzip.decompress(data)
    elif data.startswith(b"\x28\xb5\x2f\xfd"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(data)
    else:
        raw = data
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def extract_into(data: bytes, root: Path) -> None:
    """The snapshotter's layer extractor: unpack layer ``data`` into ``root``.

    The adapter of this bench: switch the import when the extractor moves."""
    from nydus.snapshotter.content.pull import extract_layer

    try:
        diff_id = layer_diff_id(data)
    except Exception:  # not decompressible: let the extractor say so
        diff_id = "sha256:" + "0" * 64
    extract_layer(data, root, diff_id)


# --------------------------------------------------------------------------- nydus-image


def _cases(a: argparse.Namespace) -> list[Any]:
    from hostile_tars import hostile_cases

    cases = hostile_cases()
    if a.quick:
        cases = [c for c in cases if c.name in QUICK_CASES]
    return cases


def _builder_trials(a: argparse.Namespace, work: Path, cases: list[Any]) -> Tally:
    t = Tally("hostile tars: nydus-image create")
    t0 = time.monotonic()
    refused = 0
    for case in cases:
        d = work / "tar-build" / case.name
        out, tmp = d / "out", d / "tmp"
        out.mkdir(parents=True)
        tmp.mkdir()
        layer = d / "layer"
        layer.write_bytes(case.make())
        t.trials += 1
        try:
            p = subprocess.run(
                [
                    *py_cli("nydus_image", "nydus-image"),
                    "create",
                    "-t",
                    "tar-rafs",
                    "-B",
                    "boot",
                    "-D",
                    "blobs",
                    "-J",
                    "out.json",
                    "--compressor",
                    "zstd",
                    str(layer),
                ],
                cwd=out,
                env={**child_env(), "TMPDIR": str(tmp)},
                capture_output=True,
                text=True,
                timeout=120,
            )
            t.traceback_in(p.stderr, f"nydus-image create ({case.name})")
            refused += p.returncode != 0
            extra = set(os.listdir(out)) - {"boot", "blobs", "out.json"}
            if extra or os.listdir(tmp):
                t.escapes += 1
                t.note(f"{case.name}: left {sorted(extra) or os.listdir(tmp)}")
        except subprocess.TimeoutExpired:
            t.hangs += 1
            t.note(f"{case.name}: no result in 120 s")
        for canary in HOST_CANARIES:
            if os.path.lexists(canary):
                t.escapes += 1
                t.note(f"{case.name} wrote {canary}")
        shutil.rmtree(d, ignore_errors=True)
    t.note(f"{refused} of {t.trials} layers refused with a clean error")
    t.seconds = time.monotonic() - t0
    return t


# --------------------------------------------------------------------------- the jail

_JAIL_CHILD = r"""
import io, json, os, shutil, signal, stat, subprocess, sys, traceback, hashlib
from pathlib import Path
sys.path[:0] = [sys.argv[3], sys.argv[4]]
import fault_jail
from nydus.errors import NydusError
from nydus.convert.rootfs import OciRootfs
cases_dir, jail = Path(sys.argv[1]), Path(sys.argv[2])
sys.setrecursionlimit(20000)  # shutil.rmtree recurses once a level: deep-path cases are 2000
cases = [(p.name, p.read_bytes()) for p in sorted(cases_dir.iterdir())]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g,mode=0755", "fault-jail", str(jail)],
               check=True)

def sentinel():
    for name in os.listdir("/"):
        p = "/" + name
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    for d in ("/etc", "/tmp", "/sentinel/sub", "/work/target"):
        os.makedirs(d)
    os.chmod("/tmp", 0o1777)
    Path("/etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    os.chmod("/etc/passwd", 0o644)
    Path("/etc/shadow").write_text("root:*:1:0:99999:7:::\n")
    os.chmod("/etc/shadow", 0o600)
    Path("/sentinel/sub/file").write_text("keep\n")
    Path("/work/outside").write_text("outside the target\n")
    os.symlink("/etc/passwd", "/sentinel/link")

def snapshot():
    out = {}
    for dp, dns, fns in os.walk("/"):
        if dp == "/work":
            dns[:] = [d for d in dns if d != "target"]
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            h = ""
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                h = os.readlink(p)
            out[p] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, h)
    return out

class CaseTimeout(BaseException):
    pass

def alarm(*_):
    raise CaseTimeout()

signal.signal(signal.SIGALRM, alarm)
# warm lazy imports before the chroot hides the interpreter's files
import tarfile, gzip, zstandard, tempfile
OciRootfs().apply(io.BytesIO(b"\0" * 1024))
with tempfile.TemporaryDirectory() as warm:
    fault_jail.extract_into(b"\0" * 1024, Path(warm))
os.chroot(str(jail))
os.chdir("/")
results = {}
for name, data in cases:
    res = {}
    for consumer in ("rootfs", "extract"):
        sentinel()
        before = snapshot()
        outcome = "ok"
        signal.alarm(30)
        try:
            if consumer == "rootfs":
                OciRootfs().apply(io.BytesIO(data))
            else:
                fault_jail.extract_into(data, Path("/work/target"))
        except NydusError as e:
            outcome = "error: " + str(e)[:120]
        except CaseTimeout:
            outcome = "hang"
        except BaseException as e:
            outcome = "exception: " + "".join(traceback.format_exception_only(e)).strip()[:200]
        finally:
            signal.alarm(0)
        after = snapshot()
        changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
        res[consumer] = {"outcome": outcome, "changed": changed[:10]}
    results[name] = res
print(json.dumps(results))
"""


def _jail_trials(a: argparse.Namespace, work: Path, cases: list[Any]) -> list[Tally]:
    rows = {
        "rootfs": Tally("hostile tars: nydusify layer reader (OciRootfs)"),
        "extract": Tally("hostile tars: snapshotter layer extractor"),
    }
    t0 = time.monotonic()
    cases_dir = work / "tar-cases"
    cases_dir.mkdir()
    skipped = []
    for case in cases:
        if case.name in SLOW_CASES and not a.tar_bombs:
            skipped.append(case.name)
            continue
        (cases_dir / case.name).write_bytes(case.make())
    jail = work / "jail"
    jail.mkdir()
    bench = Path(__file__).resolve().parent
    try:
        p = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                sys.executable,
                "-c",
                _JAIL_CHILD,
                str(cases_dir),
                str(jail),
                str(bench),
                str(REPO / "src"),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        for t in rows.values():
            t.hangs += 1
            t.note("the jail child did not finish in 30 min")
        return list(rows.values())
    if p.returncode:
        for t in rows.values():
            t.note(f"jail child failed ({p.returncode}): {p.stderr.strip()[-300:]}")
            t.traceback_in(p.stderr, "the jail child")
        return list(rows.values())
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for name, res in results.items():
        for consumer, r in res.items():
            t = rows[consumer]
            t.trials += 1
            out = r["outcome"]
            if out.startswith("error"):
                t.errors_clean += 1
            elif out == "hang":
                t.hangs += 1
                t.note(f"{name}: no result in 30 s")
            elif out.startswith("exception"):
                t.tracebacks += 1
                t.note(f"{name}: {out}")
            if r["changed"]:
                t.escapes += 1
                t.note(f"{name}: changed {', '.join(r['changed'][:3])}")
    for t in rows.values():
        t.seconds = time.monotonic() - t0
        t.note(f"{t.errors_clean} of {t.trials} layers refused with a NydusError")
        if skipped:
            t.note(
                f"not fed (decompression bombs / 200k entries, see --tar-bombs): "
                f"{', '.join(skipped)}"
            )
    return list(rows.values())


def trial_tar(a: argparse.Namespace, work: Path) -> list[Tally]:
    cases = _cases(a)
    return [_builder_trials(a, work, cases), *_jail_trials(a, work, cases)]


# --------------------------------------------------------------------------- secrets


def readable_by_others(path: Path) -> bool:
    """o+r on the file and o+x on every directory above it."""
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        for parent in path.parents:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True


def trial_secrets(a: argparse.Namespace, work: Path, img: Image) -> list[Tally]:
    import grpc
    from google.protobuf import empty_pb2

    from containerd import ARTICLE_NYDUSD_CONFIG, SnapshotterProcess
    from nydus.snapshotter.containerd.proto import SNAPSHOTS_SERVICE, snapshots_pb2
    from nydus.snapshotter.containerd.rpc import ServiceClient
    from nydus.snapshotter.daemons.imageconfig import PULL_SECRET, PULL_USERNAME
    from nydus.snapshotter.snapshots.labels import (
        CRI_IMAGE_REF,
        NYDUS_BLOB,
        NYDUS_BOOTSTRAP,
        SNAPSHOT_REF,
    )

    t = Tally("secrets: snapshotter root, log and daemon files")
    t0 = time.monotonic()
    secret = "fault-secret-" + os.urandom(6).hex()
    user = "fault-user"
    needles = [secret.encode(), base64.b64encode(f"{user}:{secret}".encode())]
    sock_dir = Path(tempfile.mkdtemp(prefix="nydus-fault-", dir="/tmp"))
    # like /var/lib/containerd-nydus: the root lies below world-searchable directories, so the
    # work directory (0700 when made by mkdtemp or pytest) must not hide what is under it
    base = Path(tempfile.mkdtemp(prefix="nydus-fault-secrets-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    root = base / "root"
    tpl = base / "nydusd.json"
    tpl.write_text(json.dumps(ARTICLE_NYDUSD_CONFIG))
    sn = SnapshotterProcess(
        root,
        sock_dir / "sn.sock",
        extra_args=[
            "--nydusd-config",
            str(tpl),
            "--daemon-start-timeout",
            "20",
            "--containerd-address",
            str(sock_dir / "no-containerd.sock"),
        ],
    )
    S = snapshots_pb2
    creds = {PULL_USERNAME: user, PULL_SECRET: secret}
    chain = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
    ref = {CRI_IMAGE_REF: "127.0.0.1:9/fault/image:latest"}
    try:
        sn.start()
        with grpc.insecure_channel(f"unix:{sn.address}") as ch:
            c = ServiceClient(ch, SNAPSHOTS_SERVICE, timeout=60)

            def call(method: str, req: Any, resp: Any) -> Any:
                try:
                    return c.unary(method, req, resp)
                except grpc.RpcError as e:
                    return e

            labels = {SNAPSHOT_REF: chain[0], NYDUS_BLOB: "true", **creds, **ref}
            call(
                "Prepare",
                S.PrepareSnapshotRequest(key=f"default/1/extract {chain[0]}", labels=labels),
                S.PrepareSnapshotResponse,
            )
            labels = {SNAPSHOT_REF: chain[1], NYDUS_BOOTSTRAP: "true", **creds, **ref}
            key = f"default/2/extract {chain[1]}"
            r = call(
                "Prepare",
                S.PrepareSnapshotRequest(key=key, parent=chain[0], labels=labels),
                S.PrepareSnapshotResponse,
            )
            if isinstance(r, grpc.RpcError):
                t.note(f"bootstrap Prepare failed: {r.details()}")
            else:
                m = r.mounts[0]
                upper = [o.split("=", 1)[1] for o in m.options if o.startswith("upperdir=")]
                fs = Path(upper[0]) if upper else Path(m.source)
                (fs / "image").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(img.bootstrap, fs / "image" / "image.boot")
                call(
                    "Commit",
                    S.CommitSnapshotRequest(name=chain[1], key=key, labels=labels),
                    empty_pb2.Empty,
                )
                r2 = call(
                    "Prepare",
                    S.PrepareSnapshotRequest(key="default/3/ctr", parent=chain[1], labels=creds),
                    S.PrepareSnapshotResponse,
                )
                if isinstance(r2, grpc.RpcError):
                    t.note(
                        f"container Prepare: {r2.code().name} (nydusd with the "
                        f"credentials was still started)"
                    )
                call("Remove", S.RemoveSnapshotRequest(key="default/3/ctr"), empty_pb2.Empty)
    except Exception as e:  # the trial measures what was written even if the flow broke
        t.note(f"snapshotter flow: {type(e).__name__}: {str(e)[:200]}")
    finally:
        sn.stop()
        cleanup_mounts([str(base), str(sock_dir)])
    paths = [p for p in [*root.rglob("*"), sn.log_path] if p.is_file() and not p.is_symlink()]
    paths += [p for p in Path("/run").glob("nydus*/**/*") if p.is_file()]
    holders = []
    for p in paths:
        t.trials += 1
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            holders.append(p)
            if readable_by_others(p):
                t.secrets += 1
                t.note(
                    f"{p.relative_to(base) if base in p.parents else p} "
                    f"({oct(p.stat().st_mode & 0o777)}) holds the secret"
                )
    t.traceback_in(sn.log_text(), "the snapshotter log")
    t.note(f"{len(holders)} files hold the secret, {t.secrets} readable by others")
    shutil.rmtree(sock_dir, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    t.seconds = time.monotonic() - t0
    return [t]
