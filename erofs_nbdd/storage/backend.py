"""Where export bytes come from, as small as the server needs it, so a registry blob or a
chunk store can stand behind it as well as a file (DESIGN.md section 6).

A backend reads into buffers the server made (it never sees NBD framing: the transmitter
writes the reply headers), says without waiting whether it can, and hands out a range of
an open file when the bytes can go out by ``sendfile``. Every failure to read is
``ImageUnreadable``. Verbs follow nbdkit's plugin API where they overlap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..ranges import FileRange
    from .exports import Export


class Backend(Protocol):
    def get_size(self) -> int: ...

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        """Fill ``view`` with the bytes at ``offset`` if that needs no waiting (they are in
        the page cache); False if it would."""
        ...

    async def read(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the bytes at ``offset``, waiting for storage as needed."""
        ...

    def file_range(self, offset: int, length: int) -> FileRange | None:
        """These bytes as a range of an open file, if ``sendfile`` can send them without
        blocking (all in the page cache); else None."""
        ...

    async def cache(self, offset: int, length: int) -> None:
        """Start bringing these bytes in (NBD_CMD_CACHE); no need to wait for them."""
        ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` extents (length, StateFlag) covering at least the first byte."""
        ...

    def close(self) -> None: ...


class BackendFactory(Protocol):
    """Opens the backend for a chosen export: once per connection that selects it. An
    ``OSError`` means the export cannot be served now (the client is told so)."""

    def __call__(self, export: Export) -> Backend: ...
