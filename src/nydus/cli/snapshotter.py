"""``containerd-nydus-grpc``: the containerd remote snapshotter, with upstream's flags.

``containerd-nydus-grpc`` parses flags into a
:class:`~nydus.snapshotter.config.SnapshotterConfig`, sets up logging
(``<root>/logs/containerd-nydus-grpc.log``, or stdout with ``--log-to-stdout``), serves the
Snapshots service on ``--address`` until SIGTERM/SIGINT, then stops cleanly (exit 0). Running
Nydus daemons are left alone on exit: containers keep using them, and the next start adopts
them. Registry credentials for the daemons also come from ``$DOCKER_CONFIG/config.json``
(default ``~/.docker/config.json``). ``--content-store`` also serves containerd's Content
service from ``<root>/content``: with containerd's content store proxied to it, stock
``ctr image pull`` pulls Nydus images without downloading their data blobs. The CLI wires the
service: the daemon manager, the metrics endpoint it serves, the snapshotter and the server.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .. import __version__
from ..config import FsDriver, docker_config_path
from ..daemon.logsetup import LEVELS, setup_logging
from ..errors import ConfigError
from . import flag, run_guarded

if TYPE_CHECKING:
    from ..snapshotter.config import SnapshotterConfig
    from ..snapshotter.content.service import ContentService
    from ..snapshotter.snapshots.localapply import LayerBlobs
    from ..snapshotter.snapshots.mounter import NydusMounter

log = logging.getLogger("containerd-nydus-grpc")


def _parser() -> argparse.ArgumentParser:
    from ..snapshotter.config import (
        DEFAULT_ADDRESS,
        DEFAULT_CONTAINERD_ADDRESS,
        DEFAULT_ROOT,
    )

    p = argparse.ArgumentParser(
        prog="containerd-nydus-grpc",
        description="containerd remote snapshotter for Nydus images (and plain OCI images)",
    )
    p.add_argument(
        "--config-path",
        "--nydusd-config",
        dest="config_path",
        type=Path,
        help="nydusd JSON configuration used for the daemons the snapshotter starts",
    )
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"state dir ({DEFAULT_ROOT})")
    p.add_argument(
        "--address",
        type=Path,
        default=DEFAULT_ADDRESS,
        help=f"unix socket to serve the Snapshots gRPC service on ({DEFAULT_ADDRESS})",
    )
    p.add_argument("--cache-dir", type=Path, help="blob cache directory (<root>/cache)")
    p.add_argument("--nydusd-path", "--nydusd", dest="nydusd_path", default="nydusd")
    flag(
        p,
        "--no-nydusd-standby",
        help="start every nydusd afresh instead of in a warm spare started ahead, which has "
        "done its imports (this implementation's nydusd only; turned off by itself when "
        "--nydusd-path does not know --standby)",
    )
    p.add_argument("--nydusimg-path", "--nydus-image", dest="nydusimg_path", default="nydus-image")
    p.add_argument("--log-level", choices=sorted(LEVELS), default="info")
    flag(p, "--log-to-stdout", help="log to stdout instead of <root>/logs")
    flag(p, "--shared-daemon", help="one nydusd for all images (same as --daemon-mode shared)")
    p.add_argument(
        "--daemon-mode",
        choices=["dedicated", "multiple", "shared", "none"],
        help="dedicated (default; alias multiple): one nydusd per image; shared: one for all",
    )
    p.add_argument(
        "--recover-policy",
        choices=["restart", "failover", "none"],
        default="restart",
        help="when a nydusd dies: restart it (default); failover: hand its FUSE connection to "
        "a new one, so running containers keep reading; none",
    )
    p.add_argument(
        "--fs-driver",
        choices=sorted(d.value for d in FsDriver),
        help="data path of the images' nydusd mounts: erofs (kernel EROFS over the daemon's "
        "blob files) or fusedev (FUSE RAFS). Default: nydusd's default (erofs, where the kernel "
        "can; fusedev under --recover-policy failover); an fs_driver in the nydusd config "
        "template wins",
    )
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (off by default)",
    )
    p.add_argument(
        "--daemon-start-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a nydusd may take to reach RUNNING (30)",
    )
    p.add_argument(
        "--containerd-address",
        type=Path,
        default=DEFAULT_CONTAINERD_ADDRESS,
        help=f"containerd's socket, to find which image a layer belongs to "
        f"({DEFAULT_CONTAINERD_ADDRESS})",
    )
    flag(
        p,
        "--content-store",
        help="also serve containerd's Content service on --address, from <root>/content: with "
        "containerd's content store proxied to it (README), stock `ctr image pull` pulls Nydus "
        "images without downloading their data blobs",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _daemon_mode(a: argparse.Namespace) -> str:
    mode = "multiple" if a.daemon_mode is None else a.daemon_mode
    mode = "dedicated" if mode == "multiple" else mode
    if a.shared_daemon:
        if a.daemon_mode is not None and mode != "shared":
            raise ConfigError(f"--shared-daemon contradicts --daemon-mode {a.daemon_mode}")
        mode = "shared"
    return mode


def _setup_logging(level: str, to_stdout: bool, log_dir: Path) -> None:
    """Log to stdout or ``<root>/logs`` (0700, file 0600); credentials are always redacted."""
    from ..credentials import private_dir

    log_file = None
    if not to_stdout:
        private_dir(log_dir)
        log_file = str(log_dir / "containerd-nydus-grpc.log")
    setup_logging(level, log_file, stream=sys.stdout)
    if level not in ("trace", "debug"):
        logging.getLogger("grpc").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    return run_guarded("containerd-nydus-grpc", lambda: _run(a), log)


def _run(a: argparse.Namespace) -> int:
    # Imported here so that --help and --version work without the generated gRPC modules.
    from ..snapshotter.config import SnapshotterConfig, load_nydusd_config
    from ..snapshotter.daemons.manager import DaemonManager
    from ..snapshotter.daemons.metrics import MetricsServer
    from ..snapshotter.server import SnapshotterServer
    from ..snapshotter.snapshots.core import Snapshotter
    from ..snapshotter.snapshots.imageref import ContainerdImageResolver

    root = a.root.absolute()
    cfg = SnapshotterConfig(
        root=root,
        address=a.address.absolute(),
        containerd_address=a.containerd_address.absolute(),
        config_path=a.config_path.absolute() if a.config_path else None,
        nydusd_config=load_nydusd_config(a.config_path) if a.config_path else {},
        cache_dir=a.cache_dir.absolute() if a.cache_dir else None,
        nydusd_path=a.nydusd_path,
        nydusd_standby=not a.no_nydusd_standby,
        nydus_image_path=a.nydusimg_path,
        daemon_mode=_daemon_mode(a),
        log_level=a.log_level,
        log_to_stdout=a.log_to_stdout,
        recover_policy=a.recover_policy,
        fs_driver=a.fs_driver,
        metrics_address=a.metrics_address,
        docker_config=Path(docker_config_path()).expanduser(),
        daemon_start_timeout=a.daemon_start_timeout,
        content_store=a.content_store,
    )
    from ..credentials import private_dir

    private_dir(cfg.root)  # metadata.db and daemon configs hold registry credentials
    _setup_logging(cfg.log_level, cfg.log_to_stdout, cfg.log_dir)
    log.info(
        "starting %s: root %s, address %s, daemon mode %s, containerd %s",
        __version__,
        cfg.root,
        cfg.address,
        cfg.daemon_mode,
        cfg.containerd_address,
    )
    cfg.effective_cache_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    content, layer_blobs = _content_service(cfg, lambda: server.service.plugin_name)
    local_blob = None
    if content is not None:
        store = content.store
        local_blob = lambda digest: store.read_small(digest, 8 << 20)  # noqa: E731
    resolver = ContainerdImageResolver(cfg.containerd_address, local_blob=local_blob)
    mounter = _mounter(cfg)
    metrics: MetricsServer | None = None
    try:
        snapshotter = Snapshotter(
            cfg.root, mounter, resolver, layers=resolver, layer_blobs=layer_blobs
        )
    except BaseException:
        mounter.close()
        raise
    try:
        if cfg.metrics_address and isinstance(mounter, DaemonManager):
            metrics = MetricsServer(mounter, cfg.metrics_address, snapshotter)
            metrics.start()
    except BaseException:
        snapshotter.close()
        raise
    server = SnapshotterServer(snapshotter, cfg.address, content=content)
    try:
        server.start()
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
        if metrics is not None:
            metrics.stop()
        snapshotter.close()
    log.info("stopped")
    return 0


def _mounter(cfg: SnapshotterConfig) -> NydusMounter:
    """The daemon manager (none in daemon mode ``none``)."""
    from ..snapshotter.daemons.manager import DaemonManager
    from ..snapshotter.snapshots.mounter import DaemonManagerMissing

    if cfg.daemon_mode == "none":
        return DaemonManagerMissing()
    return DaemonManager(cfg)


def _content_service(
    cfg: SnapshotterConfig, plugin_name: Callable[[], str]
) -> tuple[ContentService | None, LayerBlobs | None]:
    """The Content service over ``<root>/content`` with the Nydus hooks (``--content-store``),
    and the layers it stores for the snapshotter to apply itself."""
    if not cfg.content_store:
        return None, None
    from ..snapshotter.content.nydusblobs import nydus_content_service

    log.info("content store at %s (containerd's content proxy)", cfg.content_dir)
    return nydus_content_service(
        cfg.content_dir,
        cfg.containerd_address,
        plugin_name,
        scheme=cfg.registry_scheme,
        docker_config=cfg.docker_config,
    )


if __name__ == "__main__":
    sys.exit(main())
