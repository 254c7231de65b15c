"""How replies are cut for encryption in this process: whole TLS records per slice, and
files read a slice at a time into one buffer."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..ranges import ImageUnreadable
from .records import RECORD

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..ranges import FileRange

SEND_SLICE = 16 * RECORD


def slices(total: int) -> list[tuple[int, int]]:
    """Where ``total`` bytes are cut to be encrypted and sent: SEND_SLICE each, a whole
    number of full records, the last slice taking the rest as well. So a 256 KiB reply and
    its 16-byte header go in one write, not a second one carrying a 16-byte record, and
    1 MiB plus its header makes 65 records, the fewest. (Slices evened out to 262,148 bytes
    made 68: each ended in a 4-byte record that the client reads and decrypts on its own.)
    One slice, empty, for nothing."""
    count = max(1, total // SEND_SLICE)
    return [(i * SEND_SLICE, (i + 1) * SEND_SLICE) for i in range(count - 1)] + [
        ((count - 1) * SEND_SLICE, total)
    ]


def data_slices(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """``data`` as views cut by ``slices``."""
    view = memoryview(data)
    for start, end in slices(len(view)):
        yield view[start:end]


def file_slices(head: bytes | bytearray, file: FileRange) -> Iterator[memoryview]:
    """``head`` and the bytes of ``file``, cut by ``slices`` and read one slice at a time
    into one buffer, each slice a view of it valid until the next: the buffer stays in the
    CPU cache, and a reply-sized one is never allocated and zeroed. It lives only as long
    as the reply: kept per connection, among short-lived replies in the heap, it fragmented
    it (a soak's RSS grew 50 % faster). ``ImageUnreadable`` if the file ends early or fails."""
    cuts = slices(len(head) + file.length)
    first, last = cuts[0], cuts[-1]
    assert len(head) <= first[1] - first[0], "a reply header fits in its first slice"
    view = memoryview(bytearray(last[1] - last[0]))  # the last slice is the largest
    view[: len(head)] = head
    filled = len(head)
    offset = file.offset
    for start, end in cuts:
        offset = read_file(file.fd, offset, [view[filled : end - start]])
        yield view[: end - start]
        filled = 0


def read_file(fd: int, offset: int, views: list[memoryview]) -> int:
    """Fill ``views`` from file ``fd`` at ``offset`` (``preadv``, again after a short read);
    returns the offset after them. ``ImageUnreadable`` if the file ends first or fails."""
    while views:
        try:
            got = os.preadv(fd, views, offset)
        except OSError as exc:
            raise ImageUnreadable(f"reading the image at {offset} failed: {exc}") from exc
        if not got:
            left = sum(len(v) for v in views)
            raise ImageUnreadable(f"the image ended at {offset}, {left} bytes early")
        offset += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views = views[1:]
        if views and got:
            views = [views[0][got:], *views[1:]]
    return offset
