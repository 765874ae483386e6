"""A client for nydusd's HTTP API over its unix socket (used by nydusctl, tests, snapshotter).

``NydusdClient(sock).get("/api/v1/daemon")`` returns the decoded JSON; a 4xx/5xx reply raises
:class:`ApiClientError` carrying the status and upstream's ``{code, message}``; a socket that
is missing or refuses connections raises :class:`nydus.errors.NotFoundError` /
:class:`ConnectionError`; a reply that is not an HTTP answer nydusd would give (not HTTP, cut
short, an unexpected status, a body that is not the JSON the call expects) raises
:class:`ApiReplyError`. No call ever reports success on a reply it could not understand.

Built on :class:`nydus.http.HTTPTransport` over the unix socket, without keep-alive.

Threading contract: one connection per call; safe to share between threads.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlencode

from ..errors import NotFoundError, NydusError
from ..format.safejson import parse_json
from ..http import HTTPTransport, Request, TransportError

__all__ = ["NydusdClient", "ApiClientError", "ApiReplyError"]

#: Largest reply read from nydusd (metrics of many files stay far below).
MAX_REPLY = 64 << 20


class ApiClientError(NydusError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ApiReplyError(NydusError):
    """nydusd's socket answered with something that is not a valid API reply."""


class NydusdClient:
    def __init__(self, sock: str, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self._transport = HTTPTransport(
            unix_socket=sock, timeout=timeout, connect_timeout=timeout, max_idle_per_host=0
        )

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """``(status, decoded body)``; raises ApiClientError for 4xx/5xx, ApiReplyError for
        replies that are not valid API answers (see the module docstring)."""
        if query:
            path = f"{path}?{urlencode(query)}"
        data = (
            None
            if body is None
            else (body if isinstance(body, bytes) else json.dumps(body).encode())
        )
        where = f"nydusd at {self.sock}"
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            with self._transport.handle(
                Request(method, f"http://localhost{path}", headers, data)
            ) as resp:
                raw = resp.read(MAX_REPLY + 1)
                ctype = resp.headers.get("content-type") or ""
        except TransportError as e:
            cause = e.__cause__
            if isinstance(cause, FileNotFoundError):
                raise NotFoundError(f"no API socket at {self.sock} (is nydusd running?)") from None
            if isinstance(cause, TimeoutError):
                raise ApiReplyError(
                    f"{where} did not answer {method} {path} within {self.timeout:g}s"
                ) from None
            if isinstance(cause, OSError) and not isinstance(cause, http.client.HTTPException):
                raise cause from None
            kind = type(cause).__name__ if cause is not None else "TransportError"
            raise ApiReplyError(
                f"{where} sent no valid HTTP reply to {method} {path} ({kind})"
            ) from None
        if len(raw) > MAX_REPLY:
            raise ApiReplyError(f"{where}: reply to {method} {path} is over {MAX_REPLY} bytes")
        decoded: Any = None
        if raw:
            if "json" in ctype:
                decoded = parse_json(
                    raw, f"reply of {where} to {method} {path}", error=ApiReplyError
                )
            else:
                decoded = raw.decode(errors="replace")
        if resp.status >= 400:
            if isinstance(decoded, dict):
                raise ApiClientError(
                    resp.status, str(decoded.get("code", "")), str(decoded.get("message", ""))
                )
            text = " ".join(str(decoded or resp.reason).split())[:200]
            raise ApiClientError(resp.status, "", text)
        if not 200 <= resp.status < 300:
            raise ApiReplyError(f"{where} answered {method} {path} with HTTP {resp.status}")
        return resp.status, decoded

    def _json(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None
    ) -> Any:
        """A call whose successful reply must be a JSON document."""
        status, decoded = self.request(method, path, body, query)
        if not isinstance(decoded, (dict, list)):
            raise ApiReplyError(
                f"nydusd at {self.sock} answered {method} {path} with "
                f"HTTP {status} but no JSON document"
            )
        return decoded

    def _action(
        self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None
    ) -> None:
        """A call whose successful reply is ``204 No Content`` (or an empty 200)."""
        status, decoded = self.request(method, path, body, query)
        if status == 204 or (status == 200 and decoded is None):
            return
        raise ApiReplyError(
            f"nydusd at {self.sock} answered {method} {path} with HTTP "
            f"{status} and a body that is not an API reply"
        )

    def get(self, path: str, **query: str) -> Any:
        """GET a document: decoded JSON, or text for the Prometheus endpoints."""
        return self.request("GET", path, query=query or None)[1]

    def put(self, path: str, body: Any = None, **query: str) -> Any:
        return self.request("PUT", path, body, query or None)[1]

    # -- verbs ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out = self._json("GET", "/api/v1/daemon")
        if not isinstance(out, dict):
            raise ApiReplyError(f"nydusd at {self.sock}: daemon info is not a JSON object")
        return out

    def state(self) -> str:
        return str(self.info().get("state", "UNKNOWN"))

    def wait_state(self, state: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                last = self.state()
                if last == state:
                    return
            except (OSError, NydusError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"nydusd did not reach {state} in {timeout}s (last: {last or '-'})")

    def mount(
        self,
        mountpoint: str,
        source: str,
        config: str | dict[str, Any],
        prefetch_files: list[str] | None = None,
        fs_type: str = "rafs",
        bootstrap_digest: str | None = None,
    ) -> None:
        """``bootstrap_digest`` ("sha256:HEX", our extension): nydusd refuses a bootstrap
        with another digest (HTTP 422 IntegrityError)."""
        body: dict[str, Any] = {
            "source": source,
            "fs_type": fs_type,
            "config": config if isinstance(config, str) else json.dumps(config),
        }
        if prefetch_files:
            body["prefetch_files"] = prefetch_files
        if bootstrap_digest:
            body["bootstrap_digest"] = bootstrap_digest
        self._action("POST", "/api/v1/mount", body, {"mountpoint": mountpoint})

    def remount(
        self,
        mountpoint: str,
        source: str,
        config: str | dict[str, Any],
        bootstrap_digest: str | None = None,
    ) -> None:
        body = {
            "source": source,
            "fs_type": "rafs",
            "config": config if isinstance(config, str) else json.dumps(config),
        }
        if bootstrap_digest:
            body["bootstrap_digest"] = bootstrap_digest
        self._action("PUT", "/api/v1/mount", body, {"mountpoint": mountpoint})

    def umount(self, mountpoint: str) -> None:
        self._action("DELETE", "/api/v1/mount", query={"mountpoint": mountpoint})

    def metrics(self, kind: str = "", fs_id: str | None = None) -> Any:
        path = "/api/v1/metrics" + (f"/{kind}" if kind else "")
        return self._json("GET", path, query={"id": fs_id} if fs_id else None)

    def set_log_level(self, level: str) -> None:
        self._action("PUT", "/api/v1/daemon", {"log_level": level})

    def start(self) -> None:
        self._action("PUT", "/api/v1/daemon/start")

    def exit(self) -> None:
        self._action("PUT", "/api/v1/daemon/exit")
