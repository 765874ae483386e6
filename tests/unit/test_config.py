"""nydusd config v1/v2: defaults, strictness with key paths, round trips, env override."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from nydus.config import (
    DaemonConfig,
    HttpProxyConfig,
    LocalFsConfig,
    OssConfig,
    RegistryConfig,
    S3Config,
)
from nydus.errors import ConfigError


def v1(backend: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    b = backend or {"type": "localfs", "config": {"dir": "/blobs"}}
    return {"device": {"backend": b}, **top}


# An upstream-style config as nydus-snapshotter writes it.
SNAPSHOTTER_STYLE = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {
                "scheme": "https",
                "host": "registry.example.com",
                "repo": "library/ubuntu",
                "auth": "dXNlcjpwYXNz",
                "timeout": 5,
                "connect_timeout": 5,
                "retry_limit": 2,
                "skip_verify": False,
                "proxy": {
                    "url": "http://127.0.0.1:65001",
                    "ping_url": "http://127.0.0.1:40901/server/ping",
                    "fallback": True,
                    "check_interval": 5,
                    "use_http": False,
                },
                "mirrors": [
                    {
                        "host": "http://127.0.0.1:65001",
                        "headers": {"X-Dragonfly-Registry": "https://index.docker.io"},
                    }
                ],
            },
        },
        "cache": {
            "type": "blobcache",
            "compressed": False,
            "config": {"work_dir": "/var/lib/nydus/cache", "disable_indexed_map": False},
        },
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "amplify_io": 1048576,
    "fs_prefetch": {
        "enable": True,
        "threads_count": 10,
        "merging_size": 131072,
        "bandwidth_rate": 1048576,
        "prefetch_all": False,
    },
}


def test_defaults_match_upstream() -> None:
    c = DaemonConfig.from_json(v1(), environ={})
    assert c.mode == "direct" and c.digest_validate is False and c.amplify_io == 1 << 20
    p = c.fs_prefetch
    assert (p.enable, p.threads_count, p.merging_size, p.bandwidth_rate, p.prefetch_all) == (
        False,
        8,
        1 << 20,
        0,
        True,
    )
    assert c.device.cache.type == "" and c.device.cache.config.work_dir == "."
    r = DaemonConfig.from_json(
        v1({"type": "registry", "config": {"host": "h", "repo": "r"}}), environ={}
    ).device.backend.config
    assert isinstance(r, RegistryConfig)
    assert (r.scheme, r.timeout, r.connect_timeout, r.retry_limit) == ("https", 5, 5, 0)
    assert (r.proxy.fallback, r.proxy.check_interval, r.proxy.check_pause_elapsed) == (True, 5, 300)


def test_snapshotter_style_config_and_round_trip() -> None:
    c = DaemonConfig.from_json(json.dumps(SNAPSHOTTER_STYLE), environ={})
    b = c.device.backend.config
    assert isinstance(b, RegistryConfig)
    assert b.host == "registry.example.com" and b.retry_limit == 2
    assert b.proxy.ping_url.endswith("/server/ping")
    assert b.mirrors[0].headers == {"X-Dragonfly-Registry": "https://index.docker.io"}
    assert c.device.cache.is_filecache and c.enable_xattr
    assert c.fs_prefetch.threads_count == 10 and not c.fs_prefetch.prefetch_all
    again = DaemonConfig.from_json(c.to_dict(), environ={})
    assert again == c
    assert DaemonConfig.from_json(c.to_json(), environ={}) == c


@pytest.mark.parametrize(
    ("btype", "cfg", "cls"),
    [
        ("localfs", {"blob_file": "/b", "alt_dirs": ["/x"]}, LocalFsConfig),
        (
            "oss",
            {
                "endpoint": "oss.example.com",
                "bucket_name": "b",
                "object_prefix": "p/",
                "access_key_id": "k",
                "access_key_secret": "s",
            },
            OssConfig,
        ),
        (
            "s3",
            {
                "endpoint": "127.0.0.1:9000",
                "region": "us-east-1",
                "bucket_name": "b",
                "scheme": "http",
            },
            S3Config,
        ),
        ("http-proxy", {"addr": "/run/proxy.sock", "path": "/ns/blobs"}, HttpProxyConfig),
        ("http-proxy", {"addr": "http://127.0.0.1:1234"}, HttpProxyConfig),
    ],
)
def test_every_backend_type_parses(btype: str, cfg: dict[str, Any], cls: type) -> None:
    c = DaemonConfig.from_json(v1({"type": btype, "config": cfg}), environ={})
    assert c.device.backend.type == btype
    assert type(c.device.backend.config) is cls
    assert DaemonConfig.from_json(c.to_dict(), environ={}) == c


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            v1({"type": "registry", "config": {"host": "h", "repo": "r", "timeout": "5"}}),
            'device.backend.config.timeout: expected integer, got "5"',
        ),
        (
            v1({"type": "localfs", "config": {"dir": "/d", "dri": 1}}),
            "device.backend.config.dri: unknown key",
        ),
        (v1(digest_validate=1), "digest_validate: expected boolean, got 1"),
        (v1(amplify_io=True), "amplify_io: expected integer, got true"),
        (v1(amplify_io=-1), "amplify_io: -1 is out of range"),
        (v1(fs_prefetch={"threads_count": 0}), "fs_prefetch.threads_count: 0 is out of range"),
        (v1(fs_prefetch={"enable": "yes"}), 'fs_prefetch.enable: expected boolean, got "yes"'),
        (v1(bogus=1), "bogus: unknown key"),
        (v1(mode="lazy"), 'mode: expected "direct" or "cached"'),
        (v1({"type": "ftp", "config": {}}), "device.backend.type: unknown backend type 'ftp'"),
        (v1({"type": "registry", "config": {"host": "h"}}), "device.backend.config.repo: required"),
        (
            v1({"type": "registry", "config": {"host": "h", "repo": "r", "retry_limit": 256}}),
            "device.backend.config.retry_limit: 256 is out of range 0..255",
        ),
        (
            v1({"type": "registry", "config": {"host": "h", "repo": "r", "proxy": {"url": 5}}}),
            "device.backend.config.proxy.url: expected string, got 5",
        ),
        (
            v1(
                {
                    "type": "registry",
                    "config": {"host": "h", "repo": "r", "ca_cert_files": ["a", 3]},
                }
            ),
            "device.backend.config.ca_cert_files[1]: expected string, got 3",
        ),
        (v1({"type": "localfs", "config": {}}), "localfs needs 'blob_file' or 'dir'"),
        (
            v1({"type": "http-proxy", "config": {"addr": "relative.sock"}}),
            "device.backend.config.addr: expected an http(s):// URL",
        ),
        (
            {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": "/d"}},
                    "cache": {"type": "memcache"},
                }
            },
            "device.cache.type: unknown cache type",
        ),
        (
            {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": "/d"}},
                    "cache": {"type": "blobcache", "config": {"work_dir": ""}},
                }
            },
            "device.cache.config.work_dir: must not be empty",
        ),
        ({"mode": "direct"}, "device: required"),
        ([1, 2], "config: expected an object"),
    ],
)
def test_errors_name_the_key_path(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        DaemonConfig.from_json(json.dumps(doc), environ={})
    assert message in str(ei.value)


def test_garbage_text_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="neither JSON nor TOML"):
        DaemonConfig.from_json("{not json", environ={})
    with pytest.raises(ConfigError, match="must be v2"):
        DaemonConfig.from_json('device = "x"', environ={})


def test_image_pull_auth_overrides_registry_auth() -> None:
    doc = v1({"type": "registry", "config": {"host": "h", "repo": "r", "auth": "old"}})
    c = DaemonConfig.from_json(doc, environ={"IMAGE_PULL_AUTH": "bmV3OnBhc3M="})
    assert isinstance(c.device.backend.config, RegistryConfig)
    assert c.device.backend.config.auth == "bmV3OnBhc3M="
    c = DaemonConfig.from_json(doc, environ={})
    assert c.device.backend.config.auth == "old"  # type: ignore[union-attr]
    # localfs ignores it
    DaemonConfig.from_json(v1(), environ={"IMAGE_PULL_AUTH": "x"})


def test_validation_flag_combines_both_keys() -> None:
    assert DaemonConfig.from_json(v1(digest_validate=True), environ={}).validation_enabled
    doc = v1()
    doc["device"]["cache"] = {"type": "", "validate": True}
    assert DaemonConfig.from_json(doc, environ={}).validation_enabled
    assert not DaemonConfig.from_json(v1(), environ={}).validation_enabled


V2_TOML = """
version = 2
id = "my-id"

[backend]
type = "registry"

[backend.registry]
scheme = "http"
host = "localhost:5000"
repo = "nydus/test"
retry_limit = 4

[backend.registry.proxy]
url = "http://127.0.0.1:65001"
fallback = false

[cache]
type = "filecache"
validate = true

[cache.filecache]
work_dir = "/tmp/cache"

[cache.prefetch]
enable = true
threads = 2
batch_size = 65536

[rafs]
mode = "direct"
batch_size = 262144
validate = true
enable_xattr = true

[rafs.prefetch]
enable = true
threads = 4
batch_size = 524288
bandwidth_limit = 1000000
prefetch_all = true
"""


def test_v2_toml_converts_to_the_v1_model() -> None:
    c = DaemonConfig.from_json(V2_TOML, environ={})
    b = c.device.backend.config
    assert isinstance(b, RegistryConfig)
    assert (b.scheme, b.host, b.repo, b.retry_limit) == ("http", "localhost:5000", "nydus/test", 4)
    assert b.proxy.url == "http://127.0.0.1:65001" and b.proxy.fallback is False
    assert c.device.id == "my-id"
    assert c.device.cache.type == "filecache" and c.device.cache.validate
    assert c.device.cache.config.work_dir == "/tmp/cache"
    assert c.device.cache.prefetch_config.threads_count == 2
    assert c.amplify_io == 262144 and c.digest_validate and c.enable_xattr
    p = c.fs_prefetch
    assert (p.enable, p.threads_count, p.merging_size, p.bandwidth_rate) == (
        True,
        4,
        524288,
        1000000,
    )
    # and the same as JSON v2
    import tomllib

    assert DaemonConfig.from_json(json.dumps(tomllib.loads(V2_TOML)), environ={}) == c


def test_v2_errors() -> None:
    with pytest.raises(ConfigError, match="version: expected 2"):
        DaemonConfig.from_json({"version": 3}, environ={})
    with pytest.raises(ConfigError, match=r"rafs\.bogus: unknown key"):
        DaemonConfig.from_json(
            {
                "version": 2,
                "backend": {"type": "localfs", "localfs": {"dir": "/d"}},
                "rafs": {"bogus": 1},
            },
            environ={},
        )
    with pytest.raises(ConfigError, match=r"^backend\.oss\.timeout: expected integer"):
        DaemonConfig.from_json(
            {
                "version": 2,
                "backend": {
                    "type": "oss",
                    "oss": {"endpoint": "e", "bucket_name": "b", "timeout": "x"},
                },
            },
            environ={},
        )
    with pytest.raises(ConfigError, match=r"^rafs\.prefetch\.threads: 0 is out of range"):
        DaemonConfig.from_json(
            {
                "version": 2,
                "backend": {"type": "localfs", "localfs": {"dir": "/d"}},
                "rafs": {"prefetch": {"threads": 0}},
            },
            environ={},
        )
    with pytest.raises(ConfigError, match=r"^cache\.filecache\.work_dir: must not be empty"):
        DaemonConfig.from_json(
            {
                "version": 2,
                "backend": {"type": "localfs", "localfs": {"dir": "/d"}},
                "cache": {"type": "filecache", "filecache": {"work_dir": ""}},
            },
            environ={},
        )


def test_from_file(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(SNAPSHOTTER_STYLE))
    assert DaemonConfig.from_file(p, environ={}).device.backend.type == "registry"
    with pytest.raises(ConfigError, match="cannot read"):
        DaemonConfig.from_file(tmp_path / "missing.json")


def test_seed_article_configs_parse_unchanged() -> None:
    """registry.json and localfs.json exactly as the seed walkthrough writes them."""
    from nydus.config import DaemonConfig

    registry = {
        "device": {
            "backend": {
                "type": "registry",
                "config": {"scheme": "http", "host": "localhost:5000", "repo": "ubuntu"},
            },
            "digest_validate": False,
        },
        "mode": "direct",
    }
    cfg = DaemonConfig.from_json(registry)
    assert cfg.device.backend.type == "registry" and not cfg.validation_enabled
    registry["device"]["digest_validate"] = True  # type: ignore[index]
    assert DaemonConfig.from_json(registry).validation_enabled
    localfs = {
        "device": {"backend": {"type": "localfs", "config": {"dir": "/x/nydus-image/blobs"}}},
        "mode": "direct",
    }
    assert DaemonConfig.from_json(localfs).device.backend.type == "localfs"
    snapshotter = {
        "device": {
            "backend": {
                "type": "registry",
                "config": {
                    "scheme": "http",
                    "skip_verify": False,
                    "timeout": 5,
                    "connect_timeout": 5,
                    "retry_limit": 2,
                    "auth": "",
                },
            },
            "cache": {"type": "blobcache", "config": {"work_dir": "cache"}},
        },
        "mode": "direct",
        "digest_validate": False,
        "iostats_files": False,
        "enable_xattr": True,
        "fs_prefetch": {"enable": True, "threads_count": 4},
    }
    tmpl = DaemonConfig.from_json(snapshotter, template=True)
    assert tmpl.fs_prefetch.threads_count == 4
    with pytest.raises(ConfigError, match="host: required"):
        DaemonConfig.from_json(snapshotter)
