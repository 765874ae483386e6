"""Every file of the real upstream v5 and v6 fixtures read through the localfs backend (dir,
blob_file, alt_dirs) with and without a blob cache: md5 against upstream's listing (v5) and
chunk digests (v5 and v6)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from nydus.codec import digester_by_name
from nydus.config import DaemonConfig
from nydus.errors import NotFoundError
from nydus.metadata import RafsMetadata, open_bootstrap
from nydus.storage import BlobDevice, open_device

V6_BLOB = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"


def v5_md5s(fixtures: Path) -> dict[str, str]:
    text = (fixtures / "v5" / "blake3-nocompress.result").read_text()
    _, end = json.JSONDecoder().raw_decode(text)
    out = {}
    for line in text[end:].splitlines():
        if line.strip():
            digest, path = line.split(None, 1)
            out[path.strip()] = digest
    return out


def cfg(backend: dict[str, Any], work_dir: Path | None, **top: Any) -> DaemonConfig:
    cache: dict[str, Any] = {"type": "dummycache"}
    if work_dir is not None:
        cache = {"type": "blobcache", "config": {"work_dir": str(work_dir)}}
    return DaemonConfig.from_json(
        {"device": {"backend": {"type": "localfs", "config": backend}, "cache": cache}, **top},
        environ={},
    )


def read_all(md: RafsMetadata, dev: BlobDevice) -> dict[str, bytes]:
    blake3 = digester_by_name(md.digester)
    out = {}
    for path, nid in md.walk():
        attr = md.getattr(nid)
        if not attr.is_reg:
            continue
        chunks = md.chunks(nid)
        content = bytearray(attr.size)
        for c, data in zip(chunks, dev.read_chunks(chunks), strict=True):
            assert blake3.digest(data) == c.digest
            content[c.file_offset : c.file_offset + len(data)] = data
        out[path.decode()] = bytes(content)
    return out


@pytest.mark.parametrize("cached", [False, True])
def test_upstream_v5_fixture_md5(fixtures_dir: Path, tmp_path: Path, cached: bool) -> None:
    md = open_bootstrap(fixtures_dir / "v5" / "blake3-nocompress.boot")
    want = v5_md5s(fixtures_dir)
    conf = cfg(
        {"dir": str(fixtures_dir / "v5" / "blobs")},
        tmp_path / "cache" if cached else None,
        digest_validate=True,
    )
    with open_device(md.blobs, conf) as dev:
        got = read_all(md, dev)
        assert sorted(got) == sorted(want)
        for path, digest in want.items():
            assert hashlib.md5(got[path]).hexdigest() == digest, path
        if cached:
            assert dev.is_blob_ready(0)
            # a second device on the same cache serves everything without the backend
    if cached:
        with open_device(md.blobs, conf) as dev:
            assert read_all(md, dev) == got
            assert dev.metrics_backend()["read_count"] == 0


@pytest.mark.parametrize("cached", [False, True])
def test_upstream_v6_fixture(fixtures_dir: Path, tmp_path: Path, cached: bool) -> None:
    md = open_bootstrap(fixtures_dir / "v6" / "rafs-v6-2.2.boot")
    conf = cfg(
        {"dir": str(fixtures_dir / "v6" / "blobs")},
        tmp_path / "cache" if cached else None,
        digest_validate=True,
    )
    with open_device(md.blobs, conf) as dev:
        got = read_all(md, dev)
        assert sorted(got) == ["/lib.rs", "/sync_io.rs"]
        assert len(got["/lib.rs"]) == 16931 and len(got["/sync_io.rs"]) == 13400
        assert all(v.startswith(b"// Copyright") for v in got.values())
        space = dev.read_range(0, 0, md.blobs[0].uncompressed_size)
        assert space[:16931] == got["/lib.rs"]
        assert space[20480 : 20480 + 13400] == got["/sync_io.rs"]
        assert space[16931:20480] == bytes(20480 - 16931)
        if cached:
            assert dev.is_blob_ready(0)
            assert Path(dev.cache_file(0) or "").read_bytes() == space


def test_blob_file_and_alt_dirs(fixtures_dir: Path, tmp_path: Path) -> None:
    md = open_bootstrap(fixtures_dir / "v6" / "rafs-v6-2.2.boot")
    blob = fixtures_dir / "v6" / "blobs" / V6_BLOB
    with open_device(md.blobs, cfg({"blob_file": str(blob)}, None)) as dev:
        assert len(read_all(md, dev)) == 2
    alt = tmp_path / "alt"
    alt.mkdir()
    shutil.copy(blob, alt / V6_BLOB)
    empty = tmp_path / "empty"
    empty.mkdir()
    with open_device(md.blobs, cfg({"dir": str(empty), "alt_dirs": [str(alt)]}, None)) as dev:
        assert len(read_all(md, dev)) == 2
    with (
        open_device(md.blobs, cfg({"dir": str(empty)}, None)) as dev,
        pytest.raises(NotFoundError, match="not found"),
    ):
        read_all(md, dev)


# ------------------------------------------------------------------------ shared helpers


class Built:
    """A generated image: bootstrap, the blob's id and path, and the source files."""

    def __init__(
        self, md: RafsMetadata, boot: bytes, blob_id: str, blob_path: Path, files: dict[str, bytes]
    ) -> None:
        self.md, self.boot, self.blob_id, self.blob_path, self.files = (
            md,
            boot,
            blob_id,
            blob_path,
            files,
        )

    def chunks(self, path: str) -> list[Any]:
        return self.md.chunks(self.md.resolve(path))

    def read(self, dev: BlobDevice, path: str) -> bytes:
        return b"".join(dev.read_chunks(self.chunks(path)))


def build_image_dir(
    out: Path, files: dict[str, bytes], *, compressor: str = "zstd", chunk_size: int = 0x100000
) -> Built:
    """Write ``files`` under ``out/src`` and build them (in process) into ``out/blobs``."""
    from nydus.builder.build import BuildOptions, build_image
    from nydus.builder.dirsource import load_directory

    src = out / "src"
    for name, data in files.items():
        p = src / name.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    blobs = out / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / "blob.tmp"
    with open(tmp, "wb") as f:
        res = build_image(
            load_directory(src), f, BuildOptions(chunk_size=chunk_size, compressor=compressor)
        )
    assert res.blob is not None
    blob_id = res.blob.entry.blob_id
    tmp.rename(blobs / blob_id)
    (out / "boot").write_bytes(res.bootstrap)
    return Built(open_bootstrap(res.bootstrap), res.bootstrap, blob_id, blobs / blob_id, files)


def sample_files(seed: int = 0, scale: int = 1) -> dict[str, bytes]:
    import random

    rnd = random.Random(seed)
    return {
        "/bin/tool": rnd.randbytes(scale * 2_500_000),
        "/etc/config.txt": b"".join(b"key%d = value %d\n" % (i, i * i) for i in range(20000)),
        "/lib/libx.so": rnd.randbytes(scale * 700_000) + bytes(300_000),
        "/small": b"hello\n",
        "/empty": b"",
    }
