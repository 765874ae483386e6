"""The process's C library, loaded once, with the prototypes of the calls nydus makes.

mount(2), umount2(2), sync_file_range(2) and syscall(2) are called through :func:`libc` (errno
is kept, so read it with ``ctypes.get_errno()`` right after a failed call); glibc's malloc is
tuned with :func:`set_malloc`, its free memory measured with :func:`heap_free` and handed back
with :func:`trim_heap` (or by a :class:`HeapTrimmer` once it has stayed free). Loading
is idempotent and the returned handle is shared; calling through it is safe from any thread.
Background work runs at ``SCHED_IDLE`` with :func:`set_idle` or :func:`idle_priority` (the
calling thread only: Linux schedules threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator

__all__ = [
    "HeapTrimmer",
    "heap_free",
    "heap_trimmer",
    "idle_priority",
    "resident",
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_free() -> int | None:
    """Bytes free in malloc's arenas: resident unless trimmed (glibc's ``mallinfo2()``
    ``fordblks``, fast bins included). None when the C library has no ``mallinfo2`` (glibc
    before 2.33, or not glibc)."""
    try:
        fn = libc().mallinfo2
    except AttributeError:
        return None
    fn.argtypes, fn.restype = [], _MallInfo2
    return int(fn().fordblks)


def resident() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrimmer:
    """Hands the heap's free memory back once it has stayed free: call :meth:`tick` now and
    then (nydusd's main loop does, every half second, with the process's :func:`heap_trimmer`).
    Every ``period`` seconds it looks at :func:`heap_free` and :func:`resident`; when at this
    look and the one before at least ``min_free`` of the heap was free and the process had
    grown by ``min_free`` since the last trim, the free memory was not the working set of what
    runs (a burst of chunk buffers, a prefetch that is over), and :func:`trim_heap` returns
    it. Work that knows it has just freed a lot (a prefetch done, an image switched or
    unmounted) calls :meth:`nudge` from any thread: the next tick then looks at once and
    trims if ``min_free`` is free, with no second look and no growth asked. A daemon's heap
    otherwise keeps its peak: glibc returns memory only from the top of a heap, above
    ``M_TRIM_THRESHOLD``, which nydusd sets high so that chunk buffers are reused instead of
    faulted in again. (A trimmed heap still counts its pages as free: hence the growth.)"""

    def __init__(
        self,
        period: float = 10.0,
        min_free: int = 32 << 20,
        free: Callable[[], int | None] = heap_free,
        rss: Callable[[], int] = resident,
        trim: Callable[[], bool] = trim_heap,
    ) -> None:
        self.period, self.min_free = period, min_free
        self._free, self._rss, self._trim = free, rss, trim
        self._next = 0.0
        self._was_free = False
        self._nudged = False  # set from any thread; a bool store is atomic
        self._floor = 0  # resident bytes after the last trim
        self.trimmed = 0  # bytes handed back in all

    def nudge(self) -> None:
        """Much was just freed: look at the next tick, and trim if it is still free."""
        self._nudged = True

    def tick(self, now: float) -> int:
        """Resident bytes handed back by this call (0 mostly)."""
        nudged, self._nudged = self._nudged, False
        if now < self._next and not nudged:
            return 0
        self._next = now + self.period
        free, rss = self._free(), self._rss()
        grown = nudged or rss >= self._floor + self.min_free  # a nudge vouches for itself
        if free is None or free < self.min_free or not grown:
            self._was_free = False
            return 0
        if not (self._was_free or nudged):
            self._was_free = True
            return 0
        self._was_free = False
        self._trim()
        self._floor = self._rss()
        gone = max(0, rss - self._floor)
        self.trimmed += gone
        return gone


@functools.cache
def heap_trimmer() -> HeapTrimmer:
    """The process's :class:`HeapTrimmer` (its heap is one)."""
    return HeapTrimmer()


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
