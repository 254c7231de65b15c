"""glibc malloc settings for a server that moves large buffers.

Every reply over 128 KiB is a fresh buffer; by default glibc maps each with mmap and unmaps
it on free, so every 1 MiB read costs 256 page faults and a munmap, and returning heap
memory to the system on each free causes the same churn. Raising both thresholds keeps those
buffers in the heap, reused; the server's memory is bounded by its byte budgets anyway.

The price: freed buffers stay resident. Buffers still in use pin the heap's top, so after a
burst (or an attack) the resident size would stay where the burst left it. Once the
buffers are all back, ``release_free_memory`` returns their pages (``malloc_trim``, which
frees chunks anywhere in the heap, not just at its top).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (its functions are then absent)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Apply the thresholds; False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )


def release_free_memory() -> bool:
    """Give the pages of freed heap memory back to the system; False where the C library
    is not glibc. Costs about a millisecond per few hundred MiB of heap."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
