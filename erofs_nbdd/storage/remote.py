"""A registry blob as a backend: the cached file's fast path for chunks on disk, a fetch
(shared with every other reader of the chunk) for the rest."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from ..ranges import FileRange, ImageUnreadable
from .file import FileBackend

if TYPE_CHECKING:
    from .blobcache import Blob, BlobCache


class RemoteBackend:
    def __init__(self, cache: BlobCache, blob: Blob, *, io_uring: bool = True) -> None:
        """Takes over the caller's hold on ``blob``."""
        self._cache = cache
        self._blob = blob
        self._file = FileBackend(os.dup(blob.fd), io_uring=io_uring, size=blob.size)
        self._closed = False
        if blob.complete:
            self._direct()

    def _direct(self) -> None:
        """A verified blob is a plain file from now on (it can no longer turn out bad): its
        reads go straight to the file backend, without a check of ours per request (which
        cost random 4 KiB reads at QD32 13 % against a file export)."""
        self.read_nowait = self._file.read_nowait  # type: ignore[method-assign]
        self.file_range = self._file.file_range  # type: ignore[method-assign]
        self.read = self._file.read  # type: ignore[method-assign]

    def get_size(self) -> int:
        return self._blob.size

    def _check(self) -> None:
        if self._blob.bad is not None:
            raise ImageUnreadable(self._blob.bad)

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        self._check()
        if self._blob.complete:
            self._direct()
        return self._blob.has(offset, len(view)) and self._file.read_nowait(view, offset)

    def file_range(self, offset: int, length: int) -> FileRange | None:
        if self._blob.bad is None and self._blob.has(offset, length):
            return self._file.file_range(offset, length)
        return None

    async def read(self, view: memoryview, offset: int) -> None:
        await self._blob.ensure(offset, len(view))
        await self._file.read(view, offset)

    async def cache(self, offset: int, length: int) -> None:
        self._blob.prefetch(offset, length)
        await trio.lowlevel.checkpoint()

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        # a partial file's holes are bytes not fetched yet, not holes of the image
        await trio.lowlevel.checkpoint()
        return [(min(length, self._blob.size - offset), 0)]

    def close(self) -> None:
        if not self._closed:  # once: a second release would drop another reader's hold
            self._closed = True
            self._file.close()
            self._cache.release(self._blob)
