"""The process's C library, loaded once, with the prototypes of the calls nydus makes.

mount(2), umount2(2), sync_file_range(2) and syscall(2) are called through :func:`libc` (errno
is kept, so read it with ``ctypes.get_errno()`` right after a failed call). Loading is idempotent
and the returned handle is shared; calling through it is safe from any thread.
"""

from __future__ import annotations

import ctypes
import functools

__all__ = ["libc", "MS_RDONLY", "MS_NOSUID", "MS_NODEV", "MS_BIND", "MS_PRIVATE", "MNT_DETACH"]

# mount(2) flags and umount2(2)'s lazy flag (<sys/mount.h>)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_PRIVATE = 0x1, 0x2, 0x4, 0x1000, 1 << 18
MNT_DETACH = 0x2


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library of this process (``use_errno=True``), prototypes set."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
    lib.mount.restype = ctypes.c_int
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.umount2.restype = ctypes.c_int
    lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    lib.sync_file_range.restype = ctypes.c_int
    lib.syscall.restype = ctypes.c_long
    return lib
