"""The exception tree of nydus-py.

Every error raised on purpose by this package derives from :class:`NydusError`.
Each family knows the errno it maps to at a file-system edge and the exit code
it maps to at a CLI edge, so adapters translate without guessing::

    NydusError                      exit 1, EIO
    ├── FormatError                 exit 3, EIO     malformed bootstrap / blob / tar
    │   └── UnsupportedError        exit 3, EOPNOTSUPP  valid but not supported here
    ├── IntegrityError              exit 4, EIO     digest / size mismatch of data
    ├── NotFoundError               exit 2, ENOENT  a path, inode or blob is missing
    ├── ConfigError                 exit 2, EINVAL  bad flags or configuration
    └── BackendError                exit 5, EIO     a storage backend failed
        ├── RegistryAuthError       exit 5, EIO     credentials missing, refused or token failed
        └── RegistryNotFound        exit 5, EIO     the registry has no such repo/blob/manifest

Lower-layer exceptions (OSError, zstd/lz4 errors, struct.error) are translated
into these at the boundary where they occur; nothing above the format layer
should ever see a ``struct.error``.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "NydusError",
    "FormatError",
    "UnsupportedError",
    "IntegrityError",
    "NotFoundError",
    "ConfigError",
    "BackendError",
    "RegistryAuthError",
    "RegistryNotFound",
]


class NydusError(Exception):
    """Root of all nydus-py errors."""

    exit_code = 1
    errno = _errno.EIO


class FormatError(NydusError):
    """On-disk data (bootstrap, blob, blob meta, tar stream) is malformed."""

    exit_code = 3


class UnsupportedError(FormatError):
    """The data is well formed but uses a feature this implementation lacks."""

    errno = _errno.EOPNOTSUPP


class IntegrityError(NydusError):
    """Data does not match its recorded digest or size."""

    exit_code = 4


class NotFoundError(NydusError):
    """A path, inode, blob or chunk that was asked for does not exist."""

    exit_code = 2
    errno = _errno.ENOENT


class ConfigError(NydusError):
    """Invalid command-line flags or configuration."""

    exit_code = 2
    errno = _errno.EINVAL


class BackendError(NydusError):
    """A storage backend failed to deliver data."""

    exit_code = 5


class RegistryAuthError(BackendError):
    """A registry (or its token server) refused our credentials, or we had none to offer."""


class RegistryNotFound(BackendError):
    """The registry answered 404: no such repository, manifest, tag or blob.

    Still EIO at a file-system edge: a file whose blob vanished is an I/O failure there.
    """
