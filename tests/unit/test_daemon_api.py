"""The API server against an in-process daemon (no FUSE mount): routes, state machine,
{code, message} errors with 4xx statuses for bad input, socket permissions, nydusctl."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corpus import TreeInfo
from nydus.cli import nydusctl
from nydus.daemon import ApiServer, DaemonOptions, DaemonState, Nydusd
from nydus.daemon.client import ApiClientError, NydusdClient
from nydus.daemon.state import DaemonEvent, StateError, StateMachine


@pytest.fixture(scope="module")
def image(sample_tree: TreeInfo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import NydusImage

    out = tmp_path_factory.mktemp("apiimg")
    blobs = out / "blobs"
    blobs.mkdir()
    NydusImage(cwd=out)(
        "create", "--bootstrap", out / "boot", "--blob-dir", blobs, sample_tree.root
    )
    return out / "boot", blobs


def _config(blobs: Path, **extra: Any) -> str:
    return json.dumps(
        {
            "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
            "mode": "direct",
            **extra,
        }
    )


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Nydusd, NydusdClient, str]]:
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), id="test-daemon"))
    sock = str(tmp_path / "api" / "nydusd.sock")
    server = ApiServer(d, sock)
    server.start()
    yield d, NydusdClient(sock, timeout=10), sock
    server.stop()
    d.shutdown()


def _err(fn: Any, *a: Any, **kw: Any) -> ApiClientError:
    with pytest.raises(ApiClientError) as ei:
        fn(*a, **kw)
    return ei.value


def test_state_machine() -> None:
    sm = StateMachine()
    assert sm.state == DaemonState.INIT
    with pytest.raises(StateError):
        sm.fire(DaemonEvent.START)
    assert sm.fire(DaemonEvent.MOUNT) == DaemonState.READY
    assert sm.fire(DaemonEvent.START) == DaemonState.RUNNING
    assert sm.wait_for(DaemonState.RUNNING, timeout=0)
    assert sm.fire(DaemonEvent.EXIT) == DaemonState.STOPPED


def test_socket_is_private(api: tuple[Nydusd, NydusdClient, str]) -> None:
    _d, _c, sock = api
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_a_live_socket_is_not_stolen(api: tuple[Nydusd, NydusdClient, str], tmp_path: Path) -> None:
    d, _c, sock = api
    from nydus.errors import ConfigError

    with pytest.raises(ConfigError, match="in use"):
        ApiServer(d, sock)
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        ApiServer(d, str(regular))


def test_mount_start_metrics_umount(
    api: tuple[Nydusd, NydusdClient, str], image: tuple[Path, Path]
) -> None:
    d, c, _ = api
    boot, blobs = image
    info = c.info()
    assert info["state"] == "INIT" and info["id"] == "test-daemon"
    assert info["version"]["package_ver"]
    c.mount(
        "/one",
        str(boot),
        _config(blobs, iostats_files=True, access_pattern=True, latest_read_files=True),
    )
    assert c.state() == "READY"
    c.start()
    assert c.state() == "RUNNING"
    c.mount("/two", str(boot), json.loads(_config(blobs)))
    info = c.info()
    assert sorted(info["backend_collection"]) == ["/one", "/two"]
    assert info["backend_collection"]["/one"]["rafs_version"] == 6
    fs = d.images["/one"].fs
    ino = fs.resolve("/sizes/size-4097")
    fs.read(ino, 0, 10000)
    g = c.metrics(fs_id="/one")
    assert g["id"] == "/one" and g["data_read"] == 4097
    assert c.metrics("backend", "/one")["read_count"] >= 1
    assert "underlying_files" in c.metrics("blobcache", "/one")
    assert str(ino) in c.metrics("files", "/one")
    assert [p["ino"] for p in c.metrics("pattern", "/one")] == [ino]
    assert c.get("/api/v1/metrics/files", id="/one", latest="true") == [ino]
    assert c.metrics("inflight") == {"values": []}
    prom = c.get("/api/v1/metrics/prometheus")
    assert 'nydusd_data_read_bytes_total{fs_id="/one"} 4097' in prom
    assert c.get("/metrics") == prom or "nydusd_up" in c.get("/metrics")
    assert c.get("/api/v1/daemon/backend", mountpoint="/two")["mountpoint"] == "/two"
    assert c.get("/api/v1/config", id="/one")["device"]["backend"]["type"] == "localfs"
    c.umount("/one")
    assert sorted(c.info()["backend_collection"]) == ["/two"]
    e = _err(c.metrics, "", "/one")
    assert e.status == 404 and e.code == "NotFound"
    c.remount("/two", str(boot), _config(blobs))
    assert c.get("/api/v1/daemon/events")["total_errors"] >= 0


def test_bad_requests_get_4xx_and_the_daemon_survives(
    api: tuple[Nydusd, NydusdClient, str], image: tuple[Path, Path]
) -> None:
    _d, c, sock = api
    boot, blobs = image
    cases = [
        (("POST", "/api/v1/mount", b"{not json", {"mountpoint": "/x"}), 400),
        (("POST", "/api/v1/mount", b"[1, 2]", {"mountpoint": "/x"}), 400),
        (("POST", "/api/v1/mount", {"source": str(boot)}, None), 400),  # no mountpoint
        (("POST", "/api/v1/mount", {"source": str(boot)}, {"mountpoint": "/x"}), 400),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": str(boot), "config": _config(blobs), "bogus": 1},
                {"mountpoint": "/x"},
            ),
            400,
        ),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": str(boot), "config": _config(blobs), "fs_type": "ext4"},
                {"mountpoint": "/x"},
            ),
            400,
        ),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": str(boot), "config": '{"device": 1}'},
                {"mountpoint": "/x"},
            ),
            400,
        ),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": "/no/such/bootstrap", "config": _config(blobs)},
                {"mountpoint": "/x"},
            ),
            400,
        ),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": str(blobs), "config": _config(blobs)},
                {"mountpoint": "/x"},
            ),
            400,
        ),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": str(boot), "config": _config(blobs)},
                {"mountpoint": "relative"},
            ),
            400,
        ),
        (
            (
                "POST",
                "/api/v1/mount",
                {"source": str(boot), "config": _config(blobs)},
                {"mountpoint": "/../x"},
            ),
            400,
        ),
        (("DELETE", "/api/v1/mount", None, {"mountpoint": "/nothing"}), 404),
        (
            (
                "PUT",
                "/api/v1/mount",
                {"source": str(boot), "config": _config(blobs)},
                {"mountpoint": "/nothing"},
            ),
            404,
        ),
        (("GET", "/api/v1/nothing", None, None), 404),
        (("DELETE", "/api/v1/daemon", None, None), 405),
        (("PUT", "/api/v1/daemon", {"log_level": "loud"}, None), 400),
        (("PUT", "/api/v1/daemon", {"unknown": 1}, None), 400),
        (("PUT", "/api/v1/daemon/fuse/sendfd", None, None), 501),  # no --supervisor
        (("GET", "/api/v1/metrics", None, None), 404),  # nothing mounted
        (("GET", "/api/v2/blobs", None, None), 501),
    ]
    for (method, path, body, query), status in cases:
        with pytest.raises(ApiClientError) as ei:
            c.request(method, path, body, query)
        e = ei.value
        assert e.status == status, (method, path, body, e)
        assert e.code and e.message
    e = _err(
        c.request,
        "POST",
        "/api/v1/mount",
        {
            "source": str(boot),
            "config": '{"device": {"backend": {"type": "localfs", '
            '"config": {"dir": "/x", "nope": 1}}}}',
        },
        {"mountpoint": "/x"},
    )
    assert "device.backend.config" in e.message and "nope" in e.message
    c.mount("/x", str(boot), _config(blobs))
    assert _err(c.mount, "/x", str(boot), _config(blobs)).status == 409
    # raw garbage on the socket, a huge body, then a normal request still works
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(b"\x00\x01garbage\r\n\r\n")
    s.recv(1000)
    s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(b"PUT /api/v1/daemon HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n")
    assert b" 413 " in s.recv(1000)
    s.close()
    assert c.state() == "READY"


def test_concurrent_requests(
    api: tuple[Nydusd, NydusdClient, str], image: tuple[Path, Path]
) -> None:
    _d, c, _ = api
    boot, blobs = image
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(10):
                c.info()
                try:
                    c.request("POST", "/api/v1/mount", b"{", {"mountpoint": f"/w{i}"})
                except ApiClientError as e:
                    assert e.status == 400
            c.mount(f"/w{i}", str(boot), _config(blobs))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(c.info()["backend_collection"]) == 8


def test_set_log_level_and_exit(api: tuple[Nydusd, NydusdClient, str]) -> None:
    import logging

    d, c, _ = api
    old = logging.getLogger().level
    try:
        c.set_log_level("debug")
        assert logging.getLogger().level == logging.DEBUG
    finally:
        logging.getLogger().setLevel(old)
    c.exit()
    assert d._exit.is_set()
    d.shutdown()
    assert c.state() == "STOPPED"
    e = _err(c.start)
    assert e.status == 409 and e.code == "InvalidState"


def test_nydusctl(
    api: tuple[Nydusd, NydusdClient, str],
    image: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _d, _c, sock = api
    boot, blobs = image
    cfg = tmp_path / "cfg.json"
    cfg.write_text(_config(blobs))
    assert (
        nydusctl.main(["--sock", sock, "mount", "-s", str(boot), "-c", str(cfg), "-m", "/sub"]) == 0
    )
    assert nydusctl.main(["--sock", sock, "info"]) == 0
    out = capsys.readouterr().out
    assert "State" in out and "/sub" in out and "INIT" not in out.split("State")[1][:20]
    assert nydusctl.main(["--sock", sock, "--raw", "info"]) == 0
    assert json.loads(capsys.readouterr().out)["backend_collection"]["/sub"]
    for kind in ("fsstats", "backend", "cache", "inflight"):
        assert nydusctl.main(["--sock", sock, "metrics", kind]) == 0, kind
    out = capsys.readouterr().out
    assert "FOP" in out and "read_count" in out
    assert nydusctl.main(["--sock", sock, "--raw", "metrics", "backend"]) == 0
    assert json.loads(capsys.readouterr().out)["backend_type"] == "localfs"
    assert nydusctl.main(["--sock", sock, "set", "log-level", "info"]) == 0
    assert nydusctl.main(["--sock", sock, "umount", "/sub"]) == 0
    assert nydusctl.main(["--sock", sock, "umount", "/sub"]) == 1
    assert "NotFound" in capsys.readouterr().err
    assert nydusctl.main(["--sock", str(tmp_path / "nope.sock"), "info"]) == 2
