"""Range requests: the ``Range`` header and the checks on what came back.

A 206 must carry exactly the requested ``Content-Range`` and that many bytes; a 200 (a server
that ignored ``Range``) is sliced while streaming, never returned whole, and its connection is
dropped. Short bodies are :class:`~nydus.http.transport.TransportError` (retryable); a range
past the end of the resource is a plain :class:`~nydus.errors.BackendError`. Nothing partial
is ever returned. Stateless; thread-safe.
"""

from __future__ import annotations

import re

from nydus.errors import BackendError

from .transport import Response, TransportError

__all__ = ["range_header", "parse_content_range", "read_range"]

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def range_header(start: int, end: int) -> dict[str, str]:
    """The header for bytes ``[start, end)``."""
    return {"Range": f"bytes={start}-{end - 1}"}


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` as (start, end_exclusive, total or None)."""
    m = _CONTENT_RANGE_RE.match(value or "")
    if not m:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return int(m.group(1)), int(m.group(2)) + 1, total


def read_range(
    resp: Response, start: int, end: int, what: str, *, bare_200: bool = False
) -> tuple[bytes, bool]:
    """Bytes ``[start, end)`` from a 200 or 206 answer to a ranged GET, and whether the server
    ignored the range. ``bare_200`` accepts a 200 whose length is exactly the range's (as
    upstream's own http-proxy test server answers)."""
    want = end - start
    if resp.status == 206:
        cr = resp.headers.get("content-range")
        got = parse_content_range(cr)
        if got is not None and got[0] == start and got[2] is not None and got[1] == got[2] < end:
            raise BackendError(f"{what} is beyond the end of the blob ({got[2]} bytes)")
        if got is None or got[0] != start or got[1] != end:
            raise TransportError(f"{what}: server sent Content-Range {cr!r}")
        cl = resp.content_length
        if cl is not None and cl != want:
            raise TransportError(f"{what}: Content-Length {cl} for {want} bytes")
        data = resp.read(want)
        if len(data) != want or resp.read(1):
            raise TransportError(f"{what}: body has the wrong length")
        return data, False
    total = resp.content_length
    if bare_200 and total == want:
        data = resp.read(want)
        if len(data) != want or resp.read(1):
            raise TransportError(f"{what}: body has the wrong length")
        return data, False
    if total is not None and total < end:
        resp.close()
        raise BackendError(f"{what} is beyond the end of the blob ({total} bytes)")
    skip = start
    while skip:
        n = len(resp.read(min(skip, 1 << 20)))
        if not n:
            raise TransportError(f"{what}: whole-blob answer ended at {start - skip}")
        skip -= n
    data = resp.read(want)
    resp.close()  # drop the connection instead of reading the rest
    if len(data) != want:
        raise TransportError(f"{what}: whole-blob answer ended early")
    return data, True
