"""``nydusd``: serve a RAFS image (or several, via the API) over FUSE, upstream's flags.

    nydusd [fuse] --config FILE --mountpoint DIR --bootstrap FILE [--apisock SOCK] [--id ID]
           [--log-level L] [--log-file F] [--prefetch-files P ...] [--fuse-threads N]
           [--virtual-mountpoint /] [--failover-policy resend] [--supervisor S] [--upgrade]
           [--bootstrap-digest sha256:HEX]

Without ``--bootstrap`` the daemon is a shared daemon: the mount point starts empty and images
are attached with ``POST /api/v1/mount?mountpoint=/sub``. Runs in the foreground; SIGTERM or
SIGINT unmount and exit 0. Exit codes follow nydus.errors (2 config, 3 format, ...).
Parses, sets up logging, calls :class:`nydus.daemon.Nydusd`; no logic of its own.
``nydusd --standby`` (an extension, used by the containerd snapshotter) imports the daemon and
waits for its command line on stdin (:mod:`nydus.daemon.standby`).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import threading
from types import FrameType

from .. import __version__
from ..config import FsDriver
from ..errors import ConfigError
from . import LOG_LEVELS, HelpFormatter, flag, run_guarded

log = logging.getLogger("nydusd")

_SUBCOMMANDS = ("fuse", "virtiofs", "singleton", "nbd", "uffd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusd",
        description="Serve RAFS (Nydus) images over FUSE",
        formatter_class=HelpFormatter,
        epilog="Subcommand 'fuse' is the default; virtiofs, singleton (fscache), nbd and uffd "
        "are not supported by this implementation.",
    )
    p.add_argument("-V", "--version", action="version", version=f"nydusd {__version__} (python)")
    p.add_argument("-C", "--config", help="nydusd configuration file (JSON v1, or v2)")
    p.add_argument("-A", "--apisock", help="unix socket for the HTTP API")
    p.add_argument("-M", "--mountpoint", help="where to mount the FUSE file system")
    p.add_argument("-B", "--bootstrap", help="RAFS bootstrap (metadata) to serve")
    p.add_argument(
        "--bootstrap-digest",
        metavar="sha256:HEX",
        help="refuse to mount --bootstrap unless its sha256 is this (an extension "
        "of this implementation, not an upstream flag; the containerd "
        "snapshotter passes the digest it recorded)",
    )
    p.add_argument(
        "-D", "--localfs-dir", help="blob directory: shorthand for a localfs backend config"
    )
    p.add_argument("--shared-dir", help="passthroughfs directory (not supported)")
    p.add_argument("-I", "--id", default="", help="daemon id")
    p.add_argument("-S", "--supervisor", default="", help="supervisor socket (failover)")
    flag(p, "-U", "--upgrade", help="start in upgrade mode: wait for a takeover")
    p.add_argument(
        "-l",
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="log level",
    )
    p.add_argument("-L", "--log-file", help="log to this file instead of stderr")
    p.add_argument("-R", "--log-rotation-size", type=int, default=0, help="MiB (0 = never)")
    p.add_argument(
        "--rlimit-nofile", type=int, default=1_000_000, help="raise the open-files limit to this"
    )
    p.add_argument(
        "-P",
        "--prefetch-files",
        nargs="+",
        default=None,
        metavar="PATH",
        help="files to prefetch (when the config enables fs_prefetch)",
    )
    p.add_argument(
        "-m",
        "--virtual-mountpoint",
        default="/",
        help="where the --bootstrap image appears inside the mount (default /)",
    )
    p.add_argument(
        "-F",
        "--failover-policy",
        default="resend",
        choices=["none", "resend", "flush"],
        help="what a new daemon does with requests in flight at a takeover",
    )
    p.add_argument(
        "-T", "--fuse-threads", type=int, default=4, help="threads serving FUSE requests (1..1024)"
    )
    flag(p, "-W", "--writable", help="(not supported)")
    p.add_argument("--dedup-db", help="(accepted, ignored)")
    p.add_argument(
        "--fs-driver",
        choices=[d.value for d in FsDriver],
        default="erofs",
        help="default data path of images whose config has no fs_driver: erofs "
        "(default: the kernel mounts the bootstrap, the daemon serves blob "
        "data) or fusedev (FUSE RAFS). v5 images, kernels without file-backed "
        "EROFS, per-file metrics and --supervisor use fusedev",
    )
    p.add_argument(
        "--readahead-kb",
        type=int,
        default=1024,
        help="the FUSE mount's readahead in KiB (default 1024, one chunk; 0: the kernel's default)",
    )
    return p


def _split_subcommand(argv: list[str]) -> tuple[str, list[str]]:
    if argv and argv[0] in _SUBCOMMANDS:
        return argv[0], argv[1:]
    return "fuse", argv


def _raise_nofile(limit: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, limit)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    except (ValueError, OSError) as e:
        log.debug("rlimit-nofile not changed: %s", e)


def _tune_malloc() -> None:
    """Keep freed chunk buffers in glibc's heap: by default every 1 MiB+ ``bytes`` is an
    mmap of its own, so each chunk read pays fresh page faults (measured: 3 GB/s instead
    of 20 GB/s for 4 MiB batches). Fixed thresholds stop that; the heap then holds at most
    the chunk cache's working set, and its free part is handed back once it has stayed free
    (``Nydusd.wait``'s HeapTrimmer)."""
    from ..libc import set_malloc

    if not set_malloc(mmap_threshold=64 << 20, trim_threshold=256 << 20):
        log.debug("mallopt not available")


def _load_config(a: argparse.Namespace) -> object | None:
    from ..config import DaemonConfig

    if a.config:
        return DaemonConfig.from_file(a.config)
    if a.localfs_dir:
        if not os.path.isdir(a.localfs_dir):
            raise ConfigError(f"--localfs-dir {a.localfs_dir}: no such directory")
        return DaemonConfig.from_json(
            {"device": {"backend": {"type": "localfs", "config": {"dir": a.localfs_dir}}}}
        )
    if a.bootstrap:
        raise ConfigError("--bootstrap needs --config (or --localfs-dir)")
    return None


def _refuse_busy_mountpoint(mountpoint: str) -> None:
    """Refuse a mount point that is in use, saying by whom, or how to clear what a killed
    nydusd left there (its FUSE and EROFS mounts stay until unmounted)."""
    from ..kernel_mount import mounts_at, nydusd_serving

    left = mounts_at(mountpoint)
    if not left:
        return
    kinds = ", ".join(left)
    pids = nydusd_serving(mountpoint)
    if pids:
        raise StateBusyError(
            f"--mountpoint {mountpoint} is already in use ({kinds}) by nydusd "
            f"pid {', '.join(map(str, pids))}"
        )
    n = len(left)
    raise StateBusyError(
        f"--mountpoint {mountpoint} still holds {n} mount{'s' if n > 1 else ''} ({kinds}) and "
        f"no nydusd serves it: one was killed; clear {'them' if n > 1 else 'it'} with "
        f"'umount -l {mountpoint}'" + (f" ({n} times)" if n > 1 else "") + " and start again"
    )


class StateBusyError(ConfigError):
    """The mount point is taken (exit 2, like other unusable arguments)."""


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["--standby"]:  # a warm spare of the snapshotter's (daemon/standby.py)
        from ..daemon.standby import serve
        from ..errors import NydusError

        try:
            got = serve()
        except (OSError, NydusError) as e:
            print(f"nydusd: error: standby: {e}", file=sys.stderr)
            return 2
        if got is None:
            return 0
        args_in = got
    sub, rest = _split_subcommand(args_in)
    if sub != "fuse":
        print(f"nydusd: error: subcommand {sub!r} is not supported (only 'fuse')", file=sys.stderr)
        return 2
    a = _parser().parse_args(rest)
    from ..daemon.logsetup import setup_logging

    try:
        setup_logging(a.log_level, a.log_file, a.log_rotation_size)
    except (ValueError, OSError) as e:
        print(f"nydusd: error: logging: {e}", file=sys.stderr)
        return 2
    rc = run_guarded("nydusd", lambda: _run(a), log)
    log.info("nydusd exits" if rc == 0 else f"nydusd exits ({rc})")
    return rc


def _run(a: argparse.Namespace) -> int:
    from ..daemon.api import ApiServer
    from ..daemon.nydusd import DaemonOptions, ImageSource, Nydusd
    from ..fuse import SessionOptions

    if a.shared_dir:
        raise ConfigError("--shared-dir (passthroughfs) is not supported")
    if a.writable:
        raise ConfigError("--writable (userspace overlay) is not supported")
    if not a.mountpoint:
        raise ConfigError("--mountpoint is required")
    if not a.upgrade:  # first: a killed daemon's FUSE mount fails stat (ENOTCONN)
        _refuse_busy_mountpoint(os.path.abspath(a.mountpoint))
    if not os.path.isdir(a.mountpoint):
        raise ConfigError(f"--mountpoint {a.mountpoint}: not a directory")
    if a.fuse_threads < 1 or a.fuse_threads > 1024:
        raise ConfigError("--fuse-threads must be in 1..1024")
    if a.upgrade and not a.supervisor:
        raise ConfigError("--upgrade needs --supervisor")
    if a.bootstrap_digest is not None:
        from ..metadata import parse_bootstrap_digest

        if not a.bootstrap:
            raise ConfigError("--bootstrap-digest needs --bootstrap")
        a.bootstrap_digest = parse_bootstrap_digest(a.bootstrap_digest)
    if not a.bootstrap and not a.apisock:
        raise ConfigError(
            "without --bootstrap, images can only come through the API: "
            "give --bootstrap or --apisock"
        )
    cfg = _load_config(a)
    _raise_nofile(a.rlimit_nofile)
    _tune_malloc()

    opts = DaemonOptions(
        mountpoint=os.path.abspath(a.mountpoint),
        id=a.id,
        supervisor=a.supervisor,
        apisock=a.apisock or "",
        upgrade=a.upgrade,
        failover_policy=a.failover_policy,
        fs_driver=FsDriver(a.fs_driver),
        # Zero-message opens (no OPEN/RELEASE round trips) unless per-file stats are wanted,
        # or a supervisor may hold the connection while no daemon serves it: OPEN replies
        # carry FOPEN_NOFLUSH, so a close() never waits on a FLUSH nobody answers (with
        # zero-message opens the kernel sends FLUSH until its first ENOSYS reply).
        session=SessionOptions(
            threads=a.fuse_threads,
            readahead_kb=a.readahead_kb,
            no_open=not (getattr(cfg, "iostats_files", False) or a.supervisor),
        ),
    )
    daemon = Nydusd(opts)
    logging.getLogger().addHandler(daemon.events)
    api: ApiServer | None = None
    if a.apisock:
        from ..daemon.failover import Failover

        fo = Failover(daemon) if a.supervisor else None
        api = ApiServer(
            daemon,
            a.apisock,
            on_sendfd=fo.send if fo else None,
            on_takeover=fo.takeover if fo and a.upgrade else None,
        )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.request_exit(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.info(
        "nydusd %s (python) starting: mountpoint %s, %d FUSE threads",
        __version__,
        opts.mountpoint,
        a.fuse_threads,
    )
    try:
        if api is not None:
            api.start()
        if a.bootstrap:
            source = ImageSource(
                a.bootstrap,
                cfg,  # type: ignore[arg-type]
                a.prefetch_files,
                a.bootstrap_digest,
            )
            daemon.mount(a.virtual_mountpoint, source)
        if not a.upgrade:
            daemon.mount_fuse()
            daemon.start()
        else:
            log.info("upgrade mode: waiting for a takeover request")
        daemon.wait()
    finally:
        daemon.shutdown()
        if api is not None:
            api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
