"""``nydus-image``: thin command-line front end with upstream's flags.

Parses arguments, calls the builder and the image tools (check, inspect, unpack), prints
results and maps NydusError families to exit codes. No logic of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from .. import __version__
from ..builder.build import BuildOptions, BuildResult, build_from_tar, build_image
from ..builder.dirsource import load_directory
from ..builder.merge import MergeOptions, merge_bootstraps
from ..builder.tree import iter_tree
from ..convert.progress import Progress, human
from ..daemon.logsetup import setup_logging
from ..errors import ConfigError, NotFoundError, NydusError, UnsupportedError
from ..format import zran
from ..imagetool.check import check_image
from ..imagetool.inspect import dedup_report, image_stats, inspect_request
from ..imagetool.unpack import unpack_image
from ..metadata import open_bootstrap
from . import LOG_LEVELS, HelpFormatter, flag, run_guarded

log = logging.getLogger("nydus-image")

DIR_TYPES = {"dir-rafs", "directory"}
TAR_TYPES = {"tar-rafs", "targz-rafs", "tarzstd-rafs"}  # all three sniff the compression


_SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _int(v: str) -> int:
    """A number: decimal, 0x hex, or with a K/M/G suffix (binary: 1M = 0x100000)."""
    text = v.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SIZE_SUFFIX.get(text[-1:], 1) if text else 1
    if mult > 1:
        text = text[:-1]
    try:
        return int(text, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{v!r} is not a size: give decimal (1048576), hex (0x100000) or 1M/512K"
        ) from None


_Help = HelpFormatter


COMPRESSORS = ["zstd", "lz4_block", "none"]
DIGESTERS = ["blake3", "sha256"]
WHITEOUTS = ["oci", "overlayfs", "none"]
PREFETCH = ["fs", "blob", "none"]
REQUESTS = "stats, blobs, prefetch, ls [PATH], stat PATH, chunks PATH (alias icheck)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nydus-image", description="Build and inspect RAFS images", formatter_class=_Help
    )
    p.add_argument("-V", "--version", action="version", version=f"nydus-image {__version__}")

    p.add_argument("-l", "--log-level", default="info", choices=LOG_LEVELS, help="log level")
    p.add_argument("-L", "--log-file", help="log to this file instead of stderr")
    # upstream's logging flags are global: they may also follow the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-l",
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="log level (default info)",
    )
    common.add_argument(
        "-L", "--log-file", default=argparse.SUPPRESS, help="log to this file instead of stderr"
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def cmd(name: str, text: str, bootstrap: bool = False) -> argparse.ArgumentParser:
        c = sub.add_parser(
            name, parents=[common], help=text, description=text, formatter_class=_Help
        )
        if bootstrap:  # as an argument or as -B: see _bootstrap_arg
            c.add_argument("bootstrap", nargs="?", help="the bootstrap (or -B)")
            c.add_argument("-B", "--bootstrap", dest="bootstrap_opt", help="the bootstrap")
        return c

    c = cmd("create", "build a RAFS image from a directory or a layer tar")
    c.add_argument("source", help="a directory, or a tar / tar.gz / tar.zst file or - (stdin)")
    c.add_argument(
        "-t",
        "--type",
        "--source-type",
        dest="type",
        default="dir-rafs",
        choices=sorted(DIR_TYPES | TAR_TYPES | {"targz-ref"}),
        help="what SOURCE is: a directory, or an OCI layer tar (any compression)",
    )
    c.add_argument("-B", "--bootstrap", help="write the bootstrap (metadata) to this file")
    c.add_argument("-b", "--blob", help="write the data blob to this file (may be a FIFO)")
    c.add_argument(
        "-D", "--blob-dir", help="write the data blob into this directory, named by its sha256"
    )
    c.add_argument("--blob-id", help="ignored: blob ids are the blob's sha256 here")
    c.add_argument(
        "--zran-spacing",
        type=_int,
        default=zran.DEFAULT_SPACING,
        metavar="SIZE",
        help="targz-ref: compressed bytes between gzip access points (a read inflates up to "
        "that much more)",
    )
    c.add_argument(
        "--compressor",
        default="zstd",
        choices=COMPRESSORS,
        help="chunk compression (none: the kernel's EROFS can mount the image as it is)",
    )
    c.add_argument("--digester", default="blake3", choices=DIGESTERS, help="chunk digest")
    c.add_argument(
        "--chunk-size",
        type=_int,
        default=0x100000,
        metavar="SIZE",
        help="a power of two in 0x1000..0x1000000 (4K..16M); 0x100000, 1048576 and 1M are the same",
    )
    c.add_argument(
        "--batch-size",
        type=_int,
        default=0,
        metavar="SIZE",
        help="only 0 (no batched chunks) is supported",
    )
    c.add_argument(
        "-v",
        "--fs-version",
        default="6",
        choices=["5", "6"],
        help="RAFS version (this builder writes v6 only)",
    )
    _layer_args(
        c,
        parent="the lower layers' bootstrap: build a layer on top of it",
        chunk_dict="deduplicate against the chunks of this image",
        whiteouts="how deleted files of a layer are marked in SOURCE",
    )
    flag(
        c,
        "--blob-inline-meta",
        "--inline-bootstrap",
        help="append the bootstrap and a ToC to the blob (one file)",
    )
    flag(c, "--repeatable", help="accepted: builds are always reproducible here")
    flag(c, "--aligned-chunk", help="accepted: chunks are always 4K-aligned in v6")
    flag(c, "--disable-check", help="skip reading the new bootstrap back")
    c.add_argument(
        "--features", default="", help="accepted for upstream compatibility (blob-toc is always on)"
    )
    c.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compression threads (default: the number of CPUs)",
    )
    c.add_argument("-J", "--output-json", metavar="FILE", help="write a JSON summary here")

    m = cmd("merge", "merge per-layer bootstraps (lowest first) into one")
    m.add_argument("sources", nargs="+", metavar="SOURCE", help="per-layer bootstraps")
    m.add_argument("-B", "--bootstrap", help="output bootstrap")
    m.add_argument("-D", "--blob-dir", help="write the bootstrap here, named by its sha256")
    _layer_args(
        m,
        parent="merge on top of this bootstrap",
        chunk_dict="a chunk dictionary image whose blobs join the table",
        whiteouts="whiteouts of the layers (not an upstream flag; upstream uses oci)",
    )
    for opt, what in (
        ("--blob-digests", "sha256 hex"),
        ("--original-blob-ids", "blob ids"),
        ("--blob-sizes", "sizes"),
        ("--blob-toc-digests", "sha256 hex"),
        ("--blob-toc-sizes", "sizes"),
    ):
        m.add_argument(opt, help=f"comma-separated {what}, one per source")
    m.add_argument("-J", "--output-json", metavar="FILE", help="write a JSON summary here")

    k = cmd(
        "check",
        "validate a bootstrap and, with -D or --blob, every chunk of its blobs",
        bootstrap=True,
    )
    _blob_args(k)
    flag(k, "-v", "--verbose", help="accepted (upstream's)")
    k.add_argument("-J", "--output-json", metavar="FILE", help="write the report here")

    i = cmd("inspect", "query a bootstrap (one request, JSON out)", bootstrap=True)
    i.add_argument("-R", "--request", required=True, help=f"one of: {REQUESTS}")

    s = cmd("stat", "statistics of one or more bootstraps")
    s.add_argument("-B", "--bootstrap", help="one bootstrap")
    s.add_argument(
        "-D",
        "--blob-dir",
        help="a directory of bootstraps (files without an extension, as upstream)",
    )
    s.add_argument("-T", "--target", help="with -D: what this image adds to the others")
    s.add_argument(
        "--digester",
        default="blake3",
        choices=DIGESTERS,
        help="accepted (chunks are compared by their recorded digests)",
    )
    s.add_argument("-J", "--output-json", metavar="FILE", help="write the numbers here too")

    mt = cmd(
        "mount",
        "mount an image built with --compressor none with the kernel's EROFS "
        "(no daemon; not an upstream subcommand); umount MOUNTPOINT undoes it",
    )
    mt.add_argument("mountpoint", help="an existing directory")
    mt.add_argument("-B", "--bootstrap", required=True, help="the bootstrap")
    mt.add_argument(
        "-D", "--blob-dir", required=True, help="directory of the blobs, named by blob id"
    )

    u = cmd("unpack", "write the image's tree as a tar", bootstrap=True)
    _blob_args(u)
    u.add_argument("--output", required=True, help="the tar file to write")
    _optimize_parser(sub, common)
    return p


def _layer_args(p: argparse.ArgumentParser, parent: str, chunk_dict: str, whiteouts: str) -> None:
    """The options create and merge share: what the new layer sits on and dedups against."""
    p.add_argument("--parent-bootstrap", metavar="FILE", help=parent)
    p.add_argument("--chunk-dict", metavar="bootstrap=FILE", help=chunk_dict)
    p.add_argument("--whiteout-spec", default="oci", choices=WHITEOUTS, help=whiteouts)
    p.add_argument(
        "--prefetch-policy",
        default="none",
        choices=PREFETCH,
        help="fs: read the paths to prefetch from stdin, one a line",
    )


def _blob_args(p: argparse.ArgumentParser) -> None:
    """Where check and unpack find the image's data."""
    p.add_argument("-D", "--blob-dir", help="directory of the blobs, named by blob id")
    p.add_argument("--blob", help="the data blob (images with one blob)")


def _optimize_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    o = sub.add_parser(
        "optimize",
        parents=[common],
        help="a prefetch blob with the listed "
        "files' chunks and a bootstrap whose prefetch table lists them",
    )
    o.add_argument(
        "-p",
        "--prefetch-files",
        required=True,
        metavar="LIST",
        help="file list, one path a line (or an access-pattern JSON)",
    )
    o.add_argument("-B", "--bootstrap", required=True, help="the image's bootstrap")
    o.add_argument("-D", "--blob-dir", required=True, help="the image's blobs (by blob id)")
    o.add_argument("-O", "--output-bootstrap", required=True, help="the bootstrap to write")
    o.add_argument("--output-blob-dir", help="where the prefetch blob goes (default -D)")
    o.add_argument("-J", "--output-json", help='{"blobs": [...]}: the last is the new blob')


def _emit_json(path: str | None, data: Any) -> None:
    if path:
        _write_file(path, (json.dumps(data, indent=2) + "\n").encode())


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
    if a.type == "targz-ref":
        return _create_targz_ref(a)
    prefetch = None
    if a.prefetch_policy == "fs":
        if from_tar and a.source == "-":
            raise ConfigError(
                "--prefetch-policy fs reads its file list from stdin: the tar cannot come "
                "from stdin too"
            )
        prefetch = _stdin_paths()
    opts = BuildOptions(
        chunk_size=a.chunk_size,
        compressor=a.compressor,
        digester=a.digester,
        parent_bootstrap=a.parent_bootstrap,
        chunk_dict_bootstrap=_chunk_dict_path(a.chunk_dict),
        whiteout_spec=a.whiteout_spec,
        prefetch_paths=prefetch,
        workers=a.threads,
        inline_bootstrap=a.blob_inline_meta,
    )
    opts.validate()
    _check_output_dirs(
        ("-B/--bootstrap", a.bootstrap),
        ("-b/--blob", a.blob),
        ("-J/--output-json", a.output_json),
        made=a.blob_dir,
    )
    if a.blob_dir and os.path.exists(a.blob_dir) and not os.path.isdir(a.blob_dir):
        raise ConfigError(f"-D/--blob-dir {a.blob_dir} is not a directory")
    t0 = time.monotonic()
    tree = None if from_tar else load_directory(a.source)
    src = _open_tar(a.source) if from_tar else None
    progress = Progress()
    lp = progress.layer(
        f"create {os.path.basename(a.source.rstrip('/')) or a.source}",
        _source_size(src) if src is not None else _tree_bytes(tree),
    )
    if progress.enabled:  # bytes read: the tar stream's, or the directory's by chunk
        opts.on_chunk = lambda size, dedup: progress.chunk(lp, dedup, read=0 if from_tar else size)
    blob_path, tmp = _blob_target(a)
    out = open(blob_path, "wb") if blob_path else None  # noqa: SIM115
    try:
        sink = (
            _CountingSink(out, lambda n: progress.advance(lp, written=n))
            if out is not None and progress.enabled
            else out
        )
        if src is not None:
            stream = (
                _CountingReader(src, lambda n: progress.advance(lp, n)) if progress.enabled else src
            )
            res = build_from_tar(stream, sink, opts, spool_dir=a.blob_dir)  # type: ignore[arg-type]
        else:
            assert tree is not None
            res = build_image(tree, sink, opts)
    except BaseException:
        progress.close()
        if out:
            out.close()
        if tmp:
            os.unlink(tmp)
        raise
    finally:
        if src is not None and src is not sys.stdin.buffer:
            src.close()
    progress.finish_layer(
        lp,
        f"{lp.label}: {human(res.bytes_read)} read, {lp.chunks} chunks "
        f"({lp.deduped} deduplicated), blob {human(lp.written)}",
    )
    progress.close()
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
    log.info(
        "built %s: %d files, %d bytes read in %.2fs",
        a.bootstrap or blob_id,
        res.files,
        res.bytes_read,
        dt,
    )
    _emit_json(a.output_json, _create_json(a, res, blob_id, dt))
    if blob_id:
        print(f"blob: {blob_id}")
    if a.bootstrap:
        print(f"bootstrap: {a.bootstrap}")
    if "diff_id" in res.stats:
        print(f"diff_id: {res.stats['diff_id']}")
    return 0


def _create_targz_ref(a: argparse.Namespace) -> int:
    """A zran image: the bootstrap and the meta blob; the data blob is the source tar.gz."""
    from ..builder.targz_ref import build_targz_ref

    opts = BuildOptions(chunk_size=a.chunk_size, digester=a.digester)
    _check_output_dirs(
        ("-B/--bootstrap", a.bootstrap), ("-b/--blob", a.blob), ("-J/--output-json", a.output_json)
    )
    t0 = time.monotonic()
    src = _open_tar(a.source)
    try:
        res, meta_blob = build_targz_ref(
            src, opts, spacing=a.zran_spacing, inline_bootstrap=a.blob_inline_meta
        )
    finally:
        if src is not sys.stdin.buffer:
            src.close()
    if a.bootstrap:
        _write_file(a.bootstrap, res.bootstrap)
    blob_id = res.blobs[0].blob_id if res.blobs else None
    if meta_blob:
        meta_id = hashlib.sha256(meta_blob).hexdigest()
        if a.blob_dir:
            os.makedirs(a.blob_dir, exist_ok=True)
        _write_file(a.blob or os.path.join(a.blob_dir, meta_id), meta_blob)
        print(f"meta blob: {meta_id}")
    _emit_json(a.output_json, _create_json(a, res, blob_id, time.monotonic() - t0))
    if blob_id:
        print(f"blob: {blob_id}")
    if a.bootstrap:
        print(f"bootstrap: {a.bootstrap}")
    return 0


class _CountingReader:
    """A binary stream that reports the bytes read through it."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None]) -> None:
        self._f, self._on_read = f, on_read

    def read(self, n: int = -1, /) -> bytes:
        b = self._f.read(n)
        self._on_read(len(b))
        return b

    def readinto(self, buf: Any, /) -> int:
        k = self._f.readinto(buf)  # type: ignore[attr-defined]
        self._on_read(k or 0)
        return int(k or 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class _CountingSink:
    """A blob sink that reports the bytes written through it."""

    def __init__(self, f: BinaryIO, on_write: Callable[[int], None]) -> None:
        self._f, self._on_write = f, on_write

    def write(self, b: bytes, /) -> int:
        n = self._f.write(b)
        self._on_write(len(b))
        return n


def _source_size(f: BinaryIO) -> int:
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _tree_bytes(tree: Any) -> int:
    """Bytes of file data in a directory tree (a hardlinked file once)."""
    seen: set[int] = set()
    total = 0
    for _p, n in iter_tree(tree):
        if n.is_reg and id(n) not in seen:
            seen.add(id(n))
            total += n.size
    return total


def _create_json(
    a: argparse.Namespace, res: BuildResult, blob_id: str | None, dt: float
) -> dict[str, Any]:
    return {
        "version": __version__,
        "bootstrap": a.bootstrap,
        "blobs": [b.blob_id for b in res.blobs],
        "blob": blob_id,
        "blob_size": res.blob.entry.compressed_size if res.blob else 0,
        "files": res.files,
        "bytes_read": res.bytes_read,
        "seconds": round(dt, 3),
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


def _check_output_dirs(*outputs: tuple[str, str | None], made: str | None = None) -> None:
    """Refuse, before any work, an output file whose directory is missing (and will not be
    made as a parent of ``made``, the -D directory create makes)."""
    made_abs = os.path.abspath(made) if made else None
    for opt, path in outputs:
        if not path or path == "-":
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if made_abs and (made_abs + "/").startswith(parent.rstrip("/") + "/"):
            continue
        if not os.path.isdir(parent):
            raise ConfigError(f"{opt} {path}: directory {parent} does not exist")
        if os.path.isdir(path):
            raise ConfigError(f"{opt} {path} is a directory")


def _write_file(path: str, data: bytes) -> None:
    """Write ``path`` atomically (through ``path.tmp``); a failure names ``path``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"cannot write {path}: {e.strerror}") from e


def _split_list(v: str | None) -> list[str] | None:
    if v is None:
        return None
    return [x.strip() for x in v.split(",")]


def _int_list(v: str | None, opt: str) -> list[int] | None:
    items = _split_list(v)
    if items is None:
        return None
    try:
        return [int(x) for x in items]
    except ValueError:
        raise ConfigError(f"{opt}: {v!r} is not a comma-separated list of numbers") from None


def cmd_merge(a: argparse.Namespace) -> int:
    if not a.bootstrap and not a.blob_dir:
        raise ConfigError("both --bootstrap and --blob-dir are missing")
    _check_output_dirs(("-B/--bootstrap", a.bootstrap), ("-J/--output-json", a.output_json))
    opts = MergeOptions(
        parent_bootstrap=a.parent_bootstrap,
        chunk_dict_bootstrap=_chunk_dict_path(a.chunk_dict),
        blob_digests=_split_list(a.blob_digests),
        original_blob_ids=_split_list(a.original_blob_ids),
        blob_sizes=_int_list(a.blob_sizes, "--blob-sizes"),
        blob_toc_digests=_split_list(a.blob_toc_digests),
        blob_toc_sizes=_int_list(a.blob_toc_sizes, "--blob-toc-sizes"),
        prefetch_paths=_stdin_paths() if a.prefetch_policy == "fs" else None,
        whiteout_spec=a.whiteout_spec,
    )
    res = merge_bootstraps(a.sources, opts)
    target = a.bootstrap
    if not target:
        if not os.path.isdir(a.blob_dir):
            raise ConfigError(f"--blob-dir {a.blob_dir} does not exist")
        target = os.path.join(a.blob_dir, hashlib.sha256(res.bootstrap).hexdigest())
    _write_file(target, res.bootstrap)
    _emit_json(
        a.output_json,
        {
            "version": __version__,
            "bootstrap": target,
            "blobs": [b.blob_id for b in res.blobs],
            **res.stats,
        },
    )
    print(f"bootstrap: {target}")
    return 0


def _stdin_paths() -> list[bytes]:
    """``--prefetch-policy fs``: the paths to prefetch, one a line on stdin."""
    return [ln.strip().encode() for ln in sys.stdin if ln.strip()]


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
    _check_output_dirs(("-J/--output-json", a.output_json))
    rep = check_image(_bootstrap_arg(a), a.blob_dir, a.blob)
    print(
        f"RAFS v{rep.version}: {rep.inodes} inodes ({rep.files} files, {rep.dirs} dirs, "
        f"{rep.symlinks} symlinks, {rep.others} others; {rep.paths} paths)"
    )
    for b in rep.blobs:
        print(
            f"  blob {b['blob_id']}: compressed {b['compressed_size']} uncompressed "
            f"{b['uncompressed_size']} chunks {b['chunk_count']} {b['compressor']}/"
            f"{b['digester']} features {' '.join(b['feature_names']) or 'none'}"
        )
    if rep.chunks_checked:
        print(f"  verified {rep.chunks_checked} chunks, {rep.bytes_checked} bytes")
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    _emit_json(
        a.output_json,
        {
            "version": rep.version,
            "inodes": rep.inodes,
            "files": rep.files,
            "dirs": rep.dirs,
            "symlinks": rep.symlinks,
            "others": rep.others,
            "paths": rep.paths,
            "blobs": rep.blobs,
            "chunks_checked": rep.chunks_checked,
            "errors": rep.errors,
        },
    )
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
            if not os.path.isfile(path) or os.path.realpath(path) == target:
                continue
            if os.path.splitext(name)[1]:
                log.warning(
                    "stat: skipping %s: only files without an extension are read as "
                    "bootstraps (as upstream)",
                    path,
                )
                continue
            try:
                base.append(open_bootstrap(path))
            except NydusError as e:
                log.warning("stat: skipping %s: not a bootstrap (%s)", path, e)
        if not base:
            raise NotFoundError(
                f"-D/--blob-dir {a.blob_dir}: no bootstrap found (files without an extension)"
            )
        tmd = open_bootstrap(a.target) if a.target else None
        data = dedup_report(base, tmd)
    else:
        raise ConfigError("stat needs -B BOOTSTRAP or -D DIR")
    print(json.dumps(data, indent=2))
    _emit_json(a.output_json, data)
    return 0


def cmd_unpack(a: argparse.Namespace) -> int:
    _check_output_dirs(("--output", a.output))
    res = unpack_image(_bootstrap_arg(a), a.output, a.blob_dir, a.blob)
    msg = f"unpacked {res.entries} entries, {res.bytes} bytes of file data to {a.output}"
    if res.skipped_sockets:
        msg += f" ({res.skipped_sockets} sockets skipped: tar cannot hold them)"
    print(msg)
    return 0


def cmd_optimize(a: argparse.Namespace) -> int:
    from ..builder.optimize import load_prefetch_list, optimize_image
    from ..storage.blobfile import LocalBlobChunks

    paths = load_prefetch_list(a.prefetch_files)
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
                    md,
                    paths,
                    lambda c: chunks.read_chunks([c])[0],
                    _Sink(),
                    blob_id=lambda: h.hexdigest(),
                )
            if res.blob is not None:
                os.replace(tmp, os.path.join(out_dir, h.hexdigest()))
        finally:
            chunks.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
        ids = [b.blob_id for b in md.blobs] + ([h.hexdigest()] if res.blob else [])
    with open(a.output_bootstrap, "wb") as out:
        out.write(res.bootstrap)
    _emit_json(a.output_json, {"blobs": ids, "prefetch_files": res.files, "missing": res.missing})
    print(
        f"prefetch blob {h.hexdigest() if res.blob else '(none)'}: {res.files} files, "
        f"{res.bytes} bytes; prefetch table {res.table} entries; {len(res.missing)} listed "
        f"paths not in the image"
    )
    return 0


def cmd_mount(a: argparse.Namespace) -> int:
    """mount(2) the bootstrap as EROFS with its blob files as devices (util-linux ``mount -o
    device=`` cannot: it puts the bootstrap on a loop device and the kernel then refuses
    file devices)."""
    from .. import kernel_mount

    if not os.path.isdir(a.mountpoint):
        raise ConfigError(f"mount point {a.mountpoint} is not a directory")
    with open_bootstrap(a.bootstrap) as md:
        if md.version != 6:
            raise UnsupportedError(f"{a.bootstrap} is RAFS v{md.version}: only v6 is EROFS")
        devices = []
        for b in md.blobs:
            if b.compressor != "none":
                raise UnsupportedError(
                    f"blob {b.blob_id} is {b.compressor}-compressed: the kernel reads only "
                    "images built with --compressor none (serve others with nydusd)"
                )
            path = os.path.join(a.blob_dir, b.blob_id)
            if not os.path.isfile(path):
                raise NotFoundError(f"blob {b.blob_id} not found in {a.blob_dir}")
            devices.append(os.path.abspath(path))
    try:
        kernel_mount.mount_erofs(
            os.path.abspath(a.bootstrap), os.path.abspath(a.mountpoint), devices
        )
    except OSError as e:
        raise ConfigError(str(e)) from None
    print(
        f"mounted {a.bootstrap} at {a.mountpoint} (kernel EROFS, {len(devices)} blobs); "
        f"umount {a.mountpoint} to undo"
    )
    return 0


COMMANDS = {
    "create": cmd_create,
    "merge": cmd_merge,
    "check": cmd_check,
    "inspect": cmd_inspect,
    "stat": cmd_stat,
    "unpack": cmd_unpack,
    "optimize": cmd_optimize,
    "mount": cmd_mount,
}


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        setup_logging(a.log_level, a.log_file)
    except OSError as e:
        print(f"nydus-image: error: --log-file {a.log_file}: {e.strerror}", file=sys.stderr)
        return 2
    return run_guarded(f"nydus-image {a.cmd}", lambda: COMMANDS[a.cmd](a))


if __name__ == "__main__":
    sys.exit(main())
