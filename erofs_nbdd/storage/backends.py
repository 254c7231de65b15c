"""Where export bytes come from. ``Backend`` is small on purpose: a chunk store or an object
store must fit behind it later (DESIGN.md section 6); verbs follow nbdkit's plugin API."""

from __future__ import annotations

import os
from typing import Protocol

from ..protocol import StateFlag
from . import threads, uring
from .pagecache import PageCache


class Backend(Protocol):
    def get_size(self) -> int: ...

    def block_size(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum) as NBD_INFO_BLOCK_SIZE advertises them."""
        ...

    def pread_nowait(self, head: bytes, offset: int, length: int) -> bytearray | None:
        """``head`` followed by the bytes, if they can be had without blocking (page
        cache), else None."""
        ...

    def file_nowait(self, offset: int, length: int) -> int | None:
        """A file descriptor whose bytes at ``offset`` are the export's, if they are all in
        the page cache, so ``os.sendfile`` can send them without blocking; else None."""
        ...

    async def pread(self, head: bytes, offset: int, length: int) -> bytearray:
        """``head`` followed by the bytes: one buffer, so a reply is built without a copy."""
        ...

    async def cache(self, offset: int, length: int) -> None: ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents (length, StateFlag) covering at least the first byte."""
        ...

    def close(self) -> None: ...


class FileBackend:
    """An image file opened once per connection, so a file replaced while a client is
    attached keeps serving the bytes that client started with."""

    def __init__(
        self,
        path: os.PathLike[str] | str,
        *,
        preferred_block: int,
        max_payload: int,
        io_uring: bool = True,
    ) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        self._block = (512, preferred_block, max_payload)
        self._nowait = hasattr(os, "RWF_NOWAIT")
        self._cache = PageCache(self._fd, self._size)
        #: Whether pread() goes through io_uring (else on threads).
        self._io_uring = io_uring and uring.refusal() is None

    def get_size(self) -> int:
        return self._size

    def block_size(self) -> tuple[int, int, int]:
        return self._block

    def pread_nowait(self, head: bytes, offset: int, length: int) -> bytearray | None:
        # RWF_NOWAIT returns at once with what the page cache holds: a hit costs about a
        # microsecond, where a thread round-trip costs tens. A miss goes to pread(), and so
        # do pages still being read in, which readahead leaves ahead of sequential readers:
        # through io_uring they cost no more than a miss; on threads, mincore tells whether
        # a plain pread finds them (waiting, at most, for the read in flight).
        buf, view = _reply(head, length)
        if self._nowait:
            try:
                if os.preadv(self._fd, [view], offset, os.RWF_NOWAIT) == length:
                    return buf
            except BlockingIOError:
                if self._io_uring:
                    return None
            except OSError as exc:
                if exc.errno not in (95, 22):  # EOPNOTSUPP / EINVAL: this file system cannot
                    raise
                self._nowait = False
        if self._cache.resident(offset, length) and os.preadv(self._fd, [view], offset) == length:
            return buf
        return None

    def file_nowait(self, offset: int, length: int) -> int | None:
        return self._fd if self._cache.resident(offset, length) else None

    async def pread(self, head: bytes, offset: int, length: int) -> bytearray:
        # The buffer is made here, by the event loop's thread: made by a thread of the
        # pool, it came from that thread's malloc arena, and the arenas of 32 threads each
        # kept freed replies (after cold 1 MiB, 128 KiB and 4 KiB reads: 53 MiB RSS, not 37).
        buf, view = _reply(head, length)
        await uring.read_into(self._fd, view, offset, ring=self._io_uring)
        return buf

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        return await threads.run_sync(self._extents, offset, length)

    def _extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Data and holes from SEEK_DATA/SEEK_HOLE; a hole reads as zeros."""
        end = offset + length
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < end and len(out) < 1024:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                data = end
            if data > pos:
                out.append((min(data, end) - pos, StateFlag.HOLE | StateFlag.ZERO))
                pos = min(data, end)
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            out.append((min(hole, end) - pos, 0))
            pos = min(hole, end)
        return out

    def close(self) -> None:
        self._cache.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _reply(head: bytes, length: int) -> tuple[bytearray, memoryview]:
    """A reply buffer: ``head``, then room for ``length`` bytes, and a view of that room."""
    buf = bytearray(len(head) + length)
    buf[: len(head)] = head
    return buf, memoryview(buf)[len(head) :]
