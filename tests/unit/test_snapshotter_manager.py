"""Unit tests of the daemon manager's parts that need no daemon: per-image nydusd configs and
credentials, cache GC, the Prometheus text, daemon records, the failover fd supervisor."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from containerd import ARTICLE_NYDUSD_CONFIG as ARTICLE
from nydus.errors import ConfigError
from nydus.fuse.fdpass import recv_fds, send_fds
from nydus.snapshotter.containerd.errdefs import DaemonError
from nydus.snapshotter.daemons import cachegc
from nydus.snapshotter.daemons.imageconfig import (
    DEFAULT_TEMPLATE,
    PULL_SECRET,
    PULL_USERNAME,
    check_template,
    image_config,
)
from nydus.snapshotter.daemons.manager import DaemonManager, ImageMetrics, resolve_nydusd
from nydus.snapshotter.daemons.metrics import parse_address, render
from nydus.snapshotter.daemons.process import DaemonProcess, log_tail
from nydus.snapshotter.daemons.supervisor import FdSupervisor


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


# -- image configs -------------------------------------------------------------------------------


def test_article_template_filled_per_image(tmp_path: Path) -> None:
    check_template(ARTICLE)
    cfg, creds = image_config(ARTICLE, "localhost:5000/ubuntu-nydus:latest", {}, tmp_path, None)
    b = cfg["device"]["backend"]["config"]
    assert (b["host"], b["repo"], b["scheme"]) == ("localhost:5000", "ubuntu-nydus", "http")
    assert cfg["device"]["cache"]["config"]["work_dir"] == str(tmp_path)
    assert cfg["fs_prefetch"] == {"enable": True, "threads_count": 4}
    assert creds == "none" and b["auth"] == ""
    assert ARTICLE["device"]["backend"]["config"].get("host") is None  # template untouched


def test_docker_hub_names(tmp_path: Path) -> None:
    cfg, _ = image_config(DEFAULT_TEMPLATE, "ubuntu:22.04", {}, tmp_path, None)
    b = cfg["device"]["backend"]["config"]
    assert (b["host"], b["repo"]) == ("registry-1.docker.io", "library/ubuntu")


def test_credentials_precedence(tmp_path: Path) -> None:
    dc = tmp_path / "config.json"
    dc.write_text(json.dumps({"auths": {"reg.example:5000": {"auth": b64("docker:pw")}}}))
    ref = "reg.example:5000/app:1"

    def auth(template: dict, labels: dict[str, str]) -> tuple[dict, str]:
        cfg, src = image_config(template, ref, labels, tmp_path, dc)
        return cfg["device"]["backend"]["config"], src

    b, src = auth(ARTICLE, {})
    assert src == "docker config" and b["auth"] == b64("docker:pw")
    tpl = json.loads(json.dumps(ARTICLE))
    tpl["device"]["backend"]["config"]["auth"] = b64("config:pw")
    b, src = auth(tpl, {})
    assert src == "config" and b["auth"] == b64("config:pw")
    b, src = auth(tpl, {PULL_USERNAME: "label", PULL_SECRET: "pw"})
    assert src == "labels" and b["auth"] == b64("label:pw")
    b, src = auth(tpl, {PULL_SECRET: "a-token"})
    assert src == "labels" and b["registry_token"] == "a-token"
    _, src = image_config(ARTICLE, "other.example/app:1", {}, tmp_path, dc)
    assert src == "none"


def test_unknown_reference_and_other_backends(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image reference of this Nydus image is unknown"):
        image_config(ARTICLE, None, {}, tmp_path, None)
    localfs = {"device": {"backend": {"type": "localfs", "config": {"dir": "/blobs"}}}}
    cfg, src = image_config(localfs, None, {}, tmp_path, None)
    assert cfg["device"]["backend"]["config"] == {"dir": "/blobs"} and src == "n/a"
    assert cfg["device"]["cache"] == {"type": "blobcache", "config": {"work_dir": str(tmp_path)}}
    with pytest.raises(ConfigError, match="--config-path"):
        check_template({"device": {"backend": {"type": "registry", "config": {}},
                                   "cache": {"type": "nocache"}}})  # fmt: skip


# -- cache GC ------------------------------------------------------------------------------------


def test_cache_gc_deletes_only_unused_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    for blob in (a, b, c):
        for suffix in (".blob.data", ".blob.data.chunk_map", ".blob.meta"):
            (tmp_path / (blob + suffix)).write_bytes(b"x" * 5000)
    (tmp_path / "unrelated.txt").write_text("keep me")
    (tmp_path / (c + ".blob.data.tmp")).write_text("not a cache file name")
    boots = {Path("/img1"): frozenset({a}), Path("/img2"): frozenset({a, b})}
    monkeypatch.setattr(cachegc, "blob_ids_of", lambda p: boots[Path(p)])
    u = cachegc.cache_usage(tmp_path)
    assert (u.blobs, u.files) == (3, 9) and u.bytes > 0
    res = cachegc.collect_garbage(tmp_path, [Path("/img2")])
    assert res.deleted_blobs == {c} and res.deleted_files == 3 and res.freed_bytes > 0
    res = cachegc.collect_garbage(tmp_path, [Path("/img1")])
    assert res.deleted_blobs == {b}
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([a + ".blob.data", a + ".blob.data.chunk_map", a + ".blob.meta",
                           "unrelated.txt", c + ".blob.data.tmp"])  # fmt: skip


def test_cache_gc_stops_on_an_unreadable_bootstrap(tmp_path: Path) -> None:
    (tmp_path / ("d" * 64 + ".blob.data")).write_bytes(b"x")
    bad = tmp_path / "bad.boot"
    bad.write_bytes(b"not a bootstrap" * 100)
    res = cachegc.collect_garbage(tmp_path, [bad])
    assert res.deleted_files == 0 and (tmp_path / ("d" * 64 + ".blob.data")).exists()


# -- metrics -------------------------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9110") == ("127.0.0.1", 9110)
    assert parse_address(":9110") == ("", 9110)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("9110", "host:", "h:99999", "h:x"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_render(tmp_path: Path) -> None:
    (tmp_path / ("e" * 64 + ".blob.data")).write_bytes(b"y" * 8192)
    fake = SimpleNamespace(
        image_metrics=lambda: [
            ImageMetrics("3", 'reg:5000/a"b:1', "3", 12345, 40000),
            ImageMetrics("7", "reg:5000/c:1", "shared", None, None),
        ],
        daemon_counts=lambda: {"dedicated": 1, "shared": 1},
        restarts=2,
        cache_dir=tmp_path,
        gc_freed_bytes=10,
        gc_deleted_blobs=1,
    )
    text = render(fake)  # type: ignore[arg-type]
    assert 'nydus_snapshotter_image_fetch_bytes{image="3",image_ref="reg:5000/a\\"b:1",' \
           'daemon="3"} 12345' in text  # fmt: skip
    assert 'image="7"' not in text  # no numbers for an image whose daemon did not answer
    assert "nydus_snapshotter_images 2" in text
    assert 'nydus_snapshotter_daemons{mode="shared"} 1' in text
    assert "nydus_snapshotter_daemon_restarts_total 2" in text
    assert "nydus_snapshotter_cache_bytes 8192" in text
    assert "# TYPE nydus_snapshotter_gc_freed_bytes_total counter" in text
    assert "bootstrap" not in text  # no snapshotter given: no bootstrap layer counters
    text = render(fake, SimpleNamespace(local_applies=3, local_fallbacks=1))  # type: ignore[arg-type]
    assert "# TYPE nydus_snapshotter_bootstrap_applies_total counter" in text
    assert "nydus_snapshotter_bootstrap_applies_total 3" in text
    assert "# TYPE nydus_snapshotter_bootstrap_fallbacks_total counter" in text
    assert "nydus_snapshotter_bootstrap_fallbacks_total 1" in text


# -- daemon records ------------------------------------------------------------------------------


def test_daemon_record_round_trip_and_liveness(tmp_path: Path) -> None:
    d = DaemonProcess("3", "dedicated", str(tmp_path / "m"), str(tmp_path / "a.sock"),
                      str(tmp_path / "log"), pid=os.getpid())  # fmt: skip
    assert DaemonProcess.from_json(json.loads(json.dumps(d.to_json()))) == d
    # our own pid is alive, but its command line does not name the API socket: not the daemon
    assert not d.alive()
    d.pid = 2**22 + 12345
    assert not d.alive()
    # a process whose command line names the socket, then a zombie of it
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", d.apisock])
    try:
        d.pid = p.pid
        deadline = time.monotonic() + 10
        while not d.alive() and time.monotonic() < deadline:  # until the exec happened
            time.sleep(0.01)
        assert d.alive()
        p.kill()
        time.sleep(0.2)  # not reaped yet: a zombie
        assert not d.alive()
    finally:
        p.kill()
        p.wait()


def test_wait_state_reports_the_log_of_a_dead_daemon(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    d = DaemonProcess("9", "dedicated", str(tmp_path / "m"), str(tmp_path / "a.sock"), str(log))
    fake = tmp_path / "fake-nydusd"
    fake.write_text("#!/bin/sh\necho 'config: something is wrong' >&2\nexit 2\n")
    fake.chmod(0o755)
    d.spawn(str(fake), "info")
    with pytest.raises(DaemonError) as ei:
        d.wait_state("RUNNING", 10)
    assert "exited before reaching RUNNING with status 2" in str(ei.value)
    assert "something is wrong" in str(ei.value)
    assert "something is wrong" in log_tail(log)


def test_image_ids_and_nydusd_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert DaemonManager.image_id(Path("/r/snapshots/12/fs/image/image.boot")) == "12"
    other = DaemonManager.image_id(Path("/elsewhere/image.boot"))
    assert other.startswith("b") and len(other) == 16
    # the article's --nydusd-path /usr/local/bin/nydusd falls back to this package's nydusd
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    monkeypatch.setattr(sys, "executable", str(fake_bin / "python"))
    with pytest.raises(ConfigError, match="no such executable"):
        resolve_nydusd("/nonexistent/nydusd")
    (fake_bin / "nydusd").write_text("#!/bin/sh\n")
    (fake_bin / "nydusd").chmod(0o755)
    assert resolve_nydusd("/nonexistent/nydusd") == str(fake_bin / "nydusd")
    assert resolve_nydusd("sh") == "/usr/bin/sh" or resolve_nydusd("sh").endswith("/sh")


# -- the failover fd supervisor ------------------------------------------------------------------


def test_supervisor_keeps_and_gives_back_fds(tmp_path: Path) -> None:
    sup = FdSupervisor(timeout=5)
    path = str(tmp_path / "d.sup")
    sup.listen("d", path)
    r, w = os.pipe()

    def daemon_sends() -> None:  # what PUT /api/v1/daemon/fuse/sendfd makes nydusd do
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            send_fds(s, b'{"state": 1}', [w])

    try:
        sup.collect("d", daemon_sends)
        assert sup.has_state("d")
        got: list[tuple[bytes, list[int]]] = []

        def daemon_takes_over() -> None:  # PUT /api/v1/daemon/fuse/takeover
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                got.append(recv_fds(s, 5))

        sup.give_back("d", daemon_takes_over)
        ((payload, fds),) = got
        assert payload == b'{"state": 1}' and len(fds) == 1
        os.write(fds[0], b"through the held fd")
        assert os.read(r, 100) == b"through the held fd"
        os.close(fds[0])
        # a request that fails does not leave the supervisor waiting for its timeout
        t0 = time.monotonic()
        with pytest.raises(RuntimeError):
            sup.collect("d", lambda: (_ for _ in ()).throw(RuntimeError("API said no")))
        assert time.monotonic() - t0 < 2
        assert sup.has_state("d")  # the old state is kept
    finally:
        sup.forget("d")
        sup.close()
        os.close(r)
        os.close(w)
    assert not os.path.exists(path)
    with pytest.raises(DaemonError):
        sup.give_back("d", lambda: None)


def test_supervisor_collect_times_out_when_nobody_sends(tmp_path: Path) -> None:
    sup = FdSupervisor(timeout=0.5)
    sup.listen("x", str(tmp_path / "x.sup"))
    try:
        with pytest.raises(DaemonError, match="did not send"):
            sup.collect("x", lambda: None)
        assert not sup.has_state("x")
    finally:
        sup.close()


def test_threads_left_behind_are_daemons() -> None:
    assert all(t.daemon for t in threading.enumerate() if t.name == "nydus-supervisor")


def test_fs_driver_flag_fills_the_template_unless_it_says(tmp_path: Path) -> None:
    from nydus.snapshotter.config import SnapshotterConfig

    def template(fs_driver: str | None, tpl: dict[str, object] | None = None) -> object:
        cfg = SnapshotterConfig(
            root=tmp_path / "root",
            cache_dir=tmp_path / "cache",
            nydusd_config=tpl or {},
            fs_driver=fs_driver,
        )
        m = DaemonManager(cfg, start_watcher=False)
        try:
            return m.template.get("fs_driver")
        finally:
            m.close()

    assert template(None) is None  # nydusd decides: erofs, or fusedev when supervised
    assert template("fusedev") == "fusedev"
    tpl = {**DEFAULT_TEMPLATE, "fs_driver": "erofs"}
    assert template("fusedev", tpl) == "erofs"  # the template's own choice wins
