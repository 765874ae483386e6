"""set_malloc: glibc malloc parameters through mallopt(3)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from nydus.libc import libc

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
