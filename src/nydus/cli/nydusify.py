"""``nydusify``: convert, check, mount and copy Nydus images in registries (upstream's flags).

    nydusify convert --source REF --target REF [--work-dir ./tmp] [--chunk-dict REF] ...
    nydusify check   --source REF --target REF
    nydusify mount   --target REF --mount-path DIR
    nydusify copy    --source REF --target REF|file://PATH
    nydusify optimize --source REF --target REF --prefetch-files LIST
    nydusify access-pattern --snapshotter-root DIR|--apisock SOCK --output LIST

Parses flags, builds options, calls :mod:`nydus.convert`, prints results and maps NydusError
families to exit codes. Flags upstream has but that mean nothing here (``--nydus-image``: the
builder runs in-process; ``--fs-align-chunk``: always aligned) are accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .. import __version__
from ..config import docker_config_path, read_input_file
from ..daemon.logsetup import setup_logging
from ..errors import ConfigError
from ..format.safejson import parse_json_object
from ..format.zran import DEFAULT_SPACING
from . import LOG_LEVELS, HelpFormatter, flag, run_guarded

if TYPE_CHECKING:
    from ..convert.remote import Remote

log = logging.getLogger("nydusify")


def _int(v: str) -> int:
    try:
        return int(v, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None


def _duration(v: str) -> float:
    """Go-style durations: ``5s``, ``500ms``, ``1m``, ``1m30s``, or plain seconds."""
    s = v.strip()
    try:
        return float(s)
    except ValueError:
        pass
    total, pos = 0.0, 0
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for m in re.finditer(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise argparse.ArgumentTypeError(f"not a duration: {v!r}")
    return total


def _common(p: argparse.ArgumentParser, source: bool = True) -> None:
    if source:
        flag(
            p,
            "--source-insecure",
            help="skip TLS verification of the source registry (HTTP fallback)",
        )
    flag(
        p, "--target-insecure", help="skip TLS verification of the target registry (HTTP fallback)"
    )
    flag(p, "--plain-http", help="use plain HTTP for registries")
    p.add_argument("--work-dir", default="./tmp", help="working directory (default ./tmp)")
    p.add_argument(
        "--log-level",
        dest="sub_log_level",
        default=None,
        choices=LOG_LEVELS,
        help="log level (overrides the global one)",
    )


def _backend_flags(p: argparse.ArgumentParser, prefix: str = "", what: str = "") -> None:
    where = what or "the Nydus image's data blobs"
    p.add_argument(
        f"--{prefix}backend-type",
        choices=["localfs", "s3", "oss", "registry"],
        help=f"where {where} are stored (default registry: beside the manifest)",
    )
    p.add_argument(
        f"--{prefix}backend-config", metavar="JSON", help="that backend's config as JSON"
    )
    p.add_argument(
        f"--{prefix}backend-config-file", metavar="FILE", help="that backend's config JSON file"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydusify", description="Nydus image conversion tool", formatter_class=HelpFormatter
    )
    p.add_argument("-v", "--version", action="version", version=f"nydusify {__version__}")
    p.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="log level",
    )
    flag(p, "--debug", help="same as --log-level debug")
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)

    c = cmd("convert", "convert an OCI image into a Nydus image")
    c.add_argument("--source", required=True, help="source image reference")
    c.add_argument("--target", help="target image reference")
    c.add_argument("--target-suffix", help="target = source + this suffix (e.g. -nydus)")
    _common(c)
    c.add_argument("--nydus-image", help="accepted for compatibility: the builder is in-process")
    c.add_argument(
        "--fs-version",
        default="6",
        choices=["5", "6"],
        help="RAFS version (only 6 is written here)",
    )
    c.add_argument(
        "--compressor",
        default="zstd",
        choices=["none", "lz4_block", "zstd"],
        help="chunk compression",
    )
    c.add_argument(
        "--fs-chunk-size",
        type=_int,
        default=0x100000,
        metavar="SIZE",
        help="chunk size, a power of two in 0x1000..0x1000000 (decimal or 0x hex)",
    )
    flag(c, "--fs-align-chunk", help="always on for v6")
    c.add_argument("--batch-size", type=_int, default=0, help="only 0 is supported")
    c.add_argument("--oci-ref", action="store_true", help="a zran image of the gzip layers")
    c.add_argument(
        "--zran-spacing", type=_int, default=DEFAULT_SPACING, help="--oci-ref: access points"
    )
    c.add_argument("--chunk-dict", help="REF, bootstrap:registry:REF or bootstrap:local:PATH")
    flag(c, "--prefetch-patterns", help="read prefetch paths from stdin, one per line")
    c.add_argument("--prefetch-dir", help="prefetch everything under this directory")
    _backend_flags(c)
    flag(c, "--backend-force-push", help="push blobs to the backend even if it has them")
    flag(
        c,
        "--stream-push",
        help="send each blob to the target registry while it is built (not upstream's; "
        "uploads blobs the registry may already have)",
    )
    flag(c, "--oci", help="OCI media types for the target (the default)")
    flag(c, "--docker-v2-format", help="Docker v2 schema 2 manifest and config for the target")
    flag(c, "--with-referrer", help="set the Nydus manifest's subject to the source manifest")
    flag(c, "--merge-platform", help="push an index holding the OCI and the Nydus manifests")
    flag(c, "--all-platforms", help="convert every platform of the source index")
    c.add_argument("--platform", help="OS/ARCH[/VARIANT][,...] (default: this machine's)")
    c.add_argument("--output-json", metavar="FILE", help="write a JSON report here")
    c.add_argument("--push-retry-count", type=int, default=3, help="retries of a failed push")
    c.add_argument(
        "--push-retry-delay",
        type=_duration,
        default=5.0,
        metavar="DURATION",
        help="wait between push retries: seconds or Go-style (5s, 500ms, 1m)",
    )
    c.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="layers converted at once (default max(1, min(4, layers, CPUs // 2)))",
    )

    k = cmd("check", "check a Nydus image against its source")
    k.add_argument("--source", help="source (OCI) image reference")
    k.add_argument("--target", required=True, help="Nydus image reference")
    _common(k)
    k.add_argument("--nydus-image", help="accepted for compatibility")
    k.add_argument("--nydusd", help="accepted for compatibility: files are read in-process")
    k.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this machine's)")
    flag(k, "--multi-platform", help="check every platform")
    _backend_flags(k, what="the target's data blobs (not the source's)")
    _backend_flags(k, "target-", what="the target's data blobs (same as --backend-*)")
    k.add_argument("--output-json", help="write a JSON report here")

    m = cmd("mount", "mount a Nydus image from a registry with nydusd")
    m.add_argument("--target", required=True, help="Nydus image reference")
    m.add_argument("--mount-path", required=True, help="an existing directory to mount on")
    _common(m, source=False)
    m.add_argument(
        "--nydusd",
        default="nydusd",
        help="nydusd to run: a path, or a name looked up next to nydusify first, then on PATH",
    )
    m.add_argument("--platform", help="OS/ARCH[/VARIANT]")
    flag(m, "--prefetch", help="prefetch the whole image")
    _backend_flags(m)

    y = cmd("copy", "copy a Nydus image with all its blobs")
    y.add_argument("--source", required=True, help="source image reference")
    y.add_argument("--target", required=True, help="REF, or file://PATH for an OCI tarball")
    _common(y)
    flag(y, "--all-platforms", help="copy every platform of the source index")
    y.add_argument("--platform", help="OS/ARCH[/VARIANT][,...]")
    y.add_argument(
        "--push-chunk-size",
        type=_int,
        default=0,
        help="upload in chunks of this many bytes (0: client default)",
    )
    _optimize_parsers(sub)
    return p


def _optimize_parsers(sub: Any) -> None:
    """``optimize`` (upstream's flags) and ``access-pattern`` (ours: exports a recording)."""
    o = sub.add_parser(
        "optimize",
        formatter_class=HelpFormatter,
        help="rebuild a Nydus image for an access pattern: a prefetch blob "
        "with the listed files' chunks, and a prefetch table",
    )
    o.add_argument("--source", required=True, help="source Nydus image reference")
    o.add_argument("--target", required=True, help="target image reference")
    _common(o)
    o.add_argument(
        "--policy",
        default="separated-blob-with-prefetch-files",
        help="optimization policy (only separated-blob-with-prefetch-files)",
    )
    o.add_argument(
        "--prefetch-files",
        required=True,
        metavar="LIST",
        help="file list, one path a line (or an access-pattern JSON; - for stdin)",
    )
    o.add_argument("--nydus-image", help="accepted for compatibility: the builder is in-process")
    o.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: this machine's)")
    o.add_argument("--output-json", help="write a JSON report here")
    r = sub.add_parser(
        "access-pattern",
        formatter_class=HelpFormatter,
        help="export a recorded access pattern (daemons configured with "
        "access_pattern) as a prefetch list file",
    )
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshotter-root", help="the snapshotter's --root: every daemon of it")
    src.add_argument("--apisock", help="one nydusd's API socket")
    r.add_argument("--image", help="with --snapshotter-root: only this image reference")
    r.add_argument("--id", help="with --apisock: the image's mount path in the daemon")
    r.add_argument("--output", required=True, help="the prefetch list (one path a line)")
    r.add_argument("--output-json", help="also the pattern entries (with ranges) as JSON")
    r.add_argument(
        "--log-level",
        dest="sub_log_level",
        default=None,
        choices=LOG_LEVELS,
        help="log level of this command (default: the global --log-level)",
    )


def _remote_opts(insecure: bool, plain_http: bool, chunk: int = 0) -> Any:
    from ..convert.remote import RemoteOptions

    kw: dict[str, Any] = {
        "insecure": insecure,
        "plain_http": plain_http,
        "docker_config": docker_config_path(),
    }
    if chunk:
        kw["chunk_size"] = chunk
    return RemoteOptions(**kw)


def _backend(a: argparse.Namespace, prefix: str = "") -> Any:
    from ..convert.store import parse_backend_config

    t = getattr(a, f"{prefix}backend_type")
    text = getattr(a, f"{prefix}backend_config")
    path = getattr(a, f"{prefix}backend_config_file")
    if not t or t == "registry":
        if text or path:
            raise ConfigError("--backend-config needs --backend-type localfs, s3 or oss")
        return None
    if text and path:
        raise ConfigError("give --backend-config or --backend-config-file, not both")
    if path:
        text = read_input_file(path, "--backend-config-file").decode("utf-8", "replace")
    if not text:
        raise ConfigError(f"--backend-type {t} needs --backend-config or --backend-config-file")
    doc = parse_json_object(text, "backend config", error=ConfigError)
    return parse_backend_config(t, doc)


def _platforms(v: str | None) -> Any:
    from ..convert.image import Platform

    if not v:
        return None
    return [Platform.parse(x) for x in v.split(",") if x.strip()]


def _emit_json(path: str | None, data: Any) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


class _Report(Protocol):
    def summary(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


def _source_to_target(
    a: argparse.Namespace, target: str, run: Callable[[Remote, Remote], _Report]
) -> int:
    """Run a command from ``--source`` to ``target``; print and ``--output-json`` its report."""
    from ..convert.remote import Remote

    src = Remote(a.source, _remote_opts(a.source_insecure, a.plain_http))
    dst = Remote(target, _remote_opts(a.target_insecure, a.plain_http))
    try:
        rep = run(src, dst)
    finally:
        src.close()
        dst.close()
    print(rep.summary())
    _emit_json(a.output_json, rep.to_json())
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from ..convert.converter import ConvertOptions, convert
    from ..convert.progress import Progress
    from ..libc import set_malloc

    # Peak memory: glibc gives each thread that allocates (layer builder, chunk pool, pushers)
    # an arena of its own, and the ~1 MiB chunk buffers freed there stay resident. Two arenas:
    # ML image peak RSS 217 -> 172 MB at no CPU cost. A fixed 128 KiB mmap threshold on top
    # reaches 148 MB, but costs ~3 CPU s of page faults (+13% wall): not taken
    # (bench/results/convert-2026-12-04-ml-convspeed.md).
    set_malloc(arena_max=2)

    target = a.target
    if not target:
        if not a.target_suffix:
            raise ConfigError("--target (or --target-suffix) is required")
        target = a.source + a.target_suffix
    if a.batch_size:
        raise ConfigError("--batch-size: only 0 is supported")
    if a.nydus_image:
        log.debug("--nydus-image %s ignored: the builder runs in-process", a.nydus_image)
    prefetch: list[bytes] | None = None
    if a.prefetch_patterns:
        prefetch = [ln.strip().encode() for ln in sys.stdin if ln.strip()]
    if a.prefetch_dir:
        prefetch = [*(prefetch or []), a.prefetch_dir.encode()]
    opts = ConvertOptions(
        work_dir=a.work_dir,
        fs_version=str(a.fs_version),
        compressor=a.compressor,
        chunk_size=a.fs_chunk_size,
        zran_spacing=a.zran_spacing,
        prefetch_patterns=prefetch,
        chunk_dict=a.chunk_dict,
        platforms=_platforms(a.platform),
        all_platforms=a.all_platforms,
        merge_platform=a.merge_platform,
        with_referrer=a.with_referrer,
        oci=a.oci,
        docker_v2_format=a.docker_v2_format,
        backend=_backend(a),
        push_retry_count=a.push_retry_count,
        push_retry_delay=a.push_retry_delay,
        parallel=a.parallel,
        backend_force_push=a.backend_force_push,
        stream_push=a.stream_push,
    )
    if a.oci_ref:
        from ..convert.ociref import convert_oci_ref as convert  # type: ignore[assignment]
    return _source_to_target(a, target, lambda src, dst: convert(src, dst, opts, Progress()))


def cmd_check(a: argparse.Namespace) -> int:
    from ..convert.check import CheckOptions, check
    from ..convert.remote import Remote

    src = Remote(a.source, _remote_opts(a.source_insecure, a.plain_http)) if a.source else None
    dst = Remote(a.target, _remote_opts(a.target_insecure, a.plain_http))
    backend = _backend(a) or _backend(a, "target_")
    opts = CheckOptions(
        work_dir=a.work_dir,
        platforms=_platforms(a.platform),
        multi_platform=a.multi_platform,
        backend=backend,
    )
    try:
        rep = check(src, dst, opts)
    finally:
        if src is not None:
            src.close()
        dst.close()
    print(rep.text())
    _emit_json(a.output_json, rep.to_json())
    return 0 if rep.ok else 4


def cmd_mount(a: argparse.Namespace) -> int:
    from ..convert.mount import MountOptions, mount
    from ..convert.remote import Remote

    dst = Remote(a.target, _remote_opts(a.target_insecure, a.plain_http))
    plats = _platforms(a.platform)
    opts = MountOptions(
        mount_path=a.mount_path,
        work_dir=a.work_dir,
        nydusd=a.nydusd,
        backend=_backend(a),
        prefetch=a.prefetch,
        platform=plats[0] if plats else None,
        log_level=a.sub_log_level or a.log_level,
    )
    try:
        return mount(dst, opts)
    finally:
        dst.close()


def cmd_copy(a: argparse.Namespace) -> int:
    from ..convert.copy import CopyOptions, copy_image
    from ..convert.remote import Remote

    src = Remote(a.source, _remote_opts(a.source_insecure, a.plain_http))
    dst: Remote | str
    if a.target.startswith("file://"):
        dst = a.target[len("file://") :]
    else:
        dst = Remote(a.target, _remote_opts(a.target_insecure, a.plain_http, a.push_chunk_size))
    opts = CopyOptions(platforms=_platforms(a.platform), all_platforms=a.all_platforms)
    try:
        res = copy_image(src, dst, opts)
    finally:
        src.close()
        if isinstance(dst, Remote):
            dst.close()
    print(res.text())
    return 0


def cmd_optimize(a: argparse.Namespace) -> int:
    from ..builder.optimize import load_prefetch_list, read_prefetch_list
    from ..convert.optimize import OptimizeOptions, optimize

    if a.nydus_image:
        log.debug("--nydus-image %s ignored: the builder runs in-process", a.nydus_image)
    paths = (
        read_prefetch_list(sys.stdin.read())
        if a.prefetch_files == "-"
        else load_prefetch_list(a.prefetch_files)
    )
    plats = _platforms(a.platform)
    opts = OptimizeOptions(
        prefetch_files=paths,
        work_dir=a.work_dir,
        policy=a.policy,
        platform=plats[0] if plats else None,
    )
    return _source_to_target(a, a.target, lambda src, dst: optimize(src, dst, opts, log.info))


def cmd_access_pattern(a: argparse.Namespace) -> int:
    from ..convert.pattern import daemon_pattern, snapshotter_patterns, write_pattern

    if a.apisock:
        entries = daemon_pattern(a.apisock, a.id)
    else:
        entries = snapshotter_patterns(a.snapshotter_root, a.image)
    n = write_pattern(entries, a.output, a.output_json)
    print(f"{n} files in first-access order written to {a.output}")
    return 0


COMMANDS = {
    "convert": cmd_convert,
    "check": cmd_check,
    "mount": cmd_mount,
    "copy": cmd_copy,
    "optimize": cmd_optimize,
    "access-pattern": cmd_access_pattern,
}


# flags whose value may start with "-" (upstream's Go flag parser takes "--target-suffix -nydus")
_DASH_VALUE_FLAGS = ("--target-suffix",)


def _join_dash_values(argv: list[str]) -> list[str]:
    """``--flag -value`` as ``--flag=-value`` for the flags above (argparse would read
    ``-value`` as an option)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if (
            argv[i] in _DASH_VALUE_FLAGS
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
            and not argv[i + 1].startswith("--")
        ):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(_join_dash_values(list(sys.argv[1:] if argv is None else argv)))
    name = "debug" if a.debug else (a.sub_log_level or a.log_level)
    setup_logging(name)
    if name not in ("debug", "trace"):
        logging.getLogger("nydus.registry").setLevel(logging.WARNING)
    return run_guarded(f"nydusify {a.cmd}", lambda: COMMANDS[a.cmd](a))


if __name__ == "__main__":
    sys.exit(main())
