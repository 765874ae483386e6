"""The process's C library, loaded once, with the prototypes of the calls nydus makes.

mount(2), umount2(2), sync_file_range(2) and syscall(2) are called through :func:`libc` (errno
is kept, so read it with ``ctypes.get_errno()`` right after a failed call); glibc's malloc is
tuned with :func:`set_malloc`, and its free memory handed back with :func:`trim_heap`. Loading
is idempotent and the returned handle is shared; calling through it is safe from any thread.
Background work runs at ``SCHED_IDLE`` with :func:`set_idle` or :func:`idle_priority` (the
calling thread only: Linux schedules threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

__all__ = [
    "idle_priority",
    "libc",
    "set_idle",
    "set_malloc",
    "trim_heap",
    "MS_RDONLY",
    "MS_NOSUID",
    "MS_NODEV",
    "MS_BIND",
    "MS_PRIVATE",
    "MNT_DETACH",
]

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


# mallopt(3) parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def set_malloc(
    mmap_threshold: int | None = None,
    trim_threshold: int | None = None,
    arena_max: int | None = None,
) -> bool:
    """Set glibc malloc parameters for this process (mallopt(3)); None leaves one as it is.
    A fixed ``mmap_threshold`` also stops glibc raising it as large blocks are freed.
    False when the C library has no mallopt (not glibc) or refused a value."""
    try:
        fn = libc().mallopt
    except AttributeError:
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = True
    for param, value in (
        (M_MMAP_THRESHOLD, mmap_threshold),
        (M_TRIM_THRESHOLD, trim_threshold),
        (M_ARENA_MAX, arena_max),
    ):
        if value is not None:
            ok = fn(param, value) == 1 and ok
    return ok


def trim_heap() -> bool:
    """Hand the free memory of every malloc arena back to the kernel (glibc's
    ``malloc_trim(0)``: whole free pages anywhere in a heap, not only at its top).

    For a phase boundary of a long job: the buffers a phase freed stay resident otherwise,
    since glibc only shrinks a heap from its top. A few milliseconds; the pages fault in
    again when used. False when the C library has no ``malloc_trim`` (not glibc)."""
    try:
        fn = libc().malloc_trim
    except AttributeError:
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    fn(0)
    return True


def set_idle(idle: bool) -> None:
    """The calling thread at ``SCHED_IDLE`` (only when no other thread wants the CPU) or back
    at ``SCHED_OTHER``; where that is refused, at the priority it has."""
    with contextlib.suppress(OSError, AttributeError):
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        os.sched_setscheduler(0, policy, os.sched_param(0))


@contextlib.contextmanager
def idle_priority() -> Iterator[None]:
    """The calling thread at ``SCHED_IDLE`` inside the block, back to its policy after."""
    try:
        before, param = os.sched_getscheduler(0), os.sched_getparam(0)
    except OSError:
        yield
        return
    set_idle(True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, before, param)
