"""One image reference on one registry: the client, the repository, and reading its content.

Owns how nydusify reaches a registry: which scheme (``--plain-http`` forces HTTP;
``--source-insecure``/``--target-insecure`` skip TLS verification and fall back to HTTP; a
``localhost``/loopback host is probed HTTPS-then-HTTP, as containerd and upstream nydusify do,
so the article's ``--target localhost:5000/...`` works as written), credentials (the client
reads ``~/.docker/config.json``, or ``$DOCKER_CONFIG/config.json`` when the CLI passes it),
and file-like reading of a blob stream (:class:`BlobStream`) whose digest and size are checked
when it ends.

Threading: a :class:`Remote` (its client) is shared by the converter's worker threads; a
:class:`BlobStream` belongs to one reader.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, IntegrityError
from ..format import oci
from ..format.safejson import parse_json_object
from ..registry import RegistryClient, RegistryOptions, parse_reference
from ..registry.auth import DEFAULT_DOCKER_CONFIG
from ..registry.reference import Reference

__all__ = ["RemoteOptions", "Remote", "BlobStream", "is_loopback_host"]

MAX_CONFIG_SIZE = 16 << 20


@dataclass(frozen=True)
class RemoteOptions:
    """How to talk to one registry (source or target)."""

    insecure: bool = False
    plain_http: bool = False
    docker_config: str | None = DEFAULT_DOCKER_CONFIG
    retry_limit: int = 3
    timeout: float = 60.0
    chunk_size: int = 8 << 20


def is_loopback_host(host: str) -> bool:
    """``localhost``, ``127.x.x.x`` or ``[::1]``, with or without a port."""
    h = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    h = h.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


class Remote:
    """A parsed reference plus a :class:`RegistryClient` for its registry."""

    def __init__(
        self,
        ref: Reference | str,
        opts: RemoteOptions | None = None,
        client: RegistryClient | None = None,
    ) -> None:
        self.ref = parse_reference(ref) if isinstance(ref, str) else ref
        self.opts = opts or RemoteOptions()
        self.client = client or self._make_client()

    def _make_client(self) -> RegistryClient:
        o = self.opts
        if o.plain_http:
            scheme = "http"
        elif o.insecure or is_loopback_host(self.ref.api_host):
            scheme = ""  # HTTPS first, then plain HTTP
        else:
            scheme = "https"
        return RegistryClient(
            self.ref.api_host,
            RegistryOptions(
                scheme=scheme,
                skip_verify=o.insecure,
                docker_config=o.docker_config,
                retry_limit=o.retry_limit,
                timeout=o.timeout,
                connect_timeout=min(o.timeout, 30.0),
                chunk_size=o.chunk_size,
            ),
        )

    @property
    def repo(self) -> str:
        return self.ref.repository

    @property
    def host(self) -> str:
        return self.ref.registry

    def same_registry(self, other: Remote) -> bool:
        return self.ref.api_host == other.ref.api_host

    def same_repo(self, other: Remote) -> bool:
        return self.same_registry(other) and self.repo == other.repo

    def at(self, ref: Reference) -> Remote:
        """Another reference on the same registry, sharing this client."""
        return Remote(ref, self.opts, self.client)

    def close(self) -> None:
        self.client.close()

    # --- reading --------------------------------------------------------------------------

    def manifest(self, ref: str | None = None) -> tuple[bytes, str, str]:
        """``(body, media type, digest)`` of the manifest or index at ``ref`` (default: ours)."""
        return self.client.get_manifest(self.repo, ref or self.ref.ref)

    def json_blob(self, desc: oci.Descriptor, what: str) -> tuple[bytes, dict[str, Any]]:
        """A small JSON blob (a config), digest-checked, as ``(bytes, object)``."""
        if desc.size > MAX_CONFIG_SIZE:
            raise FormatError(f"{what} {desc.digest} is {desc.size} bytes: too large")
        raw = self.client.get_blob(self.repo, desc.digest, max_size=MAX_CONFIG_SIZE)
        if len(raw) != desc.size:
            raise IntegrityError(
                f"{what} {desc.digest}: {len(raw)} bytes, manifest says {desc.size}"
            )
        return raw, parse_json_object(raw, f"{what} {desc.digest}")

    def open_blob(
        self, desc: oci.Descriptor, on_bytes: Callable[[int], None] | None = None
    ) -> BlobStream:
        """A file-like stream of a blob, checked against the descriptor at its end (by the
        stream itself: the client's own digest check would hash the bytes a second time)."""
        pieces = self.client.get_blob_stream(
            self.repo, desc.digest, chunk_size=1 << 20, verify=False
        )
        return BlobStream(pieces, desc.digest, desc.size, on_bytes)


class BlobStream(io.RawIOBase):
    """Reads an iterator of byte pieces as a file; at the end, the bytes seen must have the
    expected size and sha256 digest (else :class:`IntegrityError` from ``read``).

    The registry client checks the digest too; this second check also covers the size the
    manifest promised and works for any piece source.
    """

    def __init__(
        self,
        pieces: Iterator[bytes],
        digest: str,
        size: int | None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self._pieces = pieces
        self._on_bytes = on_bytes
        self._check = oci.BlobCheck(digest, size)
        self._buf = b""
        self._off = 0
        self.done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        if self.done:
            return False
        for piece in self._pieces:
            if not piece:
                continue
            self._check.update(piece)
            if self._on_bytes is not None:
                self._on_bytes(len(piece))
            self._buf, self._off = piece, 0
            return True
        self.done = True
        self._check.finish()
        return False

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        if self._off >= len(self._buf) and not self._fill():
            return 0
        n = min(len(mv), len(self._buf) - self._off)
        mv[:n] = self._buf[self._off : self._off + n]
        self._off += n
        return n

    def drain(self) -> int:
        """Read to the end (completing the checks); returns the bytes skipped."""
        skipped = len(self._buf) - self._off
        self._buf, self._off = b"", 0
        while self._fill():
            skipped += len(self._buf)
            self._buf = b""
        return skipped

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        super().close()
