"""containerd test harness: Debian's containerd with our snapshotter as a proxy plugin.

Import into a test module (``tests/`` is on ``sys.path``)::

    from containerd import Containerd, SnapshotterProcess, containerd_skip_reason
    from containerd import build_busybox_layout, skopeo_push

Pieces:

- :class:`SnapshotterProcess`: ``containerd-nydus-grpc`` in a subprocess (this interpreter's
  venv) with its own root and socket, waited for until its Snapshots service answers;
  :meth:`~SnapshotterProcess.restart`, and :meth:`~SnapshotterProcess.stop` (SIGTERM, expects
  exit 0). :class:`InProcessSnapshotter` serves the same socket from this process, for tests
  that inject a test :class:`~nydus.snapshotter.snapshots.mounter.NydusMounter`.
- :class:`Containerd`: ``containerd --config FILE`` with a config the harness writes: its own
  ``root``, ``state`` and gRPC socket, the CRI plugin disabled, and the article's section-06
  ``config.toml`` snippet verbatim (``[proxy_plugins.nydus] type = "snapshot"``, plus the
  ``[plugins.cri]`` lines that only matter with CRI) with ``address`` pointing at our
  snapshotter. With ``content_proxy``, the config is a version-2 one whose content store is our
  snapshotter too (:data:`CONTENT_PROXY_SNIPPET`: containerd's local content plugin disabled,
  ``[proxy_plugins.nydus-content] type = "content"``; the snapshotter runs with
  ``--content-store``). :meth:`~Containerd.ctr` runs ``ctr -a SOCK -n NS ...``.
  :meth:`~Containerd.stop`
  kills leftover tasks, removes containers, stops containerd and detaches any mount left under
  its directories.
- :func:`build_busybox_layout`: an OCI image layout with two gzip layers made from Debian's
  ``busybox-static`` (``/bin/busybox`` plus applet links, then a small ``/etc`` layer);
  :func:`skopeo_push` copies it to a registry with ``skopeo copy oci:DIR docker://...``.

Socket paths live under a short ``/tmp/nydus-ctd-*`` directory (unix socket paths are limited to
108 bytes; pytest's tmp paths can be longer). Everything is local; nothing listens on TCP.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from nydus.snapshotter.containerd.proto import SNAPSHOTS_SERVICE, snapshots_pb2
from nydus.snapshotter.containerd.rpc import ServiceClient
from nydus.snapshotter.server import SnapshotterServer
from nydus.snapshotter.snapshots.core import Snapshotter
from nydus.snapshotter.snapshots.fsutil import mounts_under
from nydus.snapshotter.snapshots.mounter import NydusMounter

BUSYBOX = Path("/bin/busybox")
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SNAPSHOTTER_NAME = "nydus"
RUNC_ROOT = Path("/run/containerd/runc")

# The section-06 snippet of the article, as written (the address is replaced by the harness).
ARTICLE_SNIPPET = """\
[proxy_plugins]
  [proxy_plugins.nydus]
    type = "snapshot"
    address = "/run/containerd-nydus/containerd-nydus-grpc.sock"

[plugins.cri]
  [plugins.cri.containerd]
    snapshotter = "nydus"
    disable_snapshot_annotations = false
"""
ARTICLE_ADDRESS = "/run/containerd-nydus/containerd-nydus-grpc.sock"

# The README's snippet for stock `ctr image pull` of Nydus images: containerd's content store is
# served by the snapshotter (--content-store). Version 2: disabled_plugins names plugin URIs.
CONTENT_PROXY_SNIPPET = """\
version = 2
disabled_plugins = ["io.containerd.content.v1.content"]

[proxy_plugins]
  [proxy_plugins.nydus]
    type = "snapshot"
    address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
  [proxy_plugins.nydus-content]
    type = "content"
    address = "/run/containerd-nydus/containerd-nydus-grpc.sock"
"""


def containerd_skip_reason() -> str | None:
    """Why containerd tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc, mounts)"
    for tool in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "skopeo"):
        if shutil.which(tool, path=PATH_ENV) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    if not BUSYBOX.is_file():
        return f"{BUSYBOX} missing (Debian busybox-static)"
    return None


def short_tmpdir(prefix: str = "nydus-ctd-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def snapshots_answer(address: Path, timeout: float = 2.0) -> bool:
    """True when a Snapshots service answers a List call on ``address``."""
    if not address.exists():
        return False
    try:
        with grpc.insecure_channel(f"unix:{address}") as ch:
            c = ServiceClient(ch, SNAPSHOTS_SERVICE, timeout=timeout)
            req = snapshots_pb2.ListSnapshotsRequest(filters=["name==nydus-harness-probe"])
            list(c.stream("List", req, snapshots_pb2.ListSnapshotsResponse))
        return True
    except grpc.RpcError:
        return False


# --- our snapshotter ------------------------------------------------------------------------


class SnapshotterProcess:
    """``containerd-nydus-grpc`` as a subprocess."""

    def __init__(
        self,
        root: Path,
        address: Path,
        *,
        containerd_address: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.root = root
        self.address = address
        self.containerd_address = containerd_address
        self.extra_args = list(extra_args)
        self.log_path = root.parent / f"{root.name}-snapshotter.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        boot = (
            "import sys; from nydus.cli.snapshotter import main; "
            "sys.argv[0] = 'containerd-nydus-grpc'; sys.exit(main())"
        )
        args = [
            sys.executable,
            "-c",
            boot,
            "--root",
            str(self.root),
            "--address",
            str(self.address),
            "--log-level",
            "debug",
            "--log-to-stdout",
        ]
        if self.containerd_address is not None:
            args += ["--containerd-address", str(self.containerd_address)]
        return args + self.extra_args

    def start(self, timeout: float = 30.0) -> SnapshotterProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"snapshotter exited with {self.proc.returncode}:\n{_tail(self.log_path)}"
                )
            if snapshots_answer(self.address):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"snapshotter not ready after {timeout}s:\n{_tail(self.log_path)}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit status (None if it was not running)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def restart(self) -> int | None:
        rc = self.stop()
        self.start()
        return rc

    def log_text(self) -> str:
        return _tail(self.log_path, 20000)


class InProcessSnapshotter:
    """The same service served from this process, with a mounter chosen by the test."""

    def __init__(
        self,
        root: Path,
        address: Path,
        mounter: NydusMounter,
        containerd_address: Path,
        *,
        content_store: bool = False,
    ) -> None:
        self.root = root
        self.address = address
        self.mounter = mounter
        self.containerd_address = containerd_address
        self.content_store = content_store
        self.snapshotter: Snapshotter | None = None
        self.server: SnapshotterServer | None = None

    def start(self) -> InProcessSnapshotter:
        from nydus.snapshotter.content.nydusblobs import nydus_content_service
        from nydus.snapshotter.snapshots.imageref import ContainerdImageResolver

        content = None
        local_blob = None
        layer_blobs = None
        if self.content_store:
            content, layer_blobs = nydus_content_service(
                self.root / "content",
                self.containerd_address,
                lambda: self.server.service.plugin_name if self.server else SNAPSHOTTER_NAME,
                docker_config=None,
            )
            store = content.store
            local_blob = lambda d: store.read_small(d, 8 << 20)  # noqa: E731
        resolver = ContainerdImageResolver(self.containerd_address, local_blob=local_blob)
        self.snapshotter = Snapshotter(
            self.root, self.mounter, resolver, layers=resolver, layer_blobs=layer_blobs
        )
        self.server = SnapshotterServer(self.snapshotter, self.address, content=content)
        self.server.start()
        return self

    def stop(self) -> int | None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.snapshotter is not None:
            self.snapshotter.close()
            self.snapshotter = None
        return 0

    def restart(self) -> int | None:
        self.stop()
        self.start()
        return 0

    def log_text(self) -> str:
        return "(in-process snapshotter: see captured log)"


# --- containerd -----------------------------------------------------------------------------


@dataclass
class CtrResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> CtrResult:
        if self.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(self.args)} failed ({self.returncode}):\n"
                f"stdout: {self.stdout[-3000:]}\nstderr: {self.stderr[-3000:]}"
            )
        return self


@dataclass
class Containerd:
    """One containerd process with its own directories and sockets."""

    workdir: Path
    snapshotter_address: Path
    # Unique per instance: runc keeps container state under /run/containerd/runc/<namespace>,
    # shared by every containerd on the machine, so ids must not collide with a crashed run's.
    namespace: str = field(default_factory=lambda: f"nydus-test-{secrets.token_hex(3)}")
    sockdir: Path = field(default_factory=short_tmpdir)
    proc: subprocess.Popen[bytes] | None = None
    content_proxy: bool = False  # containerd's content store served by the snapshotter

    @property
    def address(self) -> Path:
        return self.sockdir / "containerd.sock"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def state(self) -> Path:
        return self.sockdir / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    def config_text(self) -> str:
        if self.content_proxy:
            return self._config_v2()
        snippet = ARTICLE_SNIPPET.replace(ARTICLE_ADDRESS, str(self.snapshotter_address))
        # containerd 1.6 reads a config without "version" as version 1, the article's format.
        return (
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["cri"]\n'
            "\n[grpc]\n"
            f'  address = "{self.address}"\n'
            "\n[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "\n[debug]\n"
            '  level = "debug"\n'
            "\n" + snippet
        )

    def _config_v2(self) -> str:
        snippet = CONTENT_PROXY_SNIPPET.replace(ARTICLE_ADDRESS, str(self.snapshotter_address))
        head, rest = snippet.split("\n", 1)  # "version = 2" first
        rest = rest.replace(
            'disabled_plugins = ["io.containerd.content.v1.content"]',
            'disabled_plugins = ["io.containerd.content.v1.content", "io.containerd.grpc.v1.cri"]',
        )
        dirs = f'{head}\nroot = "{self.root}"\nstate = "{self.state}"\n'
        sockets = (
            f'\n[grpc]\n  address = "{self.address}"\n'
            f'\n[ttrpc]\n  address = "{self.address}.ttrpc"\n'
            '\n[debug]\n  level = "debug"\n'
        )
        return dirs + rest + sockets

    def start(self, timeout: float = 30.0) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.toml"
        cfg.write_text(self.config_text())
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        env = {"PATH": PATH_ENV, "HOME": str(self.workdir)}
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited:\n{self.log_text()}")
            if self.address.exists() and self.ctr("version", timeout=5).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"containerd not ready after {timeout}s:\n{self.log_text()}")
        self.wait_snapshotter(deadline - time.monotonic())
        return self

    def wait_snapshotter(self, timeout: float = 30.0) -> None:
        """Wait until containerd reaches our snapshotter (a real call, not ``plugins ls``)."""
        deadline = time.monotonic() + max(timeout, 1.0)
        last = ""
        while time.monotonic() < deadline:
            r = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER_NAME, "ls", timeout=10)
            if r.returncode == 0:
                return
            last = r.stderr
            time.sleep(0.2)
        raise RuntimeError(f"containerd cannot reach the snapshotter: {last}")

    def ctr(self, *args: str, timeout: float = 120.0, namespace: str | None = None) -> CtrResult:
        cmd = ["ctr", "-a", str(self.address), "-n", namespace or self.namespace, *args]
        try:
            p = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                env={"PATH": PATH_ENV, "HOME": str(self.workdir)},
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            return CtrResult(list(args), -1, str(e.stdout or ""), f"timeout: {e}")
        return CtrResult(list(args), p.returncode, p.stdout, p.stderr)

    def log_text(self) -> str:
        return _tail(self.log_path, 20000)

    def _namespaces(self) -> list[str]:
        r = self.ctr("namespaces", "ls", "-q", timeout=20)
        return r.stdout.split() if r.returncode == 0 else [self.namespace]

    def remove_workloads(self) -> None:
        """Kill and delete every task and container (all namespaces)."""
        for ns in self._namespaces():
            tasks = self.ctr("tasks", "ls", "-q", namespace=ns, timeout=20).stdout.split()
            for t in tasks:
                self.ctr("tasks", "kill", "-s", "SIGKILL", t, namespace=ns, timeout=20)
            for t in tasks:
                for _ in range(50):
                    if self.ctr("tasks", "delete", t, namespace=ns, timeout=20).returncode == 0:
                        break
                    time.sleep(0.1)
            for c in self.ctr("containers", "ls", "-q", namespace=ns, timeout=20).stdout.split():
                self.ctr("containers", "delete", c, namespace=ns, timeout=20)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.remove_workloads()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.cleanup()

    def cleanup(self) -> None:
        """Detach mounts left under our directories and delete the socket directory."""
        from nydus.kernel_mount import umount

        for d in (self.state, self.root, self.sockdir):
            for mp in mounts_under(d):
                with contextlib.suppress(OSError):
                    umount(mp, lazy=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)
        with contextlib.suppress(OSError):  # runc's per-namespace root, empty once tasks are gone
            (RUNC_ROOT / self.namespace).rmdir()


# --- images -----------------------------------------------------------------------------


def _tar_gz(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> tuple[bytes, str]:
    """A reproducible tar.gz and the digest of its uncompressed tar (the diff ID)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti in entries:
            ti.mtime = 1_700_000_000
            ti.uname = ti.gname = ""
            body = data.get(ti.name)
            tf.addfile(ti, io.BytesIO(body) if body is not None else None)
    raw = buf.getvalue()
    gz = gzip.compress(raw, mtime=0)
    return gz, "sha256:" + hashlib.sha256(raw).hexdigest()


def _dir(name: str, mode: int = 0o755) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, mode
    return ti


def _file(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = size, mode
    return ti


def _link(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, target, 0o777
    return ti


def busybox_layers(message: str = "hello from layer 2\n") -> list[tuple[bytes, str]]:
    """Two layers: busybox with applet links; then /etc/hello.txt and /etc/os-release."""
    bb = BUSYBOX.read_bytes()
    l1 = [_dir(d) for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root")]
    l1[2].mode = 0o1777
    l1.append(_file("bin/busybox", len(bb), 0o755))
    l1 += [_link(f"bin/{a}", "busybox") for a in ("sh", "echo", "cat", "ls", "sleep", "true")]
    os_release = b'NAME="nydus-py test busybox"\nID=busybox\n'
    l2 = [_dir("etc"), _file("etc/hello.txt", len(message)), _file("etc/os-release", 0)]
    l2[2].size = len(os_release)
    return [
        _tar_gz(l1, {"bin/busybox": bb}),
        _tar_gz(l2, {"etc/hello.txt": message.encode(), "etc/os-release": os_release}),
    ]


def write_oci_layout(
    directory: Path,
    tag: str,
    layers: list[tuple[bytes, str]],
    layer_media_types: Sequence[str] | None = None,
    layer_annotations: Sequence[dict[str, str]] | None = None,
) -> str:
    """An OCI image layout holding one image; returns the manifest digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(b: bytes) -> str:
        h = hashlib.sha256(b).hexdigest()
        (blobs / h).write_bytes(b)
        return "sha256:" + h

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
            "history": [{"created_by": "nydus-py tests/containerd.py"} for _ in layers],
        },
        sort_keys=True,
    ).encode()
    descs = []
    for i, (blob, _) in enumerate(layers):
        mt = (layer_media_types or [])[i] if layer_media_types else None
        d = {
            "mediaType": mt or "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": put(blob),
            "size": len(blob),
        }
        if layer_annotations and layer_annotations[i]:
            d["annotations"] = layer_annotations[i]
        descs.append(d)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": descs,
        },
        indent=1,
    ).encode()
    mdigest = put(manifest)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": mdigest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return mdigest


def build_busybox_layout(directory: Path, tag: str = "1") -> str:
    """The small busybox OCI image (two gzip layers) as an OCI layout; manifest digest."""
    return write_oci_layout(directory, tag, busybox_layers())


def skopeo_push(layout: Path, tag: str, dest: str) -> None:
    """``skopeo copy oci:LAYOUT:TAG docker://DEST`` to a plain-HTTP registry."""
    p = subprocess.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{dest}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if p.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {p.stderr[-3000:]}")


# --- the daemon manager's processes and the whole Nydus flow ----------------------------------

VENV_BIN = Path(sys.executable).parent


def venv_tool(name: str) -> str:
    """A console script of this venv (``nydusify``, ``nydus-pull``, ``nydusd``, ...)."""
    p = VENV_BIN / name
    if not p.exists():
        raise RuntimeError(f"{p} missing: run scripts/setup.sh (pip install -e .)")
    return str(p)


def nydusify_convert(source: str, target: str, work_dir: Path, *extra: str) -> None:
    """``nydusify convert --plain-http --source SOURCE --target TARGET`` (our nydusify)."""
    p = subprocess.run(
        [venv_tool("nydusify"), "convert", "--plain-http", "--source", source, "--target", target,
         "--work-dir", str(work_dir), *extra],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"nydusify convert failed ({p.returncode}): {p.stderr[-3000:]}")


def nydus_pull(
    ctd: Containerd, ref: str, *, snapshotter: str = SNAPSHOTTER_NAME
) -> dict[str, list]:
    """``nydus-pull -a SOCK -n NS --plain-http REF``: the labelled pull; returns its JSON."""
    p = subprocess.run(
        [venv_tool("nydus-pull"), "-q", "-a", str(ctd.address), "-n", ctd.namespace,
         "--snapshotter", snapshotter, "--plain-http", ref],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"nydus-pull {ref} failed ({p.returncode}): {p.stderr[-3000:]}")
    out: dict[str, list] = json.loads(p.stdout)
    return out


def daemon_state(sn_root: Path) -> dict:
    """The daemon manager's ``<root>/daemons/state.json`` ({} if none)."""
    try:
        return dict(json.loads((sn_root / "daemons" / "state.json").read_text()))
    except (OSError, ValueError):
        return {}


def _pid_is(pid: int, apisock: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            zombie = f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return False
    return not zombie and apisock.encode() in args


def daemon_pids(sn_root: Path) -> dict[str, int]:
    """``{daemon id: pid}`` of the recorded daemons that are alive."""
    out = {}
    for d in daemon_state(sn_root).get("daemons", []):
        if _pid_is(int(d["pid"]), d["apisock"]):
            out[d["id"]] = int(d["pid"])
    return out


def stop_recorded_daemons(sn_root: Path) -> list[str]:
    """Stop the nydusd processes a snapshotter root records (by their pids, checked against
    their API socket), then detach mounts left under ``<root>/mnt``. Returns what it did."""
    from nydus.kernel_mount import umount

    done = []
    for d in daemon_state(sn_root).get("daemons", []):
        pid, sock = int(d["pid"]), str(d["apisock"])
        if not _pid_is(pid, sock):
            continue
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _pid_is(pid, sock):
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        done.append(f"stopped nydusd {d['id']} (pid {pid})")
    for mp in mounts_under(sn_root):
        with contextlib.suppress(OSError):
            umount(mp, lazy=True)
        done.append(f"detached {mp}")
    for d in daemon_state(sn_root).get("daemons", []):  # sockets, and their dir if now empty
        sock = Path(d["apisock"])
        for p in (sock, Path(d.get("supervisor") or sock)):
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            sock.parent.rmdir()
    return done


def data_layer(
    files: int = 16, size: int = 512 << 10, seed: int = 7
) -> tuple[tuple[bytes, str], dict[str, bytes]]:
    """A layer of ``files`` incompressible files ``data/fNN`` (what a lazy pull must not fetch)."""
    rng = random.Random(seed)
    contents = {f"data/f{i:02d}": rng.randbytes(size) for i in range(files)}
    entries = [_dir("data")] + [_file(name, len(body)) for name, body in contents.items()]
    return _tar_gz(entries, contents), contents


def busybox_data_layout(directory: Path, tag: str = "1", **kw: int) -> dict[str, bytes]:
    """The busybox image plus :func:`data_layer` as an OCI layout; returns the data files."""
    layer, contents = data_layer(**kw)
    write_oci_layout(directory, tag, [*busybox_layers(), layer])
    return contents


# --- a Debian-based image (debootstrap minbase, cached) -------------------------------------

DEBIAN_CACHE = Path("/var/tmp/nydus-e2e")
DEBIAN_SUITE = "bookworm"
# minbase (about 200 MB) plus an interpreter and common tools: about 330 MB unpacked
DEBIAN_INCLUDE = "python3,perl,git,curl,less,procps,vim-tiny"


def debian_rootfs_tar(cache: Path = DEBIAN_CACHE) -> Path:
    """A tarball of ``debootstrap --variant=minbase --include=DEBIAN_INCLUDE bookworm`` from
    Debian's mirror, built once and kept in ``cache`` (test runs, the bench and the demo share
    it)."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(DEBIAN_INCLUDE.encode()).hexdigest()[:8]
    out = cache / f"debian-{DEBIAN_SUITE}-minbase-{tag}.tar"
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_file():
            return out
        if shutil.which("debootstrap", path=PATH_ENV) is None:
            raise RuntimeError("debootstrap is not installed (scripts/setup.sh installs it)")
        root = cache / "rootfs.tmp"
        shutil.rmtree(root, ignore_errors=True)
        p = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={DEBIAN_INCLUDE}", DEBIAN_SUITE,
             str(root), "http://deb.debian.org/debian"],
            capture_output=True, text=True, timeout=1800, env={"PATH": PATH_ENV},
        )  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"debootstrap failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
        # No apt caches or logs: they change every build and nothing reads them.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for child in (root / junk).glob("*"):
                if child.is_file():
                    child.unlink()
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(tmp), "."],
            check=True, timeout=600,
        )  # fmt: skip
        tmp.rename(out)
        shutil.rmtree(root, ignore_errors=True)
    return out


def debian_layout(directory: Path, tag: str = "1", cache: Path = DEBIAN_CACHE) -> int:
    """The Debian image (one gzip layer of :func:`debian_rootfs_tar`) as an OCI layout;
    returns the uncompressed size. The gzip layer is cached beside the tarball."""
    tar = debian_rootfs_tar(cache)
    gz = tar.with_suffix(".tar.gz")
    if not gz.is_file() or gz.stat().st_mtime < tar.stat().st_mtime:
        tmp = gz.with_suffix(".tmp")
        with open(tar, "rb") as src, open(tmp, "wb") as dst:
            zp = subprocess.run(["gzip", "-6", "-n", "-c"], stdin=src, stdout=dst, check=True)
            assert zp.returncode == 0
        tmp.rename(gz)
    h = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    diff_id = "sha256:" + h.hexdigest()
    blob = gz.read_bytes()
    write_oci_layout(directory, tag, [(blob, diff_id)])
    return tar.stat().st_size


class NydusStack:
    """containerd + ``containerd-nydus-grpc`` (a subprocess with the real daemon manager).

    ``sn_args`` are extra snapshotter flags (``--shared-daemon``, ``--recover-policy ...``);
    ``content_store`` adds ``--content-store`` and proxies containerd's content store to it.
    :meth:`stop` removes workloads, stops containerd and the snapshotter, then stops every
    nydusd the snapshotter's root still records (the snapshotter leaves daemons running on
    exit, by design) and detaches what is left mounted.
    """

    def __init__(
        self, tmp: Path, sn_args: Sequence[str] = (), *, content_store: bool = False
    ) -> None:
        self.tmp = tmp
        self.sock_dir = short_tmpdir("nydus-sn-")
        self.sn_address = self.sock_dir / "containerd-nydus-grpc.sock"
        self.ctd = Containerd(tmp / "containerd", self.sn_address, content_proxy=content_store)
        self.sn_root = tmp / "snapshotter"
        self.cache_dir = tmp / "cache"
        args = ["--cache-dir", str(self.cache_dir), *sn_args]
        if content_store:
            args.append("--content-store")
        self.sn = SnapshotterProcess(
            self.sn_root, self.sn_address, containerd_address=self.ctd.address, extra_args=args
        )
        self.leftovers: list[str] = []

    def start(self) -> NydusStack:
        self.sn.start()
        self.ctd.start()
        return self

    def stop(self) -> int | None:
        try:
            self.ctd.stop()
        finally:
            rc = self.sn.stop()
            self.leftovers = stop_recorded_daemons(self.sn_root)
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        return rc

    def wait_spare(self, timeout: float = 30.0) -> float:
        """Seconds until the snapshotter's log says its warm spare nydusd is ready."""
        t0 = time.monotonic()
        while not re.search(r"spare nydusd \d+ ready in ", self.sn.log_text()):
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"no spare nydusd ready after {timeout}s\n{self.diagnostics()}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def restart_snapshotter(self) -> float:
        """Restart the snapshotter; seconds until containerd reaches the new one."""
        rc = self.sn.stop()
        assert rc == 0, f"snapshotter exit status {rc}\n{self.diagnostics()}"
        self.sn.start()
        t0 = time.monotonic()
        self.ctd.wait_snapshotter(30)
        return time.monotonic() - t0

    def ctr(self, *args: str, timeout: float = 300.0) -> CtrResult:
        return self.ctd.ctr(*args, timeout=timeout)

    def run(self, ref: str, cid: str, *cmd: str, timeout: float = 300.0) -> CtrResult:
        """``ctr run --rm --snapshotter nydus REF ID CMD...`` (stock ctr)."""
        return self.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER_NAME, ref, cid, *cmd,
                        timeout=timeout)  # fmt: skip

    def daemon_pids(self) -> dict[str, int]:
        return daemon_pids(self.sn_root)

    def diagnostics(self) -> str:
        parts = [
            f"--- snapshotter log ---\n{self.sn.log_text()[-8000:]}",
            f"--- containerd log ---\n{self.ctd.log_text()[-4000:]}",
        ]
        for log in sorted((self.sn_root / "daemons").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{_tail(log, 3000)}")
        return "\n".join(parts)


# The seed article's /etc/nydus/config.json, verbatim: the snapshotter's nydusd config template.
ARTICLE_NYDUSD_CONFIG: dict[str, object] = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {
                "scheme": "http",
                "skip_verify": False,
                "timeout": 5,
                "connect_timeout": 5,
                "retry_limit": 2,
                "auth": "",
            },
        },
        "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "fs_prefetch": {"enable": True, "threads_count": 4},
}
