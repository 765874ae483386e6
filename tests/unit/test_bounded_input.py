"""Bounded input (issue 12, point 5): bootstraps, the nydusd API, nydusd's replies to nydusctl.

Every test here is a regression test for a finding of an outside probe: a FIFO or /dev/zero as
a bootstrap, an oversized bootstrap, a mount that stalls the whole API, nested JSON, an
unbounded or trickling API request, and a nydusctl that crashed on (or believed) replies that
were not nydusd's. Anything that could hang on the old code runs in a subprocess or thread
with a timeout, so the suite fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corpus import TreeInfo
from nydus.cli import nydusctl
from nydus.daemon import ApiServer, DaemonOptions, Nydusd
from nydus.daemon import api as api_mod
from nydus.daemon.client import ApiClientError, NydusdClient


@pytest.fixture(scope="module")
def image(sample_tree: TreeInfo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import NydusImage

    out = tmp_path_factory.mktemp("boundimg")
    blobs = out / "blobs"
    blobs.mkdir()
    NydusImage(cwd=out)(
        "create", "--bootstrap", out / "boot", "--blob-dir", blobs, sample_tree.root
    )
    return out / "boot", blobs


def _config(blobs: Path) -> str:
    return json.dumps(
        {
            "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}}},
            "mode": "direct",
        }
    )


def _limit_memory() -> None:  # in the child: the old code read /dev/zero until OOM
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _open_in_child(path: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``open_bootstrap(path)`` in a child with bounded memory; prints the error line."""
    code = (
        "import sys\nfrom nydus.errors import NydusError\n"
        "from nydus.metadata import open_bootstrap\n"
        "try:\n    open_bootstrap(sys.argv[1])\nexcept NydusError as e:\n"
        "    print('ERROR', e)\n    sys.exit(3)\nprint('OPENED')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit_memory,
    )


def _unblock_fifo(fifo: Path) -> None:
    """Give a reader blocked on ``fifo`` its EOF (the old code waits there forever)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


# --- bootstraps ---------------------------------------------------------------------------------


def test_fifo_bootstrap_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "boot.fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    try:
        proc = _open_in_child(fifo, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("open_bootstrap blocked on a FIFO")
    assert time.monotonic() - t0 < 8
    assert proc.returncode == 3, proc.stderr
    assert "is a FIFO, not a regular file" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_dev_zero_bootstrap_is_refused() -> None:
    try:
        proc = _open_in_child(Path("/dev/zero"))
    except subprocess.TimeoutExpired:
        pytest.fail("open_bootstrap kept reading /dev/zero")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "/dev/zero is a device, not a regular file" in proc.stdout


def test_oversized_bootstrap_is_refused_with_the_limit_in_the_message(tmp_path: Path) -> None:
    from nydus.metadata import MAX_BOOTSTRAP_SIZE

    big = tmp_path / "big.boot"
    with open(big, "wb") as f:  # sparse: EROFS magic at 1024, then 600 MiB of holes
        f.seek(1024)
        f.write((0xE0F5E1E2).to_bytes(4, "little"))
        f.truncate(600 << 20)
    assert MAX_BOOTSTRAP_SIZE == 512 << 20
    proc = _open_in_child(big)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"bootstrap {big} is 600 MiB, over the 512 MiB limit" in proc.stdout


def test_blob_cache_refuses_a_hostile_blob_id(tmp_path: Path) -> None:
    """A blob id never becomes a path outside the cache (nor can BlobInfo hold one)."""
    import dataclasses

    from nydus.errors import FormatError
    from nydus.metadata import BlobInfo
    from nydus.storage.blobcache import BlobCacheFile

    good = BlobInfo(0, "a" * 64, 1 << 20, 1, "zstd", "sha256", 0, 100, 100)
    work = tmp_path / "x" / "y" / "cache"
    work.mkdir(parents=True)
    for evil in ("../../escaped", "..", "/abs", "a/b", ".hidden", "-opt", "x\0y", ""):
        with pytest.raises(FormatError, match="not a safe file name"):
            info = dataclasses.replace(good, blob_id=evil)
            BlobCacheFile(str(work), info)
        with pytest.raises(FormatError):
            object.__setattr__(good, "blob_id", evil)  # even a forged BlobInfo
            try:
                BlobCacheFile(str(work), good)
            finally:
                object.__setattr__(good, "blob_id", "a" * 64)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y"]
    assert not (tmp_path / "escaped.blob.data").exists()


# --- the API ------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Nydusd, NydusdClient, str]]:
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), id="bounds"))
    sock = str(tmp_path / "api" / "nydusd.sock")
    server = ApiServer(d, sock)
    server.start()
    yield d, NydusdClient(sock, timeout=10), sock
    server.stop()
    d.shutdown()


def _raw(sock: str, data: bytes, timeout: float = 10) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(sock)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)  # the server may answer and close before reading it all
        out = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                return out
            if not part:
                return out
            out += part
    finally:
        s.close()


def test_api_socket_dir_is_private(api: tuple[Nydusd, NydusdClient, str]) -> None:
    assert os.stat(os.path.dirname(api[2])).st_mode & 0o777 == 0o700


def test_nested_json_body_gets_400_and_nydusd_survives(
    api: tuple[Nydusd, NydusdClient, str], image: tuple[Path, Path]
) -> None:
    _d, c, _sock = api
    boot, blobs = image
    deep = b'{"log_level": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for method, path, body, query in [
        ("PUT", "/api/v1/daemon", deep, None),
        ("POST", "/api/v1/mount", deep, {"mountpoint": "/x"}),
        (
            "POST",
            "/api/v1/mount",
            {"source": str(boot), "config": '{"a":' * 50_000 + "1" + "}" * 50_000},
            {"mountpoint": "/x"},
        ),
        ("PUT", "/api/v1/daemon", b'{"log_level": ' + b"9" * 5000 + b"}", None),
    ]:
        with pytest.raises(ApiClientError) as ei:
            c.request(method, path, body, query)
        e = ei.value
        assert e.status == 400, (path, e)
        assert "nested" in e.message or "not JSON" in e.message, e.message
        assert "\n" not in e.message and len(e.message) < 300
    c.mount("/ok", str(boot), _config(blobs))
    assert c.state() == "READY"


def test_api_limits_headers_length_and_slow_clients(
    api: tuple[Nydusd, NydusdClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _d, c, sock = api
    # headers: 100 KiB of them is refused (431), not read into memory
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))
    assert b" 431 " in _raw(sock, b"GET /api/v1/daemon HTTP/1.1\r\n" + many + b"\r\n")[:40]
    # a JSON body needs a Content-Length; a malformed one is refused
    assert b" 411 " in _raw(sock, b"PUT /api/v1/daemon HTTP/1.1\r\n\r\n")[:40]
    for bad in (b"+5", b"5_0", b" -1", b"1e3", b"\xd9\xa5"):
        reply = _raw(sock, b"PUT /api/v1/daemon HTTP/1.1\r\nContent-Length: " + bad + b"\r\n\r\n{}")
        assert b" 400 " in reply[:40], (bad, reply[:200])
    # a client that stalls in its request is cut off (and meanwhile others are served)
    monkeypatch.setattr(api_mod, "REQUEST_DEADLINE", 1.0)
    monkeypatch.setattr(api_mod, "IDLE_TIMEOUT", 60.0)
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(8)
    s.connect(sock)
    try:
        s.sendall(b"PUT /api/v1/daemon HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        assert c.state() == "INIT"
        t0 = time.monotonic()
        try:
            got = s.recv(100)
        except TimeoutError:
            pytest.fail("a stalled API client was never disconnected")
        assert got == b"" or b" 400 " in got
        assert time.monotonic() - t0 < 6
    finally:
        s.close()
    assert c.state() == "INIT"


def test_api_connection_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_mod, "MAX_CONNECTIONS", 2)
    d = Nydusd(DaemonOptions(mountpoint=str(tmp_path), id="cap"))
    sock = str(tmp_path / "cap.sock")
    server = ApiServer(d, sock)
    server.start()
    held = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(b"GET /api/v1/daemon HTTP/1.1\r\n")  # and never finishes
            held.append(s)
        time.sleep(0.2)
        assert b" 503 " in _raw(sock, b"GET /api/v1/daemon HTTP/1.1\r\n\r\n")[:40]
    finally:
        for s in held:
            s.close()
        time.sleep(0.2)
        assert NydusdClient(sock, timeout=5).state() == "INIT"
        server.stop()
        d.shutdown()


def test_fifo_bootstrap_through_the_api_is_refused_and_the_api_stays_up(
    api: tuple[Nydusd, NydusdClient, str], image: tuple[Path, Path], tmp_path: Path
) -> None:
    _d, _c, sock = api
    _boot, blobs = image
    fifo = tmp_path / "api.fifo"
    os.mkfifo(fifo)
    quick = NydusdClient(sock, timeout=5)
    try:
        with pytest.raises(ApiClientError) as ei:
            quick.mount("/f", str(fifo), _config(blobs))
        assert ei.value.status == 400 and "is a FIFO, not a regular file" in ei.value.message
        with pytest.raises(ApiClientError) as ei:
            quick.mount("/z", "/dev/zero", _config(blobs))
        assert ei.value.status == 400 and "is a device" in ei.value.message
        assert quick.state() == "INIT"
    finally:
        _unblock_fifo(fifo)  # the old code is stuck reading it, holding the daemon lock


def test_api_answers_while_a_mount_loads(
    api: tuple[Nydusd, NydusdClient, str], image: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow bootstrap read (a big image, a slow disk) must not stall other requests."""
    from nydus.daemon import nydusd as service

    _d, c, _sock = api
    boot, blobs = image
    real = service.open_bootstrap
    loading = threading.Event()

    def slow_open(path: Any) -> Any:
        loading.set()
        time.sleep(3)
        return real(path)

    monkeypatch.setattr(service, "open_bootstrap", slow_open)
    errors: list[BaseException] = []

    def mount() -> None:
        try:
            c.mount("/slow", str(boot), _config(blobs))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=mount)
    t.start()
    try:
        assert loading.wait(5)
        t0 = time.monotonic()
        info = c.info()
        assert time.monotonic() - t0 < 1.5, "GET /api/v1/daemon waited for the mount"
        assert "/slow" not in info["backend_collection"]
        # the path is reserved while it loads
        with pytest.raises(ApiClientError) as ei:
            c.mount("/slow", str(boot), _config(blobs))
        assert ei.value.status == 409
    finally:
        t.join(20)
    assert not errors
    assert "/slow" in c.info()["backend_collection"]


# --- nydusctl against things that are not nydusd -----------------------------------------------


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            want = int(line.split(b":", 1)[1])
            while len(body) < want:
                part = conn.recv(65536)
                if not part:
                    return
                body += part


class _FakeDaemon:
    """A unix socket that answers every connection with ``reply`` (raw bytes)."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path, self.reply = path, reply
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    _read_request(conn)
                    conn.sendall(self.reply)
                    conn.shutdown(socket.SHUT_WR)
                    conn.recv(1)  # the client closes first: no reset loses the reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\nnot json",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\n\r\n<html></html>",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n[1, 2, 3]",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200004\r\n\r\n"
        + b"[" * 100_000
        + b"]" * 100_002,
    ],
)
@pytest.mark.parametrize(
    "argv", [["info"], ["umount", "/x"], ["metrics"], ["set", "log-level", "info"]]
)
def test_nydusctl_never_believes_a_bad_reply(
    tmp_path: Path, reply: bytes, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "fake.sock"
    fake = _FakeDaemon(sock, reply)
    try:
        rc = nydusctl.main(["--sock", str(sock), *argv])
    finally:
        fake.close()
    cap = capsys.readouterr()
    assert rc != 0, cap.out
    assert "unmounted" not in cap.out and "log level set" not in cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydusctl: error: "), cap.err


def test_nydusctl_with_a_dead_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))  # bound, never listening: connection refused
    try:
        for argv in (["info"], ["umount", "/x"]):
            assert nydusctl.main(["--sock", str(dead), *argv]) == 2
            cap = capsys.readouterr()
            assert "unmounted" not in cap.out
            assert cap.err.count("\n") == 1 and "cannot talk to nydusd" in cap.err, cap.err
    finally:
        s.close()
    assert nydusctl.main(["--sock", str(tmp_path / "none.sock"), "info"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_fifo_or_device_config_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    code = (
        "import sys\nfrom nydus.config import DaemonConfig\nfrom nydus.errors import "
        "ConfigError\ntry:\n    DaemonConfig.from_file(sys.argv[1])\n"
        "except ConfigError as e:\n    print('ERROR', e)\n"
    )
    try:
        for path in (fifo, "/dev/zero"):
            proc = subprocess.run(
                [sys.executable, "-c", code, str(path)],
                capture_output=True,
                text=True,
                timeout=10,
                preexec_fn=_limit_memory,
            )
            assert f"ERROR config {path} is not a regular file" in proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO config blocked")
    finally:
        _unblock_fifo(fifo)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:../../escaped",
        "sha256:" + "a" * 63 + "/",
        "../" + "a" * 64,
        "sha256:" + "A" * 64,
        "md5:" + "a" * 32,
        "sha256:" + "a" * 64 + "/../../x",
        "",
    ],
)
def test_hostile_digests_never_become_paths(digest: str, tmp_path: Path) -> None:
    """Digests from a registry or a content client name files only once checked (these held
    on the old code too: kept as guards)."""
    from nydus.errors import NydusError
    from nydus.format import oci
    from nydus.snapshotter.content.store import ContentStore

    with pytest.raises(NydusError):
        oci.parse_digest(digest)
    store = ContentStore(tmp_path / "content")
    with pytest.raises(NydusError):
        store.blob_path(digest)
    assert not list(tmp_path.glob("escaped*"))


def test_every_named_config_file_refuses_a_fifo(tmp_path: Path) -> None:
    """nydusctl mount --config, nydusify --backend-config-file and --prefetch-files, the
    snapshotter's --config-path and nydus-image optimize -p read through one reader: a FIFO
    is refused at once with one line, never waited on."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    f = str(fifo)
    runs = [
        (
            "nydusctl",
            [
                "--sock",
                str(tmp_path / "none.sock"),
                "mount",
                "--config",
                f,
                "--source",
                "/x.boot",
                "--mountpoint",
                "/m",
            ],
        ),
        (
            "nydusify",
            [
                "check",
                "--target",
                "localhost:1/x:y",
                "--backend-type",
                "localfs",
                "--backend-config-file",
                f,
            ],
        ),
        (
            "nydus_image",
            [
                "optimize",
                "-p",
                f,
                "-B",
                "/x.boot",
                "-D",
                str(tmp_path),
                "-O",
                str(tmp_path / "o.boot"),
            ],
        ),
    ]
    try:
        for mod, argv in runs:
            code = f"import sys; from nydus.cli.{mod} import main; sys.exit(main(sys.argv[1:]))"
            proc = subprocess.run(
                [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=20
            )
            assert proc.returncode != 0, (mod, proc.stdout)
            assert f"{f} is not a regular file" in proc.stderr, (mod, proc.stderr)
            assert "Traceback" not in proc.stderr
        from nydus.errors import ConfigError
        from nydus.snapshotter.config import load_nydusd_config

        with pytest.raises(ConfigError, match="is not a regular file"):
            load_nydusd_config(fifo)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO named on a command line blocked")
    finally:
        _unblock_fifo(fifo)
