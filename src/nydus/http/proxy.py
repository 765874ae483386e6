"""The ``proxy`` backend setting: requests through a forward proxy (Dragonfly's dfdaemon) with
health checks and fallback to the origin (upstream ``backend.config.proxy``).

While the proxy is healthy every request goes through it (``https`` targets through a CONNECT
tunnel, or rewritten to plain ``http`` with ``use_http`` so the proxy can cache them). With
``fallback`` (the default) a proxy that fails to answer or answers 5xx makes that request go
straight to the origin and marks the proxy unhealthy; it is tried again ``check_interval``
seconds later, once a GET of ``ping_url`` (when given) answers below 500. Health is checked
when requests come, never in the background, so an idle client pings nothing (the meaning of
upstream's ``check_pause_elapsed``). Without ``fallback`` proxy errors are the request's errors.
Only requests with replayable bodies fall back.

Threading: shared by all threads of a client; the health state is locked and one thread at a
time probes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

from .transport import Request, Response, Transport, TransportError

__all__ = ["ProxyTransport"]

log = logging.getLogger("nydus.http")


@dataclass(eq=False)
class ProxyTransport:
    """Send through ``proxied`` while it works; on failure fall back to ``direct``."""

    proxied: Transport
    direct: Transport
    _: KW_ONLY
    fallback: bool = True
    ping_url: str | None = None
    check_interval: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _checked: float = field(init=False)
    _ok: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        self._checked = self.clock()

    def healthy(self) -> bool:
        """Whether requests go through the proxy now (pinging it when a check is due)."""
        with self._lock:
            due = self.clock() - self._checked >= self.check_interval
            if not due or (self._ok and not self.ping_url):
                return self._ok
            self._checked = self.clock()  # one thread probes; others keep the old answer
            if not self.ping_url:
                self._ok = True
                return True
        ok = self._ping()
        with self._lock:
            if ok != self._ok:
                log.warning("proxy is %s", "healthy again" if ok else "unhealthy")
            self._ok = ok
        return ok

    def _ping(self) -> bool:
        assert self.ping_url is not None
        try:
            with self.direct.handle(Request("GET", self.ping_url)) as r:
                return r.status < 500
        except TransportError:
            return False

    def _mark_down(self, why: str) -> None:
        with self._lock:
            if self._ok:
                log.warning("proxy unhealthy (%s); falling back to direct requests", why)
            self._ok = False
            self._checked = self.clock()

    def handle(self, request: Request) -> Response:
        replayable = request.body is None or isinstance(request.body, bytes | bytearray)
        if not self.fallback:
            return self.proxied.handle(request)
        if self.healthy():
            try:
                resp = self.proxied.handle(request)
            except TransportError as e:
                if not replayable:
                    raise
                self._mark_down(str(e))
            else:
                if resp.status < 500 or not replayable:
                    return resp
                resp.close()
                self._mark_down(f"proxy answered {resp.status}")
        return self.direct.handle(request)

    def close(self) -> None:
        self.proxied.close()
        self.direct.close()
