"""containerd's content store on disk: blobs, resumable ingests, labels and lazy entries.

Owns one directory (the snapshotter's ``<root>/content``), laid out like containerd's own local
store so that an operator finds their way around::

    blobs/<alg>/<hex>            committed blobs: read-only files, renamed into place whole
    ingest/<sha256(ref)>/        one write in progress, resumable by its ref:
        ref total expected       what the writer declared (the ref itself, never a path)
        startedat updatedat      nanoseconds since the epoch, as text
        data                     the bytes written so far (its size is the offset)
    lazy/<alg>/<hex>             lazy entries (JSON ``{"size": N, ...}``, see below)
    labels/<alg>/<hex>           JSON labels of a blob or lazy entry

A **lazy entry** stands for a blob whose bytes are not here but whose digest and size are known
(a Nydus data blob listed in a manifest: :mod:`.nydusblobs`). :meth:`ContentStore.info` answers
its size, :meth:`ContentStore.walk` lists it and :meth:`ContentStore.delete` removes it, so
containerd can treat it as present and collect it; its bytes come only through
:meth:`ContentStore.materialize` (a caller-supplied stream, checked against the digest before it
becomes a blob). A real blob of the same digest always wins over a lazy entry.

Rules, as containerd's ``content/local`` store:

- Digests are ``sha256:``/``sha384:``/``sha512:`` + lower-case hex of the right length;
  anything else is INVALID_ARGUMENT, so no digest can name a path outside the store.
- An ingest directory is named by the sha256 of its ref, so a hostile ref (``../..``, NULs,
  4 KiB of slashes) stays a file name; the ref is kept in the ``ref`` file and checked on resume.
- One writer per ref at a time (:class:`ContentLocked`, which containerd retries); a writer
  resumes at the end of ``data`` (the digest is recomputed); a write must be at the current
  offset, or at 0 to start over.
- Commit flushes and fsyncs ``data``, checks size and digest (FAILED_PRECONDITION on mismatch,
  and then nothing is committed), renames it to ``blobs/`` (atomic) and fsyncs the directory;
  a blob that is already there answers ALREADY_EXISTS. JSON side files are written to a
  temporary name, fsynced and renamed. Temporary files left by a crash are removed at start.

Threading: one instance is shared by the gRPC worker threads. Ref locks and the final rename of
a commit are guarded by one lock; everything else works on files that are either immutable or
owned by the writer holding the ref lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ...errors import FormatError
from ...format import oci
from ...format.safejson import parse_json_object
from ..containerd.errdefs import (
    ContentLocked,
    ContentOutOfRange,
    SnapshotExists,
    SnapshotInvalidArgument,
    SnapshotNotFound,
    SnapshotPreconditionFailed,
)
from ..containerd.rpc import updated_labels

__all__ = [
    "ContentInfo",
    "ContentStore",
    "IngestStatus",
    "IngestWriter",
    "LazyEntry",
    "parse_digest",
]

_TMP_PREFIX = ".tmp-"
_MAX_REF = 4096
_MAX_JSON = 1 << 20
_COPY_CHUNK = 1 << 20
_LOCK_WAIT = 1.0  # seconds a second writer of the same ref waits before UNAVAILABLE
_INTERNAL_REF = "nydus-materialize-"  # ingests of materialize(): never listed, gone at start


def parse_digest(digest: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of a valid digest, else :class:`SnapshotInvalidArgument`."""
    return oci.parse_digest(digest, error=SnapshotInvalidArgument)


def _now_ns() -> int:
    return time.time_ns()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _read_small(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(_MAX_JSON + 1)
    except FileNotFoundError:
        return None


def _read_int(path: Path, default: int = 0) -> int:
    raw = _read_small(path)
    try:
        return int(raw.decode().strip()) if raw else default
    except ValueError:
        return default


@dataclass(frozen=True)
class ContentInfo:
    """What ``Info``/``List`` report about a blob or a lazy entry."""

    digest: str
    size: int
    created_ns: int
    updated_ns: int
    labels: Mapping[str, str] = field(default_factory=dict)
    lazy: bool = False


@dataclass(frozen=True)
class LazyEntry:
    """A blob known by digest and size only (see the module docstring)."""

    digest: str
    size: int
    created_ns: int
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestStatus:
    """What ``Status``/``ListStatuses`` report about a write in progress."""

    ref: str
    offset: int
    total: int
    expected: str
    started_ns: int
    updated_ns: int


class IngestWriter:
    """The writer of one ingest; holds the ref's lock until :meth:`close` or :meth:`commit`."""

    def __init__(self, store: ContentStore, ref: str, path: Path) -> None:
        self.store = store
        self.ref = ref
        self.path = path
        data = path / "data"
        self._f: BinaryIO | None = open(data, "r+b", buffering=0)  # noqa: SIM115 - owned
        self._hash = hashlib.sha256()
        self.offset = 0
        while chunk := self._f.read(_COPY_CHUNK):  # resuming: the digest so far
            self._hash.update(chunk)
            self.offset += len(chunk)
        self._updated_ns = _read_int(path / "updatedat") or _now_ns()
        self._dirty = False
        self._released = False

    # -- state ----------------------------------------------------------------------------

    @property
    def total(self) -> int:
        return _read_int(self.path / "total")

    def set_total(self, total: int) -> None:
        if total > 0 and total != self.total:
            _write_atomic(self.path / "total", str(total).encode())

    @property
    def expected(self) -> str:
        raw = _read_small(self.path / "expected")
        return raw.decode(errors="replace") if raw else ""

    def set_expected(self, expected: str) -> None:
        if expected and expected != self.expected:
            parse_digest(expected)
            _write_atomic(self.path / "expected", expected.encode())

    def digest(self) -> str:
        """The sha256 digest of what was written so far."""
        return "sha256:" + self._hash.hexdigest()

    def status(self) -> IngestStatus:
        return IngestStatus(
            ref=self.ref,
            offset=self.offset,
            total=self.total,
            expected=self.expected,
            started_ns=_read_int(self.path / "startedat"),
            updated_ns=self._updated_ns,
        )

    def _file(self) -> BinaryIO:
        if self._f is None:
            raise SnapshotPreconditionFailed(f"writer for ref {self.ref!r} is closed")
        return self._f

    # -- writing --------------------------------------------------------------------------

    def truncate(self, size: int) -> None:
        """Start over (containerd's writers only truncate to 0)."""
        if size != 0:
            raise SnapshotInvalidArgument("an ingest can only be truncated to 0")
        f = self._file()
        f.seek(0)
        f.truncate(0)
        self._hash = hashlib.sha256()
        self.offset = 0
        self._touch()

    def write(self, data: bytes) -> int:
        """Append ``data`` at the current offset; returns the new offset."""
        f = self._file()
        f.seek(self.offset)
        f.write(data)
        self._hash.update(data)
        self.offset += len(data)
        self._touch()
        return self.offset

    def write_at(self, offset: int, data: bytes) -> int:
        """containerd's rule: a write at 0 restarts, any other must be at the current offset."""
        if offset == 0 and self.offset > 0:
            self.truncate(0)
        elif offset > 0 and offset != self.offset:
            raise ContentOutOfRange(
                f"write @{offset} must occur at current offset {self.offset} (ref {self.ref!r})"
            )
        return self.write(data) if data else self.offset

    def _touch(self) -> None:
        self._updated_ns = _now_ns()
        self._dirty = True

    def commit(self, size: int, expected: str, labels: Mapping[str, str] | None = None) -> str:
        """Check and move the data into ``blobs/``; returns the digest. Closes the writer.

        ``size`` 0 and ``expected`` "" skip those checks. On a mismatch nothing is committed
        (the ingest stays, as containerd's does, for the client to abort or restart).
        """
        f = self._file()
        try:
            f.flush()
            os.fsync(f.fileno())
            actual_size = os.fstat(f.fileno()).st_size
            if size > 0 and size != actual_size:
                raise SnapshotPreconditionFailed(
                    f"unexpected commit size {actual_size}, expected {size} (ref {self.ref!r})"
                )
            dgst = self.digest()
            if expected:
                alg, _ = parse_digest(expected)
                if alg != "sha256":
                    dgst = _file_digest(f, alg)
                if dgst != expected:
                    raise SnapshotPreconditionFailed(
                        f"unexpected commit digest {dgst}, expected {expected} (ref {self.ref!r})"
                    )
        except BaseException:
            self.close()
            raise
        self._close_file()
        self.store._finish_commit(self, dgst, labels or {})
        return dgst

    def _close_file(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._dirty:
            with contextlib.suppress(OSError):
                (self.path / "updatedat").write_text(str(self._updated_ns))
            self._dirty = False

    def close(self) -> None:
        """Release the ref; the ingest stays on disk, resumable. Idempotent."""
        try:
            self._close_file()
        finally:
            self.release()

    def release(self) -> None:
        """Give the ref lock back (once)."""
        if not self._released:
            self._released = True
            self.store._unlock(self.ref)


def _file_digest(f: BinaryIO, alg: str) -> str:
    h = hashlib.new(alg)
    f.seek(0)
    while chunk := f.read(_COPY_CHUNK):
        h.update(chunk)
    return f"{alg}:{h.hexdigest()}"


class ContentStore:
    """See the module docstring."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.blobs_dir = self.root / "blobs"
        self.ingest_dir = self.root / "ingest"
        self.lazy_dir = self.root / "lazy"
        self.labels_dir = self.root / "labels"
        for d in (self.root, self.blobs_dir, self.ingest_dir, self.lazy_dir, self.labels_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Condition()
        self._locked: set[str] = set()
        self._remove_temporaries()

    def _remove_temporaries(self) -> None:
        for d in (self.blobs_dir, self.lazy_dir, self.labels_dir):
            for tmp in d.glob(f"*/{_TMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        for ingest in self.ingest_dir.iterdir():
            if ingest.name.startswith(_TMP_PREFIX) or (
                _read_small(ingest / "ref") or b""
            ).startswith(_INTERNAL_REF.encode()):
                shutil.rmtree(ingest, ignore_errors=True)
                continue
            for tmp in ingest.glob(f"{_TMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    # -- paths ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        alg, hexpart = parse_digest(digest)
        return self.blobs_dir / alg / hexpart

    def _lazy_path(self, digest: str) -> Path:
        alg, hexpart = parse_digest(digest)
        return self.lazy_dir / alg / hexpart

    def _labels_path(self, digest: str) -> Path:
        alg, hexpart = parse_digest(digest)
        return self.labels_dir / alg / hexpart

    def _ingest_path(self, ref: str) -> Path:
        if not ref:
            raise SnapshotInvalidArgument("ref must not be empty")
        if len(ref.encode("utf-8", "surrogatepass")) > _MAX_REF:
            raise SnapshotInvalidArgument(f"ref is longer than {_MAX_REF} bytes")
        return self.ingest_dir / hashlib.sha256(ref.encode("utf-8", "surrogatepass")).hexdigest()

    # -- blobs and lazy entries -------------------------------------------------------------

    def _labels(self, digest: str) -> dict[str, str]:
        raw = _read_small(self._labels_path(digest))
        if not raw:
            return {}
        try:
            doc = parse_json_object(raw, f"labels of {digest}")
        except FormatError:
            return {}
        return {str(k): str(v) for k, v in doc.items()}

    def lazy(self, digest: str) -> LazyEntry | None:
        """The lazy entry of ``digest``, if there is one (and no real blob)."""
        path = self._lazy_path(digest)
        raw = _read_small(path)
        if raw is None:
            return None
        try:
            doc = parse_json_object(raw, f"lazy entry of {digest}")
            size = int(doc["size"])
            st = path.stat()
        except (FormatError, ValueError, KeyError, TypeError, OSError):
            return None  # damaged or just removed: as if absent
        if size < 0:
            return None
        raw_meta = doc.get("meta")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        return LazyEntry(digest, size, st.st_mtime_ns, meta)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def info(self, digest: str) -> ContentInfo:
        """Info of a blob, else of a lazy entry; NOT_FOUND otherwise."""
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            lazy = self.lazy(digest)
            if lazy is None:
                raise SnapshotNotFound(f"content {digest}: not found") from None
            updated = self._labels_mtime(digest) or lazy.created_ns
            return ContentInfo(
                digest, lazy.size, lazy.created_ns, updated, self._labels(digest), lazy=True
            )
        updated = self._labels_mtime(digest) or st.st_mtime_ns
        return ContentInfo(digest, st.st_size, st.st_mtime_ns, updated, self._labels(digest))

    def _labels_mtime(self, digest: str) -> int:
        try:
            return self._labels_path(digest).stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def _digests_in(self, base: Path) -> Iterator[str]:
        for alg in sorted(oci.DIGEST_HEX_LENGTHS):
            d = base / alg
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                digest = f"{alg}:{p.name}"
                try:
                    parse_digest(digest)
                except SnapshotInvalidArgument:
                    continue  # temporaries and strangers
                yield digest

    def walk(self) -> Iterator[ContentInfo]:
        """Every blob and lazy entry (a digest once)."""
        seen: set[str] = set()
        for base in (self.blobs_dir, self.lazy_dir):
            for digest in self._digests_in(base):
                if digest in seen:
                    continue
                seen.add(digest)
                try:
                    yield self.info(digest)
                except SnapshotNotFound:
                    continue  # deleted meanwhile

    def put_lazy(self, digest: str, size: int, meta: Mapping[str, Any] | None = None) -> bool:
        """Record a lazy entry; False when the blob (or an entry) is already there."""
        if size < 0:
            raise SnapshotInvalidArgument(f"lazy entry {digest}: negative size")
        path = self._lazy_path(digest)
        if self.has_blob(digest) or path.exists():
            return False
        doc = {"size": size, "meta": dict(meta or {})}
        _write_atomic(path, json.dumps(doc, sort_keys=True).encode())
        return True

    def update(
        self, digest: str, labels: Mapping[str, str], fieldpaths: Sequence[str] = ()
    ) -> ContentInfo:
        """containerd's ``Update``: ``labels`` (all) or ``labels.<key>`` paths; none = all."""
        self.info(digest)  # NOT_FOUND first
        new = updated_labels(self._labels(digest), labels, fieldpaths, f"content info {digest}")
        new = {k: v for k, v in new.items() if v}  # an empty value removes the label
        lp = self._labels_path(digest)
        if new:
            _write_atomic(lp, json.dumps(new, sort_keys=True).encode())
        else:
            with contextlib.suppress(FileNotFoundError):
                lp.unlink()
        return self.info(digest)

    def delete(self, digest: str) -> None:
        """Remove the blob and/or lazy entry of ``digest`` and its labels."""
        found = False
        for p in (self.blob_path(digest), self._lazy_path(digest)):
            try:
                p.unlink()
                found = True
            except FileNotFoundError:
                pass
        with contextlib.suppress(FileNotFoundError):
            self._labels_path(digest).unlink()
        if not found:
            raise SnapshotNotFound(f"content {digest}: not found")

    def read(self, digest: str, offset: int = 0, size: int = 0) -> Iterator[bytes]:
        """The bytes of blob ``digest`` from ``offset``: ``size`` of them (0: to the end).

        Opened before the first chunk is asked for, so NOT_FOUND and OUT_OF_RANGE come at once.
        A lazy entry has no bytes here: NOT_FOUND (see :meth:`materialize`).
        """
        try:
            f = open(self.blob_path(digest), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise SnapshotNotFound(f"content {digest}: not found") from None
        total = os.fstat(f.fileno()).st_size
        offset = max(offset, 0)
        if offset > total:
            f.close()
            raise ContentOutOfRange(f"read past object length {total} bytes")
        if size <= 0 or offset + size > total:
            size = total - offset

        def chunks() -> Iterator[bytes]:
            with f:
                f.seek(offset)
                left = size
                while left > 0:
                    piece = f.read(min(left, _COPY_CHUNK))
                    if not piece:
                        return
                    left -= len(piece)
                    yield piece

        return chunks()

    def read_small(self, digest: str, limit: int) -> bytes | None:
        """A whole blob of at most ``limit`` bytes (manifests, configs); None if absent/bigger."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        return data if len(data) <= limit else None

    def materialize(self, digest: str, source: Iterable[bytes]) -> ContentInfo:
        """Turn lazy entry ``digest`` into a blob with the bytes of ``source`` (checked)."""
        lazy = self.lazy(digest)
        if lazy is None:
            return self.info(digest)
        ref = f"{_INTERNAL_REF}{digest}"
        try:  # one download per digest: a second caller waits, then finds the blob
            w = self.writer(ref, lazy.size, digest, wait=600.0)
        except SnapshotExists:
            return self.info(digest)
        if self.has_blob(digest):
            w.close()
            self.abort_quiet(ref)
            return self.info(digest)
        try:
            w.truncate(0)
            for piece in source:
                w.write(piece)
                if w.offset > lazy.size:
                    raise SnapshotPreconditionFailed(
                        f"content {digest}: source gave more than {lazy.size} bytes"
                    )
            w.commit(lazy.size, digest)
        except SnapshotExists:
            pass  # committed by someone else meanwhile
        except BaseException:
            w.close()
            self.abort_quiet(ref)
            raise
        return self.info(digest)

    # -- ingests --------------------------------------------------------------------------

    def _try_lock(self, ref: str, wait: float) -> None:
        deadline = time.monotonic() + wait
        with self._lock:
            while ref in self._locked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ContentLocked(f"ref {ref!r} locked: another writer is using it")
                self._lock.wait(left)
            self._locked.add(ref)

    def _unlock(self, ref: str) -> None:
        with self._lock:
            self._locked.discard(ref)
            self._lock.notify_all()

    def writer(
        self, ref: str, total: int = 0, expected: str = "", *, wait: float = _LOCK_WAIT
    ) -> IngestWriter:
        """Begin or resume the ingest ``ref`` (locked for the caller until close/commit).

        ALREADY_EXISTS when ``expected`` is a blob already here (a lazy entry does not count:
        writing its real bytes turns it into a blob).
        """
        path = self._ingest_path(ref)
        if expected:
            parse_digest(expected)
            if self.has_blob(expected):
                raise SnapshotExists(f"content {expected}: already exists")
        self._try_lock(ref, wait)
        try:
            if (path / "ref").is_file() and _read_small(path / "ref") != ref.encode(
                "utf-8", "surrogatepass"
            ):
                shutil.rmtree(path, ignore_errors=True)  # a damaged ingest: start again
            if not (path / "data").is_file():
                shutil.rmtree(path, ignore_errors=True)
                tmp = self.ingest_dir / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
                tmp.mkdir(mode=0o700)
                now = str(_now_ns()).encode()
                (tmp / "ref").write_bytes(ref.encode("utf-8", "surrogatepass"))
                (tmp / "startedat").write_bytes(now)
                (tmp / "updatedat").write_bytes(now)
                if total > 0:
                    (tmp / "total").write_bytes(str(total).encode())
                if expected:
                    (tmp / "expected").write_bytes(expected.encode())
                (tmp / "data").touch()
                os.rename(tmp, path)
            w = IngestWriter(self, ref, path)
            w.set_total(total)
            w.set_expected(expected)
            return w
        except BaseException:
            self._unlock(ref)
            raise

    def _finish_commit(self, w: IngestWriter, digest: str, labels: Mapping[str, str]) -> None:
        """Second half of :meth:`IngestWriter.commit`: the rename, under the store lock."""
        try:
            target = self.blob_path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                if target.exists():
                    shutil.rmtree(w.path, ignore_errors=True)
                    raise SnapshotExists(f"content {digest}: already exists")
                os.chmod(w.path / "data", 0o444)
                os.rename(w.path / "data", target)
                _fsync_dir(target.parent)
                with contextlib.suppress(FileNotFoundError):
                    self._lazy_path(digest).unlink()
            shutil.rmtree(w.path, ignore_errors=True)
            if labels:
                self.update(digest, labels)
        finally:
            w.release()

    def _status_of(self, path: Path) -> IngestStatus | None:
        raw = _read_small(path / "ref")
        if raw is None:
            return None
        try:
            offset = (path / "data").stat().st_size
        except FileNotFoundError:
            return None
        expected = _read_small(path / "expected")
        return IngestStatus(
            ref=raw.decode("utf-8", "surrogateescape"),
            offset=offset,
            total=_read_int(path / "total"),
            expected=expected.decode(errors="replace") if expected else "",
            started_ns=_read_int(path / "startedat"),
            updated_ns=_read_int(path / "updatedat"),
        )

    def status(self, ref: str) -> IngestStatus:
        st = self._status_of(self._ingest_path(ref))
        if st is None or st.ref != ref:
            raise SnapshotNotFound(f"ingest {ref!r}: not found")
        return st

    def list_statuses(self) -> list[IngestStatus]:
        """The ingests containerd made (not the store's own, which its GC must not abort)."""
        out = []
        for p in sorted(self.ingest_dir.iterdir()):
            if p.name.startswith(_TMP_PREFIX):
                continue
            st = self._status_of(p)
            if st is not None and not st.ref.startswith(_INTERNAL_REF):
                out.append(st)
        return out

    def abort(self, ref: str) -> None:
        """Drop the ingest ``ref`` (NOT_FOUND if there is none; UNAVAILABLE while written)."""
        path = self._ingest_path(ref)
        self._try_lock(ref, _LOCK_WAIT)
        try:
            if not path.exists():
                raise SnapshotNotFound(f"ingest {ref!r}: not found")
            shutil.rmtree(path)
        finally:
            self._unlock(ref)

    def abort_quiet(self, ref: str) -> None:
        with contextlib.suppress(SnapshotNotFound, ContentLocked, OSError):
            self.abort(ref)
