"""nydusd end to end: the real CLI in a subprocess, real FUSE mounts, real files.

The seed walkthrough (layers built with ``nydus-image create --parent-bootstrap`` and served by
``nydusd --config ./localfs.json``) equals the source layers overlaid; the upstream v5/v6
fixtures mount and every file's md5 matches; a shared daemon serves several images through
``/api/v1/mount`` and unmounting one leaves the others working; bad input fails clearly.

Every test that mounts uses :class:`Nydusd` as a context manager or fixture: it fails fast
when the daemon dies, and always unmounts (``umount -l`` as the last resort).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corpus import make_tree
from nydus.daemon.client import ApiClientError, NydusdClient
from treecmp import compare_trees

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

_BOOT = "import sys; from nydus.cli.{mod} import main; sys.argv[0] = '{prog}'; sys.exit(main())"


def cli(prog: str) -> list[str]:
    """argv prefix running ``prog`` (nydusd, nydusctl) with this interpreter."""
    return [sys.executable, "-c", _BOOT.format(mod=prog.replace("-", "_"), prog=prog)]


class Nydusd:
    """A ``nydusd`` subprocess; ``start()`` waits for its mount (or fails with its log)."""

    def __init__(
        self,
        args: list[str | os.PathLike[str]],
        mountpoint: Path,
        *,
        cwd: Path,
        apisock: Path | None = None,
    ) -> None:
        self.mountpoint = mountpoint
        self.cwd = cwd
        stamp = time.monotonic_ns()
        self.log = cwd / f"nydusd-{stamp}.log"
        self.args = [os.fspath(a) for a in args]
        if apisock is None and "--apisock" not in self.args:
            # readiness is the RUNNING state, not the mount point: in kernel EROFS mode the
            # image's mount is stacked on the daemon's FUSE mount a moment after that appears
            apisock = cwd / f"nydusd-{stamp}.sock"
            self.args += ["--apisock", os.fspath(apisock)]
        self.apisock = apisock
        self.proc: subprocess.Popen[bytes] | None = None

    def start(
        self, timeout: float = 30.0, expect_mount: bool = True, expect_state: str = "RUNNING"
    ) -> Nydusd:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*cli("nydusd"), *self.args],
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            mounted = os.path.ismount(self.mountpoint) or not expect_mount
            ready = self.apisock is None or self._state() == expect_state
            if mounted and ready:
                return self
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"nydusd did not come up in {timeout}s:\n{self.log_text()}", pytrace=False)

    def _state(self) -> str:
        assert self.apisock is not None
        try:
            return NydusdClient(str(self.apisock), timeout=2).state()
        except Exception:
            return ""

    @property
    def client(self) -> NydusdClient:
        assert self.apisock is not None
        return NydusdClient(str(self.apisock), timeout=30)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            text = self.log_text()
            self._cleanup_mount()
            pytest.fail(f"nydusd exited with {self.proc.returncode}:\n{text}", pytrace=False)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                rc = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        elif self.proc is not None:
            rc = self.proc.returncode
        self._cleanup_mount()
        return rc

    def _cleanup_mount(self) -> None:
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", str(self.mountpoint)], capture_output=True, check=False)
        if os.path.ismount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)

    def __enter__(self) -> Nydusd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def localfs_config(blob_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}}},
        "mode": "direct",
        **extra,
    }


def run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout
    )


def nydus_image(cwd: Path, *args: str | os.PathLike[str]) -> None:
    proc = run([*cli("nydus-image"), *(os.fspath(a) for a in args)], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]


def create_image(tmp_path: Path, src: Path, *extra: str) -> Path:
    """``nydus-image create`` of ``src`` (zstd, the default) into ``tmp_path/boot`` and the
    directory ``tmp_path/blobs``, which is returned."""
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    nydus_image(
        tmp_path, "create", "--bootstrap", tmp_path / "boot", "--blob-dir", blobs, *extra, src
    )
    return blobs


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    for _ in range(2):
        if os.path.ismount(m):
            subprocess.run(["umount", "-l", str(m)], capture_output=True, check=False)


def md5_tree(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for n in files:
            p = Path(dirpath, n)
            if p.is_file() and not p.is_symlink():
                out["/" + str(p.relative_to(root))] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


# --- the seed walkthrough -----------------------------------------------------------------

_T = 1_700_000_000 * 10**9


def _layer2(d: Path) -> None:
    (d / "sizes").mkdir(parents=True)
    (d / "sizes" / "size-1").write_bytes(b"X")  # modified file
    (d / "sizes" / ".wh.size-0").write_bytes(b"")  # deleted
    (d / "data").mkdir()
    (d / "data" / ".wh..wh..opq").write_bytes(b"")  # opaque: lower content hidden
    (d / "data" / "only-new").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (d / "new2").mkdir()
    (d / "new2" / "a").write_bytes(b"hardlinked in layer 2\n" * 100)
    os.link(d / "new2" / "a", d / "new2" / "b")
    os.symlink("sizes/size-1", d / "l2link")


def _layer3(d: Path) -> None:
    (d / "new2").mkdir(parents=True)
    (d / "new2" / ".wh.a").write_bytes(b"")
    (d / "new2" / "c").write_bytes(b"layer 3")


def _layer4(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / ".wh.deep").write_bytes(b"")
    (d / "final.txt").write_bytes(b"the last layer\n")
    (d / "empty-dir").mkdir()
    (d / "empty-dir" / "now-full").write_bytes(b"x" * 5000)


def _fix_dir_times(d: Path, seed: int) -> None:
    """Deterministic attributes on every directory of a layer (they win in the overlay)."""
    for i, (dirpath, _dirs, _files) in enumerate(sorted(os.walk(d))):
        os.chmod(dirpath, 0o755)
        os.utime(dirpath, ns=(_T + seed * 1000 + i, _T + seed * 1000 + i))


def overlay_into(dst: Path, layer: Path) -> None:
    """Apply an OCI layer directory (with .wh. whiteouts) onto ``dst``, as the merged view
    must look. Upper layers here hold only directories, regular files, hardlinks, symlinks."""
    links: dict[tuple[int, int], Path] = {}
    dirs: list[tuple[Path, os.stat_result]] = []
    for dirpath, dirnames, filenames in os.walk(layer):
        rel = Path(dirpath).relative_to(layer)
        target = dst / rel
        names = dirnames + filenames
        if ".wh..wh..opq" in names:
            for child in list(target.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        for n in names:
            if n.startswith(".wh.") and n != ".wh..wh..opq":
                victim = target / n[4:]
                if victim.is_dir() and not victim.is_symlink():
                    shutil.rmtree(victim)
                elif victim.exists() or victim.is_symlink():
                    victim.unlink()
        for n in dirnames:
            t = target / n
            if (t.exists() or t.is_symlink()) and not t.is_dir():
                t.unlink()
            t.mkdir(exist_ok=True)
        for n in filenames:
            if n.startswith(".wh."):
                continue
            src, t = Path(dirpath, n), target / n
            if t.is_dir() and not t.is_symlink():
                shutil.rmtree(t)
            elif t.exists() or t.is_symlink():
                t.unlink()
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), t)
            elif (st.st_dev, st.st_ino) in links:
                os.link(links[(st.st_dev, st.st_ino)], t)
                continue
            else:
                shutil.copyfile(src, t)
                links[(st.st_dev, st.st_ino)] = t
                os.chmod(t, stat.S_IMODE(st.st_mode))
            os.lchown(t, st.st_uid, st.st_gid)
            os.utime(t, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        dirs.append((target, os.stat(dirpath)))
    for target, st in reversed(dirs):
        os.chmod(target, stat.S_IMODE(st.st_mode))
        os.chown(target, st.st_uid, st.st_gid)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_seed_walkthrough_layers_overlaid(tmp_path: Path, mnt: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    layers = [work / f"diff{i}" for i in range(1, 5)]
    make_tree(layers[0], scale="small")
    for fn, d in zip((_layer2, _layer3, _layer4), layers[1:], strict=True):
        fn(d)
    for i, d in enumerate(layers[1:], 2):
        _fix_dir_times(d, i)
    # the walkthrough, step by step (relative paths, cwd = the work dir)
    for i in range(1, 5):
        (work / "nydus-image" / f"layer{i}").mkdir(parents=True)
    (work / "nydus-image" / "blobs").mkdir()
    nydus_image(
        work,
        "create",
        "--bootstrap",
        "./nydus-image/layer1/bootstrap",
        "--blob-dir",
        "./nydus-image/blobs",
        "--compressor",
        "none",
        layers[0],
    )
    for i in range(2, 5):
        nydus_image(
            work,
            "create",
            "--parent-bootstrap",
            f"./nydus-image/layer{i - 1}/bootstrap",
            "--bootstrap",
            f"./nydus-image/layer{i}/bootstrap",
            "--blob-dir",
            "./nydus-image/blobs",
            "--compressor",
            "none",
            layers[i - 1],
        )
    (work / "localfs.json").write_text(
        json.dumps(
            {
                "device": {
                    "backend": {
                        "type": "localfs",
                        "config": {"dir": str(work / "nydus-image" / "blobs")},
                    }
                },
                "mode": "direct",
            },
            indent=2,
        )
    )
    expected = tmp_path / "expected"
    make_tree(expected, scale="small")  # deterministic: the same as layer 1
    for d in layers[1:]:
        overlay_into(expected, d)
    args = [
        "--config",
        "./localfs.json",
        "--mountpoint",
        mnt,
        "--bootstrap",
        "./nydus-image/layer4/bootstrap",
        "--log-level",
        "info",
    ]
    with Nydusd(args, mnt, cwd=work).start() as d:
        diffs = compare_trees(expected, mnt)
        assert diffs == [], "\n".join(diffs[:50])
        assert not (mnt / "sizes" / "size-0").exists()
        assert (mnt / "data" / "only-new").stat().st_size == 3 * 1024 * 1024 + 17
        assert sorted(os.listdir(mnt / "data")) == ["only-new"]
        assert not (mnt / "deep").exists() and not (mnt / "new2" / "a").exists()
        d.check_alive()
        assert d.stop() == 0
    assert not os.path.ismount(mnt)
    assert "nydusd exits" in d.log_text()


# --- upstream fixtures ----------------------------------------------------------------------


def _v5_expected(fixtures_dir: Path) -> dict[str, str]:
    text = (fixtures_dir / "v5" / "blake3-nocompress.result").read_text()
    _listing, end = json.JSONDecoder().raw_decode(text)
    return {
        path.strip(): digest
        for digest, path in (ln.split(None, 1) for ln in text[end:].splitlines() if ln.strip())
    }


def test_upstream_v5_fixture_md5(fixtures_dir: Path, tmp_path: Path, mnt: Path) -> None:
    cfg = tmp_path / "localfs.json"
    cfg.write_text(json.dumps(localfs_config(fixtures_dir / "v5" / "blobs")))
    args = [
        "--config",
        cfg,
        "--mountpoint",
        mnt,
        "--bootstrap",
        fixtures_dir / "v5" / "blake3-nocompress.boot",
    ]
    with Nydusd(args, mnt, cwd=tmp_path).start():
        want = _v5_expected(fixtures_dir)
        got = md5_tree(mnt)
        assert got == want


def test_upstream_v6_fixture_md5(fixtures_dir: Path, tmp_path: Path, mnt: Path) -> None:
    from nydus.metadata import open_bootstrap
    from nydus.storage.blobfile import open_local_blob

    boot = fixtures_dir / "v6" / "rafs-v6-2.2.boot"
    want = {}
    with open_bootstrap(boot) as md:  # decoded by the format layer, digests verified
        reader, close = open_local_blob(
            str(fixtures_dir / "v6" / "blobs" / md.blobs[0].blob_id), md.blobs[0]
        )
        try:
            for path, nid in md.walk():
                if md.getattr(nid).is_reg:
                    data = b"".join(reader.read_chunk(c) for c in md.chunks(nid))
                    want[path.decode()] = hashlib.md5(data).hexdigest()
        finally:
            close()
    cfg = tmp_path / "localfs.json"
    cfg.write_text(json.dumps(localfs_config(fixtures_dir / "v6" / "blobs", digest_validate=True)))
    with Nydusd(
        ["--config", cfg, "--mountpoint", mnt, "--bootstrap", boot], mnt, cwd=tmp_path
    ).start():
        assert md5_tree(mnt) == want
        assert (mnt / "lib.rs").read_bytes().startswith(b"// Copyright")


# --- shared daemon --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three different images sharing one blob directory."""
    base = tmp_path_factory.mktemp("three")
    blobs = base / "blobs"
    blobs.mkdir()
    out: dict[str, Any] = {"blobs": blobs, "src": {}, "boot": {}}
    for name in ("a", "b", "c"):
        src = base / f"src-{name}"
        (src / "dir").mkdir(parents=True)
        for i in range(5):
            (src / "dir" / f"f{i}").write_bytes(f"{name}{i}".encode() * (1000 * (i + 1)))
        (src / "name").write_text(name)
        (src / "big").write_bytes(hashlib.sha256(name.encode()).digest() * 70000)
        nydus_image(base, "create", "--bootstrap", base / f"{name}.boot", "--blob-dir", blobs, src)
        out["src"][name] = src
        out["boot"][name] = base / f"{name}.boot"
    return out


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_shared_daemon_mounts_several_images(
    three_images: dict[str, Any], tmp_path: Path, mnt: Path, driver: str
) -> None:
    sock = tmp_path / "api.sock"
    cfg = json.dumps(localfs_config(three_images["blobs"]))
    boot, src = three_images["boot"], three_images["src"]
    with Nydusd(
        ["--mountpoint", mnt, "--apisock", sock, "--id", "shared", "--fs-driver", driver],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start() as d:
        c = d.client
        assert os.listdir(mnt) == []
        c.mount("/a", str(boot["a"]), cfg)
        c.mount("/b", str(boot["b"]), cfg)
        c.mount("/nested/c", str(boot["c"]), cfg)
        assert sorted(os.listdir(mnt)) == ["a", "b", "nested"]
        for name, sub in (("a", mnt / "a"), ("b", mnt / "b"), ("c", mnt / "nested" / "c")):
            assert compare_trees(src[name], sub) == []
            assert md5_tree(sub) == md5_tree(src[name])
        st_a, st_b = os.stat(mnt / "a" / "name"), os.stat(mnt / "b" / "name")
        # distinct files: one inode space (fusedev) or one file system per image (erofs)
        assert (st_a.st_dev, st_a.st_ino) != (st_b.st_dev, st_b.st_ino)
        keep_open = open(mnt / "b" / "big", "rb")  # noqa: SIM115
        try:
            c.umount("/b")
            assert sorted(os.listdir(mnt)) == ["a", "nested"]
            assert not (mnt / "b").exists()
            # the others keep working, and so does a file left open on the unmounted one
            assert (mnt / "a" / "name").read_text() == "a"
            assert (mnt / "nested" / "c" / "dir" / "f4").read_bytes() == b"c4" * 5000
            assert keep_open.read() == (src["b"] / "big").read_bytes()
        finally:
            keep_open.close()
        # mount again (a different image at the same place), and remount in place
        c.mount("/b", str(boot["c"]), cfg)
        assert (mnt / "b" / "name").read_text() == "c"
        c.remount("/b", str(boot["a"]), cfg)
        assert (mnt / "b" / "name").read_text() == "a"
        info = c.info()
        assert info["state"] == "RUNNING" and info["id"] == "shared"
        assert sorted(info["backend_collection"]) == ["/a", "/b", "/nested/c"]
        assert {b["fs_driver"] for b in info["backend_collection"].values()} == {driver}
        assert c.metrics(fs_id="/a")["data_read"] > 0
        # nydusctl against the live daemon
        proc = run([*cli("nydusctl"), "--sock", str(sock), "umount", "/nested/c"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert sorted(os.listdir(mnt)) == ["a", "b"]
        proc = run([*cli("nydusctl"), "--sock", str(sock), "info"], tmp_path)
        assert proc.returncode == 0 and "RUNNING" in proc.stdout
        with pytest.raises(ApiClientError) as ei:
            c.mount("/a", str(boot["a"]), cfg)
        assert ei.value.status == 409
        if driver == "erofs":
            # an external umount of one image's kernel mount detaches that image only
            subprocess.run(["umount", str(mnt / "b")], check=True)
            deadline = time.monotonic() + 10
            while "/b" in c.info()["backend_collection"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sorted(c.info()["backend_collection"]) == ["/a"]
            assert (mnt / "a" / "name").read_text() == "a"
            assert "/b: the kernel EROFS mount" in d.log_text()
        d.check_alive()
        assert d.stop() == 0


def test_sigint_and_external_umount_end_the_daemon(
    three_images: dict[str, Any], tmp_path: Path, mnt: Path
) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(localfs_config(three_images["blobs"])))
    args = ["--config", cfg, "--mountpoint", mnt, "--bootstrap", three_images["boot"]["a"]]
    with Nydusd(args, mnt, cwd=tmp_path).start() as d:
        assert d.stop(signal.SIGINT) == 0
        assert not os.path.ismount(mnt)
    with Nydusd(args, mnt, cwd=tmp_path).start() as d:
        subprocess.run(["umount", str(mnt)], check=True)
        assert d.proc is not None and d.proc.wait(20) == 0
        assert "session ended" in d.log_text()


# --- bad input ------------------------------------------------------------------------------


def _fails(args: list[Any], cwd: Path, rc: int | None = None, *words: str) -> str:
    proc = run([*cli("nydusd"), *map(os.fspath, args)], cwd, timeout=60)
    assert proc.returncode != 0, proc.stderr
    if rc is not None:
        assert proc.returncode == rc, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    return proc.stderr


def test_bad_startup_input_fails_clearly(
    three_images: dict[str, Any], tmp_path: Path, mnt: Path
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(localfs_config(three_images["blobs"])))
    boot = three_images["boot"]["a"]
    _fails(
        ["--config", good, "--mountpoint", mnt, "--bootstrap", tmp_path / "missing"],
        tmp_path,
        3,
        "cannot read bootstrap",
    )
    corrupt = tmp_path / "corrupt.boot"
    raw = bytearray(boot.read_bytes())
    raw[1024:1028] = b"\0\0\0\0"  # no EROFS magic
    corrupt.write_bytes(bytes(raw))
    _fails(
        ["--config", good, "--mountpoint", mnt, "--bootstrap", corrupt],
        tmp_path,
        3,
        "not a RAFS bootstrap",
    )
    truncated = tmp_path / "truncated.boot"
    truncated.write_bytes(boot.read_bytes()[:3000])
    _fails(["--config", good, "--mountpoint", mnt, "--bootstrap", truncated], tmp_path, 3)
    bad_key = tmp_path / "badkey.json"
    cfg = localfs_config(three_images["blobs"])
    cfg["device"]["backend"]["config"]["dirr"] = "/x"
    bad_key.write_text(json.dumps(cfg))
    _fails(
        ["--config", bad_key, "--mountpoint", mnt, "--bootstrap", boot],
        tmp_path,
        2,
        "device.backend.config",
        "dirr",
    )
    bad_type = tmp_path / "badtype.json"
    bad_type.write_text(json.dumps(localfs_config(three_images["blobs"], digest_validate="yes")))
    _fails(
        ["--config", bad_type, "--mountpoint", mnt, "--bootstrap", boot],
        tmp_path,
        2,
        "digest_validate",
    )
    not_json = tmp_path / "notjson.json"
    not_json.write_text("{ this is not json")
    _fails(["--config", not_json, "--mountpoint", mnt, "--bootstrap", boot], tmp_path, 2)
    _fails(
        ["--config", good, "--mountpoint", tmp_path / "nope", "--bootstrap", boot],
        tmp_path,
        2,
        "mountpoint",
    )
    _fails(["virtiofs", "--sock", "/x"], tmp_path, 2, "not supported")
    _fails(["--mountpoint", mnt], tmp_path, 2, "--apisock")  # nothing could ever be served
    assert not os.path.ismount(mnt)
    # a mount point in use
    with Nydusd(
        ["--config", good, "--mountpoint", mnt, "--bootstrap", boot], mnt, cwd=tmp_path
    ).start():
        _fails(
            ["--config", good, "--mountpoint", mnt, "--bootstrap", boot],
            tmp_path,
            None,
            "already in use",
        )
        assert (mnt / "name").read_text() == "a"


def test_missing_blob_fails_only_affected_reads(tmp_path: Path, mnt: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    (lower / "d" / "old").write_bytes(b"lower" * 100000)
    upper.mkdir()
    (upper / "new").write_bytes(b"upper" * 100000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    nydus_image(tmp_path, "create", "--bootstrap", tmp_path / "l1", "--blob-dir", blobs, lower)
    nydus_image(
        tmp_path,
        "create",
        "--parent-bootstrap",
        tmp_path / "l1",
        "--bootstrap",
        tmp_path / "l2",
        "--blob-dir",
        blobs,
        upper,
    )
    from nydus.metadata import open_bootstrap

    with open_bootstrap(tmp_path / "l2") as md:
        lower_blob = md.blobs[0].blob_id
    os.unlink(blobs / lower_blob)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(localfs_config(blobs)))
    sock = tmp_path / "api.sock"
    with Nydusd(
        ["--config", cfg, "--mountpoint", mnt, "--bootstrap", tmp_path / "l2", "--apisock", sock],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start() as d:
        assert (mnt / "d" / "old").stat().st_size == 500000
        with pytest.raises(OSError) as ei:
            (mnt / "d" / "old").read_bytes()
        assert ei.value.errno == errno.EIO
        assert (mnt / "new").read_bytes() == b"upper" * 100000
        assert sorted(os.listdir(mnt)) == ["d", "new"]
        d.check_alive()
        g = d.client.metrics()
        assert g["fop_errors"][4] >= 1  # READ
        # bad API requests get 4xx from the live daemon too
        for body in (b"{", b"[]", json.dumps({"source": "/nope", "config": "{}"}).encode()):
            with pytest.raises(ApiClientError) as e2:
                d.client.request("POST", "/api/v1/mount", body, {"mountpoint": "/x"})
            assert 400 <= e2.value.status < 500
        d.check_alive()


@pytest.mark.parametrize("driver", ["fusedev", "erofs"])
def test_concurrent_random_reads(tmp_path: Path, mnt: Path, driver: str) -> None:
    """32 threads read random ranges of random files (some O_DIRECT, some after dropping the
    file's page cache) for a bounded time; every byte must match the source. In erofs mode
    the blob files' page cache is dropped all the time too, so reads keep reaching the daemon
    (and its pushes race with them); O_DIRECT opens fail there (a kernel limit, checked)."""
    import mmap
    import random
    import threading

    src = tmp_path / "src"
    rng = random.Random(7)
    files: list[Path] = []
    for i in range(40):
        d = src / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.choice(
            [0, 1, 4095, 4097, 70_000, 1 << 20, 3 * (1 << 20) + 11, rng.randrange(1, 2 << 20)]
        )
        p = d / f"f{i}"
        p.write_bytes(rng.randbytes(size) if i % 3 else (b"compressible %d " % i) * (size // 16))
        files.append(p)
    blobs = create_image(tmp_path, src, "--chunk-size", "0x40000")
    cfg = tmp_path / "c.json"
    cfg.write_text(
        json.dumps(
            {
                **localfs_config(blobs, digest_validate=True),
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                    "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "c")}},
                },
            }
        )
    )
    sock = tmp_path / "api.sock"
    data = {str(p.relative_to(src)): p.read_bytes() for p in files}
    duration = float(os.environ.get("NYDUSD_STRESS_SECONDS", "20"))
    errors: list[str] = []
    counts = [0] * 32

    def reader(t: int) -> None:
        r = random.Random(t)
        buf = mmap.mmap(-1, 4 << 20)
        deadline = time.monotonic() + duration
        try:
            while time.monotonic() < deadline and len(errors) < 5:
                rel = r.choice(list(data))
                want = data[rel]
                off = r.randrange(0, len(want) + 10)
                n = r.choice([1, 512, 4096, 65536, 1 << 20, 3 << 20])
                mode = t % 4
                flags = os.O_RDONLY | (os.O_DIRECT if mode == 0 else 0)
                if mode == 0 and driver == "erofs":
                    try:
                        os.close(os.open(mnt / rel, flags))
                        errors.append(f"{rel}: O_DIRECT open worked on file-backed EROFS")
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                    flags, mode = os.O_RDONLY, 2
                fd = os.open(mnt / rel, flags)
                try:
                    if mode == 1:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    if mode == 0:
                        k = os.preadv(fd, [memoryview(buf)[:n]], off)
                        got = bytes(buf[:k])
                    else:
                        got = os.pread(fd, n, off)
                finally:
                    os.close(fd)
                if got != want[off : off + n]:
                    errors.append(f"{rel} @{off}+{n}: {len(got)} bytes, mismatch")
                counts[t] += 1
        except Exception as e:
            errors.append(f"thread {t}: {e!r}")
        finally:
            buf.close()

    def drop_blob_pages(blobfs: str, stop: threading.Event) -> None:
        while not stop.wait(0.2):
            for name in os.listdir(blobfs):
                fd = os.open(os.path.join(blobfs, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    with Nydusd(
        [
            "--config",
            cfg,
            "--mountpoint",
            mnt,
            "--bootstrap",
            tmp_path / "boot",
            "--apisock",
            sock,
            "--fuse-threads",
            "8",
            "--fs-driver",
            driver,
        ],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start() as d:
        info = d.client.info()
        assert info["backend_collection"]["/"]["fs_driver"] == driver
        threads = [threading.Thread(target=reader, args=(t,)) for t in range(32)]
        stop = threading.Event()
        if driver == "erofs":
            threads.append(threading.Thread(target=drop_blob_pages, args=(info["blobfs"], stop)))
        for th in threads:
            th.start()
        for th in threads[:32]:
            th.join()
        stop.set()
        for th in threads[32:]:
            th.join()
        d.check_alive()
        assert not errors, errors[:5]
        assert sum(counts) > 32 * 10 and min(counts) > 0
        print(f"{sum(counts)} reads by 32 threads in {duration:.0f} s, 0 mismatches")
        g = d.client.metrics()
        assert sum(g["fop_errors"]) == 0, g["fop_errors"]
        assert d.stop() == 0


def test_open_counting_and_access_pattern(
    three_images: dict[str, Any], tmp_path: Path, mnt: Path
) -> None:
    """Default: zero-message opens (no OPEN/RELEASE round trips). With iostats_files the
    daemon serves opens and counts them per file; access_pattern lists files in read order."""
    boot, src = three_images["boot"]["b"], three_images["src"]["b"]
    sock = tmp_path / "api.sock"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(localfs_config(three_images["blobs"])))
    with Nydusd(
        [
            "--config",
            plain,
            "--mountpoint",
            mnt,
            "--bootstrap",
            boot,
            "--apisock",
            sock,
            "--fs-driver",
            "fusedev",
        ],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start() as d:
        for _ in range(3):
            assert (mnt / "name").read_text() == "b"
        g = d.client.metrics()
        assert g["fop_hits"][2] == 0 and g["data_read"] == 1  # OPEN never reached us
    stats = tmp_path / "stats.json"
    stats.write_text(
        json.dumps(
            localfs_config(
                three_images["blobs"],
                iostats_files=True,
                access_pattern=True,
                latest_read_files=True,
            )
        )
    )
    with Nydusd(
        ["--config", stats, "--mountpoint", mnt, "--bootstrap", boot, "--apisock", sock],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start() as d:
        assert (mnt / "dir" / "f3").read_bytes() == (src / "dir" / "f3").read_bytes()
        assert (mnt / "name").read_text() == "b"
        c = d.client
        # per-file metrics asked for: the daemon default (erofs) gave way to fusedev
        assert c.info()["backend_collection"]["/"]["fs_driver"] == "fusedev"
        assert "per-file metrics" in d.log_text()
        g = c.metrics()
        assert g["fop_hits"][2] == 2 and g["nr_opens"] == 0
        files = c.metrics("files")
        f3 = str(os.stat(mnt / "dir" / "f3").st_ino)
        assert files[f3]["nr_max_open"] == 1 and files[f3]["data_read"] == 8000
        pattern = c.metrics("pattern")
        assert [p["file_path"] for p in pattern] == ["/dir/f3", "/name"]
        assert sorted(c.get("/api/v1/metrics/files", latest="true")) == sorted(
            int(os.stat(mnt / n).st_ino) for n in ("dir/f3", "name")
        )


def test_virtual_mountpoint_and_log_file(
    three_images: dict[str, Any], tmp_path: Path, mnt: Path
) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(localfs_config(three_images["blobs"])))
    log = tmp_path / "nydusd.log"
    sock = tmp_path / "api.sock"
    with Nydusd(
        [
            "--config",
            cfg,
            "--mountpoint",
            mnt,
            "--bootstrap",
            three_images["boot"]["a"],
            "--virtual-mountpoint",
            "/img",
            "--log-file",
            log,
            "--log-level",
            "debug",
            "--apisock",
            sock,
        ],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    ).start() as d:
        assert os.listdir(mnt) == ["img"]
        assert (mnt / "img" / "name").read_text() == "a"
        d.client.mount("/other", str(three_images["boot"]["c"]), cfg.read_text())
        assert sorted(os.listdir(mnt)) == ["img", "other"]
        assert (mnt / "other" / "name").read_text() == "c"
        # erofs (the default): the kernel read one page of the blob device for the 1-byte file
        assert d.client.info()["backend_collection"]["/img"]["fs_driver"] == "erofs"
        assert d.client.metrics(fs_id="/img")["data_read"] == 4096
        assert d.stop() == 0
    text = log.read_text()
    assert "mounted" in text and "DEBUG" in text and "nydusd exits" in text
    assert "] INFO [" in text  # upstream-like line format
    assert d.log_text().strip() == ""  # nothing on stderr when logging to a file
