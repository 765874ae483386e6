"""nydusify's blob stores: localfs and a fake OSS server (tests/fake_oss.py: virtual-host
addressing, the header signature checked from the OSS spec on every request), read back through
the storage layer's OSS backend to prove both sides use the same object keys."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fake_oss import FakeOss
from nydus.config import LocalFsConfig, OssConfig
from nydus.convert.store import LocalFsStore, ObjectStore, make_store
from nydus.errors import BackendError, ConfigError
from nydus.storage.objectstore import OssBackend

AK, SK, BUCKET, PREFIX = "ak-id", "sk-secret", "bkt", "nydus/"


@pytest.fixture
def oss() -> Iterator[FakeOss]:
    with FakeOss(BUCKET, AK, SK) as s:
        yield s


def test_oss_store_put_skip_and_read_back(oss: FakeOss, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    endpoint = f"oss.test:{oss.port}"
    cfg = OssConfig(
        scheme="http",
        endpoint=endpoint,
        bucket_name=BUCKET,
        object_prefix=PREFIX,
        access_key_id=AK,
        access_key_secret=SK,
    )
    resolve = {f"{BUCKET}.oss.test": "127.0.0.1"}
    store = ObjectStore("oss", cfg, resolve)
    assert not store.has(digest)
    assert store.push_file(digest, str(blob)) is True
    assert store.has(digest)
    assert store.push_file(digest, str(blob)) is False  # already there
    assert store.push_file(digest, str(blob), force=True) is True
    assert oss.puts == 2 and oss.bad == []
    assert list(oss.objects) == [PREFIX + digest[7:]]
    be = OssBackend(cfg, resolve=resolve)
    try:
        assert be.read(digest[7:], 1000, 5000) == data[1000:6000]
    finally:
        be.close()
    wrong = ObjectStore("oss", OssConfig(**{**cfg.__dict__, "access_key_secret": "nope"}), resolve)
    with pytest.raises(BackendError, match="403"):
        wrong.push_file(digest, str(blob))


def test_localfs_store(tmp_path: Path) -> None:
    data = b"blob data" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    src = tmp_path / "src"
    src.write_bytes(data)
    store = make_store(None, _localfs(tmp_path / "dir"))  # type: ignore[arg-type]
    assert isinstance(store, LocalFsStore) and not store.in_manifest
    assert not store.has(digest)
    assert store.push_file(digest, str(src)) is True
    assert (tmp_path / "dir" / digest[7:]).read_bytes() == data
    assert store.push_file(digest, str(src)) is False
    assert [p.name for p in (tmp_path / "dir").iterdir()] == [digest[7:]]  # no temp left
    with pytest.raises(ConfigError):
        LocalFsStore(LocalFsConfig(blob_file="/x"))


def _localfs(d: Path) -> Any:
    from nydus.convert.store import parse_backend_config

    return parse_backend_config("localfs", {"dir": str(d)})
