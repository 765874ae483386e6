"""The s3 backend against moto's S3 server with authentication on: signed requests are
checked by the server; a generated image reads back byte for byte through the blob cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_storage_localfs import build_image_dir, sample_files  # type: ignore[import-not-found]

from moto_s3 import Moto, moto_server
from nydus.config import DaemonConfig, S3Config
from nydus.errors import BackendError
from nydus.storage import open_device
from nydus.storage.objectstore import S3Backend

BUCKET = "nydus-blobs"
PREFIX = "nydus/v6/"


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with moto_server("nydus") as m:
        m.s3().create_bucket(Bucket=BUCKET)
        yield m


def s3cfg(m: Moto, **kw: Any) -> dict[str, Any]:
    return {
        "scheme": "http",
        "endpoint": m.endpoint,
        "region": "us-east-1",
        "bucket_name": BUCKET,
        "object_prefix": PREFIX,
        "access_key_id": m.key_id,
        "access_key_secret": m.secret,
        **kw,
    }


def test_signed_ranges_and_size(moto: Moto) -> None:
    blob_id = "cd" * 32
    data = os.urandom(1_000_000)
    moto.s3().put_object(Bucket=BUCKET, Key=PREFIX + blob_id, Body=data)
    be = S3Backend(S3Config(**s3cfg(moto)))
    try:
        assert be.blob_size(blob_id) == len(data)
        assert be.read(blob_id, 999_000, 1000) == data[999_000:]
        rs = [(0, 1), (500_000, 4096), (123, 77_777)]
        assert be.read_ranges(blob_id, rs) == [data[o : o + n] for o, n in rs]
    finally:
        be.close()
    bad = S3Backend(S3Config(**s3cfg(moto, access_key_secret="wrong", retry_limit=1)))
    with pytest.raises(BackendError, match="403"):
        bad.read(blob_id, 0, 10)
    bad.close()
    missing = S3Backend(S3Config(**s3cfg(moto)))
    with pytest.raises(BackendError, match="404"):
        missing.read("00" * 32, 0, 10)
    missing.close()


def test_generated_image_through_s3_and_blobcache(moto: Moto, tmp_path: Path) -> None:
    img = build_image_dir(tmp_path / "img", sample_files(5))
    moto.s3().upload_file(str(img.blob_path), BUCKET, PREFIX + img.blob_id)
    cfg = DaemonConfig.from_json(
        {
            "device": {
                "backend": {"type": "s3", "config": s3cfg(moto)},
                "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "c")}},
            },
            "digest_validate": True,
        },
        environ={},
    )
    with open_device(img.md.blobs, cfg, id="s3") as dev:
        for path, data in img.files.items():
            assert img.read(dev, path) == data, path
        m = dev.metrics_backend()
        assert m["backend_type"] == "s3" and m["read_errors"] == 0 and m["read_count"] > 0
