"""A client for nydusd's HTTP API over its unix socket (used by nydusctl, tests, snapshotter).

``NydusdClient(sock).get("/api/v1/daemon")`` returns the decoded JSON; a 4xx/5xx reply raises
:class:`ApiClientError` carrying the status and upstream's ``{code, message}``; a socket that
is missing or refuses connections raises :class:`nydus.errors.NotFoundError` /
:class:`ConnectionError`.

Threading contract: one connection per call; safe to share between threads.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import urlencode

from ..errors import NotFoundError, NydusError

__all__ = ["NydusdClient", "ApiClientError", "UnixHTTPConnection"]


class ApiClientError(NydusError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except FileNotFoundError:
            s.close()
            raise NotFoundError(f"no API socket at {self.unix_path} (is nydusd running?)") \
                from None
        except OSError:
            s.close()
            raise
        self.sock = s


class NydusdClient:
    def __init__(self, sock: str, timeout: float = 30.0) -> None:
        self.sock = sock
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, str] | None = None) -> tuple[int, Any]:
        """``(status, decoded body)``; raises ApiClientError for 4xx/5xx."""
        if query:
            path = f"{path}?{urlencode(query)}"
        data = None if body is None else (body if isinstance(body, bytes)
                                         else json.dumps(body).encode())
        conn = UnixHTTPConnection(self.sock, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
        finally:
            conn.close()
        decoded: Any = None
        if raw:
            if "json" in ctype:
                try:
                    decoded = json.loads(raw)
                except ValueError:
                    decoded = raw.decode(errors="replace")
            else:
                decoded = raw.decode(errors="replace")
        if resp.status >= 400:
            if isinstance(decoded, dict):
                raise ApiClientError(resp.status, str(decoded.get("code", "")),
                                     str(decoded.get("message", "")))
            raise ApiClientError(resp.status, "", str(decoded or resp.reason))
        return resp.status, decoded

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)[1]

    def put(self, path: str, body: Any = None, **query: str) -> Any:
        return self.request("PUT", path, body, query or None)[1]

    # -- verbs ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        out = self.get("/api/v1/daemon")
        assert isinstance(out, dict)
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

    def mount(self, mountpoint: str, source: str, config: str | dict[str, Any],
              prefetch_files: list[str] | None = None, fs_type: str = "rafs") -> None:
        body: dict[str, Any] = {"source": source, "fs_type": fs_type,
                                "config": config if isinstance(config, str)
                                else json.dumps(config)}
        if prefetch_files:
            body["prefetch_files"] = prefetch_files
        self.request("POST", "/api/v1/mount", body, {"mountpoint": mountpoint})

    def remount(self, mountpoint: str, source: str, config: str | dict[str, Any]) -> None:
        body = {"source": source, "fs_type": "rafs",
                "config": config if isinstance(config, str) else json.dumps(config)}
        self.request("PUT", "/api/v1/mount", body, {"mountpoint": mountpoint})

    def umount(self, mountpoint: str) -> None:
        self.request("DELETE", "/api/v1/mount", query={"mountpoint": mountpoint})

    def metrics(self, kind: str = "", fs_id: str | None = None) -> Any:
        path = "/api/v1/metrics" + (f"/{kind}" if kind else "")
        return self.get(path, **({"id": fs_id} if fs_id else {}))

    def set_log_level(self, level: str) -> None:
        self.request("PUT", "/api/v1/daemon", {"log_level": level})

    def start(self) -> None:
        self.request("PUT", "/api/v1/daemon/start")

    def exit(self) -> None:
        self.request("PUT", "/api/v1/daemon/exit")
