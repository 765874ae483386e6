"""The ``proxy`` backend setting: route requests through an HTTP proxy such as Dragonfly's
dfdaemon, with health checks and fallback (nydus-reference.md §1.2, upstream
``storage/src/backend/connection.rs``).

Semantics, as upstream: requests go through ``url`` (a forward proxy; ``https`` targets
through a CONNECT tunnel, or rewritten to plain ``http`` when ``use_http`` so the proxy can
cache them) while the proxy is healthy. With ``fallback`` (the default) a proxy that fails to
answer or answers 5xx makes that request go straight to the origin, and the proxy is marked
unhealthy until the next successful ping. With a ``ping_url`` a background thread pings it
every ``check_interval`` seconds; it stops pinging after ``check_pause_elapsed`` seconds
without requests and resumes on the next one. Without a ``ping_url`` the proxy is assumed
healthy, and a failure only diverts the failing request.

Thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..config import ProxyConfig
from ..errors import ConfigError

__all__ = ["ProxyHealth"]

log = logging.getLogger(__name__)


class ProxyHealth:
    def __init__(self, cfg: ProxyConfig, ping: Callable[[str], bool]) -> None:
        from .http import _target

        self.cfg = cfg
        url = cfg.url if "://" in cfg.url else f"http://{cfg.url}"
        try:
            self.target = _target(url)
        except Exception as e:
            raise ConfigError(f"proxy.url: invalid URL {cfg.url!r}") from e
        self._ping = ping
        self._healthy = True
        self._last_use = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        if cfg.ping_url:
            self._thread = threading.Thread(target=self._loop, name="nydus-proxy-ping",
                                            daemon=True)
            self._thread.start()

    def healthy(self) -> bool:
        return self._healthy

    def touch(self) -> None:
        self._last_use = time.monotonic()
        self._wake.set()

    def note_failure(self) -> None:
        self.failures += 1
        if self.cfg.ping_url:
            self._healthy = False  # until the next good ping

    def _loop(self) -> None:
        interval = max(self.cfg.check_interval, 1)
        while not self._stop.is_set():
            idle = time.monotonic() - self._last_use
            if self.cfg.check_pause_elapsed and idle > self.cfg.check_pause_elapsed:
                self._wake.clear()
                self._wake.wait(interval)
                if not self._wake.is_set():
                    continue
            ok = self._ping(self.cfg.ping_url)
            if ok != self._healthy:
                log.warning("proxy %s is %s", self.cfg.url, "healthy" if ok else "unhealthy")
            self._healthy = ok
            self._stop.wait(interval)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
