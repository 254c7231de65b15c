"""Whether a range of a file sits in the page cache, asked without reading it.

A reply sent straight from the page cache (``os.sendfile``) costs this process no copy, but
it would stall the event loop on the disk when the bytes are not cached. ``mincore(2)`` on a
mapping of the file answers first, with one syscall and without touching the pages.

Linux shows a file's page cache only to a process that owns the file or may write to it
(the side-channel fix of 5.2); to any other process mincore reports every page resident,
which would send uncached reads from the event loop. So for such files ``PageCache`` never
asks and answers "not resident", and the caller reads in a thread as before.
"""

from __future__ import annotations

import ctypes
import mmap
import os

PAGE = mmap.PAGESIZE
#: The low bit of each mincore byte says "resident"; the other bits are reserved.
_LOW_BIT = bytes(i & 1 for i in range(256))


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's included
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.mmap.restype = ctypes.c_void_p
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.munmap.restype = ctypes.c_int
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        lib.mincore.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return lib


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def can_see(file: int | str | os.PathLike[str]) -> bool:
    """Whether mincore will report this file's (a descriptor's or a path's) page cache to
    us: we own it or may write it (see the module doc)."""
    if os.stat(file).st_uid == os.geteuid():
        return True
    target = f"/proc/self/fd/{file}" if isinstance(file, int) else file
    effective = os.access in os.supports_effective_ids  # the kernel checks the fsuid
    return os.access(target, os.W_OK, effective_ids=effective)


class PageCache:
    """Residency of one open file's pages, through a read-only mapping that is never read
    (so a file truncated later cannot fault us: mincore reports its lost pages as absent)."""

    def __init__(self, fd: int, size: int) -> None:
        self._addr: int | None = None
        self._size = size
        self._vec = ctypes.create_string_buffer(0)
        if _LIBC is None or size <= 0 or not can_see(fd):
            return
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            return
        self._addr = addr

    @property
    def active(self) -> bool:
        """False where residency cannot be known: every range then counts as absent."""
        return self._addr is not None

    def resident(self, offset: int, length: int) -> bool:
        """Whether every page of ``[offset, offset + length)`` is in the page cache now."""
        if self._addr is None or length <= 0 or offset < 0 or offset + length > self._size:
            return False
        first = offset - offset % PAGE
        pages = (offset + length - first + PAGE - 1) // PAGE
        if len(self._vec) < pages:
            self._vec = ctypes.create_string_buffer(pages)
        if _LIBC is None or _LIBC.mincore(self._addr + first, pages * PAGE, self._vec) != 0:
            return False
        return 0 not in self._vec.raw[:pages].translate(_LOW_BIT)

    def close(self) -> None:
        if self._addr is not None and _LIBC is not None:
            _LIBC.munmap(self._addr, self._size)
        self._addr = None
