"""An image file as a backend: page cache first, io_uring (or threads) for what misses."""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from ..protocol import StateFlag
from ..ranges import FileRange, ImageUnreadable
from . import threads, uring
from .pagecache import PageCache

if TYPE_CHECKING:
    from .backend import Backend
    from .exports import Export

#: preadv's answers to RWF_NOWAIT on a file system that cannot honour it.
_NO_NOWAIT = (errno.EOPNOTSUPP, errno.EINVAL)

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    return next((kind for test, kind in _KINDS if test(mode)), f"of type {stat.S_IFMT(mode):#o}")


class NotRegularFile(OSError):
    """The path is a FIFO, a device, a socket or a directory, never an image. An OSError,
    so whoever handles a failed open (GO's error reply) handles this one too."""


def open_regular(path: os.PathLike[str] | str) -> tuple[int, os.stat_result]:
    """``path`` opened read-only (a blocking descriptor) and its fstat, if it is a regular
    file; NotRegularFile if not.

    A path checked with stat may be a FIFO by the time it is opened, and opening a FIFO for
    reading waits for a writer: O_NONBLOCK makes the open return at once whatever it finds,
    and the check is then made on the descriptor itself. O_NOCTTY keeps a terminal from
    becoming ours. O_NONBLOCK is cleared again before anything reads the image, as its
    meaning for regular files is left to each reader (io_uring consults it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"not a regular file but {file_kind(st.st_mode)}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class FileBackend:
    """An image file opened once per connection, so a file replaced while a client is
    attached keeps serving the bytes that client started with. A path that stopped being
    a regular file since the scan (a FIFO put in its place) raises NotRegularFile at once
    rather than hanging the open."""

    def __init__(
        self, path: os.PathLike[str] | str | int, *, io_uring: bool = True, size: int = -1
    ) -> None:
        """``path``, or (an int) a descriptor this backend then owns, of ``size`` bytes."""
        if isinstance(path, int):
            self._fd = path
            st_size = size
        else:
            self._fd, st = open_regular(path)
            st_size = st.st_size
        try:
            self._size = st_size
            self._cache = PageCache(self._fd, self._size)
        except BaseException:
            os.close(self._fd)
            raise
        self._nowait = hasattr(os, "RWF_NOWAIT")
        #: Whether read() goes through io_uring (else on threads).
        self._io_uring = io_uring and uring.refusal() is None

    def get_size(self) -> int:
        return self._size

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        # RWF_NOWAIT returns at once with what the page cache holds: a hit costs about a
        # microsecond, where a thread round-trip costs tens. A miss goes to read(), and so
        # do pages still being read in, which readahead leaves ahead of sequential readers:
        # through io_uring they cost no more than a miss; on threads, mincore tells whether
        # a plain pread finds them (waiting, at most, for the read in flight).
        length = len(view)
        try:
            if self._nowait:
                try:
                    if os.preadv(self._fd, [view], offset, os.RWF_NOWAIT) == length:
                        return True
                except BlockingIOError:
                    if self._io_uring:
                        return False
                except OSError as exc:
                    if exc.errno not in _NO_NOWAIT:
                        raise
                    self._nowait = False
            return self._cache.resident(offset, length) and (
                os.preadv(self._fd, [view], offset) == length
            )
        except OSError as exc:
            raise ImageUnreadable(f"reading the image at {offset} failed: {exc}") from exc

    def file_range(self, offset: int, length: int) -> FileRange | None:
        if self._cache.resident(offset, length):
            return FileRange(self._fd, offset, length)
        return None

    async def read(self, view: memoryview, offset: int) -> None:
        try:
            await uring.read_into(self._fd, view, offset, ring=self._io_uring)
        except OSError as exc:
            raise ImageUnreadable(f"reading the image at {offset} failed: {exc}") from exc

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        try:
            return await threads.run_sync(self._extents, offset, length)
        except OSError as exc:
            raise ImageUnreadable(f"finding extents at {offset} failed: {exc}") from exc

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
        if self._fd >= 0:
            self._cache.close()
            os.close(self._fd)
            self._fd = -1


class FileBackendFactory:
    """The server's default: each export's image file, or its blob in the registry cache."""

    def __init__(self, *, io_uring: bool = True) -> None:
        self.io_uring = io_uring

    def __call__(self, export: Export) -> Backend:
        if export.remote is not None:
            return export.remote.open(io_uring=self.io_uring)
        return FileBackend(export.image, io_uring=self.io_uring)
