"""OCI distribution client: manifests, blobs (ranges, streams, uploads), tags, auth, retries.

Owns the registry API (ping, tags, manifests, blob ranges/streams/uploads/mounts) and checks
that what came back is what was asked for (status, ``Content-Range``, lengths, digests). Auth,
redirects, retries and the scheme are the request engine's (``session.py``,
:class:`~nydus.registry.session.RegistrySession`, the base class). The storage backends and
the converter are built on :class:`RegistryClient`. Ranges: ``end``
is exclusive (``data[start:end]``), checked by :func:`nydus.http.read_range` (a 206 must carry
exactly the requested ``Content-Range``; a 200 is sliced while streaming, never returned whole).

Errors: everything raises :class:`~nydus.errors.BackendError` subclasses —
:class:`~nydus.errors.RegistryNotFound` (404), :class:`~nydus.errors.RegistryAuthError`
(401/403, token server refusals), :class:`RegistryHTTPError` (other statuses),
:class:`~nydus.http.TransportError` (connection, TLS, framing) — except content
that does not match its digest, which is an :class:`~nydus.errors.IntegrityError`.

Threading: a client is shared by many threads. The transport pool, token cache and redirect
cache are locked; :meth:`get_blob_ranges` runs ranges concurrently on a small thread pool.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlencode, urljoin

from nydus.errors import (
    BackendError,
    ConfigError,
    FormatError,
    IntegrityError,
)
from nydus.format.oci import (
    ALL_MANIFEST_MEDIA_TYPES,
    Descriptor,
    compute_digest,
    manifest_media_type,
    parse_digest,
)
from nydus.http import Response, TransportError, parse_content_range, range_header, read_range
from nydus.registry.session import (
    _RETRY_STATUSES,
    MAX_MANIFEST_SIZE,
    ClientStats,
    RegistryHTTPError,
    RegistryOptions,
    RegistrySession,
    Scopes,
    _error_detail,
)
from nydus.registry.upload import BlobData, UploadSource

from ..format.safejson import parse_json

__all__ = ["BlobUpload", "RegistryClient", "RegistryHTTPError", "RegistryOptions", "ClientStats"]

T = TypeVar("T")


class RegistryClient(RegistrySession):
    """A client for one registry host. Construction arguments: see
    :class:`~nydus.registry.session.RegistrySession`; policy: the module docstrings.

    Thread-safe: share one client between all reader threads.
    """

    # --- API: ping, tags ------------------------------------------------------------------

    def ping(self) -> None:
        """Check that ``/v2/`` answers 200 (authenticating if the registry asks)."""

        def handle(resp: Response) -> None:
            if resp.status != 200:
                raise self._status_error(resp, "/v2/")

        self._execute("GET", "/v2/", (), handle)

    def list_tags(self, repo: str, *, page_size: int | None = None) -> list[str]:
        """All tags of ``repo`` (following ``Link: rel="next"`` pages)."""
        tags: list[str] = []
        path = self._repo_path(repo, "tags", "list")
        if page_size:
            path += "?" + urlencode({"n": page_size})
        for _ in range(10000):
            nxt: list[str] = []

            def handle(resp: Response, nxt: list[str] = nxt) -> list[str]:
                if resp.status != 200:
                    raise self._status_error(resp, f"tags of {repo}")
                doc = parse_json(
                    resp.read_all(limit=MAX_MANIFEST_SIZE),
                    f"tag list of {repo}",
                    error=BackendError,
                )
                link = resp.headers.get("link") or ""
                m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
                if m:
                    nxt.append(m.group(1))
                got = doc.get("tags") if isinstance(doc, dict) else None
                return [t for t in (got or []) if isinstance(t, str)]

            tags.extend(self._execute("GET", path, self.pull_scope(repo), handle))
            if not nxt:
                return tags
            path = urljoin(self.base_url() + path, nxt[0])
        raise BackendError(f"tag list of {repo} does not end")

    # --- API: manifests -------------------------------------------------------------------

    def get_manifest(
        self, repo: str, ref: str, accept: Sequence[str] = ALL_MANIFEST_MEDIA_TYPES
    ) -> tuple[bytes, str, str]:
        """``(body, media_type, digest)`` of a manifest or index by tag or digest.

        The digest is computed from the body; if ``ref`` is a digest the body must match it,
        and a ``Docker-Content-Digest`` header must agree (else :class:`IntegrityError`).
        """
        algo = self._ref_algorithm(ref)

        def handle(resp: Response) -> tuple[bytes, str, str]:
            body = resp.read_all(limit=MAX_MANIFEST_SIZE)
            try:
                mt = manifest_media_type(body, resp.headers.get("content-type"))
            except FormatError as e:
                raise BackendError(f"manifest {repo}:{ref} from {self.host}: {e}") from None
            digest = compute_digest(body, algo)
            self._check_digest(
                f"manifest {repo}:{ref}", ref, digest, resp.headers.get("docker-content-digest")
            )
            return body, mt, digest

        return self._manifest_request("GET", repo, ref, accept, handle)

    def head_manifest(
        self, repo: str, ref: str, accept: Sequence[str] = ALL_MANIFEST_MEDIA_TYPES
    ) -> Descriptor:
        """Media type, digest and size of a manifest without its body (GET if the registry
        gives no ``Docker-Content-Digest``)."""

        def handle(resp: Response) -> Descriptor | None:
            dg = resp.headers.get("docker-content-digest")
            size = resp.content_length
            ct = (resp.headers.get("content-type") or "").split(";")[0].strip()
            if not dg or size is None or not ct:
                return None
            self._check_digest(f"manifest {repo}:{ref}", ref, dg, None)
            return Descriptor(ct, dg, size)

        desc = self._manifest_request("HEAD", repo, ref, accept, handle)
        if desc is not None:
            return desc
        body, mt, dg = self.get_manifest(repo, ref, accept)
        return Descriptor(mt, dg, len(body))

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """Upload a manifest or index under a tag or digest; returns its sha256 digest."""
        digest = compute_digest(data, self._ref_algorithm(ref))
        if ref.count(":") and ref != digest:
            raise IntegrityError(f"manifest body has digest {digest}, not {ref}")

        def handle(resp: Response) -> str:
            if resp.status not in (200, 201, 202):
                raise self._status_error(resp, f"PUT manifest {repo}:{ref}")
            self._check_digest(
                f"manifest {repo}:{ref}", digest, digest, resp.headers.get("docker-content-digest")
            )
            return digest

        headers = {"Content-Type": media_type, "Content-Length": str(len(data))}
        return self._execute(
            "PUT",
            self._repo_path(repo, "manifests", ref),
            self.push_scope(repo),
            handle,
            headers=headers,
            body=bytes(data),
        )

    def _manifest_request(
        self,
        method: str,
        repo: str,
        ref: str,
        accept: Sequence[str],
        handle: Callable[[Response], T],
    ) -> T:
        """GET or HEAD of manifest ``repo:ref`` accepting ``accept``; ``handle`` gets a 200."""

        def handle_ok(resp: Response) -> T:
            if resp.status != 200:
                raise self._status_error(resp, f"manifest {repo}:{ref}")
            return handle(resp)

        return self._execute(
            method,
            self._repo_path(repo, "manifests", ref),
            self.pull_scope(repo),
            handle_ok,
            headers={"Accept": ", ".join(accept)},
        )

    @staticmethod
    def _ref_algorithm(ref: str) -> str:
        if ":" not in ref:
            return "sha256"
        try:
            return parse_digest(ref)[0]
        except FormatError as e:
            raise ConfigError(str(e)) from None

    @staticmethod
    def _check_digest(what: str, ref: str, computed: str, header: str | None) -> None:
        if ":" in ref and ref != computed:
            raise IntegrityError(f"{what}: content has digest {computed}, not {ref}")
        if header and header.split(":")[0] == computed.split(":")[0] and header != computed:
            raise IntegrityError(
                f"{what}: content has digest {computed} but the registry says {header}"
            )

    # --- API: blobs (read) ----------------------------------------------------------------

    def _blob(self, repo: str, digest: str) -> tuple[str, tuple[str, str]]:
        try:
            parse_digest(digest)
        except FormatError as e:
            raise ConfigError(str(e)) from None
        return self._repo_path(repo, "blobs", digest), (repo, digest)

    def blob_size(self, repo: str, digest: str) -> int:
        """Size of a blob (HEAD, following redirects)."""
        path, _ = self._blob(repo, digest)

        def handle(resp: Response) -> int:
            if resp.status != 200:
                raise self._status_error(resp, f"blob {repo}@{digest}")
            size = resp.content_length
            if size is None:
                raise BackendError(f"HEAD of blob {repo}@{digest} gave no Content-Length")
            return size

        return self._execute("HEAD", path, self.pull_scope(repo), handle)

    def has_blob(self, repo: str, digest: str) -> bool:
        """True if the registry has the blob in ``repo`` (HEAD; 404 is False)."""
        path, _ = self._blob(repo, digest)

        def handle(resp: Response) -> bool:
            if resp.status == 200:
                return True
            if resp.status == 404:
                return False
            raise self._status_error(resp, f"blob {repo}@{digest}")

        return self._execute("HEAD", path, self.pull_scope(repo), handle)

    def get_blob_range(self, repo: str, digest: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob, with one ranged GET (retried as needed)."""
        if start < 0 or end < start:
            raise ConfigError(f"bad blob range {start}-{end}")
        if start == end:
            return b""
        path, key = self._blob(repo, digest)
        want = end - start
        what = f"blob {repo}@{digest} range [{start}, {end})"

        def handle(resp: Response) -> bytes:
            if resp.status in (200, 206):
                data, ignored = read_range(resp, start, end, what)
                if ignored:
                    self.stats.add("range_ignored")
                self.stats.add("blob_bytes", end if ignored else want)
                return data
            if resp.status == 416:
                detail, _ = _error_detail(resp)
                raise BackendError(f"{what}: not satisfiable (HTTP 416){detail}")
            raise self._status_error(resp, f"blob {repo}@{digest}")

        return self._execute(
            "GET",
            path,
            self.pull_scope(repo),
            handle,
            headers=range_header(start, end),
            redirect_key=key,
        )

    def get_blob_ranges(
        self, repo: str, digest: str, ranges: Sequence[tuple[int, int]]
    ) -> list[bytes]:
        """Several ``[start, end)`` ranges, fetched concurrently; results in input order."""
        if len(ranges) <= 1:
            return [self.get_blob_range(repo, digest, s, e) for s, e in ranges]
        pool = self._executor()
        futures = [pool.submit(self.get_blob_range, repo, digest, s, e) for s, e in ranges]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="nydus-registry"
                )
            return self._pool

    def get_blob(self, repo: str, digest: str, *, max_size: int = 64 << 20) -> bytes:
        """A whole (small) blob, digest-checked: configs, bootstraps."""
        out = bytearray()
        for piece in self.get_blob_stream(repo, digest):
            out += piece
            if len(out) > max_size:
                raise BackendError(f"blob {repo}@{digest} is larger than {max_size} bytes")
        return bytes(out)

    def get_blob_stream(
        self, repo: str, digest: str, *, chunk_size: int = 1 << 20, verify: bool = True
    ) -> Iterator[bytes]:
        """The whole blob as an iterator of pieces. A connection lost mid-way resumes with a
        Range request; with ``verify`` the digest is checked at the end
        (:class:`IntegrityError` is raised after the last piece if it differs)."""
        path, key = self._blob(repo, digest)
        return self._stream(repo, digest, path, key, chunk_size, verify)

    def _stream(
        self,
        repo: str,
        digest: str,
        path: str,
        key: tuple[str, str],
        chunk_size: int,
        verify: bool,
    ) -> Iterator[bytes]:
        hasher = hashlib.new(parse_digest(digest)[0]) if verify else None
        pos = 0
        total: int | None = None
        budget = self._budget()
        what = f"blob {repo}@{digest}"
        while True:
            headers = {"Range": f"bytes={pos}-"} if pos else {}
            resp = self._open(
                "GET", path, self.pull_scope(repo), headers=headers, redirect_key=key, budget=budget
            )
            try:
                if resp.status == 200:
                    skip = pos
                    total = resp.content_length if total is None else total
                    while skip:  # the server ignored our resume Range
                        n = len(resp.read(min(skip, chunk_size)))
                        if not n:
                            raise TransportError(f"{what}: answer ended early")
                        skip -= n
                elif resp.status == 206 and pos:
                    got = parse_content_range(resp.headers.get("content-range"))
                    if got is None or got[0] != pos:
                        raise TransportError(f"{what}: bad Content-Range on resume")
                    total = got[2] if got[2] is not None else total
                else:
                    raise self._status_error(resp, what)
                for piece in resp.iter_bytes(chunk_size):
                    pos += len(piece)
                    self.stats.add("blob_bytes", len(piece))
                    if hasher is not None:
                        hasher.update(piece)
                    yield piece
                break
            except TransportError as e:
                self._retry_or_raise(e, budget, forget=key)
                continue
            finally:
                resp.close()
        if total is not None and pos != total:
            raise BackendError(f"{what}: got {pos} bytes of {total}")
        if hasher is not None:
            got_digest = f"{hasher.name}:{hasher.hexdigest()}"
            if got_digest != digest:
                raise IntegrityError(f"{what}: content has digest {got_digest}")

    # --- API: blobs (write) ---------------------------------------------------------------

    def push_blob(
        self,
        repo: str,
        digest: str,
        data: BlobData,
        size: int | None = None,
        *,
        check_exists: bool = True,
        digest_known: bool = False,
    ) -> bool:
        """Upload a blob unless ``repo`` already has it; True if uploaded.

        ``data``: bytes, a path, a binary file object, or an iterable of bytes. Up to
        ``monolithic_max`` bytes of known size go as POST + one PUT; larger or unknown-size
        data as POST + PATCH chunks of ``chunk_size`` + PUT. The digest and size of what was
        sent are checked before the final PUT (:class:`IntegrityError`); with ``digest_known``
        (the caller hashed the data as it wrote it) only the size is, and the digest is left to
        the registry's check on that PUT. An upload that fails transiently is started again if
        the source can be re-read.
        """
        self._blob(repo, digest)
        src = UploadSource(data, size, digest, self.chunk_size, digest_known)
        if check_exists and self.has_blob(repo, digest):
            return False
        self._upload_with_retries(repo, src, None)
        return True

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; if the registry will not mount, copy the blob through us.
        True if mounted, False if copied."""
        self._blob(repo, digest)
        path = (
            self._repo_path(repo, "blobs", "uploads")
            + "/?"
            + urlencode({"mount": digest, "from": from_repo})
        )
        scopes = (*self.push_scope(repo), *self.pull_scope(from_repo))

        def handle(resp: Response) -> str | None:
            if resp.status == 201:
                return None
            if resp.status == 202:
                return self._location(resp, f"mount of {digest} into {repo}")
            raise self._status_error(resp, f"mount of {digest} from {from_repo} into {repo}")

        location = self._execute(
            "POST", path, scopes, handle, headers={"Content-Length": "0"}, body=b""
        )
        if location is None:
            return True
        size = self.blob_size(from_repo, digest)
        src = UploadSource(
            lambda: self.get_blob_stream(from_repo, digest, verify=False),
            size,
            digest,
            self.chunk_size,
        )
        self._upload_with_retries(repo, src, location)
        return False

    def _location(self, resp: Response, what: str) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise BackendError(f"{what}: registry gave no upload Location")
        return urljoin(resp.url or self.base_url(), loc)

    def _start_upload(self, repo: str) -> str:
        def handle(resp: Response) -> str:
            if resp.status != 202:
                raise self._status_error(resp, f"upload to {repo}")
            return self._location(resp, f"upload to {repo}")

        return self._execute(
            "POST",
            self._repo_path(repo, "blobs", "uploads") + "/",
            self.push_scope(repo),
            handle,
            headers={"Content-Length": "0"},
            body=b"",
        )

    def _upload_with_retries(self, repo: str, src: UploadSource, location: str | None) -> None:
        budget = self._budget()
        while True:
            try:
                self._upload_once(repo, src, location or self._start_upload(repo))
                return
            except (TransportError, RegistryHTTPError) as e:
                transient = (
                    e.retryable if isinstance(e, TransportError) else e.status in _RETRY_STATUSES
                )
                if transient and src.replayable and budget.take():
                    location = None
                    self._wait(budget, None, f"upload of {src.digest} to {repo}: {e}")
                    continue
                raise

    def _upload_once(self, repo: str, src: UploadSource, location: str) -> None:
        scopes = self.push_scope(repo)
        what = f"upload of {src.digest} to {repo}"
        if src.size is not None and src.size <= self.monolithic_max:
            data = src.read_all()
            self._finish_upload(location, scopes, what, src.digest, data)
            return
        offset = 0
        for piece in src.chunks(reuse=True):  # each piece is sent before the next is read
            location = self._patch(location, scopes, what, offset, piece)
            offset += len(piece)
        src.check_complete()
        self._finish_upload(location, scopes, what, src.digest, b"")

    def _patch(
        self, location: str, scopes: Scopes, what: str, offset: int, piece: bytes | bytearray
    ) -> str:
        """Send ``piece`` at ``offset`` of an upload; returns the next Location."""
        end = offset + len(piece) - 1

        def handle(resp: Response) -> str:
            if resp.status != 202:
                raise self._status_error(resp, what)
            rng = resp.headers.get("range")
            if rng and not rng.endswith(f"-{end}"):
                raise RegistryHTTPError(
                    f"{what}: registry has {rng}, expected 0-{end}", resp.status
                )
            return self._location(resp, what)

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(piece)),
            "Content-Range": f"{offset}-{end}",
        }
        location = self._execute("PATCH", location, scopes, handle, headers=headers, body=piece)
        self.stats.add("uploaded_bytes", len(piece))
        return location

    def start_blob_upload(self, repo: str) -> BlobUpload:
        """An upload session whose digest is given only at the end (:class:`BlobUpload`):
        for data that is sent while it is still being produced."""
        return BlobUpload(self, repo, self._start_upload(repo))

    def _finish_upload(
        self, location: str, scopes: Scopes, what: str, digest: str, data: bytes
    ) -> None:
        url = location + ("&" if "?" in location else "?") + urlencode({"digest": digest})

        def handle(resp: Response) -> None:
            if resp.status not in (201, 204):
                raise self._status_error(resp, what)
            got = resp.headers.get("docker-content-digest")
            if got and got != digest:
                raise IntegrityError(f"{what}: registry stored digest {got}")

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        self._execute("PUT", url, scopes, handle, headers=headers, body=data)
        self.stats.add("uploaded_bytes", len(data))


class BlobUpload:
    """One chunked upload session (POST done, then PATCHes in order, then the final PUT).

    The digest is named only by :meth:`commit`, so the data can be sent while it is produced;
    the registry checks it on that PUT and stores nothing under it otherwise. No retries: a
    failed request leaves the session unusable (the caller uploads again from the start, with
    :meth:`RegistryClient.push_blob`); :meth:`abort` releases it. Used from one thread.
    """

    def __init__(self, client: RegistryClient, repo: str, location: str) -> None:
        self.client = client
        self.repo = repo
        self.location = location
        self.offset = 0  # bytes sent

    def write(self, piece: bytes) -> None:
        """Send the next ``piece`` (one PATCH)."""
        if not piece:
            return
        c = self.client
        what = f"upload to {self.repo}"
        self.location = c._patch(self.location, c.push_scope(self.repo), what, self.offset, piece)
        self.offset += len(piece)

    def commit(self, digest: str, size: int) -> None:
        """Finish the upload as ``digest`` (the final PUT); ``size`` must be what was sent."""
        parse_digest(digest)
        if size != self.offset:
            raise IntegrityError(f"blob {digest}: {self.offset} bytes sent, the blob has {size}")
        c = self.client
        what = f"upload of {digest} to {self.repo}"
        c._finish_upload(self.location, c.push_scope(self.repo), what, digest, b"")

    def abort(self) -> None:
        """Cancel the session (best effort: a registry also expires abandoned uploads)."""

        def handle(resp: Response) -> None:
            return None

        with contextlib.suppress(BackendError):
            self.client._execute("DELETE", self.location, self.client.push_scope(self.repo), handle)
