"""glibc malloc settings for a server that moves large buffers.

Every reply over 128 KiB is a fresh buffer; by default glibc maps each with mmap and unmaps
it on free, so every 1 MiB read costs 256 page faults and a munmap, and returning heap
memory to the system on each free causes the same churn. Raising both thresholds keeps those
buffers in the heap, reused; the server's memory is bounded by its byte budgets anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Apply the thresholds; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
