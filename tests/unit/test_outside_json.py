"""Nested and otherwise hostile JSON from outside (issue 12, point 5) at every place it is read.

The outside probe crashed nydusd's API and nydusify (manifest and config from a registry) with
deeply nested JSON: a ``RecursionError`` traceback. Every reader now goes through
:mod:`nydus.format.safejson` and answers with a one-line error of the NydusError family. The
registry here is a tiny in-process HTTP server that serves whatever the test tells it to.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nydus.errors import ConfigError, FormatError, NydusError

DEEP = b"[" * 200_000 + b"]" * 200_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
HOSTILE = [
    DEEP,
    DEEP_OBJECT,
    b'{"size": ' + b"9" * 10_000 + b"}",
    b'{"size": 1e99999}',
    b'{"x": NaN}',
]


@pytest.mark.parametrize("doc", HOSTILE)
def test_daemon_config(doc: bytes) -> None:
    from nydus.config import DaemonConfig

    with pytest.raises(ConfigError) as ei:
        DaemonConfig.from_json(doc, environ={})
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("doc", HOSTILE)
def test_manifests_indexes_and_media_types(doc: bytes) -> None:
    from nydus.convert import image as im
    from nydus.format import oci

    digest = "sha256:" + hashlib.sha256(doc).hexdigest()
    for call in (
        lambda: oci.manifest_media_type(doc),
        lambda: im.parse_manifest(doc, oci.MEDIA_TYPE_OCI_MANIFEST, digest),
        lambda: im.parse_index(doc, digest),
    ):
        with pytest.raises(FormatError) as ei:
            call()
        assert "\n" not in str(ei.value)


@pytest.mark.parametrize("doc", HOSTILE)
def test_files_and_answers_read_by_the_snapshotter_and_the_registry_client(
    doc: bytes, tmp_path: Path
) -> None:
    from nydus.format.safejson import parse_json_object, parse_json_object_or_none
    from nydus.registry.auth import docker_config_credentials
    from nydus.snapshotter.config import load_nydusd_config

    f = tmp_path / "doc.json"
    f.write_bytes(doc)
    with pytest.raises(ConfigError):
        docker_config_credentials("r.example", f)
    with pytest.raises(ConfigError):
        load_nydusd_config(f)
    with pytest.raises(FormatError):
        parse_json_object(doc, "manifest")
    if doc.startswith(b"{"):
        assert parse_json_object_or_none(doc, 4 << 20) is None


def test_daemon_manager_state_file(tmp_path: Path) -> None:
    from nydus.snapshotter.config import SnapshotterConfig
    from nydus.snapshotter.daemons.manager import DaemonManager

    root = tmp_path / "root"
    (root / "daemons").mkdir(parents=True)
    (root / "daemons" / "state.json").write_bytes(DEEP_OBJECT)
    m = DaemonManager(SnapshotterConfig(root=root, cache_dir=tmp_path / "c"), start_watcher=False)
    try:
        assert m.images == {} and m.daemons == {}
    finally:
        m.close()


# --- nydusify against a hostile registry --------------------------------------------------------


class _Registry:
    """Serves ``/v2/`` and fixed manifests/blobs; refuses everything else."""

    def __init__(self) -> None:
        self.manifests: dict[str, tuple[bytes, str]] = {}
        self.blobs: dict[str, bytes] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                found: tuple[bytes, str] | None = None
                if path == "/v2/":
                    found = (b"{}", "application/json")
                elif "/manifests/" in path:
                    found = outer.manifests.get(path.rsplit("/", 1)[1])
                elif "/blobs/" in path:
                    blob = outer.blobs.get(path.rsplit("/", 1)[1])
                    found = (blob, "application/octet-stream") if blob is not None else None
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", found[1])
                self.send_header("Content-Length", str(len(found[0])))
                self.end_headers()
                if body:
                    self.wfile.write(found[0])

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile_registry() -> Iterator[_Registry]:
    r = _Registry()
    yield r
    r.stop()


def _nydusify(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from nydus.cli.nydusify import main

    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.err


def test_nydusify_with_a_nested_manifest(
    hostile_registry: _Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nydus.format import oci

    hostile_registry.manifests["latest"] = (DEEP, oci.MEDIA_TYPE_OCI_MANIFEST)
    host = hostile_registry.host
    for verb in (
        ["convert", "--source", f"{host}/evil:latest", "--target", f"{host}/evil:nydus"],
        ["check", "--target", f"{host}/evil:latest"],
    ):
        rc, err = _nydusify([*verb, "--plain-http", "--work-dir", str(tmp_path / "w")], capsys)
        assert rc != 0
        assert "Traceback" not in err and "RecursionError" not in err
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("nydusify ") and "JSON" in lines[-1], err
        assert "nested" in lines[-1]


def test_nydusify_with_a_nested_image_config(
    hostile_registry: _Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nydus.format import oci

    config = DEEP_OBJECT
    layer = b"not really a layer"
    digest = oci.sha256_digest
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
            "config": {
                "mediaType": oci.MEDIA_TYPE_OCI_CONFIG,
                "digest": digest(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": oci.MEDIA_TYPE_OCI_LAYER_GZIP,
                    "digest": digest(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    hostile_registry.manifests["latest"] = (manifest, oci.MEDIA_TYPE_OCI_MANIFEST)
    hostile_registry.blobs[digest(config)] = config
    hostile_registry.blobs[digest(layer)] = layer
    host = hostile_registry.host
    rc, err = _nydusify(
        [
            "convert",
            "--source",
            f"{host}/evil:latest",
            "--target",
            f"{host}/evil:nydus",
            "--plain-http",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        capsys,
    )
    assert rc == FormatError.exit_code, err
    assert "Traceback" not in err and "RecursionError" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nydusify ") and "nested" in last, err


def test_errors_are_one_line_nydus_errors() -> None:
    from nydus.format.safejson import parse_json

    for doc in HOSTILE:
        with pytest.raises(NydusError) as ei:
            parse_json(doc, "x")
        assert "\n" not in str(ei.value)
