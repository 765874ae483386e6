"""Kernel EROFS mode (fs_driver "erofs"): the kernel mounts the v6 bootstrap, nydusd serves the
blob devices as files on its blob fs and fills them on demand.

Covers the acceptance: the format corpus served lazily from a real registry compares equal to
the source; the upstream v6 fixture mounts this way with localfs; v5 falls back to fusedev; a
corrupted chunk gives EIO; the switch to native; a SIGKILLed daemon leaves reads failing, not
hanging; sub-mounts of a shared daemon through the API with ``fs_driver`` in the body.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_nydusd import Nydusd, cli, localfs_config, md5_tree, nydus_image
from test_nydusd_registry import REPO, _publish_under_blob_id

import registry as harness
from corpus import TreeInfo
from nydus.metadata import open_bootstrap
from registry import FaultProxy, RegistryServer
from treecmp import compare_trees

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]

registry_plain = harness.registry_plain
fault_proxy = harness.fault_proxy

MiB = 1 << 20


def _mounts(path: Path) -> list[str]:
    """File system types mounted at ``path`` (bottom first)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(path):
                out.append(parts[parts.index("-") + 1])
    return out


def _cleanup(mnt: Path) -> None:
    # by the mount table, not os.path.ismount: a dead daemon's FUSE root whose cached
    # attributes expired answers stat with ENOTCONN, and ismount then says "not a mount"
    for _ in range(4):
        if _mounts(mnt):
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def _start(tmp_path: Path, mnt: Path, cfg: dict[str, Any], boot: Path, *extra: str) -> Nydusd:
    cfg_path = tmp_path / f"cfg-{time.monotonic_ns()}.json"
    cfg_path.write_text(json.dumps(cfg))
    sock = tmp_path / "api.sock"
    d = Nydusd(
        ["--config", cfg_path, "--mountpoint", mnt, "--bootstrap", boot, "--apisock", sock, *extra],
        mnt,
        cwd=tmp_path,
        apisock=sock,
    )
    return d.start()


@pytest.fixture
def mnt(tmp_path: Path) -> Any:
    m = tmp_path / "mnt"
    m.mkdir()
    yield m
    _cleanup(m)


def _image(tmp_path: Path, src: Path, compressor: str = "zstd") -> tuple[Path, Path, str]:
    blobs = tmp_path / "blobs"
    blobs.mkdir(exist_ok=True)
    boot = tmp_path / "boot"
    nydus_image(
        tmp_path,
        "create",
        "--bootstrap",
        boot,
        "--blob-dir",
        blobs,
        "--compressor",
        compressor,
        src,
    )
    with open_bootstrap(boot) as md:
        [blob] = md.blobs
    return boot, blobs, blob.blob_id


def test_upstream_v6_fixture_erofs_localfs(fixtures_dir: Path, tmp_path: Path, mnt: Path) -> None:
    boot = fixtures_dir / "v6" / "rafs-v6-2.2.boot"
    cfg = localfs_config(fixtures_dir / "v6" / "blobs", digest_validate=True, fs_driver="erofs")
    with _start(tmp_path, mnt, cfg, boot) as d:
        assert _mounts(mnt) == ["fuse.rafs", "erofs"]
        got = md5_tree(mnt)
        assert (mnt / "lib.rs").read_bytes().startswith(b"// Copyright")
        assert len(got) >= 2
        info = _daemon_info(d)
        be = info["backend_collection"]["/"]
        assert be["fs_driver"] == "erofs" and be["erofs"]["mode"] == "lazy"
        blobfs = info["blobfs"]
        assert blobfs and be["erofs"]["devices"][0].startswith(blobfs)
        # the blob fs served the reads, through the storage layer (validated)
        files = info["blob_files"]
        assert sum(f["bytes_read"] for f in files.values()) > 0
        metrics = d.client.metrics("backend")
        assert metrics["read_count"] > 0 and metrics["read_errors"] == 0
    assert _mounts(mnt) == []
    assert not os.path.ismount(blobfs)
    # the same tree as FUSE RAFS mode gives
    cfg2 = localfs_config(fixtures_dir / "v6" / "blobs", digest_validate=True, fs_driver="fusedev")
    with _start(tmp_path, mnt, cfg2, boot):
        assert _mounts(mnt) == ["fuse.rafs"]
        assert md5_tree(mnt) == got


def _daemon_info(d: Nydusd) -> dict[str, Any]:
    status, body = _request(d, "GET", "/api/v1/daemon", None)
    assert status == 200, body
    return dict(json.loads(body))


def test_v5_falls_back_to_fusedev(fixtures_dir: Path, tmp_path: Path, mnt: Path) -> None:
    cfg = localfs_config(fixtures_dir / "v5" / "blobs", fs_driver="erofs")
    with _start(tmp_path, mnt, cfg, fixtures_dir / "v5" / "blake3-nocompress.boot") as d:
        assert _mounts(mnt) == ["fuse.rafs"]
        assert md5_tree(mnt)
        assert _daemon_info(d)["backend_collection"]["/"]["fs_driver"] == "fusedev"
        assert "fs_driver fusedev (RAFS v5 is not an EROFS image)" in d.log_text()


def test_corpus_lazily_from_registry(
    sample_tree: TreeInfo,
    registry_plain: RegistryServer,
    fault_proxy: FaultProxy,
    tmp_path: Path,
    mnt: Path,
) -> None:
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry not installed")
    boot, blobs, blob_id = _image(tmp_path, sample_tree.root)
    digest = _publish_under_blob_id(registry_plain, blobs / blob_id, blob_id)
    fault_proxy.clear()
    cfg = {
        "device": {
            "backend": {
                "type": "registry",
                "config": {"scheme": "http", "host": fault_proxy.host, "repo": REPO},
            },
            "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}},
        },
        "mode": "direct",
        "digest_validate": True,
        "enable_xattr": True,
        "fs_driver": "erofs",
    }
    with _start(tmp_path, mnt, cfg, boot) as d:
        assert _mounts(mnt) == ["fuse.rafs", "erofs"]
        os.listdir(mnt)
        assert fault_proxy.blob_bytes(digest) == 0  # metadata never leaves the kernel
        diffs = compare_trees(sample_tree.root, mnt)
        assert diffs == []
        assert fault_proxy.blob_bytes(digest) > 0
        backend = d.client.metrics("backend")
        assert backend["backend_type"] == "registry" and backend["read_errors"] == 0
        d.check_alive()


def test_corrupted_chunk_gives_eio(tmp_path: Path, mnt: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good").write_bytes(b"g" * (2 * MiB))
    (src / "bad").write_bytes(os.urandom(3 * MiB))
    boot, blobs, blob_id = _image(tmp_path, src, compressor="none")
    with open_bootstrap(boot) as md:
        chunks = md.chunks(md.resolve("/bad"))
        off = chunks[1].compressed_offset + 100
    with open(blobs / blob_id, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    cfg = localfs_config(blobs, digest_validate=True, fs_driver="erofs")
    with _start(tmp_path, mnt, cfg, boot, "--log-level", "info") as d:
        assert (mnt / "good").read_bytes() == b"g" * (2 * MiB)
        with open(mnt / "bad", "rb") as f:
            f.seek(MiB)
            with pytest.raises(OSError) as ei:
                f.read(4096)
            assert ei.value.errno == errno.EIO
        d.check_alive()


def test_switch_to_native(tmp_path: Path, mnt: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(2 * MiB + i))
    boot, blobs, blob_id = _image(tmp_path, src)
    cache = tmp_path / "cache"
    cfg = localfs_config(blobs, digest_validate=True, fs_driver="erofs")
    cfg["device"]["cache"] = {"type": "blobcache", "config": {"work_dir": str(cache)}}
    with _start(tmp_path, mnt, cfg, boot) as d:
        old = open(mnt / "f0", "rb")  # noqa: SIM115 - kept open across the switch
        try:
            assert old.read(4096) == (src / "f0").read_bytes()[:4096]
            # read everything once: the blob becomes complete in the cache
            for i in range(4):
                assert (mnt / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
            deadline = time.monotonic() + 20
            be: dict[str, Any] = {}
            while time.monotonic() < deadline:
                be = _daemon_info(d)["backend_collection"]["/"]
                if be["erofs"]["mode"] == "native":
                    break
                time.sleep(0.2)
            assert be["erofs"]["mode"] == "native", d.log_text()
            assert be["erofs"]["devices"] == [str(cache / f"{blob_id}.blob.data")]
            assert _mounts(mnt) == ["fuse.rafs", "erofs"]  # the lazy one is detached
            assert "switched to native" in d.log_text()
            # the switch made (and removed) its staging directory on a tmpfs of the daemon's
            # own, not on the disk holding /run: removing a directory there can wait for the
            # disk (a synchronous discard on ext4 without a journal) while the switch holds
            # its lock
            assert d.proc is not None
            assert _mounts(Path("/run/nydusd-blobfs") / str(d.proc.pid) / "stage") == ["tmpfs"]
            # the file opened before the switch keeps working
            old.seek(0)
            assert old.read() == (src / "f0").read_bytes()
        finally:
            old.close()
        before = _daemon_info(d)["blob_files"]
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        for i in range(4):
            assert (mnt / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()
        after = _daemon_info(d)["blob_files"]
        # no reads went through the daemon's blob fs after the switch
        assert {k: v["reads"] for k, v in after.items()} == {
            k: v["reads"] for k, v in before.items()
        }
    assert _mounts(mnt) == []
    # a new daemon with the blob complete goes native as soon as it has hashed the cache file
    # (in the background; reads meanwhile go through the blob fs, from the cache)
    with _start(tmp_path, mnt, cfg, boot) as d:
        assert (mnt / "f3").read_bytes() == (src / "f3").read_bytes()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            be = _daemon_info(d)["backend_collection"]["/"]
            if be["erofs"]["mode"] == "native":
                break
            time.sleep(0.2)
        assert be["erofs"]["mode"] == "native", d.log_text()
        assert "every cached chunk verified" in d.log_text()
        assert (mnt / "f2").read_bytes() == (src / "f2").read_bytes()


def _resident(path: Path) -> float:
    """The part of ``path``'s pages in the page cache of the file system it is on (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    # a private mapping (ctypes needs a writable buffer); untouched, it shows the file's pages
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        head = ctypes.c_char.from_buffer(m)
        try:
            rc = libc.mincore(ctypes.addressof(head), size, vec)
        finally:
            del head  # the mapping cannot close while ctypes holds it
    if rc != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(b & 1 for b in vec.raw) / pages


def test_switch_to_native_keeps_what_was_read_in_the_page_cache(tmp_path: Path, mnt: Path) -> None:
    """The native instance is mounted with the page cache the lazy one had: the file ranges
    the kernel read through the blob fs are read into it before it replaces the lazy one, so
    the first container after the switch does not copy them from the blob files again."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("read", "prefetched"):
        (src / name).write_bytes(os.urandom(8 * MiB))
    blobs, boot = tmp_path / "blobs", tmp_path / "boot"
    # "prefetched" is the image's prefetch table: the blob is complete (and the switch can
    # happen) only once this test has read "read" too
    subprocess.run(
        [*cli("nydus-image"), "create", "-B", boot, "-D", blobs, "--prefetch-policy", "fs", src],
        input="/prefetched\n",
        text=True,
        check=True,
        capture_output=True,
    )
    cfg = localfs_config(blobs, fs_driver="erofs")
    cfg["device"]["cache"] = {"type": "blobcache", "config": {"work_dir": str(tmp_path / "c")}}
    cfg["fs_prefetch"] = {"enable": True, "prefetch_all": False}
    with _start(tmp_path, mnt, cfg, boot) as d:
        # read one file through the lazy instance; prefetch fetched the other one
        assert (mnt / "read").read_bytes() == (src / "read").read_bytes()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _daemon_info(d)["backend_collection"]["/"]["erofs"]["mode"] == "native":
                break
            time.sleep(0.1)
        assert "switched to native" in d.log_text(), d.log_text()
        assert "8.0 MiB of 1 files, move and detach" in d.log_text(), d.log_text()
        # the mount point is the native instance now: its page cache holds the file read
        # before, and not the one only prefetch fetched (nothing read it through EROFS)
        assert _resident(mnt / "read") == 1.0
        assert _resident(mnt / "prefetched") < 0.5
        assert (mnt / "read").read_bytes() == (src / "read").read_bytes()
        assert (mnt / "prefetched").read_bytes() == (src / "prefetched").read_bytes()


def test_sigkill_leaves_reads_failing_not_hanging(tmp_path: Path, mnt: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(2 * MiB))
    (src / "b").write_bytes(os.urandom(2 * MiB))
    boot, blobs, _ = _image(tmp_path, src)
    cfg = localfs_config(blobs, fs_driver="erofs", amplify_io=0)
    d = _start(tmp_path, mnt, cfg, boot)
    try:
        blobfs = _daemon_info(d)["blobfs"]
        assert (mnt / "a").read_bytes() == (src / "a").read_bytes()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        # a read of data nobody fetched: must fail, quickly
        code = (
            "import sys\ntry:\n open(sys.argv[1],'rb').read()\nexcept OSError as e:\n"
            " print(e.errno); sys.exit(3)\nprint('ok')"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(mnt / "b")], capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert int(r.stdout.strip()) in (errno.EIO, errno.ENOTCONN)
        # data already in the page cache stays readable
        assert (mnt / "a").read_bytes() == (src / "a").read_bytes()
        # the snapshotter's recovery: detach the stale mounts, start a new daemon
        _cleanup(mnt)
        subprocess.run(["umount", "-l", blobfs], capture_output=True, check=False)
        assert _mounts(mnt) == []
        with _start(tmp_path, mnt, cfg, boot):
            assert (mnt / "b").read_bytes() == (src / "b").read_bytes()
    finally:
        d.stop()


def test_sendfd_refused_with_erofs_mounts(fixtures_dir: Path, tmp_path: Path, mnt: Path) -> None:
    """Failover cannot keep kernel EROFS mounts (their blob fs dies with the daemon): the FUSE
    fd hand-over is refused at once, not attempted."""
    boot = fixtures_dir / "v6" / "rafs-v6-2.2.boot"
    cfg = localfs_config(fixtures_dir / "v6" / "blobs", fs_driver="erofs")
    with _start(tmp_path, mnt, cfg, boot, "--supervisor", str(tmp_path / "sup.sock")) as d:
        status, out = _request(d, "PUT", "/api/v1/daemon/fuse/sendfd", None)
        assert status == 501, out
        assert b"failover of kernel EROFS mounts (/) is not supported" in out
        assert (mnt / "lib.rs").read_bytes().startswith(b"// Copyright")


def test_shared_daemon_api_mount_with_fs_driver(
    fixtures_dir: Path, tmp_path: Path, mnt: Path
) -> None:
    sock = tmp_path / "api.sock"
    with Nydusd(
        ["--mountpoint", mnt, "--apisock", sock], mnt, cwd=tmp_path, apisock=sock
    ).start() as d:
        cfg6 = json.dumps(localfs_config(fixtures_dir / "v6" / "blobs"))
        cfg5 = json.dumps(localfs_config(fixtures_dir / "v5" / "blobs"))
        _post_mount(d, "/v6", fixtures_dir / "v6" / "rafs-v6-2.2.boot", cfg6, "erofs")
        _post_mount(d, "/v5", fixtures_dir / "v5" / "blake3-nocompress.boot", cfg5, "erofs")
        _post_mount(d, "/f6", fixtures_dir / "v6" / "rafs-v6-2.2.boot", cfg6, "fusedev")
        _post_mount(d, "/d6", fixtures_dir / "v6" / "rafs-v6-2.2.boot", cfg6, None)
        assert _mounts(mnt / "v6") == ["erofs"] and _mounts(mnt / "d6") == ["erofs"]
        assert _mounts(mnt / "v5") == [] and _mounts(mnt / "f6") == []
        assert md5_tree(mnt / "v6") == md5_tree(mnt / "f6") == md5_tree(mnt / "d6")
        bc = _daemon_info(d)["backend_collection"]
        # no fs_driver in the request or the config: the daemon default, erofs
        assert {p: b["fs_driver"] for p, b in bc.items()} == {
            "/v6": "erofs",
            "/v5": "fusedev",
            "/f6": "fusedev",
            "/d6": "erofs",
        }
        _request(d, "DELETE", "/api/v1/mount?mountpoint=/v6", None)
        assert _mounts(mnt / "v6") == [] and not (mnt / "v6").exists()
        assert sorted(os.listdir(mnt)) == ["d6", "f6", "v5"]


def _request(d: Nydusd, method: str, path: str, body: Any) -> tuple[int, bytes]:
    import http.client
    import socket

    class _Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(d.apisock))

    c = _Conn("localhost", timeout=30)
    c.request(method, path, body=json.dumps(body) if body is not None else None)
    r = c.getresponse()
    return r.status, r.read()


def _post_mount(d: Nydusd, path: str, boot: Path, cfg: str, driver: str | None) -> None:
    body: dict[str, Any] = {"source": str(boot), "fs_type": "rafs", "config": cfg}
    if driver:
        body["fs_driver"] = driver
    status, out = _request(d, "POST", f"/api/v1/mount?mountpoint={path}", body)
    assert status == 204, out


def test_image_mounted_again_after_release_reads_its_blobs(tmp_path: Path, mnt: Path) -> None:
    # the kernel keeps the blob fs entry of a released blob (and its node, which a detached
    # mount may still read); the same blob registered again must be served through it
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(MiB + 4096 * i))
    boot, blobs, _blob_id = _image(tmp_path, src)
    sock = tmp_path / "api.sock"
    with Nydusd(
        ["--mountpoint", mnt, "--apisock", sock], mnt, cwd=tmp_path, apisock=sock
    ).start() as d:
        cfg = json.dumps(localfs_config(blobs))
        _post_mount(d, "/a", boot, cfg, "erofs")
        (mnt / "a" / "f0").read_bytes()  # the rest of the blob is not in the page cache
        _request(d, "DELETE", "/api/v1/mount?mountpoint=/a", None)
        _post_mount(d, "/b", boot, cfg, "erofs")
        assert md5_tree(mnt / "b") == md5_tree(src)
