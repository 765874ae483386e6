"""containerd 1.6 + runc + our snapshotter as the ``nydus`` proxy plugin, end to end.

Plain OCI images (busybox-static, pushed with skopeo to docker-registry) are pulled with stock
``ctr image pull --snapshotter nydus`` and run with ``ctr run --snapshotter nydus``; the
snapshotter is restarted under a running container; removal and garbage collection leave no
snapshot directories behind.

Nydus images are built here with our ``nydus-image`` (uncompressed, so the kernel can mount the
bootstrap with the blob as its device) and pushed as upstream lays them out: one
``nydus-blob`` layer, then the ``nydus-bootstrap`` tar.gz. The pull goes through a counting
proxy, which shows that containerd never fetches the blob: with ``nydus-pull``, or with stock
``ctr image pull`` when containerd's content store is the snapshotter's (``--content-store``);
without it, stock ``ctr image pull`` fails with the snapshotter's explanation. The container
is started with a test mounter that kernel-mounts the bootstrap over the local blob (a real
EROFS mount, though neither lazy nor through nydusd), and with the shipped daemon manager
serving the blob from a ``localfs`` template; with ``--daemon-mode none``, ``ctr run`` fails
with an error that names what is missing. The lazy registry path, end to end, is in
test_e2e_snapshotter.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from containerd import (
    ARTICLE_NYDUSD_CONFIG,
    BUSYBOX,
    Containerd,
    InProcessSnapshotter,
    SnapshotterProcess,
    busybox_layers,
    containerd_skip_reason,
    short_tmpdir,
    skopeo_push,
    snapshots_answer,
    stop_recorded_daemons,
    write_oci_layout,
)
from nydus.kernel_mount import mount_erofs, umount
from nydus.metadata import open_bootstrap
from nydus.registry import RegistryClient
from nydus.snapshotter.content.pull import RegistrySource, RemoteUnpacker, UnpackResult
from nydus.snapshotter.snapshots.mounter import MountRequest, NydusMounter
from registry import FaultProxy, RegistryServer, registry_plain  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(
    containerd_skip_reason() is not None, reason=str(containerd_skip_reason())
)

HELLO = "hello from layer 2\n"
NYDUS_BLOB_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot_dirs(root: Path) -> list[str]:
    d = root / "snapshots"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture(scope="module")
def busybox_ref(registry_plain: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:  # noqa: F811
    layout = tmp_path_factory.mktemp("busybox-oci")
    write_oci_layout(layout, "1", busybox_layers(HELLO))
    ref = f"{registry_plain.host}/busybox:1"
    skopeo_push(layout, "1", ref)
    return ref


class Stack:
    """containerd + snapshotter for one test."""

    def __init__(
        self,
        tmp: Path,
        mounter: NydusMounter | None = None,
        sn_args: Sequence[str] = (),
        *,
        content_store: bool = False,
    ) -> None:
        """A snapshotter subprocess, or an in-process one when a test mounter is given;
        ``content_store``: it serves containerd's content store too."""
        self.tmp = tmp
        self.sock_dir = short_tmpdir("nydus-sn-")
        self.sn_address = self.sock_dir / "containerd-nydus-grpc.sock"
        self.ctd = Containerd(tmp / "containerd", self.sn_address, content_proxy=content_store)
        self.sn_root = tmp / "snapshotter"
        self.sn: SnapshotterProcess | InProcessSnapshotter
        if mounter is None:
            extra = [*sn_args, "--content-store"] if content_store else list(sn_args)
            self.sn = SnapshotterProcess(
                self.sn_root,
                self.sn_address,
                containerd_address=self.ctd.address,
                extra_args=extra,
            )
        else:
            self.sn = InProcessSnapshotter(
                self.sn_root,
                self.sn_address,
                mounter,
                self.ctd.address,
                content_store=content_store,
            )

    def start(self) -> Stack:
        self.sn.start()
        self.ctd.start()
        return self

    def stop(self) -> int | None:
        try:
            self.ctd.stop()
        finally:
            rc = self.sn.stop()
            stop_recorded_daemons(self.sn_root)  # the snapshotter leaves them running
            for p in self.sock_dir.iterdir():
                p.unlink()
            self.sock_dir.rmdir()
        return rc

    def restart_snapshotter(self) -> tuple[int | None, float]:
        """Restart the snapshotter; wait until containerd's channel to it reconnects.

        containerd's gRPC client to a proxy plugin fails calls fast (UNAVAILABLE) while it is
        reconnecting with backoff, as with upstream's snapshotter; returns (exit status of the
        old process, seconds until containerd reached the new one).
        """
        rc = self.sn.restart()
        t0 = time.monotonic()
        self.ctd.wait_snapshotter(30)
        return rc, time.monotonic() - t0

    def ctr(self, *args: str, timeout: float = 120.0):  # type: ignore[no-untyped-def]
        return self.ctd.ctr(*args, timeout=timeout)

    def diagnostics(self) -> str:
        return (
            f"--- snapshotter log ---\n{self.sn.log_text()[-6000:]}\n"
            f"--- containerd log ---\n{self.ctd.log_text()[-6000:]}"
        )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path).start()
    yield s
    rc = s.stop()
    assert rc == 0, f"snapshotter exit status {rc}\n{s.diagnostics()}"


def gc_image(s: Stack, ref: str) -> None:
    s.ctr("image", "rm", "--sync", ref).check()


# -- plain OCI images ----------------------------------------------------------------------


@pytest.mark.slow
def test_plain_image_runs_and_gc_leaves_no_dirs(stack: Stack, busybox_ref: str) -> None:
    s = stack
    s.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", busybox_ref).check()
    ls = s.ctr("snapshots", "--snapshotter", "nydus", "ls").check().stdout
    assert ls.count("Committed") == 2, ls
    r = s.ctr(
        "run", "--rm", "--snapshotter", "nydus", busybox_ref, "c1", "/bin/busybox", "echo", "hello"
    ).check()
    assert r.stdout == "hello\n", s.diagnostics()
    # the upper layer is seen through the overlay, on top of the lower one
    r = s.ctr(
        "run",
        "--rm",
        "--snapshotter",
        "nydus",
        busybox_ref,
        "c2",
        "/bin/sh",
        "-c",
        "cat /etc/hello.txt; echo written > /tmp/x; cat /tmp/x",
    ).check()
    assert r.stdout == HELLO + "written\n"
    # containers gone: GC removes their snapshots, only the two layers stay
    wait_for(lambda: len(snapshot_dirs(s.sn_root)) == 2, what="container snapshots removed")
    gc_image(s, busybox_ref)
    wait_for(lambda: snapshot_dirs(s.sn_root) == [], what="all snapshot dirs removed")
    assert s.ctr("snapshots", "--snapshotter", "nydus", "ls").check().stdout.count("\n") <= 1


@pytest.mark.slow
def test_snapshotter_restart_under_running_container(stack: Stack, busybox_ref: str) -> None:
    s = stack
    s.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", busybox_ref).check()
    s.ctr(
        "run", "-d", "--snapshotter", "nydus", busybox_ref, "long", "/bin/busybox", "sleep", "600"
    ).check()
    rc, reconnect = s.restart_snapshotter()
    assert rc == 0 and reconnect < 20
    # the running container still reads its files
    r = s.ctr("tasks", "exec", "--exec-id", "e1", "long", "/bin/busybox", "cat", "/etc/hello.txt")
    assert r.check().stdout == HELLO
    # a new container starts after the restart, and containerd's view is consistent
    r = s.ctr(
        "run", "--rm", "--snapshotter", "nydus", busybox_ref, "after", "/bin/busybox", "echo", "ok"
    ).check()
    assert r.stdout == "ok\n"
    s.ctr("tasks", "kill", "-s", "SIGKILL", "long").check()
    wait_for(lambda: s.ctr("tasks", "delete", "long").returncode == 0, what="task deletion")
    s.ctr("containers", "delete", "long").check()
    wait_for(lambda: len(snapshot_dirs(s.sn_root)) == 2, what="container snapshots removed")


# -- the article's command line ----------------------------------------------------------


def _cli(*args: str) -> list[str]:
    boot = (
        "import sys; from nydus.cli.snapshotter import main; "
        "sys.argv[0] = 'containerd-nydus-grpc'; sys.exit(main())"
    )
    return [sys.executable, "-c", boot, *args]


def test_article_command_line_starts_and_stops_cleanly(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(ARTICLE_NYDUSD_CONFIG, indent=2))
    sock_dir = short_tmpdir("nydus-sn-")
    address = sock_dir / "containerd-nydus-grpc.sock"
    root = tmp_path / "io.containerd.snapshotter.v1.nydus"
    cmd = _cli(
        "--config-path", str(cfg),
        "--shared-daemon",
        "--log-level", "info",
        "--root", str(root),
        "--cache-dir", str(tmp_path / "cache"),
        "--address", str(address),
        "--nydusd-path", "/usr/local/bin/nydusd",
        "--nydusimg-path", "/usr/local/bin/nydus-image",
        "--log-to-stdout",
    )  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: snapshots_answer(address) or p.poll() is not None, 30, "snapshotter")
        assert p.poll() is None
        assert (tmp_path / "cache").is_dir() and (root / "metadata.db").is_file()
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=20)
        sock_dir.rmdir() if sock_dir.exists() and not any(sock_dir.iterdir()) else None
    assert p.returncode == 0, out
    assert "daemon mode shared" in out and "received SIGTERM" in out
    assert not address.exists()


def test_bad_config_path_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = subprocess.run(
        _cli("--config-path", str(bad), "--root", str(tmp_path / "r"), "--log-to-stdout",
             "--address", str(tmp_path / "s.sock")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2
    assert "--config-path" in p.stderr and "is not JSON" in p.stderr
    p = subprocess.run(
        _cli("--shared-daemon", "--daemon-mode", "dedicated", "--root", str(tmp_path / "r")),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and "contradicts" in p.stderr


# -- Nydus images --------------------------------------------------------------------------


def _nydus_image_cmd(*args: str) -> list[str]:
    boot = (
        "import sys; from nydus.cli.nydus_image import main; "
        "sys.argv[0] = 'nydus-image'; sys.exit(main())"
    )
    return [sys.executable, "-c", boot, *args]


class NydusImage:
    """A Nydus image built from the busybox tree: bootstrap, blob dir, OCI layout."""

    def __init__(self, work: Path) -> None:
        src = work / "src"
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev"):
            (src / d).mkdir(parents=True)
        (src / "bin" / "busybox").write_bytes(BUSYBOX.read_bytes())
        os.chmod(src / "bin" / "busybox", 0o755)
        for applet in ("sh", "echo", "cat"):
            os.symlink("busybox", src / "bin" / applet)
        (src / "etc" / "hello.txt").write_text("hello from a nydus image\n")
        out = work / "nydus"
        out.mkdir()
        self.bootstrap = out / "image.boot"
        self.blob_dir = out / "blobs"
        subprocess.run(
            _nydus_image_cmd(
                "create", "--compressor", "none", "--bootstrap", str(self.bootstrap),
                "--blob-dir", str(self.blob_dir), str(src),
            ),
            check=True, capture_output=True,
        )  # fmt: skip
        (blob_file,) = list(self.blob_dir.iterdir())
        self.blob = blob_file.read_bytes()
        self.blob_digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        # the bootstrap layer: a tar.gz holding image/image.boot, as upstream's converter makes
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            ti = tarfile.TarInfo("image")
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
            boot = self.bootstrap.read_bytes()
            ti = tarfile.TarInfo("image/image.boot")
            ti.size, ti.mode = len(boot), 0o644
            tf.addfile(ti, io.BytesIO(boot))
        raw = buf.getvalue()
        self.boot_layer = gzip.compress(raw, mtime=0)
        self.boot_digest = "sha256:" + hashlib.sha256(self.boot_layer).hexdigest()
        self.layout = work / "layout"
        write_oci_layout(
            self.layout,
            "1",
            [
                (self.blob, self.blob_digest),
                (self.boot_layer, "sha256:" + hashlib.sha256(raw).hexdigest()),
            ],
            layer_media_types=[NYDUS_BLOB_TYPE, "application/vnd.oci.image.layer.v1.tar+gzip"],
            layer_annotations=[
                {"containerd.io/snapshot/nydus-blob": "true"},
                {
                    "containerd.io/snapshot/nydus-bootstrap": "true",
                    "containerd.io/snapshot/nydus-fs-version": "6",
                },
            ],
        )


@pytest.fixture(scope="module")
def nydus_image(tmp_path_factory: pytest.TempPathFactory) -> NydusImage:
    return NydusImage(tmp_path_factory.mktemp("nydus-image"))


class KernelErofsMounter(NydusMounter):
    """Test mounter: kernel EROFS mount of the bootstrap over the local blob dir.

    A real mount, but neither lazy nor served by nydusd: it checks the snapshotter's Nydus path
    (labels, image lookup, lower dir, release) independently of the daemon manager.
    """

    def __init__(self, blob_dir: Path, mnt_base: Path) -> None:
        self.blob_dir = blob_dir
        self.base = mnt_base
        self.calls: list[tuple[str, str, str | None, dict[str, str]]] = []
        self.umounts: list[str] = []

    def mount(self, request: MountRequest) -> Path:
        snapshot_id, bootstrap_path = request.snapshot_id, request.bootstrap_path
        labels = request.labels
        image_ref = request.image_ref
        self.calls.append((snapshot_id, str(bootstrap_path), image_ref, dict(labels)))
        mnt = self.base / snapshot_id
        mnt.mkdir(parents=True, exist_ok=True)
        with open_bootstrap(bootstrap_path) as md:
            devices = [str(self.blob_dir / b.blob_id) for b in md.blobs]
        mount_erofs(bootstrap_path, mnt, devices)
        return mnt

    def umount(self, snapshot_id: str) -> None:
        self.umounts.append(snapshot_id)
        mnt = self.base / snapshot_id
        if os.path.ismount(mnt):
            umount(mnt, lazy=True)

    def recover(self, mounts: Sequence[object]) -> None:
        pass


def _push_nydus(img: NydusImage, registry: RegistryServer, name: str) -> None:
    skopeo_push(img.layout, "1", f"{registry.host}/{name}:1")


def _pull(s: Stack, ref: str, host: str, *, cri_labels: bool) -> UnpackResult:
    """What stock ctr 1.6 cannot do: a pull whose unpack passes the layer labels."""
    client = RegistryClient(host, scheme="http", docker_config=None)
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    unpacker = RemoteUnpacker(s.ctd.address, s.ctd.namespace, cri_labels=cri_labels)
    return unpacker.pull(ref, tag, RegistrySource(client, repo))


@pytest.mark.slow
def test_stock_ctr_pull_of_a_nydus_image_needs_the_content_store(
    stack: Stack,
    nydus_image: NydusImage,
    registry_plain: RegistryServer,  # noqa: F811
) -> None:
    """Without the content store, containerd 1.6's ``ctr image pull`` downloads every layer,
    then its unpack asks its own metadata for the blob layer (a proxy snapshotter never sees
    that ``Stat``) and prepares it for extraction: the snapshotter refuses, saying what to do
    (rather than containerd's "no processor for media-type" once it tried to apply it)."""
    _push_nydus(nydus_image, registry_plain, "nydus-stock")
    proxy = FaultProxy(registry_plain)
    try:
        ref = f"{proxy.host}/nydus-stock:1"
        r = stack.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref)
        assert r.returncode != 0
        assert proxy.blob_bytes(nydus_image.blob_digest) == len(nydus_image.blob)
        assert "is a Nydus data blob" in r.stderr and "--content-store" in r.stderr, r.stderr
        assert "no processor for media-type" not in r.stderr
        # nothing is left half-made
        ls = stack.ctr("snapshots", "--snapshotter", "nydus", "ls").check().stdout
        assert ls.count("\n") <= 1, ls
    finally:
        proxy.stop()


@pytest.mark.slow
@pytest.mark.kernel
def test_stock_ctr_pull_through_the_content_store_skips_the_blob(
    tmp_path: Path,
    nydus_image: NydusImage,
    registry_plain: RegistryServer,  # noqa: F811
) -> None:
    """Stock ``ctr image pull`` + ``ctr run`` with containerd's content store proxied to the
    snapshotter: the blob layer is neither downloaded nor applied, the bootstrap layer is
    unpacked by containerd and found by the container's ``Prepare``."""
    _push_nydus(nydus_image, registry_plain, "nydus-stock-2")
    proxy = FaultProxy(registry_plain)
    ref = f"{proxy.host}/nydus-stock-2:1"
    mounter = KernelErofsMounter(nydus_image.blob_dir, tmp_path / "rafs")
    s = Stack(tmp_path, mounter, content_store=True).start()
    lazy = s.sn_root / "content" / "lazy" / "sha256" / nydus_image.blob_digest.split(":")[1]
    try:
        s.ctr("image", "pull", "--plain-http", "--snapshotter", "nydus", ref).check()
        assert proxy.blob_bytes(nydus_image.blob_digest) == 0, "the blob was downloaded"
        assert proxy.blob_bytes(nydus_image.boot_digest) == len(nydus_image.boot_layer)
        assert json.loads(lazy.read_text())["size"] == len(nydus_image.blob)
        r = s.ctr(
            "run", "--rm", "--snapshotter", "nydus", ref, "s1", "/bin/busybox", "cat",
            "/etc/hello.txt",
        )  # fmt: skip
        assert r.check().stdout == "hello from a nydus image\n", s.diagnostics()
        ((sid, _, image_ref, labels),) = mounter.calls
        assert image_ref == ref
        assert labels.get("containerd.io/snapshot/nydus-bootstrap") == "true"
        wait_for(lambda: mounter.umounts == [sid], what="Nydus mount released on removal")
        gc_image(s, ref)
        wait_for(lambda: snapshot_dirs(s.sn_root) == [], what="all snapshot dirs removed")
        wait_for(lambda: not lazy.exists(), what="lazy entry collected")
        assert proxy.blob_bytes(nydus_image.blob_digest) == 0
    finally:
        s.stop()
        proxy.stop()


@pytest.mark.slow
@pytest.mark.kernel
def test_nydus_image_blob_skipped_and_container_runs_through_mounter(
    tmp_path: Path,
    nydus_image: NydusImage,
    registry_plain: RegistryServer,  # noqa: F811
) -> None:
    _push_nydus(nydus_image, registry_plain, "nydus-busybox")
    proxy = FaultProxy(registry_plain)
    ref = f"{proxy.host}/nydus-busybox:1"
    mounter = KernelErofsMounter(nydus_image.blob_dir, tmp_path / "rafs")
    s = Stack(tmp_path, mounter).start()
    try:
        # no CRI labels: the snapshotter must find the image through containerd itself
        res = _pull(s, ref, proxy.host, cri_labels=False)
        assert len(res.skipped) == 1 and len(res.applied) == 1, res
        assert proxy.blob_bytes(nydus_image.blob_digest) == 0, "the blob was downloaded"
        assert proxy.blob_bytes(nydus_image.boot_digest) == len(nydus_image.boot_layer)
        ls = s.ctr("snapshots", "--snapshotter", "nydus", "ls").check().stdout
        assert res.skipped[0] in ls and res.chain_id in ls
        # stock ctr run: the image counts as unpacked, the container gets the Nydus lower dir
        r = s.ctr(
            "run", "--rm", "--snapshotter", "nydus", ref, "n1", "/bin/busybox", "cat",
            "/etc/hello.txt",
        )  # fmt: skip
        assert r.check().stdout == "hello from a nydus image\n", s.diagnostics()
        ((sid, boot, image_ref, labels),) = mounter.calls
        assert image_ref == ref  # found through containerd's Images + Content services
        assert boot.endswith("/fs/image/image.boot")
        assert labels.get("containerd.io/snapshot/nydus-bootstrap") == "true"
        wait_for(lambda: mounter.umounts == [sid], what="Nydus mount released on removal")
        assert not os.path.ismount(tmp_path / "rafs" / sid)
        # removing the image lets containerd's GC remove the remote snapshots too
        gc_image(s, ref)
        wait_for(lambda: snapshot_dirs(s.sn_root) == [], what="all snapshot dirs removed")
        assert proxy.blob_bytes(nydus_image.blob_digest) == 0
    finally:
        s.stop()
        proxy.stop()


@pytest.mark.slow
def test_nydus_image_runs_through_the_daemon_manager_with_a_localfs_template(
    tmp_path: Path,
    nydus_image: NydusImage,
    registry_plain: RegistryServer,  # noqa: F811
) -> None:
    """The same image with the shipped mounter, blobs from a ``localfs`` template.

    (``nydus-image create --compressor none`` names its blob by an id that is not the sha256
    of the blob file, so a registry cannot serve it under that id: the registry path is the
    business of nydusify-converted images, in test_e2e_snapshotter.py.)
    """
    _push_nydus(nydus_image, registry_plain, "nydus-busybox-2")
    ref = f"{registry_plain.host}/nydus-busybox-2:1"
    cfg = tmp_path / "nydusd-localfs.json"
    cfg.write_text(
        json.dumps(
            {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": str(nydus_image.blob_dir)}},
                    "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
                },
                "enable_xattr": True,
            }
        )
    )
    s = Stack(tmp_path, sn_args=["--config-path", str(cfg)]).start()
    try:
        # the module's command line (the console script nydus-pull runs the same code)
        p = subprocess.run(
            [sys.executable, "-m", "nydus.cli.pull", "-a", str(s.ctd.address),
             "-n", s.ctd.namespace, "--plain-http", ref],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert len(res["skipped"]) == 1 and len(res["applied"]) == 1, res
        r = s.ctr("run", "--rm", "--snapshotter", "nydus", ref, "n2", "/bin/cat", "/etc/hello.txt")
        assert r.returncode == 0, f"{r.stderr}\n{s.diagnostics()}"
        assert r.stdout == "hello from a nydus image\n"
    finally:
        assert s.stop() == 0


@pytest.mark.slow
def test_daemon_mode_none_fails_clearly(
    tmp_path: Path,
    nydus_image: NydusImage,
    registry_plain: RegistryServer,  # noqa: F811
) -> None:
    _push_nydus(nydus_image, registry_plain, "nydus-busybox-3")
    ref = f"{registry_plain.host}/nydus-busybox-3:1"
    s = Stack(tmp_path, sn_args=["--daemon-mode", "none"]).start()
    try:
        _pull(s, ref, registry_plain.host, cri_labels=False)
        r = s.ctr("run", "--rm", "--snapshotter", "nydus", ref, "n3", "/bin/busybox", "true")
        assert r.returncode != 0
        assert "runs no nydusd daemon manager" in r.stderr and ref in r.stderr, r.stderr
        # nothing was left behind for the failed container: blob layer + bootstrap layer only
        assert len(snapshot_dirs(s.sn_root)) == 2
    finally:
        assert s.stop() == 0


# -- fidelity with containerd's own overlayfs snapshotter ----------------------------------


def _normalized_mounts(s: Stack, snapshotter: str, root: Path, chains: list[str]) -> list[str]:
    """``ctr snapshots ... --mounts`` answers, with snapshot dirs renamed S0, S1, ... in order."""
    sn = ["snapshots", "--snapshotter", snapshotter]
    out = [
        s.ctr(*sn, "prepare", "--mounts", f"{snapshotter}-a", chains[-1]).check().stdout,
        s.ctr(*sn, "view", "--mounts", f"{snapshotter}-v2", chains[-1]).check().stdout,
        s.ctr(*sn, "view", "--mounts", f"{snapshotter}-v1", chains[0]).check().stdout,
        s.ctr(*sn, "prepare", "--mounts", f"{snapshotter}-root").check().stdout,
        s.ctr(*sn, "mounts", "/target", f"{snapshotter}-a").check().stdout,
    ]
    names: dict[str, str] = {}

    def rename(m: re.Match[str]) -> str:
        return names.setdefault(m.group(0), f"S{len(names)}")

    pattern = re.compile(re.escape(str(root)) + r"/snapshots/\d+")
    return [pattern.sub(rename, o) for o in out]


@pytest.mark.slow
def test_mounts_match_containerd_overlayfs(stack: Stack, busybox_ref: str) -> None:
    s = stack
    for sn in ("overlayfs", "nydus"):
        s.ctr("image", "pull", "--plain-http", "--snapshotter", sn, busybox_ref).check()
    chains = s.ctr("image", "pull", "--plain-http", "--print-chainid", busybox_ref).check()
    ids = re.findall(r"sha256:[0-9a-f]{64}", chains.stdout)
    top = ids[-1]
    ls = s.ctr("snapshots", "--snapshotter", "nydus", "ls").check().stdout
    bottom = next(line.split()[0] for line in ls.splitlines()[1:] if len(line.split()) == 2)
    overlay_root = s.ctd.root / "io.containerd.snapshotter.v1.overlayfs"
    theirs = _normalized_mounts(s, "overlayfs", overlay_root, [bottom, top])
    ours = _normalized_mounts(s, "nydus", s.sn_root, [bottom, top])
    assert ours == theirs
    assert "lowerdir=" in ours[0] and "upperdir=" in ours[0] and "bind" in ours[2]
