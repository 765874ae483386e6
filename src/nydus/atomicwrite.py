"""Replace a file's contents atomically: readers see the old file or the new one, never a part.

:func:`write_atomic` writes a temporary file beside the target (named by process and thread, so
concurrent writers do not meet), syncs it and renames it over the target; on any failure the
temporary file is removed and the error propagates. Safe from any thread.
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["write_atomic"]


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Make ``path`` hold ``data`` (file mode ``mode``, exactly), durable once this returns."""
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}.{threading.get_ident()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
