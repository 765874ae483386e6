"""Settings of one ``containerd-nydus-grpc`` instance (what its command-line flags say).

Paths default as upstream nydus-snapshotter's do. ``nydusd_config`` is the nydusd JSON config
named by ``--config-path`` (the template of every daemon the snapshotter starts); it is loaded and
checked to be a JSON object here, and interpreted by the daemon manager
(:mod:`.daemons.imageconfig`).
``recover_policy`` says what happens when a nydusd dies: ``restart`` (a new daemon on the same
mount point; containers that were reading through the dead one get errors), ``failover`` (the
snapshotter holds each daemon's FUSE connection, and a new daemon takes it over: running
containers carry on) or ``none``. ``content_store`` serves containerd's Content service from
``<root>/content`` too (:mod:`.content.service`), which lets stock ``ctr image pull`` pull Nydus
images lazily.

Immutable once built; share freely between threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import read_input_file
from ..errors import ConfigError
from ..format.safejson import parse_json_object

__all__ = [
    "DAEMON_MODES",
    "RECOVER_POLICIES",
    "DEFAULT_ADDRESS",
    "DEFAULT_CONTAINERD_ADDRESS",
    "DEFAULT_ROOT",
    "SnapshotterConfig",
    "load_nydusd_config",
]

DEFAULT_ROOT = Path("/var/lib/containerd-nydus")
DEFAULT_ADDRESS = Path("/run/containerd-nydus/containerd-nydus-grpc.sock")
DEFAULT_CONTAINERD_ADDRESS = Path("/run/containerd/containerd.sock")

#: Daemon modes: upstream's names, with ``multiple`` an alias of ``dedicated``.
DAEMON_MODES = ("dedicated", "shared", "none")
RECOVER_POLICIES = ("restart", "failover", "none")


@dataclass(frozen=True)
class SnapshotterConfig:
    root: Path = DEFAULT_ROOT
    address: Path = DEFAULT_ADDRESS
    containerd_address: Path = DEFAULT_CONTAINERD_ADDRESS
    config_path: Path | None = None
    nydusd_config: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None  # default: <root>/cache
    nydusd_path: str = "nydusd"
    nydusd_standby: bool = True  # keep a warm spare nydusd started ahead (daemons/spare.py)
    nydus_image_path: str = "nydus-image"
    daemon_mode: str = "dedicated"
    fs_driver: str | None = None  # None: nydusd's default (erofs; fusedev when supervised)
    log_level: str = "info"
    log_to_stdout: bool = False
    recover_policy: str = "restart"
    metrics_address: str | None = None  # "HOST:PORT" for the Prometheus endpoint
    docker_config: Path | None = None  # docker config.json read for registry credentials
    daemon_start_timeout: float = 30.0  # seconds for a nydusd to reach RUNNING
    daemon_check_interval: float = 1.0  # seconds between liveness checks of the daemons
    content_store: bool = False  # serve containerd's Content service too (<root>/content)

    def __post_init__(self) -> None:
        if self.daemon_mode not in DAEMON_MODES:
            raise ConfigError(
                f"--daemon-mode: {self.daemon_mode!r} is not one of {', '.join(DAEMON_MODES)}"
            )
        if self.recover_policy not in RECOVER_POLICIES:
            raise ConfigError(
                f"--recover-policy: {self.recover_policy!r} is not one of "
                f"{', '.join(RECOVER_POLICIES)}"
            )

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.root / "cache"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def content_dir(self) -> Path:
        return self.root / "content"

    @property
    def registry_scheme(self) -> str:
        """The nydusd template's registry scheme ("" when it names none: auto-detect)."""
        backend = (self.nydusd_config.get("device") or {}).get("backend") or {}
        scheme = (backend.get("config") or {}).get("scheme") if isinstance(backend, dict) else ""
        return scheme if scheme in ("http", "https") else ""


def load_nydusd_config(path: Path) -> dict[str, Any]:
    """Read the nydusd JSON config at ``path``; it must be a JSON object."""
    text = read_input_file(path, "--config-path").decode("utf-8", "replace")
    return parse_json_object(text, f"--config-path {path}", error=ConfigError)
