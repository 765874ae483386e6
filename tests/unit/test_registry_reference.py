"""Image references and the OCI vocabulary helpers."""

from __future__ import annotations

import pytest

from nydus.errors import ConfigError, FormatError
from nydus.format import oci
from nydus.registry import parse_reference
from nydus.registry.reference import registry_api_host

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repo", "tag", "digest", "ref"),
    [
        ("busybox", "docker.io", "library/busybox", None, None, "latest"),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None, "1.36"),
        ("docker.io/foo/bar", "docker.io", "foo/bar", None, None, "latest"),
        ("index.docker.io/library/x:y", "docker.io", "library/x", "y", None, "y"),
        ("localhost/app", "localhost", "app", None, None, "latest"),
        ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None, "v1"),
        ("127.0.0.1:5000/img@" + D, "127.0.0.1:5000", "img", None, D, D),
        ("ghcr.io/o/r:t@" + D, "ghcr.io", "o/r", "t", D, D),
        ("docker://quay.io/x/y-z_w.v:latest", "quay.io", "x/y-z_w.v", "latest", None, "latest"),
        ("[::1]:5000/img:t", "[::1]:5000", "img", "t", None, "t"),
        ("Registry.Example/r", "registry.example", "r", None, None, "latest"),
    ],
)
def test_parse(
    text: str, registry: str, repo: str, tag: str | None, digest: str | None, ref: str
) -> None:
    r = parse_reference(text)
    assert (r.registry, r.repository, r.tag, r.digest, r.ref) == (
        registry,
        repo,
        tag,
        digest,
        ref,
    )


@pytest.mark.parametrize(
    "bad",
    ["", "repo/UPPER", "a//b", "img:", "img:-tag", "img@sha256:abc", "host:5000/", "a/b:t/c"],
)
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_reference(bad)


def test_str_and_helpers() -> None:
    r = parse_reference("localhost:5000/a/b:v1")
    assert str(r) == "localhost:5000/a/b:v1"
    assert str(r.with_digest(D)) == f"localhost:5000/a/b:v1@{D}"
    assert r.with_tag("v2").ref == "v2"
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert registry_api_host("127.0.0.1:5000") == "127.0.0.1:5000"
    assert parse_reference("img", default_registry="127.0.0.1:5000").repository == "img"


def test_digests() -> None:
    assert oci.parse_digest(D) == ("sha256", "ab" * 32)
    for bad in ("sha256:AB", "md5:" + "0" * 32, "sha256", "sha256:" + "0" * 63):
        with pytest.raises(FormatError):
            oci.parse_digest(bad)
    assert oci.compute_digest(b"", "sha512").startswith("sha512:cf83e1357eef")
    assert oci.sha256_digest(b"abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_manifest_media_type() -> None:
    mt = oci.manifest_media_type
    assert mt(b"{}", oci.MEDIA_TYPE_DOCKER_MANIFEST + "; charset=utf-8") == (
        oci.MEDIA_TYPE_DOCKER_MANIFEST
    )
    assert mt(b'{"mediaType": "x/y"}', "application/json") == "x/y"
    assert mt(b'{"manifests": []}') == oci.MEDIA_TYPE_OCI_INDEX
    assert mt(b'{"layers": []}', "text/plain") == oci.MEDIA_TYPE_OCI_MANIFEST
    with pytest.raises(FormatError):
        mt(b"not json")
    with pytest.raises(FormatError):
        mt(b"{}")
    assert oci.is_index(oci.MEDIA_TYPE_DOCKER_MANIFEST_LIST)
    assert oci.is_manifest(oci.MEDIA_TYPE_OCI_MANIFEST)
    assert not oci.is_manifest(oci.MEDIA_TYPE_NYDUS_BLOB)


def test_descriptor_round_trip() -> None:
    d = oci.Descriptor(
        oci.MEDIA_TYPE_NYDUS_BLOB,
        D,
        123,
        {oci.ANNOTATION_NYDUS_BLOB: "true"},
        platform={"os": "linux", "architecture": "amd64"},
    )
    assert oci.Descriptor.from_dict(d.to_dict()) == d
    with pytest.raises(FormatError):
        oci.Descriptor.from_dict({"mediaType": "x", "digest": D, "size": -1})
    with pytest.raises(FormatError):
        oci.Descriptor.from_dict({"mediaType": "x", "digest": "bad", "size": 1})
