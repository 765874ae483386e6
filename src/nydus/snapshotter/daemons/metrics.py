"""The snapshotter's Prometheus endpoint (``--metrics-address HOST:PORT``; upstream serves
``:9110``), text exposition format 0.0.4 on ``GET /metrics`` (and upstream's ``/v1/metrics``).

Each scrape asks every daemon for its image's counters (``/api/v1/metrics/backend`` and
``/api/v1/metrics``, two-second timeout each) and measures the cache directory:

- ``nydus_snapshotter_image_fetch_bytes{image,image_ref,daemon}``: bytes the image's daemon read
  from the backend (registry) since it started -- what lazy loading actually downloaded;
- ``nydus_snapshotter_image_read_bytes{...}``: bytes read from the image through FUSE;
- ``nydus_snapshotter_images``, ``nydus_snapshotter_daemons{mode}`` (live daemons),
  ``nydus_snapshotter_daemon_restarts_total``;
- ``nydus_snapshotter_cache_bytes`` (allocated bytes of blob cache files),
  ``nydus_snapshotter_cache_blobs``, ``nydus_snapshotter_gc_freed_bytes_total``,
  ``nydus_snapshotter_gc_deleted_blobs_total``;
- ``nydus_snapshotter_bootstrap_applies_total`` (Nydus bootstrap layers the snapshotter applied
  from its own content store, :mod:`..snapshots.localapply`) and
  ``nydus_snapshotter_bootstrap_fallbacks_total`` (those left to containerd's apply).

Threading: a small threaded HTTP server; scrapes read the manager through its thread-safe
methods.
"""

from __future__ import annotations

import http.server
import logging
import threading
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from .cachegc import cache_usage

if TYPE_CHECKING:
    from ..snapshots.core import Snapshotter
    from .manager import DaemonManager

__all__ = ["MetricsServer", "parse_address", "render"]

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``:PORT`` means every interface) as a bind address."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--metrics-address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"


def render(manager: DaemonManager, snapshotter: Snapshotter | None = None) -> str:
    """The exposition text for one scrape (the bootstrap counters with ``snapshotter``)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {value}" for labels, value in samples)

    images = [
        (_labels(image=m.image_id, image_ref=m.image_ref, daemon=m.daemon_id), m)
        for m in manager.image_metrics()
    ]
    fetch = [(k, m.fetched_bytes) for k, m in images if m.fetched_bytes is not None]
    read = [(k, m.read_bytes) for k, m in images if m.read_bytes is not None]
    metric(
        "nydus_snapshotter_image_fetch_bytes",
        "gauge",
        "Bytes the image's nydusd fetched from the backend since it started.",
        fetch,
    )
    metric(
        "nydus_snapshotter_image_read_bytes",
        "gauge",
        "Bytes read from the image through FUSE since its nydusd started.",
        read,
    )
    metric("nydus_snapshotter_images", "gauge", "Nydus images being served.", [("", len(images))])
    counts = manager.daemon_counts()
    metric(
        "nydus_snapshotter_daemons",
        "gauge",
        "Live nydusd processes.",
        [(_labels(mode=k), v) for k, v in sorted(counts.items())],
    )
    metric(
        "nydus_snapshotter_daemon_restarts_total",
        "counter",
        "nydusd processes restored after they died.",
        [("", manager.restarts)],
    )
    usage = cache_usage(manager.cache_dir)
    metric(
        "nydus_snapshotter_cache_bytes",
        "gauge",
        "Allocated bytes of blob cache files in the cache directory.",
        [("", usage.bytes)],
    )
    metric("nydus_snapshotter_cache_blobs", "gauge", "Blobs with cache files.", [("", usage.blobs)])
    metric(
        "nydus_snapshotter_gc_freed_bytes_total",
        "counter",
        "Bytes of cache files deleted because no image uses their blob.",
        [("", manager.gc_freed_bytes)],
    )
    metric(
        "nydus_snapshotter_gc_deleted_blobs_total",
        "counter",
        "Blobs whose cache files were deleted.",
        [("", manager.gc_deleted_blobs)],
    )
    if snapshotter is not None:
        applies = "Nydus bootstrap layers applied from the snapshotter's content store."
        fallbacks = "Nydus bootstrap layers not applied from the content store (containerd did)."
        for name, help_, n in (
            ("nydus_snapshotter_bootstrap_applies_total", applies, snapshotter.local_applies),
            ("nydus_snapshotter_bootstrap_fallbacks_total", fallbacks, snapshotter.local_fallbacks),
        ):
            metric(name, "counter", help_, [("", n)])
    return "\n".join(out) + "\n"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsServer:
    def __init__(
        self, manager: DaemonManager, address: str, snapshotter: Snapshotter | None = None
    ) -> None:
        self.manager = manager
        self.snapshotter = snapshotter
        self.bind = parse_address(address)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/v1/metrics"):
                    self.send_error(404, "try /metrics")
                    return
                try:
                    body = render(owner.manager, owner.snapshotter).encode()
                    status = 200
                except Exception as e:  # a scrape must never take the snapshotter down
                    log.exception("metrics scrape failed")
                    body, status = f"scrape failed: {e}\n".encode(), 500
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self._server = _Server(self.bind, Handler)
        except OSError as e:
            raise ConfigError(f"--metrics-address {self.bind[0]}:{self.bind[1]}: {e}") from e
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.2,), name="metrics", daemon=True
        )
        self._thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.bind[0] or "*", self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
