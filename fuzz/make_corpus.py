"""Write the seed corpora of the fuzz targets: ``fuzz/corpus/`` (``fuzz_bootstrap.py``),
``fuzz/corpus-tar/``, ``fuzz/corpus-blobmeta/``, ``fuzz/corpus-oci/`` and ``fuzz/corpus-config/``.

Bootstrap seeds:
Three seeds: the two real upstream bootstraps from the shared fixtures (a RAFS v6
image written by nydus-image 2.2 and a RAFS v5 one), copied byte for byte, and a
v6 bootstrap made by our own builder from a small tree holding directories,
regular files (empty, one chunk, several chunks, a duplicate), symlinks, a
hardlink and user xattrs. Content and timestamps are fixed, so re-running gives
the same builder bootstrap for the same uid/gid.

Tar seeds: the upstream tar fixtures and layers of the small tree written by :mod:`tarfile`
(GNU and PAX, plain, gzip and zstd, with a long name, PAX xattrs and a device). Blob meta
seeds: the builder's blobs of the small tree (zstd and uncompressed; ci header and array in
every mode of the target). OCI seeds: an OCI manifest, a Docker manifest, an index and a
Nydus manifest. Config seeds: v1 JSON configs for every backend, a v2 JSON and a v2 TOML.

Usage, from the repository root: ``PYTHONPATH=src .venv/bin/python fuzz/make_corpus.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURES = next(
    (
        p
        for p in (
            REPO.parent / "shared" / "fixtures" / "nydus",
            REPO.parents[1] / "shared" / "fixtures" / "nydus",
        )
        if p.is_dir()
    ),
    REPO.parent / "shared" / "fixtures" / "nydus",
)  # checkout, or a worktree
UPSTREAM = {
    "upstream-rafs-v6-2.2.boot": FIXTURES / "v6" / "rafs-v6-2.2.boot",
    "upstream-v5-blake3-nocompress.boot": FIXTURES / "v5" / "blake3-nocompress.boot",
}
BUILT_NAME = "builder-small-tree.boot"

if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def make_small_tree(root: Path) -> None:
    """A tiny tree with every node kind the fuzzer should start from."""
    root.mkdir()
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n" * 100)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello nydus\n")
    (root / "multi.bin").write_bytes(bytes(range(256)) * 40)  # 10 KiB: 3 chunks of 4 KiB
    (root / "dup.bin").write_bytes(bytes(range(256)) * 40)  # deduplicated against multi.bin
    os.symlink("dir/sub/deep.txt", root / "link")
    os.symlink("t" * 200, root / "long-link")
    os.link(root / "small.txt", root / "dir" / "hardlink")
    try:
        os.setxattr(root / "small.txt", "user.nydus.test", b"value")
        os.setxattr(root / "dir", "user.dirattr", b"x" * 40)
    except OSError:
        pass  # no user xattrs on this file system: the seed is still useful
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(
                os.path.join(dirpath, name),
                ns=(1, 1_600_000_000_123_456_789),
                follow_symlinks=False,
            )
    os.utime(root, ns=(1, 1_600_000_000_123_456_789))


def build_small_bootstrap(workdir: Path) -> bytes:
    """The builder's v6 bootstrap of :func:`make_small_tree` (4 KiB chunks, zstd)."""
    from nydus.builder.build import BuildOptions, build_image
    from nydus.builder.dirsource import load_directory

    tree = workdir / "tree"
    make_small_tree(tree)
    res = build_image(
        load_directory(tree), io.BytesIO(), BuildOptions(compressor="zstd", chunk_size=0x1000)
    )
    return res.bootstrap


def _tar_seeds(tree: Path) -> dict[str, bytes]:
    import gzip
    import tarfile

    import zstandard

    seeds: dict[str, bytes] = {}
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            tf.add(tree, arcname=".")
            ti = tarfile.TarInfo("l" * 150 + "/long-name")
            ti.size = 3
            ti.pax_headers = {"SCHILY.xattr.user.x": "v", "mtime": "1.5"}
            tf.addfile(ti, io.BytesIO(b"abc"))
            dev = tarfile.TarInfo("dev")
            dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
            tf.addfile(dev)
        seeds[f"small-tree-{name}.tar"] = buf.getvalue()
    plain = seeds["small-tree-pax.tar"]
    seeds["small-tree.tar.gz"] = gzip.compress(plain, mtime=0)
    seeds["small-tree.tar.zst"] = zstandard.ZstdCompressor().compress(plain)
    for p in sorted((FIXTURES / "tar").glob("*.tar")):
        seeds[f"upstream-{p.name}"] = p.read_bytes()
    return seeds


def _blobmeta_seeds(tree: Path) -> dict[str, bytes]:
    import fuzz_blobmeta

    from nydus.builder.build import BuildOptions, build_image
    from nydus.builder.dirsource import load_directory
    from nydus.format import blob_meta as bm
    from nydus.metadata import open_bootstrap

    seeds: dict[str, bytes] = {}
    for name, opts in (
        ("zstd-v1", BuildOptions(compressor="zstd", chunk_size=0x1000)),
        ("none-v1", BuildOptions(compressor="none", chunk_size=0x1000)),
    ):
        blob = io.BytesIO()
        res = build_image(load_directory(tree), blob, opts)
        data = blob.getvalue()
        with open_bootstrap(res.bootstrap) as md:
            [b] = md.blobs
        comp = fuzz_blobmeta.CI_COMPRESSORS.index(b.ci_compressor)
        kw = {
            "chunk_count": b.chunk_count,
            "ci_offset": b.ci_offset,
            "ci_csize": b.ci_compressed_size,
            "ci_usize": b.ci_uncompressed_size,
            "features": b.features,
            "toc_size": b.toc_size,
            "ci_compressor": comp,
            "uncompressed_size": b.uncompressed_size,
        }
        seeds[f"{name}-fetch.bin"] = fuzz_blobmeta.make_input(1, data, **kw)
        seeds[f"{name}-toc.bin"] = fuzz_blobmeta.make_input(3, data, **kw)
        start = b.ci_offset
        ci = data[start : start + b.ci_compressed_size]
        from nydus import codec

        raw = (
            codec.decompress(codec.compressor_by_name(b.ci_compressor), ci, b.ci_uncompressed_size)
            if comp
            else ci
        )
        hdr = data[start + b.ci_compressed_size : start + b.ci_compressed_size + bm.CI_HEADER_SIZE]
        cached = raw.ljust(-(-len(raw) // 4096) * 4096, b"\0") + hdr
        seeds[f"{name}-cached.bin"] = fuzz_blobmeta.make_input(
            2, cached, compressed_size=len(data), **kw
        )
        seeds[f"{name}-raw.bin"] = fuzz_blobmeta.make_input(0, raw + hdr, **kw)
    return seeds


def _oci_seeds() -> dict[str, bytes]:
    import json

    from nydus.format import oci

    d = "sha256:" + "a" * 64
    layer = {"mediaType": oci.MEDIA_TYPE_OCI_LAYER_GZIP, "digest": d, "size": 10}
    cfg = {"mediaType": oci.MEDIA_TYPE_OCI_CONFIG, "digest": d, "size": 2}
    man = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "config": cfg,
        "layers": [layer, {**layer, "annotations": {"a": "b"}}],
    }
    docker = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_DOCKER_MANIFEST,
        "config": {**cfg, "mediaType": oci.MEDIA_TYPE_DOCKER_CONFIG},
        "layers": [{**layer, "mediaType": oci.MEDIA_TYPE_DOCKER_LAYER_GZIP}],
    }
    nydus = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "config": cfg,
        "layers": [
            {
                "mediaType": oci.MEDIA_TYPE_NYDUS_BLOB,
                "digest": d,
                "size": 5,
                "annotations": {oci.ANNOTATION_NYDUS_BLOB: "true"},
            },
            {**layer, "annotations": {oci.ANNOTATION_NYDUS_BOOTSTRAP: "true"}},
        ],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": oci.MEDIA_TYPE_OCI_INDEX,
        "manifests": [
            {
                "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
                "digest": d,
                "size": 100,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {
                "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
                "digest": d,
                "size": 100,
                "platform": {
                    "os": "linux",
                    "architecture": "arm64",
                    "variant": "v8",
                    "os.features": [oci.PLATFORM_FEATURE_NYDUS],
                },
            },
        ],
    }
    return {
        f"{k}.json": json.dumps(v, indent=1).encode()
        for k, v in (
            ("oci-manifest", man),
            ("docker-manifest", docker),
            ("nydus-manifest", nydus),
            ("oci-index", index),
        )
    }


def _config_seeds() -> dict[str, bytes]:
    import json

    backends = {
        "registry": {
            "scheme": "https",
            "host": "r.example",
            "repo": "a/b",
            "auth": "dTpw",
            "timeout": 5,
            "proxy": {"url": "http://p", "fallback": True},
        },
        "localfs": {"dir": "/var/lib/blobs"},
        "oss": {
            "endpoint": "oss.example",
            "bucket_name": "b",
            "access_key_id": "k",
            "access_key_secret": "s",
        },
        "s3": {"endpoint": "s3.example", "bucket_name": "b", "region": "r"},
    }
    seeds = {}
    for name, conf in backends.items():
        v1 = {
            "device": {
                "backend": {"type": name, "config": conf},
                "cache": {
                    "type": "blobcache",
                    "compressed": False,
                    "config": {"work_dir": "/cache"},
                },
            },
            "mode": "direct",
            "digest_validate": False,
            "iostats_files": False,
            "enable_xattr": True,
            "fs_prefetch": {"enable": True, "threads_count": 4},
        }
        seeds[f"v1-{name}.json"] = json.dumps(v1, indent=1).encode()
    v2 = {
        "version": 2,
        "id": "x",
        "backend": {"type": "localfs", "localfs": {"dir": "/b"}},
        "cache": {"type": "filecache", "filecache": {"work_dir": "/c"}},
        "rafs": {"mode": "direct", "validate": True},
    }
    seeds["v2.json"] = json.dumps(v2, indent=1).encode()
    seeds["v2.toml"] = (
        b'version = 2\nid = "x"\n[backend]\ntype = "localfs"\n'
        b'[backend.localfs]\ndir = "/b"\n[cache]\ntype = "filecache"\n'
        b'[cache.filecache]\nwork_dir = "/c"\n[rafs]\nmode = "direct"\n'
    )
    return seeds


def _write(out: Path, seeds: dict[str, bytes]) -> None:
    out.mkdir(exist_ok=True)
    for name, data in seeds.items():
        (out / name).write_bytes(data)


def main() -> int:
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as td:
        tree = Path(td) / "tree"
        make_small_tree(tree)
        _write(HERE / "corpus-tar", _tar_seeds(tree))
        _write(HERE / "corpus-blobmeta", _blobmeta_seeds(tree))
    _write(HERE / "corpus-oci", _oci_seeds())
    _write(HERE / "corpus-config", _config_seeds())
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    for name, src in UPSTREAM.items():
        if not src.is_file():
            print(f"missing fixture {src}", file=sys.stderr)
            return 1
        shutil.copyfile(src, out / name)
    with tempfile.TemporaryDirectory() as td:
        (out / BUILT_NAME).write_bytes(build_small_bootstrap(Path(td)))
    for d in ("corpus", "corpus-tar", "corpus-blobmeta", "corpus-oci", "corpus-config"):
        for p in sorted((HERE / d).iterdir()):
            print(f"{p.stat().st_size:8d}  {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
