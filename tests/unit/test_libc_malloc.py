"""set_malloc: glibc malloc parameters through mallopt(3)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from nydus.libc import HeapTrimmer, libc

# In a fresh process: free a 16 MiB block (glibc then raises its mmap threshold to 16 MiB),
# then count the mmaps an 8 MiB block takes (mallinfo2's hblks).
PROBE = """
import ctypes, sys
from nydus.libc import libc, set_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

lib = libc()
lib.mallinfo2.restype = Mallinfo2
lib.malloc.restype, lib.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
lib.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "set":
    assert set_malloc(mmap_threshold=128 << 10, trim_threshold=1 << 20, arena_max=2)
lib.free(lib.malloc(16 << 20))
before = lib.mallinfo2().hblks
p = lib.malloc(8 << 20)
print(lib.mallinfo2().hblks - before)
lib.free(p)
"""


def _mmaps(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        env.pop(k, None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_fixed_mmap_threshold_keeps_large_blocks_mapped() -> None:
    """By default, once a large block is freed glibc raises its mmap threshold, so later
    large buffers come from the heap (and stay resident when freed); with set_malloc's fixed
    threshold they are mmaps again, returned to the system on free."""
    if not hasattr(libc(), "mallinfo2"):
        pytest.skip("not glibc 2.33+")
    assert ctypes.sizeof(ctypes.c_size_t) == 8
    assert _mmaps("default") == 0
    assert _mmaps("set") == 1


def test_heap_trimmer_trims_free_memory_that_stays_free() -> None:
    free: list[int | None] = [0]
    rss, trims = [0], []

    def trim() -> bool:
        trims.append(rss[0])
        rss[0] -= free[0] or 0
        return True

    t = HeapTrimmer(period=10, min_free=32, free=lambda: free[0], rss=lambda: rss[0], trim=trim)
    free[0], rss[0] = 100, 200
    assert t.tick(0) == 0  # free once: maybe a burst between two reads
    assert t.tick(5) == 0  # not a look (within the period)
    free[0] = 10
    assert t.tick(10) == 0 and trims == []  # reused: the working set
    free[0] = 100
    assert t.tick(20) == 0
    assert t.tick(30) == 100 and trims == [200] and t.trimmed == 100
    # a trimmed heap still counts its pages as free: no trim until the process grows again
    assert t.tick(40) == t.tick(50) == t.tick(60) == 0 and len(trims) == 1
    rss[0] = 150
    assert t.tick(70) == 0 and t.tick(80) == 100 and len(trims) == 2
    free[0] = None  # not glibc
    assert t.tick(90) == t.tick(100) == 0
    # a nudge: the next tick looks at once, and one look is enough
    free[0], rss[0] = 100, 300
    t.nudge()
    assert t.tick(101) == 100 and len(trims) == 3
    t.nudge()  # nothing grew since, but a nudge says memory was freed: trimmed
    assert t.tick(102) == 100 and len(trims) == 4
    free[0] = 10
    t.nudge()  # too little free: no trim
    assert t.tick(103) == 0 and len(trims) == 4


# A freed half of 192 MiB of 1 MiB buffers under nydusd's malloc settings stays resident
# until a HeapTrimmer's second look.
TRIM_PROBE = """
from nydus.libc import HeapTrimmer, resident, set_malloc
assert set_malloc(mmap_threshold=64 << 20, trim_threshold=256 << 20)
bufs = [bytearray(b"x" * (1 << 20)) for _ in range(192)]
del bufs[::2]
before = resident()
t = HeapTrimmer()
print(before, t.tick(0), t.tick(10), resident())
"""


def test_heap_trimmer_hands_back_what_a_daemon_freed() -> None:
    if not hasattr(libc(), "mallinfo2"):
        pytest.skip("not glibc 2.33+")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE], env=env, capture_output=True, text=True, check=True
    )
    before, first, second, after = (int(x) for x in out.stdout.split())
    assert first == 0
    assert second >= 80 << 20, out.stdout
    assert after <= before - (80 << 20)
