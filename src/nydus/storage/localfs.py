"""``localfs`` backend: blobs are files in a directory (or one explicit blob file).

Config keys as upstream: ``blob_file`` (every blob id maps to this file), ``dir`` (blob
``<dir>/<blob_id>``) and ``alt_dirs`` (searched in order when the blob is not in ``dir``).
File descriptors are opened on first use and kept; ``pread`` makes reads thread-safe.
"""

from __future__ import annotations

import os
import threading

from ..config import LocalFsConfig
from ..errors import BackendError, NotFoundError
from .backend import BlobBackend

__all__ = ["LocalFsBackend"]


class LocalFsBackend(BlobBackend):
    type = "localfs"

    def __init__(self, cfg: LocalFsConfig, id: str = "") -> None:
        super().__init__(id)
        self.cfg = cfg
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def path_of(self, blob_id: str) -> str:
        if self.cfg.blob_file:
            return self.cfg.blob_file
        if not blob_id or "/" in blob_id or blob_id in (".", ".."):
            raise BackendError(f"localfs: invalid blob id {blob_id!r}")
        dirs = [d for d in (self.cfg.dir, *self.cfg.alt_dirs) if d]
        for d in dirs:
            p = os.path.join(d, blob_id)
            if os.path.exists(p):
                return p
        raise NotFoundError(f"localfs: blob {blob_id} not found in {', '.join(dirs)}")

    def _fd(self, blob_id: str) -> int:
        with self._lock:
            fd = self._fds.get(blob_id)
            if fd is not None:
                return fd
        path = self.path_of(blob_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"localfs: cannot open {path}: {e.strerror}") from e
        with self._lock:
            old = self._fds.setdefault(blob_id, fd)
        if old != fd:
            os.close(fd)
        return old

    def _blob_size(self, blob_id: str) -> int:
        return os.fstat(self._fd(blob_id)).st_size

    def _read(self, blob_id: str, offset: int, size: int) -> bytes:
        fd = self._fd(blob_id)
        out = os.pread(fd, size, offset)
        while len(out) < size:  # pread may return short reads on some file systems
            more = os.pread(fd, size - len(out), offset + len(out))
            if not more:
                break
            out += more
        return out

    def close(self) -> None:
        super().close()
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
