"""nydusify's pure parts: image documents, platform choice, blob streams, the rootfs model and
comparison, retries, signing, progress, CLI parsing. No registry needed."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import tarfile

import pytest

import oci_images as oi
from nydus.cli.nydusify import _duration
from nydus.convert import image as im
from nydus.convert.converter import build_order, default_parallel, retry
from nydus.convert.progress import Progress, human
from nydus.convert.remote import BlobStream, is_loopback_host
from nydus.convert.rootfs import FileNode, OciRootfs, compare
from nydus.convert.store import parse_backend_config
from nydus.errors import (
    BackendError,
    ConfigError,
    FormatError,
    IntegrityError,
    RegistryNotFound,
    UnsupportedError,
)
from nydus.format import oci
from nydus.storage.objectstore import UNSIGNED_PAYLOAD, oss_authorization, sigv4_headers

# --- image documents ----------------------------------------------------------------------


def test_bootstrap_layer_is_reproducible_and_readable() -> None:
    boot = b"\0" * 1024 + b"bootstrap" * 100
    gz1, diff1 = im.bootstrap_layer(boot)
    gz2, diff2 = im.bootstrap_layer(boot)
    assert gz1 == gz2 and diff1 == diff2
    assert diff1 == oci.sha256_digest(gzip.decompress(gz1))
    assert im.read_bootstrap_layer(gz1) == boot
    with tarfile.open(fileobj=io.BytesIO(gz1)) as tf:
        names = [(m.name, m.mtime, m.uid) for m in tf]
    assert names == [("image", 0, 0), ("image/image.boot", 0, 0)]
    with pytest.raises(FormatError):
        im.read_bootstrap_layer(b"not a tar")
    empty = io.BytesIO()
    with tarfile.open(fileobj=empty, mode="w"):
        pass
    with pytest.raises(FormatError, match=r"image/image\.boot"):
        im.read_bootstrap_layer(empty.getvalue())


def test_nydus_config_rewrites_diff_ids_and_appends_history() -> None:
    src = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "x"}],
    }
    out = json.loads(im.nydus_config(src, ["sha256:" + "a" * 64, "sha256:" + "b" * 64]))
    assert out["rootfs"] == {
        "type": "layers",
        "diff_ids": ["sha256:" + "a" * 64, "sha256:" + "b" * 64],
    }
    assert out["history"][0] == src["history"][0]
    assert out["history"][-1] == {
        "created_by": "Nydus Converter",
        "comment": "Nydus Bootstrap Layer",
    }
    assert list(out) == list(src)  # key order kept
    assert src["rootfs"]["diff_ids"] == ["sha256:" + "1" * 64]  # input untouched
    assert im.nydus_config(src, ["sha256:" + "a" * 64]) == im.nydus_config(
        src, ["sha256:" + "a" * 64]
    )


def test_manifest_and_index_documents() -> None:
    cfg = b"{}"
    blob = im.blob_descriptor("sha256:" + "c" * 64, 10)
    gz, diff = im.bootstrap_layer(b"x" * 2048)
    boot = im.bootstrap_descriptor(gz, diff, docker=False, fs_version="6")
    body, mt = im.nydus_manifest(
        cfg,
        [blob, boot],
        docker=False,
        subject=oci.Descriptor(oci.MEDIA_TYPE_OCI_MANIFEST, "sha256:" + "d" * 64, 5),
    )
    doc = json.loads(body)
    assert mt == oci.MEDIA_TYPE_OCI_MANIFEST == doc["mediaType"]
    assert doc["layers"][0]["annotations"] == {
        oci.ANNOTATION_UNCOMPRESSED: blob.digest,
        oci.ANNOTATION_NYDUS_BLOB: "true",
    }
    assert doc["layers"][1]["annotations"][oci.ANNOTATION_NYDUS_BOOTSTRAP] == "true"
    assert doc["subject"] == {
        "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
        "digest": "sha256:" + "d" * 64,
        "size": 5,
    }
    body, mt = im.nydus_manifest(cfg, [boot], docker=True)
    assert mt == oci.MEDIA_TYPE_DOCKER_MANIFEST
    assert json.loads(body)["config"]["mediaType"] == oci.MEDIA_TYPE_DOCKER_CONFIG
    body, _ = im.nydus_manifest(cfg, [boot], docker=False, nydus_config_type=True)
    assert json.loads(body)["config"]["mediaType"] == oci.MEDIA_TYPE_NYDUS_CONFIG
    assert (
        im.blob_descriptor(blob.digest, 1, docker=True).media_type
        == oci.MEDIA_TYPE_DOCKER_LAYER_GZIP
    )
    ent = im.index_entry(
        oci.Descriptor(mt, "sha256:" + "e" * 64, 3),
        {"os": "linux", "architecture": "amd64"},
        nydus_marker=True,
        docker=False,
    )
    assert ent["artifactType"] == oci.ARTIFACT_TYPE_NYDUS_MANIFEST
    assert ent["platform"]["os.features"] == [oci.PLATFORM_FEATURE_NYDUS]
    refs = im.bootstrap_descriptor(
        gz, diff, docker=False, fs_version="6", reference_blob_ids=["ab", "cd"]
    )
    assert json.loads(refs.annotations[oci.ANNOTATION_NYDUS_REFERENCE_BLOB_IDS]) == ["ab", "cd"]


def _manifest(
    layer_types: list[str],
    config_type: str = oci.MEDIA_TYPE_OCI_CONFIG,
    annotations: dict[str, str] | None = None,
) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MEDIA_TYPE_OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": "sha256:" + "0" * 64, "size": 2},
            "layers": [
                {
                    "mediaType": t,
                    "digest": "sha256:" + f"{i:x}" * 64,
                    "size": 1,
                    **({"annotations": annotations} if annotations else {}),
                }
                for i, t in enumerate(layer_types)
            ],
        }
    ).encode()


def test_parse_manifest_rejects_what_cannot_be_converted() -> None:
    mt = oci.MEDIA_TYPE_OCI_MANIFEST
    ok = im.parse_manifest(
        _manifest([oci.MEDIA_TYPE_OCI_LAYER_GZIP, oci.MEDIA_TYPE_OCI_LAYER_ZSTD]), mt, "sha256:x"
    )
    assert len(ok.layers) == 2
    with pytest.raises(UnsupportedError, match="unsupported media type"):
        im.parse_manifest(_manifest(["application/x-squashfs"]), mt, "d")
    with pytest.raises(UnsupportedError, match="config media type"):
        im.parse_manifest(_manifest([], "application/vnd.cncf.helm.config.v1+json"), mt, "d")
    with pytest.raises(UnsupportedError, match="already a Nydus image"):
        im.parse_manifest(_manifest([oci.MEDIA_TYPE_NYDUS_BLOB]), mt, "d")
    with pytest.raises(UnsupportedError, match="schema 1"):
        im.parse_manifest(b"{}", "application/vnd.docker.distribution.manifest.v1+prettyjws", "d")
    with pytest.raises(FormatError):
        im.parse_manifest(b"[]", mt, "d")
    # for check/copy any layer type is fine
    im.parse_manifest(_manifest([oci.MEDIA_TYPE_NYDUS_BLOB]), mt, "d", for_conversion=False)


def _entry(
    plat: dict[str, str] | None, n: int, mt: str = oci.MEDIA_TYPE_OCI_MANIFEST
) -> im.IndexEntry:
    raw = {"mediaType": mt, "digest": "sha256:" + f"{n:x}" * 64, "size": 1}
    if plat:
        raw["platform"] = plat  # type: ignore[assignment]
    return im.IndexEntry(oci.Descriptor.from_dict(raw), im.Platform.from_dict(plat), raw)


def test_select_platforms() -> None:
    entries = [
        _entry({"os": "linux", "architecture": "amd64"}, 1),
        _entry({"os": "linux", "architecture": "arm64", "variant": "v8"}, 2),
        _entry({"os": "unknown", "architecture": "unknown"}, 3),
    ]
    assert im.select_platforms(entries, [im.Platform.parse("linux/arm64")], False) == [entries[1]]
    assert im.select_platforms(entries, None, True) == entries[:2]  # attestation skipped
    both = [im.Platform.parse("linux/arm64/v8"), im.Platform.parse("linux/amd64")]
    assert im.select_platforms(entries, both, False) == [entries[1], entries[0]]
    with pytest.raises(ConfigError, match="no linux/s390x image"):
        im.select_platforms(entries, [im.Platform.parse("linux/s390x")], False)
    with pytest.raises(ConfigError):
        im.Platform.parse("linux")
    assert str(im.Platform.parse("linux/arm/v7")) == "linux/arm/v7"
    assert im.host_platform().os == "linux"


# --- streams, retries, CLI ----------------------------------------------------------------


def test_blob_stream_checks_digest_and_size() -> None:
    data = b"hello world" * 1000
    digest = oci.sha256_digest(data)
    seen: list[int] = []
    s = BlobStream(iter([data[:100], data[100:]]), digest, len(data), seen.append)
    assert s.read(50) == data[:50]
    assert s.drain() == len(data) - 50
    assert sum(seen) == len(data)
    with pytest.raises(IntegrityError, match="content has digest"):
        BlobStream(iter([data[:-1] + b"X"]), digest, len(data)).read()
    with pytest.raises(IntegrityError, match="descriptor says"):
        BlobStream(iter([data[:-1]]), digest, len(data)).read()
    with pytest.raises(IntegrityError, match="longer"):
        BlobStream(iter([data, b"x"]), digest, len(data)).read()


def test_loopback_hosts() -> None:
    for h in ("localhost:5000", "127.0.0.1:5000", "[::1]:5000", "localhost", "::1"):
        assert is_loopback_host(h), h
    for h in ("registry.example.com", "10.0.0.1:5000", "docker.io"):
        assert not is_loopback_host(h), h


def test_retry_policy() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BackendError("503")
        return "ok"

    assert retry(flaky, "x", 3, 0) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(BackendError):
        retry(lambda: (_ for _ in ()).throw(BackendError("down")), "x", 2, 0)
    for exc in (RegistryNotFound("404"), IntegrityError("bad")):
        n = [0]

        def fail(e: Exception = exc, count: list[int] = n) -> None:
            count[0] += 1
            raise e

        with pytest.raises(type(exc)):
            retry(fail, "x", 5, 0)
        assert n[0] == 1


def test_durations() -> None:
    assert _duration("5s") == 5 and _duration("500ms") == 0.5 and _duration("1m30s") == 90
    assert _duration("2") == 2
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        _duration("5 parsecs")


def test_progress_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    p = Progress(quiet)  # a StringIO is not a tty
    lp = p.layer("layer 1/1", 100)
    p.advance(lp, 50)
    p.finish_layer(lp, "done")
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    p = Progress(loud, enabled=True)
    lp = p.layer("layer 1/2 abc", 2 << 20)
    p.chunk(lp, False)
    p.chunk(lp, True)
    p.advance(lp, 1 << 20, written=4096)
    p.finish_layer(lp, "layer 1/2 abc: 2.0 MiB read, 3 chunks (1 deduplicated)")
    p.close()
    out = loud.getvalue()
    assert "layer 1/2 abc: 2.0 MiB read, 3 chunks (1 deduplicated)\n" in out
    # the bar while it ran: bytes read of the total, chunks, dedup and blob bytes
    assert "layer 1/2 abc:  50%" in out and "1.00M/2.00M" in out
    assert "2 chunks, 1 dedup, blob 4.0 KiB" in out
    assert human(1536) == "1.5 KiB"


def test_backend_config_and_signing() -> None:
    b = parse_backend_config("localfs", {"dir": "/x"})
    assert b.type == "localfs"
    with pytest.raises(ConfigError):
        parse_backend_config("registry", {"host": "h", "repo": "r"})
    with pytest.raises(ConfigError, match="bucket_name"):
        parse_backend_config("s3", {"region": "us-east-1"})
    # AWS SigV4 documentation, 'GET Object' example (empty payload)
    when = dt.datetime(2013, 5, 24, tzinfo=dt.UTC)
    h = sigv4_headers(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        region="us-east-1",
        now=when,
        payload_hash=hashlib.sha256(b"").hexdigest(),
    )
    assert h["Authorization"].endswith(
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    put = sigv4_headers(
        "PUT",
        "http://127.0.0.1:9000/b/k",
        {"Content-Length": "3"},
        access_key_id="a",
        secret="s",
        region="r",
        now=when,
        payload_hash=UNSIGNED_PAYLOAD,
    )
    assert put["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert "content-length" not in put["Authorization"]
    o = oss_authorization(
        "PUT",
        "/bkt/p/k",
        "Thu, 17 Nov 2005 18:49:58 GMT",
        oss_headers={"Content-Type": "application/octet-stream"},
        access_key_id="id",
        secret="sec",
    )
    assert o.startswith("OSS id:")


# --- rootfs model -------------------------------------------------------------------------


def _tree(*layers: list[oi.T]) -> OciRootfs:
    t = OciRootfs()
    for entries in layers:
        t.apply(io.BytesIO(oi.layer(entries, "gzip").blob))
    return t


def _paths(n: FileNode, prefix: str = "") -> list[str]:
    out = []
    for name, child in sorted((n.children or {}).items()):
        p = f"{prefix}/{name.decode()}"
        out.append(p)
        out += _paths(child, p)
    return out


def test_oci_rootfs_whiteouts_opaque_and_links() -> None:
    t = _tree(
        [
            oi.T("dir", "a"),
            oi.T("file", "a/x", b"x"),
            oi.T("file", "a/y", b"y"),
            oi.T("dir", "d"),
            oi.T("file", "d/old", b"o"),
            oi.T("file", "f", b"1"),
            oi.T("link", "g", target="f"),
        ],
        [
            oi.T("whiteout", "a/x"),
            oi.T("dir", "d"),
            oi.T("opaque", "d"),
            oi.T("file", "d/new", b"n"),
            oi.T("file", "h", b"h", xattrs={"user.k": b"v", "com.apple.x": b"dropped"}),
        ],
    )
    assert _paths(t.root) == ["/a", "/a/y", "/d", "/d/new", "/f", "/g", "/h"]
    kids = t.root.children
    assert kids is not None
    assert kids[b"f"] is kids[b"g"] and kids[b"f"].link_id
    assert kids[b"h"].xattrs == {b"user.k": b"v"}
    assert kids[b"a"].uncertain and not kids[b"d"].uncertain  # a: implied by a/.wh.x
    z = OciRootfs()
    z.apply(io.BytesIO(oi.layer([oi.T("file", "z", b"zz")], "zstd").blob))
    assert _paths(z.root) == ["/z"]
    with pytest.raises(FormatError):
        OciRootfs().apply(io.BytesIO(b"\x1f\x8b garbage"))


def test_compare_reports_each_kind_of_difference() -> None:
    base = [
        oi.T("dir", "d"),
        oi.T("file", "d/f", b"data"),
        oi.T("symlink", "s", target="d"),
        oi.T("file", "x", b"x", xattrs={"user.a": b"1"}),
        oi.T("link", "y", target="x"),
    ]
    a = _tree(base).root
    same, n, _u = compare(a, _tree(base).root)
    assert same == [] and n == 6
    other = [
        oi.T("dir", "d", mode=0o700),
        oi.T("file", "d/f", b"DATA"),
        oi.T("symlink", "s", target="e"),
        oi.T("file", "x", b"x", xattrs={"user.a": b"2"}),
        oi.T("file", "y", b"x"),
        oi.T("file", "extra", b""),
    ]
    diffs, _n, _u = compare(a, _tree(other).root)
    text = "\n".join(str(d) for d in diffs)
    assert "/d: mode differs (oci 0o755, nydus 0o700)" in text
    assert "/d/f: content differs" in text
    assert "/s: symlink target differs" in text
    assert "/x: xattrs differs" in text
    assert "/extra: only in the Nydus image" in text
    assert "/x, /y: hardlinked only in the OCI image" in text
    diffs, _n, _u = compare(_tree(other).root, a)
    assert any("missing in the Nydus image" in str(d) for d in diffs)


def test_oci_rootfs_survives_hostile_layers() -> None:
    """Regressions from bench/fault.py's tar trials: a 2000-directory-deep path raised
    RecursionError in the overlay and walk of OciRootfs, and a sparse file claiming 2**50
    bytes kept it hashing zeros for days; now the first is read, the second refused."""
    import io

    from hostile_tars import hostile_cases
    from nydus.convert.rootfs import OciRootfs, _walk
    from nydus.errors import FormatError

    cases = {c.name: c for c in hostile_cases()}
    rootfs = OciRootfs()
    rootfs.apply(io.BytesIO(cases["deep-path-ok"].make()))
    paths = [p for p, _ in _walk(rootfs.root)]
    assert ("/" + "a/" * 2000 + "f").encode() in paths
    rootfs.apply(io.BytesIO(cases["deep-path-ok"].make()))  # overlay onto a deep lower tree
    with pytest.raises(FormatError, match="sparse file"):
        OciRootfs().apply(io.BytesIO(cases["sparse-huge"].make()))


def test_default_parallel_is_one_layer_per_two_cpus() -> None:
    """Layers in flight by default: max(1, min(4, layers, CPUs // 2)) (memory: each layer
    in flight holds its tree; each builder already compresses on a pool of its own)."""
    assert default_parallel(5, cpus=2) == 1
    assert default_parallel(5, cpus=1) == 1
    assert default_parallel(5, cpus=4) == 2
    assert default_parallel(2, cpus=64) == 2
    assert default_parallel(9, cpus=64) == 4
    assert default_parallel(0, cpus=8) == 1


def test_build_order_largest_first_unless_streamed_one_at_a_time() -> None:
    """Largest first; one layer at a time with streamed pushes: layer order, so that the lower
    prefixes merge while the upper layers build."""
    assert build_order([5, 1, 90, 3], 1) == [2, 0, 3, 1]
    assert build_order([5, 1, 90, 3], 2, streamed=True) == [2, 0, 3, 1]
    assert build_order([5, 1, 90, 3], 1, streamed=True) == [0, 1, 2, 3]
    assert build_order([], 1, streamed=True) == []
