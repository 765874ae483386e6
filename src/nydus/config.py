"""nydusd configuration: the upstream JSON v1 format (and v2, TOML or JSON), parsed strictly.

Owns the daemon/storage configuration model and is the only module that reads ``os.environ``
(``IMAGE_PULL_AUTH`` overrides the registry backend's ``auth``, as upstream nydusd does;
``DOCKER_CONFIG`` locates the docker ``config.json``, :func:`docker_config_path`).

:meth:`DaemonConfig.from_json` accepts a JSON text, a ``bytes`` object or an already decoded
``dict``. Field names and defaults follow upstream ``api/src/config.rs`` (nydus-reference.md
§1.2). Parsing is strict: an unknown key, a wrong type or an out-of-range number raises
:class:`nydus.errors.ConfigError` whose message starts with the key path, e.g.
``device.backend.config.timeout: expected integer, got "5"``. Two upstream keys are accepted
and ignored on purpose: ``mirrors`` (removed from nydusd in 2025; older snapshotters still write
it) and localfs ``readahead``/``readahead_sec`` (older docs).

A config with ``"version": 2`` (JSON) or ``version = 2`` (TOML) is converted into the same v1
model. :meth:`DaemonConfig.to_dict` always writes v1 and round-trips through ``from_json``.

Objects are plain dataclasses: build once, then treat as immutable; safe to share between threads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias, TypeVar, Union

from .errors import ConfigError
from .format.safejson import parse_json

__all__ = [
    "DaemonConfig",
    "FsDriver",
    "DeviceConfig",
    "BackendConfig",
    "CacheConfig",
    "FileCacheConfig",
    "PrefetchConfig",
    "BlobPrefetchConfig",
    "ProxyConfig",
    "MirrorConfig",
    "ConnectionConfig",
    "LocalFsConfig",
    "LocalDiskConfig",
    "RegistryConfig",
    "OssConfig",
    "S3Config",
    "HttpProxyConfig",
    "OverlayConfig",
    "BACKEND_TYPES",
    "CACHE_TYPES",
]


class FsDriver(StrEnum):
    """An image's data path (extension): FUSE RAFS or kernel EROFS. The values are the wire
    strings (config, API, CLI); ``FsDriver(s)`` is the one check (ValueError otherwise)."""

    FUSEDEV = "fusedev"
    EROFS = "erofs"


U8 = (0, 0xFF)
U32 = (0, 0xFFFF_FFFF)
U64 = (0, 0xFFFF_FFFF_FFFF_FFFF)


def _num(lo_hi: tuple[int, int], default: int) -> Any:
    return field(default=default, metadata={"range": lo_hi})


# --------------------------------------------------------------------------- backends


@dataclass
class ProxyConfig:
    """``proxy``: send backend requests through an HTTP proxy (Dragonfly dfdaemon)."""

    url: str = ""
    ping_url: str = ""
    fallback: bool = True
    check_interval: int = _num(U64, 5)
    check_pause_elapsed: int = _num(U64, 300)
    use_http: bool = False
    dragonfly_scheduler_endpoint: str = ""


@dataclass
class MirrorConfig:
    """Historic ``mirrors`` entry: parsed for compatibility, never used (removed upstream)."""

    host: str = ""
    ping_url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    auth_through: bool = False
    health_check_interval: int = _num(U64, 5)
    failure_limit: int = _num(U8, 5)
    health_check_pause_elapsed: int = _num(U64, 300)


@dataclass
class ConnectionConfig:
    """Keys shared by every network backend."""

    skip_verify: bool = False
    ca_cert_files: list[str] = field(default_factory=list)
    timeout: int = _num(U32, 5)
    connect_timeout: int = _num(U32, 5)
    retry_limit: int = _num(U8, 0)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    mirrors: list[MirrorConfig] = field(default_factory=list)


@dataclass
class RegistryConfig(ConnectionConfig):
    scheme: str = "https"
    host: str = ""
    repo: str = ""
    auth: str | None = None
    registry_token: str | None = None
    blob_url_scheme: str = ""
    blob_redirected_host: str = ""

    _required: ClassVar[tuple[str, ...]] = ("host", "repo")


@dataclass
class OssConfig(ConnectionConfig):
    scheme: str = "https"
    endpoint: str = ""
    bucket_name: str = ""
    object_prefix: str = ""
    access_key_id: str = ""
    access_key_secret: str = ""

    _required: ClassVar[tuple[str, ...]] = ("endpoint", "bucket_name")


@dataclass
class S3Config(OssConfig):
    region: str = ""

    _required: ClassVar[tuple[str, ...]] = ("region", "bucket_name")


@dataclass
class HttpProxyConfig(ConnectionConfig):
    addr: str = ""
    path: str = ""

    _required: ClassVar[tuple[str, ...]] = ("addr",)


@dataclass
class LocalFsConfig:
    blob_file: str = ""
    dir: str = ""
    alt_dirs: list[str] = field(default_factory=list)
    readahead: bool = False
    readahead_sec: int = _num(U32, 0)


@dataclass
class LocalDiskConfig:
    device_path: str = ""
    disable_gpt: bool = False

    _required: ClassVar[tuple[str, ...]] = ("device_path",)


BackendSpecific: TypeAlias = (
    LocalFsConfig | LocalDiskConfig | RegistryConfig | OssConfig | S3Config | HttpProxyConfig
)

BACKEND_TYPES: dict[str, type[Any]] = {
    "localfs": LocalFsConfig,
    "localdisk": LocalDiskConfig,
    "registry": RegistryConfig,
    "oss": OssConfig,
    "s3": S3Config,
    "http-proxy": HttpProxyConfig,
}


@dataclass
class BackendConfig:
    type: str
    config: BackendSpecific


# --------------------------------------------------------------------------- cache


@dataclass
class FileCacheConfig:
    """``device.cache.config`` for blobcache/filecache (and fscache: only work_dir matters)."""

    work_dir: str = "."
    disable_indexed_map: bool = False
    enable_encryption: bool = False
    enable_convergent_encryption: bool = False
    encryption_key: str = ""


@dataclass
class BlobPrefetchConfig:
    """``device.cache.prefetch_config``: blob-level prefetch (fscache path)."""

    enable: bool = False
    threads_count: int = _num((0, 1024), 8)
    merging_size: int = _num((0, 0x1000_0000), 1 << 20)
    bandwidth_rate: int = _num(U32, 0)


CACHE_TYPES = ("", "dummycache", "blobcache", "filecache", "fscache")


@dataclass
class CacheConfig:
    type: str = ""
    compressed: bool = False
    validate: bool = False
    config: FileCacheConfig = field(default_factory=FileCacheConfig)
    prefetch_config: BlobPrefetchConfig = field(default_factory=BlobPrefetchConfig)

    @property
    def is_filecache(self) -> bool:
        return self.type in ("blobcache", "filecache")


@dataclass
class DeviceConfig:
    backend: BackendConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    id: str = ""
    # Not an upstream field, but the seed article's registry.json puts it here and
    # upstream silently ignores it; we honour it as an alias of the top-level key.
    digest_validate: bool = False


# --------------------------------------------------------------------------- top level


@dataclass
class PrefetchConfig:
    """``fs_prefetch``: file-system level prefetch."""

    enable: bool = False
    threads_count: int = _num((1, 1024), 8)
    merging_size: int = _num((0, 0x1000_0000), 1 << 20)
    bandwidth_rate: int = _num(U32, 0)
    prefetch_all: bool = True
    stream_prefetch: bool = False
    # an extension: the largest locality readahead window after a user read's cache miss
    # (storage/readahead.py), on whenever prefetch is enabled; 0 turns it off
    readahead_size: int = _num((0, 0x1000_0000), 1 << 20)


@dataclass
class OverlayConfig:
    upper_dir: str = ""
    work_dir: str = ""


@dataclass
class DaemonConfig:
    """nydusd config v1: ``device`` plus RAFS options."""

    device: DeviceConfig
    mode: str = "direct"
    digest_validate: bool = False
    iostats_files: bool = False
    enable_xattr: bool = False
    access_pattern: bool = False
    latest_read_files: bool = False
    amplify_io: int = _num((0, 0x1000_0000), 1 << 20)
    fs_prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    overlay: OverlayConfig | None = None
    fs_driver: FsDriver | None = None  # None: the daemon's default (nydus.daemon.driver)

    # ------------------------------------------------------------------ api

    @classmethod
    def from_json(
        cls,
        source: str | bytes | Mapping[str, Any],
        *,
        environ: Mapping[str, str] | None = None,
        template: bool = False,
    ) -> DaemonConfig:
        """Parse a v1 (or v2) config; ``environ`` defaults to ``os.environ``.

        ``template`` accepts a config whose per-image keys (registry host and repo,
        bucket names) are still missing: the snapshotter's config is such a template.
        """
        obj = _load(source)
        v2 = "version" in obj
        if v2:
            obj = _v2_to_v1(obj)
        try:
            cfg = _parse(cls, obj, "")
            cfg._check(template)
        except ConfigError as e:
            if not v2:
                raise
            raise ConfigError(_v2_path(str(e), obj)) from None
        env = os.environ if environ is None else environ
        pull_auth = env.get("IMAGE_PULL_AUTH", "")
        if pull_auth and isinstance(cfg.device.backend.config, RegistryConfig):
            cfg.device.backend.config.auth = pull_auth
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kw: Any) -> DaemonConfig:
        return cls.from_json(read_input_file(path, "config"), **kw)

    def to_dict(self) -> dict[str, Any]:
        """The v1 JSON object (secrets included); ``from_json(to_dict())`` is equal."""
        out = _dump(self)
        assert isinstance(out, dict)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def validation_enabled(self) -> bool:
        """Whether every read from the blob cache is hashed again (``digest_validate`` or
        ``cache.validate``). Chunks from a backend are always hashed (nydus.storage.verified)."""
        return self.digest_validate or self.device.digest_validate or self.device.cache.validate

    # ------------------------------------------------------------------ checks

    def _check(self, template: bool = False) -> None:
        if self.mode not in ("direct", "cached"):
            raise ConfigError(f'mode: expected "direct" or "cached", got {self.mode!r}')
        cache = self.device.cache
        if cache.type not in CACHE_TYPES:
            raise ConfigError(
                f"device.cache.type: unknown cache type {cache.type!r} "
                f"(expected one of {', '.join(repr(t) for t in CACHE_TYPES)})"
            )
        if cache.is_filecache and not cache.config.work_dir:
            raise ConfigError("device.cache.config.work_dir: must not be empty")
        b = self.device.backend.config
        for key in () if template else getattr(b, "_required", ()):
            if not getattr(b, key):
                raise ConfigError(f"device.backend.config.{key}: required")
        if isinstance(b, LocalFsConfig) and not (b.blob_file or b.dir):
            raise ConfigError("device.backend.config: localfs needs 'blob_file' or 'dir'")
        if isinstance(b, (RegistryConfig, OssConfig)) and b.scheme not in ("", "http", "https"):
            raise ConfigError(
                f'device.backend.config.scheme: expected "http" or "https", got {b.scheme!r}'
            )
        if isinstance(b, HttpProxyConfig) and not (
            b.addr.startswith(("http://", "https://")) or b.addr.startswith("/")
        ):
            raise ConfigError(
                "device.backend.config.addr: expected an http(s):// URL or an absolute "
                f"unix socket path, got {b.addr!r}"
            )


# --------------------------------------------------------------------------- machinery

T = TypeVar("T")


def docker_config_path(environ: Mapping[str, str] | None = None) -> str:
    """The docker ``config.json`` read for registry credentials: ``$DOCKER_CONFIG/config.json``,
    else ``~/.docker/config.json`` (``~`` unexpanded; the reader expands it)."""
    base = (os.environ if environ is None else environ).get("DOCKER_CONFIG")
    return os.path.join(base, "config.json") if base else "~/.docker/config.json"


def read_input_file(path: str | os.PathLike[str], what: str, max_size: int = 1 << 20) -> bytes:
    """The bytes of a small input file a user named (a config, a file list): opened with
    ``O_NONBLOCK`` so a FIFO cannot block the open, then only a regular file of at most
    ``max_size`` bytes is read (a FIFO, device or directory is refused at once). Errors are
    one-line :class:`ConfigError`s that start with ``what`` and the path."""
    name = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {name}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{what} {name} is not a regular file")
        try:
            data = f.read(max_size + 1)
        except OSError as e:
            raise ConfigError(f"cannot read {what} {name}: {e.strerror}") from None
    if len(data) > max_size:
        raise ConfigError(f"{what} {name} is larger than {max_size >> 20} MiB")
    return data


def _load(source: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    try:
        obj = parse_json(text, "config", error=ConfigError)
    except ConfigError as je:
        try:
            obj = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError, ValueError):
            reason = str(je).removeprefix("config is not JSON: ")
            raise ConfigError(f"config is neither JSON nor TOML: {reason}") from None
        if "version" not in obj:
            raise ConfigError("a TOML config must be v2 (version = 2)") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"config: expected an object, got {_tname(obj)}")
    return obj


def _tname(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _show(v: object) -> str:
    s = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else _tname(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints(cls: type[Any]) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = _HINTS[cls] = typing.get_type_hints(cls)
    return h


def _parse(cls: type[T], obj: object, path: str) -> T:
    where = path or "config"
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected object, got {_tname(obj)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in obj:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{_join(path, key)}: unknown key (known keys: {known})")
    kwargs: dict[str, Any] = {}
    if cls is BackendConfig:
        btype = obj.get("type")
        if not isinstance(btype, str):
            raise ConfigError(f"{_join(path, 'type')}: expected string, got {_tname(btype)}")
        spec = BACKEND_TYPES.get(btype)
        if spec is None:
            raise ConfigError(
                f"{_join(path, 'type')}: unknown backend type {btype!r} "
                f"(expected one of {', '.join(BACKEND_TYPES)})"
            )
        return BackendConfig(btype, _parse(spec, obj.get("config", {}), _join(path, "config")))  # type: ignore[return-value]
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{_join(path, name)}: required")
            continue
        kwargs[name] = _value(hints[name], obj[name], _join(path, name), f)
    return cls(**kwargs)


def _value(tp: Any, v: object, path: str, f: dataclasses.Field[Any] | None = None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            return None
        return _value(args[0], v, path, f)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{path}: expected boolean, got {_show(v)}")
        return v
    if tp is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{path}: expected integer, got {_show(v)}")
        lo, hi = f.metadata.get("range", U64) if f is not None else U64
        if not lo <= v <= hi:
            raise ConfigError(f"{path}: {v} is out of range {lo}..{hi}")
        return v
    if tp is str or tp is FsDriver:
        if not isinstance(v, str):
            raise ConfigError(f"{path}: expected string, got {_show(v)}")
        if tp is FsDriver:
            try:
                return FsDriver(v)
            except ValueError:
                raise ConfigError(f'{path}: expected "fusedev" or "erofs", got {v!r}') from None
        return v
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise ConfigError(f"{path}: expected array, got {_show(v)}")
        return [_value(item, x, _join(path, i)) for i, x in enumerate(v)]
    if origin is dict:
        _k, val = typing.get_args(tp)
        if not isinstance(v, dict):
            raise ConfigError(f"{path}: expected object, got {_show(v)}")
        return {str(k): _value(val, x, _join(path, str(k))) for k, x in v.items()}
    if dataclasses.is_dataclass(tp):
        return _parse(tp, v, path)  # type: ignore[arg-type]
    raise AssertionError(f"unhandled config type {tp!r}")  # pragma: no cover


def _dump(v: object) -> object:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        out: dict[str, object] = {}
        for f in dataclasses.fields(v):
            val = getattr(v, f.name)
            if val is None:
                continue
            out[f.name] = _dump(val)
        return out
    if isinstance(v, list):
        return [_dump(x) for x in v]
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    return v


# --------------------------------------------------------------------------- v2


def _take(obj: dict[str, Any], path: str, known: dict[str, str]) -> dict[str, Any]:
    """Rename the keys of a v2 section to their v1 names; unknown keys are errors."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected object, got {_tname(obj)}")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if k not in known:
            raise ConfigError(f"{_join(path, k)}: unknown key (known keys: {', '.join(known)})")
        out[known[k]] = v
    return out


_V2_PREFETCH = {
    "enable": "enable",
    "threads": "threads_count",
    "batch_size": "merging_size",
    "bandwidth_limit": "bandwidth_rate",
    "prefetch_all": "prefetch_all",
    "stream_prefetch": "stream_prefetch",
}
# rafs.prefetch (fs_prefetch) only: blob-level cache.prefetch has no readahead of its own
_V2_RAFS_PREFETCH = {**_V2_PREFETCH, "readahead_size": "readahead_size"}


def _v2_path(msg: str, v1: dict[str, Any]) -> str:
    """Rewrite the v1 key path at the start of an error message into the v2 one."""
    btype = v1.get("device", {}).get("backend", {}).get("type", "")
    ctype = v1.get("device", {}).get("cache", {}).get("type", "")
    section = "fscache" if ctype == "fscache" else "filecache"
    rules = [
        ("device.backend.config.", f"backend.{btype}."),
        ("device.backend.type", "backend.type"),
        ("device.cache.prefetch_config.", "cache.prefetch."),
        ("device.cache.config.", f"cache.{section}."),
        ("device.cache.", "cache."),
        ("device.id", "id"),
        ("fs_prefetch.", "rafs.prefetch."),
        ("amplify_io", "rafs.batch_size"),
        ("digest_validate", "rafs.validate"),
    ]
    renames = {
        "threads_count": "threads",
        "merging_size": "batch_size",
        "bandwidth_rate": "bandwidth_limit",
    }
    path, sep, rest = msg.partition(": ")
    for old, new in rules:
        if path.startswith(old):
            path = new + path[len(old) :]
            break
    else:
        if path in ("mode", "enable_xattr", "iostats_files", "access_pattern", "latest_read_files"):
            path = f"rafs.{path}"
    if path.startswith(("rafs.prefetch.", "cache.prefetch.")):
        head, _, key = path.rpartition(".")
        path = f"{head}.{renames.get(key, key)}"
    return path + sep + rest


def _v2_to_v1(obj: dict[str, Any]) -> dict[str, Any]:
    if obj.get("version") != 2:
        raise ConfigError(f"version: expected 2, got {_show(obj.get('version'))}")
    top = _take(
        obj,
        "",
        {
            "version": "version",
            "id": "id",
            "backend": "backend",
            "cache": "cache",
            "rafs": "rafs",
            "overlay": "overlay",
        },
    )
    out: dict[str, Any] = {}
    backend = top.get("backend")
    if backend is None:
        raise ConfigError("backend: required")
    if not isinstance(backend, dict):
        raise ConfigError(f"backend: expected object, got {_tname(backend)}")
    btype = backend.get("type")
    if not isinstance(btype, str) or btype not in BACKEND_TYPES:
        raise ConfigError(
            f"backend.type: unknown backend type {_show(btype)} "
            f"(expected one of {', '.join(BACKEND_TYPES)})"
        )
    for k in backend:
        if k != "type" and k not in BACKEND_TYPES:
            raise ConfigError(f"backend.{k}: unknown key")
    device: dict[str, Any] = {"backend": {"type": btype, "config": backend.get(btype, {})}}
    if "id" in top:
        device["id"] = top["id"]
    cache = top.get("cache")
    if cache is not None:
        c = _take(
            cache,
            "cache",
            {
                "type": "type",
                "compressed": "compressed",
                "validate": "validate",
                "prefetch": "prefetch",
                "filecache": "filecache",
                "fscache": "fscache",
            },
        )
        v1c: dict[str, Any] = {k: c[k] for k in ("type", "compressed", "validate") if k in c}
        ctype = c.get("type", "")
        section = c.get("fscache") if ctype == "fscache" else c.get("filecache")
        if section is not None:
            v1c["config"] = section
        if "prefetch" in c:
            p = _take(c["prefetch"], "cache.prefetch", _V2_PREFETCH)
            p.pop("prefetch_all", None)
            p.pop("stream_prefetch", None)
            v1c["prefetch_config"] = p
        device["cache"] = v1c
    out["device"] = device
    rafs = top.get("rafs")
    if rafs is not None:
        r = _take(
            rafs,
            "rafs",
            {
                "mode": "mode",
                "batch_size": "amplify_io",
                "validate": "digest_validate",
                "enable_xattr": "enable_xattr",
                "iostats_files": "iostats_files",
                "access_pattern": "access_pattern",
                "latest_read_files": "latest_read_files",
                "prefetch": "fs_prefetch",
            },
        )
        if "fs_prefetch" in r:
            r["fs_prefetch"] = _take(r["fs_prefetch"], "rafs.prefetch", _V2_RAFS_PREFETCH)
        out.update(r)
    if "overlay" in top:
        out["overlay"] = top["overlay"]
    return out
