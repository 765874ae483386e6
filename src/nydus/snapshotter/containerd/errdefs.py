"""Snapshot errors with containerd's meanings, and their gRPC status codes.

containerd tells errors apart by gRPC status code only (``errdefs.FromGRPC``): its unpacker, for
example, skips a layer when ``Prepare`` answers ``ALREADY_EXISTS``, and its garbage collector
ignores ``FAILED_PRECONDITION`` from ``Remove``. So every error the snapshotter raises on purpose
carries the code containerd expects, and :func:`grpc_code_of` maps everything else::

    NydusError
    ├── SnapshotNotFound (NotFoundError)       NOT_FOUND
    ├── SnapshotExists                         ALREADY_EXISTS
    ├── SnapshotPreconditionFailed             FAILED_PRECONDITION
    ├── SnapshotInvalidArgument                INVALID_ARGUMENT
    ├── NydusUnavailable (UnsupportedError)    UNIMPLEMENTED   (daemon mode none, ...)
    ├── DaemonError                            UNAVAILABLE     (nydusd died or never ran)
    ├── ContentLocked                          UNAVAILABLE     (another writer holds the ref)
    └── ContentOutOfRange                      OUT_OF_RANGE    (read or write past the data)

The content store (:mod:`~..content.store`) reuses the snapshot classes for its own "not found",
"exists", "precondition" and "invalid argument" cases, so both services speak the same codes.

Other families: ``NotFoundError`` -> NOT_FOUND, ``ConfigError`` -> INVALID_ARGUMENT,
``BackendError`` -> UNAVAILABLE, any other ``NydusError`` -> UNKNOWN, anything else -> INTERNAL.
"""

from __future__ import annotations

import errno as _errno

import grpc

from ...errors import BackendError, ConfigError, NotFoundError, NydusError, UnsupportedError

__all__ = [
    "ContentLocked",
    "ContentOutOfRange",
    "DaemonError",
    "NydusUnavailable",
    "SnapshotExists",
    "SnapshotInvalidArgument",
    "SnapshotNotFound",
    "SnapshotPreconditionFailed",
    "grpc_code_of",
]


class SnapshotNotFound(NotFoundError):
    """No snapshot (or parent) with that key."""


class SnapshotExists(NydusError):
    """The key (or a remote snapshot's target) is already there."""

    errno = _errno.EEXIST


class SnapshotPreconditionFailed(NydusError):
    """The snapshot is in the wrong state: not active, has children, still mounted, ..."""

    errno = _errno.EBUSY


class SnapshotInvalidArgument(NydusError):
    """A malformed request: bad filter, parent not committed, unknown update field, ..."""

    exit_code = 2
    errno = _errno.EINVAL


class NydusUnavailable(UnsupportedError):
    """A Nydus image needs something this snapshotter cannot do (yet), e.g. start nydusd."""


class DaemonError(NydusError):
    """A nydusd could not be started, did not reach RUNNING, or refused a mount request."""


class ContentLocked(NydusError):
    """Another writer holds the ingest ``ref`` (containerd retries on UNAVAILABLE)."""

    errno = _errno.EBUSY


class ContentOutOfRange(NydusError):
    """A read past the end of a blob, or a write not at the ingest's current offset."""

    errno = _errno.ERANGE


def grpc_code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code containerd must see for ``exc``."""
    table: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
        (SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
        (SnapshotPreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
        (SnapshotInvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (NydusUnavailable, grpc.StatusCode.UNIMPLEMENTED),
        (DaemonError, grpc.StatusCode.UNAVAILABLE),
        (ContentLocked, grpc.StatusCode.UNAVAILABLE),
        (ContentOutOfRange, grpc.StatusCode.OUT_OF_RANGE),
        (NotFoundError, grpc.StatusCode.NOT_FOUND),
        (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
        (BackendError, grpc.StatusCode.UNAVAILABLE),
        (NydusError, grpc.StatusCode.UNKNOWN),
    )
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
