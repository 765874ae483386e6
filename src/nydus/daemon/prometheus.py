"""Prometheus text exposition (format 0.0.4) of nydusd's metrics.

Names: ``nydusd_`` + the upstream JSON field (nydus-reference.md §4), ``_total`` for counters;
per-fop arrays become one series per fop (label ``fop``), distributions one series per bucket
(label ``bucket``). Every image is labelled ``fs_id`` (its mount path). Only numbers are
exported; a metric source that fails is skipped, never fatal.

Threading contract: stateless; reads the daemon's thread-safe metric exports.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..fs.metrics import StatsFop

if TYPE_CHECKING:
    from .nydusd import Nydusd

__all__ = ["render_prometheus"]

log = logging.getLogger("nydus.api")

_SIZE_BUCKETS = ["lt1k", "lt4k", "lt16k", "lt64k", "lt128k", "lt512k", "lt1m", "ge1m"]
_LAT_BUCKETS = ["le1ms", "le20ms", "le50ms", "le100ms", "le500ms", "le1s", "le2s", "gt2s"]
_FOPS = [f.name.lower() for f in StatsFop]
#: (metric, help, JSON field) of the per-fop arrays
_PER_FOP = [
    ("nydusd_fop_hits_total", "successful operations", "fop_hits"),
    ("nydusd_fop_errors_total", "failed operations", "fop_errors"),
    (
        "nydusd_fop_cumulative_latency_micros_total",
        "time spent per operation type",
        "fop_cumulative_latency_total",
    ),
]
#: (metric, help, JSON field, bucket labels) of the distributions
_PER_BUCKET = [
    ("nydusd_block_count_read_total", "reads by request size", "block_count_read", _SIZE_BUCKETS),
    ("nydusd_read_latency_dist_total", "reads by latency", "read_latency_dist", _LAT_BUCKETS),
]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.seen: set[str] = set()

    def add(self, name: str, kind: str, help_: str, labels: dict[str, str], value: Any) -> None:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, float)):
            return
        if name not in self.seen:
            self.seen.add(name)
            self.lines.append(f"# HELP {name} {help_}")
            self.lines.append(f"# TYPE {name} {kind}")
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")


def render_prometheus(d: Nydusd) -> str:
    o = _Out()
    o.add("nydusd_up", "gauge", "1 while the daemon serves", {"state": d.sm.state.value}, 1)
    inflight = d.metrics_inflight()
    o.add("nydusd_fuse_inflight_requests", "gauge", "FUSE requests being served", {}, len(inflight))
    s = d.session
    if s is not None:
        o.add(
            "nydusd_fuse_requests_total", "counter", "FUSE requests received", {}, s.stats.requests
        )
        o.add(
            "nydusd_fuse_errors_total",
            "counter",
            "FUSE requests answered with an error",
            {},
            s.stats.errors,
        )
    for fs_id in sorted(d.images):
        lab = {"fs_id": fs_id}
        try:
            g = d.metrics_fs(fs_id)
            o.add(
                "nydusd_data_read_bytes_total",
                "counter",
                "bytes read through the fs",
                lab,
                g["data_read"],
            )
            o.add("nydusd_nr_opens", "gauge", "files open now", lab, g["nr_opens"])
            o.add("nydusd_nr_max_opens", "gauge", "most files open at once", lab, g["nr_max_opens"])
            for i, fop in enumerate(_FOPS):
                for name, help_, key in _PER_FOP:
                    o.add(name, "counter", help_, {**lab, "fop": fop}, g[key][i])
            for name, help_, key, buckets in _PER_BUCKET:
                for i, b in enumerate(buckets):
                    o.add(name, "counter", help_, {**lab, "bucket": b}, g[key][i])
        except Exception as e:
            log.debug("prometheus: fs metrics of %s: %s", fs_id, e)
        try:
            be = d.metrics_backend(fs_id)
            bl = {**lab, "backend_type": str(be.get("backend_type", ""))}
            for key in (
                "read_count",
                "read_errors",
                "read_amount_total",
                "read_cumulative_latency_millis_total",
            ):
                name = key if key.endswith("_total") else key + "_total"
                o.add(f"nydusd_backend_{name}", "counter", f"backend {key}", bl, be.get(key))
        except Exception as e:
            log.debug("prometheus: backend metrics of %s: %s", fs_id, e)
        try:
            c = d.metrics_blobcache(fs_id)
            for key, v in sorted(c.items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    o.add(f"nydusd_blobcache_{key}", "gauge", f"blobcache {key}", lab, v)
        except Exception as e:
            log.debug("prometheus: blobcache metrics of %s: %s", fs_id, e)
    return "\n".join(o.lines) + "\n"
