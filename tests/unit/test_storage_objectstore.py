"""S3 and OSS request signing and addressing: SigV4 checked against botocore, the OSS header
signature checked by a fake OSS server (tests/fake_oss.py), URLs as upstream builds them."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
from collections.abc import Iterator

import pytest

from fake_oss import FakeOss
from nydus.config import OssConfig, S3Config
from nydus.errors import BackendError
from nydus.storage.objectstore import OssBackend, S3Backend, oss_authorization, sigv4_headers

AK, SK = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def test_s3_url_is_path_style_like_upstream() -> None:
    be = S3Backend(
        S3Config(
            scheme="http",
            endpoint="localhost:9000",
            region="us-east-1",
            bucket_name="test-bucket",
            object_prefix="test-prefix-",
        )
    )
    assert be.url("test-object") == "http://localhost:9000/test-bucket/test-prefix-test-object"
    be2 = S3Backend(S3Config(region="us-east-1", bucket_name="b"))
    assert be2.url("x") == "https://s3.amazonaws.com/b/x"
    be3 = S3Backend(S3Config(endpoint="https://minio.local", region="r", bucket_name="b"))
    assert be3.url("x") == "https://minio.local/b/x"
    for b in (be, be2, be3):
        b.close()


def test_oss_url_is_virtual_host_style_like_upstream() -> None:
    be = OssBackend(
        OssConfig(
            endpoint="oss-cn-hangzhou.aliyuncs.com", bucket_name="bkt", object_prefix="nydus/"
        )
    )
    assert be.url("sha256:ab") == "https://bkt.oss-cn-hangzhou.aliyuncs.com/nydus/sha256:ab"
    be.close()


def test_sigv4_matches_botocore() -> None:
    botocore = pytest.importorskip("botocore")
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    assert botocore
    when = dt.datetime(2013, 5, 24, 0, 0, 0, tzinfo=dt.UTC)
    url = "https://examplebucket.s3.amazonaws.com/test%20dir/file~1.txt"
    ours = sigv4_headers(
        "GET",
        url,
        {"Range": "bytes=0-9"},
        access_key_id=AK,
        secret=SK,
        region="us-east-1",
        now=when,
    )

    req = AWSRequest(
        method="GET",
        url=url,
        headers={
            "Range": "bytes=0-9",
            "x-amz-date": "20130524T000000Z",
            "x-amz-content-sha256": hashlib.sha256(b"").hexdigest(),
        },
    )
    req.context["timestamp"] = "20130524T000000Z"
    signer = S3SigV4Auth(Credentials(AK, SK), "s3", "us-east-1")
    canonical = signer.canonical_request(req)
    sts = signer.string_to_sign(req, canonical)
    want = signer.signature(sts, req)
    assert ours["Authorization"].endswith(f"Signature={want}")
    assert "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date" in ours["Authorization"]
    assert ours["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={AK}/20130524/us-east-1/s3/aws4_request"
    )


def test_sigv4_aws_documentation_example() -> None:
    """The 'GET Object' example of the AWS SigV4 documentation."""
    when = dt.datetime(2013, 5, 24, 0, 0, 0, tzinfo=dt.UTC)
    h = sigv4_headers(
        "GET",
        "https://examplebucket.s3.amazonaws.com/test.txt",
        {"Range": "bytes=0-9"},
        access_key_id=AK,
        secret=SK,
        region="us-east-1",
        now=when,
    )
    assert h["Authorization"].endswith(
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


@pytest.fixture
def oss() -> Iterator[FakeOss]:
    with FakeOss("bkt", AK, SK, {"prefix/" + "ef" * 32: bytes(range(256)) * 1000}) as s:
        yield s


def test_oss_backend_signs_requests(oss: FakeOss) -> None:
    cfg = OssConfig(
        scheme="http",
        endpoint=f"oss.test:{oss.port}",
        bucket_name="bkt",
        object_prefix="prefix/",
        access_key_id=AK,
        access_key_secret=SK,
    )
    be = OssBackend(cfg, resolve={"bkt.oss.test": "127.0.0.1"})
    try:
        assert be.blob_size("ef" * 32) == 256_000
        assert be.read("ef" * 32, 1000, 3000) == (bytes(range(256)) * 1000)[1000:4000]
        assert oss.bad == []
    finally:
        be.close()
    bad = OssBackend(
        OssConfig(
            scheme="http",
            endpoint=f"oss.test:{oss.port}",
            bucket_name="bkt",
            object_prefix="prefix/",
            access_key_id=AK,
            access_key_secret="wrong",
        ),
        resolve={"bkt.oss.test": "127.0.0.1"},
    )
    with pytest.raises(BackendError, match="HTTP 403"):
        bad.read("ef" * 32, 0, 10)
    bad.close()


def test_oss_authorization_includes_oss_headers() -> None:
    a = oss_authorization(
        "GET",
        "/b/k",
        "Thu, 01 Jan 2026 00:00:00 GMT",
        access_key_id="id",
        secret="s",
        oss_headers={"X-OSS-Meta-A": " 1 ", "Range": "x"},
    )
    string = "GET\n\n\nThu, 01 Jan 2026 00:00:00 GMT\nx-oss-meta-a:1\n/b/k"
    mac = base64.b64encode(hmac.new(b"s", string.encode(), hashlib.sha1).digest()).decode()
    assert a == f"OSS id:{mac}"
