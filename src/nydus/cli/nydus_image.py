"""``nydus-image``: thin command-line front end with upstream's flags.

Parses arguments, calls the builder and the verbs, prints results and maps
NydusError families to exit codes. No logic of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, BinaryIO

from .. import __version__
from ..builder.build import BuildOptions, BuildResult, build_from_tar, build_image
from ..builder.dirsource import load_directory
from ..builder.merge import MergeOptions, merge_bootstraps
from ..errors import ConfigError, NydusError, UnsupportedError
from ..metadata import open_bootstrap
from ..verbs.check import check_image
from ..verbs.inspect import dedup_report, image_stats, inspect_request
from ..verbs.unpack import unpack_image
from . import run_guarded

log = logging.getLogger("nydus-image")

DIR_TYPES = {"dir-rafs", "directory"}
TAR_TYPES = {"tar-rafs", "targz-rafs", "tarzstd-rafs"}  # all three sniff the compression


def _int(v: str) -> int:
    try:
        return int(v, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {v!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-image", description="Build and inspect RAFS images")
    p.add_argument("-V", "--version", action="version", version=f"nydus-image {__version__}")
    levels = ["trace", "debug", "info", "warn", "error"]
    p.add_argument("-l", "--log-level", default="info", choices=levels)
    p.add_argument("-L", "--log-file")
    # upstream's logging flags are global: they may also follow the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-l", "--log-level", choices=levels, default=argparse.SUPPRESS)
    common.add_argument("-L", "--log-file", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("create", parents=[common],
                       help="build a RAFS image from a directory or a layer tar")
    c.add_argument("source", help="a directory, or a tar / tar.gz / tar.zst file or - (stdin)")
    c.add_argument("-t", "--type", "--source-type", dest="type", default="dir-rafs",
                   choices=sorted(DIR_TYPES | TAR_TYPES))
    c.add_argument("-B", "--bootstrap")
    c.add_argument("-b", "--blob")
    c.add_argument("-D", "--blob-dir")
    c.add_argument("--blob-id")
    c.add_argument("--compressor", default="zstd")
    c.add_argument("--digester", default="blake3")
    c.add_argument("--chunk-size", type=_int, default=0x100000)
    c.add_argument("--batch-size", type=_int, default=0, help="only 0 (no batches) here")
    c.add_argument("-v", "--fs-version", default="6")
    c.add_argument("--parent-bootstrap")
    c.add_argument("--chunk-dict")
    c.add_argument("--whiteout-spec", default="oci")
    c.add_argument("--prefetch-policy", default="none", choices=["fs", "blob", "none"])
    c.add_argument("--blob-inline-meta", "--inline-bootstrap", action="store_true")
    c.add_argument("--repeatable", action="store_true", help="always on")
    c.add_argument("--aligned-chunk", action="store_true", help="always on for v6")
    c.add_argument("--disable-check", action="store_true")
    c.add_argument("--features", default="")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("-J", "--output-json")

    m = sub.add_parser("merge", parents=[common],
                       help="merge per-layer bootstraps (lowest first) into one")
    m.add_argument("sources", nargs="+", metavar="SOURCE")
    m.add_argument("-B", "--bootstrap", help="output bootstrap")
    m.add_argument("-D", "--blob-dir", help="write the bootstrap here, named by its sha256")
    m.add_argument("--parent-bootstrap")
    m.add_argument("--chunk-dict")
    m.add_argument("--prefetch-policy", default="none", choices=["fs", "blob", "none"])
    m.add_argument("--blob-digests", help="comma-separated sha256 hex, one per source")
    m.add_argument("--original-blob-ids", help="comma-separated blob ids, one per source")
    m.add_argument("--blob-sizes", help="comma-separated sizes, one per source")
    m.add_argument("--blob-toc-digests", help="comma-separated sha256 hex, one per source")
    m.add_argument("--blob-toc-sizes", help="comma-separated sizes, one per source")
    m.add_argument("--whiteout-spec", default="oci", choices=["oci", "overlayfs", "none"],
                   help="whiteouts of the layers (not an upstream flag; upstream uses oci)")
    m.add_argument("-J", "--output-json")

    k = sub.add_parser("check", parents=[common], help="validate a bootstrap and its blobs")
    k.add_argument("bootstrap", nargs="?")
    k.add_argument("-B", "--bootstrap", dest="bootstrap_opt")
    k.add_argument("-D", "--blob-dir")
    k.add_argument("--blob")
    k.add_argument("-v", "--verbose", action="store_true")
    k.add_argument("-J", "--output-json")

    i = sub.add_parser("inspect", parents=[common], help="query a bootstrap")
    i.add_argument("bootstrap", nargs="?")
    i.add_argument("-B", "--bootstrap", dest="bootstrap_opt")
    i.add_argument("-R", "--request", required=True)

    s = sub.add_parser("stat", parents=[common], help="statistics of one or more bootstraps")
    s.add_argument("-B", "--bootstrap")
    s.add_argument("-D", "--blob-dir", help="a directory of bootstraps")
    s.add_argument("-T", "--target")
    s.add_argument("--digester", default="blake3")
    s.add_argument("-J", "--output-json")

    u = sub.add_parser("unpack", parents=[common], help="write the image's tree as a tar")
    u.add_argument("bootstrap", nargs="?")
    u.add_argument("-B", "--bootstrap", dest="bootstrap_opt")
    u.add_argument("-D", "--blob-dir")
    u.add_argument("--blob")
    u.add_argument("--output", required=True)
    _optimize_parser(sub, common)
    return p


def _optimize_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    o = sub.add_parser("optimize", parents=[common], help="a prefetch blob with the listed "
                       "files' chunks and a bootstrap whose prefetch table lists them")
    o.add_argument("-p", "--prefetch-files", required=True, metavar="LIST",
                   help="file list, one path a line (or an access-pattern JSON)")
    o.add_argument("-B", "--bootstrap", required=True)
    o.add_argument("-D", "--blob-dir", required=True, help="the image's blobs (by blob id)")
    o.add_argument("-O", "--output-bootstrap", required=True)
    o.add_argument("--output-blob-dir", help="where the prefetch blob goes (default -D)")
    o.add_argument("-J", "--output-json", help='{"blobs": [...]}: the last is the new blob')


def _emit_json(path: str | None, data: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def _bootstrap_arg(a: argparse.Namespace) -> str:
    boot = a.bootstrap or a.bootstrap_opt
    if not boot:
        raise ConfigError("a bootstrap path is required")
    return str(boot)


def cmd_create(a: argparse.Namespace) -> int:
    if a.fs_version not in ("6",):
        raise ConfigError(f"--fs-version {a.fs_version}: this builder writes RAFS v6 only")
    if not a.bootstrap and not a.blob_inline_meta:
        raise ConfigError("--bootstrap is required (or --blob-inline-meta)")
    if a.batch_size:
        raise UnsupportedError("--batch-size: batched chunks are not supported (use 0)")
    from_tar = a.type in TAR_TYPES
    if from_tar and not (a.blob or a.blob_dir):
        raise ConfigError("both --blob and --blob-dir are missing")
    prefetch = None
    if a.prefetch_policy == "fs":
        if from_tar and a.source == "-":
            raise ConfigError(
                "--prefetch-policy fs reads its file list from stdin: the tar cannot come "
                "from stdin too"
            )
        prefetch = [ln.strip().encode() for ln in sys.stdin if ln.strip()]
    opts = BuildOptions(
        chunk_size=a.chunk_size, compressor=a.compressor, digester=a.digester,
        parent_bootstrap=a.parent_bootstrap,
        chunk_dict_bootstrap=_chunk_dict_path(a.chunk_dict), whiteout_spec=a.whiteout_spec,
        prefetch_paths=prefetch, workers=a.threads, inline_bootstrap=a.blob_inline_meta,
    )
    opts.validate()
    t0 = time.monotonic()
    tree = None if from_tar else load_directory(a.source)
    src = _open_tar(a.source) if from_tar else None
    blob_path, tmp = _blob_target(a)
    out = open(blob_path, "wb") if blob_path else None  # noqa: SIM115
    try:
        if src is not None:
            res = build_from_tar(src, out, opts, spool_dir=a.blob_dir)
        else:
            assert tree is not None
            res = build_image(tree, out, opts)
    except BaseException:
        if out:
            out.close()
        if tmp:
            os.unlink(tmp)
        raise
    finally:
        if src is not None and src is not sys.stdin.buffer:
            src.close()
    if out:
        out.close()
    blob_id = res.blob.entry.blob_id if res.blob else None
    if tmp:
        if blob_id:
            os.replace(tmp, os.path.join(a.blob_dir, blob_id))
        else:
            os.unlink(tmp)
    if blob_id and a.blob_id:
        log.warning("--blob-id is ignored: blob ids are content digests here")
    if a.bootstrap:
        _write_file(a.bootstrap, res.bootstrap)
    if not a.disable_check:
        with open_bootstrap(res.bootstrap) as md:
            for _p, _n in md.walk():
                pass
    dt = time.monotonic() - t0
    log.info("built %s: %d files, %d bytes read in %.2fs", a.bootstrap or blob_id, res.files,
             res.bytes_read, dt)
    _emit_json(a.output_json, _create_json(a, res, blob_id, dt))
    if blob_id:
        print(f"blob: {blob_id}")
    if a.bootstrap:
        print(f"bootstrap: {a.bootstrap}")
    if "diff_id" in res.stats:
        print(f"diff_id: {res.stats['diff_id']}")
    return 0


def _create_json(a: argparse.Namespace, res: BuildResult, blob_id: str | None,
                 dt: float) -> dict[str, Any]:
    return {
        "version": __version__, "bootstrap": a.bootstrap,
        "blobs": [b.blob_id for b in res.blobs],
        "blob": blob_id,
        "blob_size": res.blob.entry.compressed_size if res.blob else 0,
        "files": res.files, "bytes_read": res.bytes_read, "seconds": round(dt, 3),
        **res.stats,
    }


def _open_tar(source: str) -> BinaryIO:
    if source == "-":
        return sys.stdin.buffer
    if os.path.isdir(source):
        raise ConfigError(f"{source} is a directory: --type dir-rafs builds from directories")
    try:
        return open(source, "rb")
    except OSError as e:
        raise ConfigError(f"cannot open the source tar {source}: {e.strerror}") from e


def _write_file(path: str, data: bytes) -> None:
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _split_list(v: str | None) -> list[str] | None:
    if v is None:
        return None
    return [x.strip() for x in v.split(",")]


def _int_list(v: str | None, flag: str) -> list[int] | None:
    items = _split_list(v)
    if items is None:
        return None
    try:
        return [int(x) for x in items]
    except ValueError:
        raise ConfigError(f"{flag}: {v!r} is not a comma-separated list of numbers") from None


def cmd_merge(a: argparse.Namespace) -> int:
    if not a.bootstrap and not a.blob_dir:
        raise ConfigError("both --bootstrap and --blob-dir are missing")
    prefetch = None
    if a.prefetch_policy == "fs":
        prefetch = [ln.strip().encode() for ln in sys.stdin if ln.strip()]
    opts = MergeOptions(
        parent_bootstrap=a.parent_bootstrap,
        chunk_dict_bootstrap=_chunk_dict_path(a.chunk_dict),
        blob_digests=_split_list(a.blob_digests),
        original_blob_ids=_split_list(a.original_blob_ids),
        blob_sizes=_int_list(a.blob_sizes, "--blob-sizes"),
        blob_toc_digests=_split_list(a.blob_toc_digests),
        blob_toc_sizes=_int_list(a.blob_toc_sizes, "--blob-toc-sizes"),
        prefetch_paths=prefetch, whiteout_spec=a.whiteout_spec,
    )
    res = merge_bootstraps(a.sources, opts)
    target = a.bootstrap
    if not target:
        if not os.path.isdir(a.blob_dir):
            raise ConfigError(f"--blob-dir {a.blob_dir} does not exist")
        target = os.path.join(a.blob_dir, hashlib.sha256(res.bootstrap).hexdigest())
    _write_file(target, res.bootstrap)
    _emit_json(a.output_json, {"version": __version__, "bootstrap": target,
                               "blobs": [b.blob_id for b in res.blobs], **res.stats})
    print(f"bootstrap: {target}")
    return 0


def _chunk_dict_path(v: str | None) -> str | None:
    if not v:
        return None
    kind, _, path = v.partition("=")
    if not path:
        return kind
    if kind != "bootstrap":
        raise ConfigError(f"--chunk-dict {v}: only bootstrap=PATH is supported")
    return path


def _blob_target(a: argparse.Namespace) -> tuple[str | None, str | None]:
    if a.blob:
        return a.blob, None
    if a.blob_dir:
        os.makedirs(a.blob_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".blob-", dir=a.blob_dir)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        return tmp, tmp
    return None, None


def cmd_check(a: argparse.Namespace) -> int:
    rep = check_image(_bootstrap_arg(a), a.blob_dir, a.blob)
    print(f"RAFS v{rep.version}: {rep.inodes} inodes ({rep.files} files, {rep.dirs} dirs)")
    for b in rep.blobs:
        print(f"  blob {b['blob_id']}: compressed {b['compressed_size']} uncompressed "
              f"{b['uncompressed_size']} chunks {b['chunk_count']} {b['compressor']}/"
              f"{b['digester']} features {b['features']}")
    if rep.chunks_checked:
        print(f"  verified {rep.chunks_checked} chunks, {rep.bytes_checked} bytes")
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    _emit_json(a.output_json, {
        "version": rep.version, "inodes": rep.inodes, "files": rep.files, "dirs": rep.dirs,
        "blobs": rep.blobs, "chunks_checked": rep.chunks_checked, "errors": rep.errors,
    })
    return 0 if rep.ok else 4


def cmd_inspect(a: argparse.Namespace) -> int:
    with open_bootstrap(_bootstrap_arg(a)) as md:
        print(json.dumps(inspect_request(md, a.request), indent=2))
    return 0


def cmd_stat(a: argparse.Namespace) -> int:
    if a.bootstrap:
        with open_bootstrap(a.bootstrap) as md:
            data: Any = image_stats(md)
    elif a.blob_dir:
        if not os.path.isdir(a.blob_dir):
            raise ConfigError(f"--blob-dir {a.blob_dir} is not a directory")
        target = os.path.realpath(a.target) if a.target else None
        base = []
        for name in sorted(os.listdir(a.blob_dir)):
            path = os.path.join(a.blob_dir, name)
            # as upstream: every file without an extension, except the target
            if (os.path.splitext(name)[1] or not os.path.isfile(path)
                    or os.path.realpath(path) == target):
                continue
            try:
                base.append(open_bootstrap(path))
            except NydusError as e:
                log.debug("stat: skipping %s: %s", path, e)
        tmd = open_bootstrap(a.target) if a.target else None
        data = dedup_report(base, tmd)
    else:
        raise ConfigError("stat needs -B BOOTSTRAP or -D DIR")
    print(json.dumps(data, indent=2))
    _emit_json(a.output_json, data)
    return 0


def cmd_unpack(a: argparse.Namespace) -> int:
    res = unpack_image(_bootstrap_arg(a), a.output, a.blob_dir, a.blob)
    msg = f"unpacked {res.entries} entries, {res.bytes} bytes of file data to {a.output}"
    if res.skipped_sockets:
        msg += f" ({res.skipped_sockets} sockets skipped: tar cannot hold them)"
    print(msg)
    return 0


def cmd_optimize(a: argparse.Namespace) -> int:
    from ..builder.optimize import chunk_info_of, optimize_image, read_prefetch_list
    from ..fs.localblobs import LocalBlobChunks

    try:
        with open(a.prefetch_files, encoding="utf-8", errors="surrogateescape") as f:
            paths = read_prefetch_list(f.read())
    except OSError as e:
        raise ConfigError(f"--prefetch-files {a.prefetch_files}: {e.strerror}") from None
    out_dir = a.output_blob_dir or a.blob_dir
    os.makedirs(out_dir, exist_ok=True)
    with open_bootstrap(a.bootstrap) as md:
        chunks = LocalBlobChunks(a.blob_dir, md.blobs)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".optimize-", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as raw:
                class _Sink:
                    def write(self, b: bytes, /) -> int:
                        h.update(b)
                        return raw.write(b)

                res = optimize_image(
                    md, paths, lambda c: chunks.read_chunks([chunk_info_of(c)])[0], _Sink(),
                    blob_id=lambda: h.hexdigest())
            if res.blob is not None:
                os.replace(tmp, os.path.join(out_dir, h.hexdigest()))
        finally:
            chunks.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
        ids = [b.blob_id for b in md.blobs] + ([h.hexdigest()] if res.blob else [])
    with open(a.output_bootstrap, "wb") as out:
        out.write(res.bootstrap)
    _emit_json(a.output_json, {"blobs": ids, "prefetch_files": res.files,
                               "missing": res.missing})
    print(f"prefetch blob {h.hexdigest() if res.blob else '(none)'}: {res.files} files, "
          f"{res.bytes} bytes; prefetch table {res.table} entries; {len(res.missing)} listed "
          f"paths not in the image")
    return 0


COMMANDS = {"create": cmd_create, "merge": cmd_merge, "check": cmd_check,
            "inspect": cmd_inspect, "stat": cmd_stat, "unpack": cmd_unpack,
            "optimize": cmd_optimize}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    level = {"trace": logging.DEBUG, "warn": logging.WARNING}.get(a.log_level,
                                                                 a.log_level.upper())
    logging.basicConfig(level=level, filename=a.log_file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_guarded(f"nydus-image {a.cmd}", lambda: COMMANDS[a.cmd](a))


if __name__ == "__main__":
    sys.exit(main())
