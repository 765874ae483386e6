"""``nydusctl``: talk to a running nydusd over its API socket (upstream's subcommands).

    nydusctl --sock SOCK [--raw] info
    nydusctl --sock SOCK [--raw] metrics [fsstats|backend|cache|files|pattern|inflight]
                                         [--id MOUNTPOINT] [--interval SECS]
    nydusctl --sock SOCK mount --source BOOTSTRAP --config FILE --mountpoint /sub [--type rafs]
             [--bootstrap-digest sha256:HEX]
    nydusctl --sock SOCK umount --mountpoint /sub
    nydusctl --sock SOCK set log-level LEVEL

Readable tables by default, the daemon's JSON with ``--raw``. Exit 0 on success, 1 when the
daemon answers with an error or with a reply that is not a valid API answer (never reported as
success), 2 for bad usage or an unreachable socket; always one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .. import __version__
from ..config import read_input_file
from ..daemon.client import ApiClientError, ApiReplyError, NydusdClient
from ..errors import ConfigError, NydusError
from . import flag

_FOPS = [
    "getattr",
    "readlink",
    "open",
    "release",
    "read",
    "statfs",
    "getxattr",
    "listxattr",
    "opendir",
    "lookup",
    "readdir",
    "readdirplus",
    "access",
    "forget",
    "batch_forget",
]
_SIZES = ["<1K", "<4K", "<16K", "<64K", "<128K", "<512K", "<1M", ">=1M"]
_LAT = ["<=1ms", "<=20ms", "<=50ms", "<=100ms", "<=500ms", "<=1s", "<=2s", ">2s"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusctl", description="Query and control nydusd")
    p.add_argument("-V", "--version", action="version", version=f"nydusctl {__version__}")
    p.add_argument("-S", "--sock", required=True, help="nydusd API socket")
    flag(p, "-r", "--raw", help="print the daemon's JSON")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="daemon information")
    m = sub.add_parser("metrics", help="metrics")
    m.add_argument(
        "kind",
        nargs="?",
        default="fsstats",
        choices=["fsstats", "backend", "cache", "blobcache", "files", "pattern", "inflight"],
        help="which metrics (default fsstats)",
    )
    m.add_argument("-I", "--id", help="file system id (its mount path; default: the only one)")
    m.add_argument(
        "-i", "--interval", type=float, default=0, help="repeat every N seconds (Ctrl-C to stop)"
    )
    mo = sub.add_parser(
        "mount", help="attach an image to a shared daemon (one started without --bootstrap)"
    )
    mo.add_argument("-s", "--source", required=True, help="bootstrap path")
    mo.add_argument("-c", "--config", required=True, help="nydusd config file")
    mo.add_argument("-m", "--mountpoint", required=True, help="virtual mount path, e.g. /sub")
    mo.add_argument(
        "-t",
        "--type",
        default="rafs",
        choices=["rafs", "passthrough_fs"],
        help="file system type (only rafs here)",
    )
    mo.add_argument("-P", "--prefetch-files", nargs="+", metavar="PATH", help="files to prefetch")
    flag(mo, "--remount", help="replace an existing mount")
    mo.add_argument(
        "--bootstrap-digest",
        metavar="sha256:HEX",
        help="nydusd refuses the bootstrap unless its sha256 is this (an extension "
        "of this implementation, not upstream)",
    )
    um = sub.add_parser("umount", help="detach an image")
    um.add_argument(
        "mountpoint_pos", nargs="?", metavar="MOUNTPOINT", help="the virtual mount path, e.g. /sub"
    )
    um.add_argument("-m", "--mountpoint", help="the same, as a flag")
    st = sub.add_parser("set", help="change a daemon setting")
    st.add_argument("item", choices=["log-level"], help="the setting")
    st.add_argument("value", help="its new value (trace, debug, info, warn, error)")
    return p


def _table(rows: list[tuple[str, Any]]) -> str:
    if not rows:
        return ""
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _human(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)


def _fmt_info(d: dict[str, Any]) -> str:
    v = d.get("version", {})
    out = _table(
        [
            ("Version", f"{v.get('package_ver', '')} ({v.get('rustc', '')})"),
            ("ID", d.get("id") or "-"),
            ("State", d.get("state", "")),
            ("Mountpoint", d.get("mountpoint", "")),
            ("Supervisor", d.get("supervisor") or "-"),
        ]
    )
    mounts = d.get("backend_collection") or {}
    if mounts:
        lines = ["", f"{'MOUNT':<20} {'TYPE':<6} {'VER':<4} {'BLOBS':<6} BOOTSTRAP"]
        for path, b in sorted(mounts.items()):
            lines.append(
                f"{path:<20} {b.get('fs_type', ''):<6} "
                f"{'v' + str(b.get('rafs_version', '')):<4} "
                f"{len(b.get('blobs', [])):<6} {b.get('bootstrap', '')}"
            )
        out += "\n" + "\n".join(lines)
    return out


def _fmt_fsstats(g: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("ID", g.get("id", "")),
        ("Data read", _human(int(g.get("data_read", 0)))),
        ("Open files", f"{g.get('nr_opens', 0)} (max {g.get('nr_max_opens', 0)})"),
        ("Per-file stats", g.get("files_account_enabled")),
        ("Access pattern", g.get("access_pattern_enabled")),
    ]
    out = _table(rows) + "\n\n" + f"{'FOP':<14} {'HITS':>10} {'ERRORS':>8} {'LAT(us)':>12}"
    hits, errs = g.get("fop_hits", []), g.get("fop_errors", [])
    lat = g.get("fop_cumulative_latency_total", [])
    for i, name in enumerate(_FOPS):
        if i < len(hits) and (hits[i] or (i < len(errs) and errs[i])):
            out += (
                f"\n{name:<14} {hits[i]:>10} {errs[i] if i < len(errs) else 0:>8} "
                f"{lat[i] if i < len(lat) else 0:>12}"
            )
    bc = g.get("block_count_read", [])
    if any(bc):
        out += "\n\nReads by size: " + ", ".join(
            f"{s} {n}" for s, n in zip(_SIZES, bc, strict=False) if n
        )
    ld = g.get("read_latency_dist", [])
    if any(ld):
        out += "\nReads by latency: " + ", ".join(
            f"{s} {n}" for s, n in zip(_LAT, ld, strict=False) if n
        )
    return out


def _fmt_flat(d: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if k in ("read_amount_total", "prefetch_data_amount", "buffered_backend_size"):
            v = f"{v} ({_human(int(v))})"
        elif isinstance(v, list) and len(v) > 8:
            v = f"[{len(v)} items]"
        rows.append((k, v))
    return _table(rows)


def _fmt_rows(items: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["  ".join(c.upper() for c in cols)]
    for it in items:
        lines.append("  ".join(str(it.get(c, "")) for c in cols))
    return "\n".join(lines)


def _metrics(client: NydusdClient, a: argparse.Namespace) -> str:
    kind = {"fsstats": "", "cache": "blobcache"}.get(a.kind, a.kind)
    data = client.metrics(kind, a.id)
    if a.raw:
        return json.dumps(data, indent=2)
    if a.kind == "fsstats":
        return _fmt_fsstats(data)
    if a.kind == "pattern":
        return _fmt_rows(data, ["ino", "nr_read", "first_access_time_secs", "file_path"])
    if a.kind == "inflight":
        return (
            _fmt_rows(data.get("values", []), ["unique", "opcode", "inode", "timestamp_secs"])
            or "no requests in flight"
        )
    if a.kind == "files" and isinstance(data, dict):
        rows = [{"ino": k, **v} for k, v in data.items()]
        return _fmt_rows(rows, ["ino", "nr_open", "total_fops", "data_read"])
    return _fmt_flat(data) if isinstance(data, dict) else json.dumps(data, indent=2)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    client = NydusdClient(a.sock)
    try:
        if a.cmd == "info":
            info = client.info()
            print(json.dumps(info, indent=2) if a.raw else _fmt_info(info))
        elif a.cmd == "metrics":
            while True:
                print(_metrics(client, a))
                if a.interval <= 0:
                    break
                time.sleep(a.interval)
                print()
        elif a.cmd == "mount":
            try:
                config = read_input_file(a.config, "config").decode("utf-8", "replace")
            except ConfigError as e:
                print(f"nydusctl: error: {e}", file=sys.stderr)
                return 2
            if a.remount:
                client.remount(a.mountpoint, a.source, config, a.bootstrap_digest)
            else:
                client.mount(
                    a.mountpoint, a.source, config, a.prefetch_files, a.type, a.bootstrap_digest
                )
            print(f"mounted {a.source} at {a.mountpoint}")
        elif a.cmd == "umount":
            mp = a.mountpoint or a.mountpoint_pos
            if not mp:
                print("nydusctl: error: umount needs a mount point", file=sys.stderr)
                return 2
            client.umount(mp)
            print(f"unmounted {mp}")
        elif a.cmd == "set":
            client.set_log_level(a.value)
            print(f"log level set to {a.value}")
    except ApiClientError as e:
        if a.raw:
            print(json.dumps({"code": e.code, "message": e.message}), file=sys.stderr)
        else:
            print(f"nydusctl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except ApiReplyError as e:
        print(f"nydusctl: error: {e}", file=sys.stderr)
        return 1
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        # a JSON reply of the wrong shape (the daemon is not a nydusd we understand)
        print(
            f"nydusctl: error: unexpected reply from nydusd at {a.sock} ({type(e).__name__})",
            file=sys.stderr,
        )
        return 1
    except NydusError as e:
        print(f"nydusctl: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"nydusctl: error: cannot talk to nydusd at {a.sock}: {e.strerror or type(e).__name__}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
