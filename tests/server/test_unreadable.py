"""An image that cannot be read, wherever the server finds out: a read answered from the
page cache, one that waits for storage, and BLOCK_STATUS all get ``NBD_EIO`` with the
reason, and the connection goes on. The failing storage is a backend of the test's own,
given through the server's backend factory."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from erofs_nbd_client.negotiate import RequestError, negotiate
from erofs_nbdd.config import ServerConfig
from erofs_nbdd.protocol import BASE_ALLOCATION, Errno
from erofs_nbdd.ranges import ImageUnreadable
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.storage.file import FileBackend
from erofs_nbdd.transport.stream import StreamTransport

if TYPE_CHECKING:
    from pathlib import Path

    from erofs_nbdd.storage.exports import Export

BAD = 8192  # the block at this offset cannot be read


class Failing(FileBackend):
    """Every read that touches BAD fails, as a disk's bad sector would; ``cached`` says
    whether the page cache claims the bytes (the inline path) or not (the waiting one)."""

    def __init__(self, export: Export, cached: bool) -> None:
        super().__init__(export.image)
        self._cached = cached

    def _check(self, view: memoryview, offset: int) -> None:
        if offset <= BAD < offset + len(view):
            raise ImageUnreadable(f"reading the image at {offset} failed: bad sector")

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        if not self._cached:
            return False
        self._check(view, offset)
        return super().read_nowait(view, offset)

    async def read(self, view: memoryview, offset: int) -> None:
        self._check(view, offset)
        await super().read(view, offset)

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        raise ImageUnreadable(f"finding extents at {offset} failed: bad sector")


@pytest.mark.parametrize("cached", [True, False], ids=["inline", "waiting"])
async def test_unreadable_bytes_get_eio_and_the_connection_goes_on(
    images: Path, cached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    client, server = trio.testing.memory_stream_pair()
    conn = Connection(
        StreamTransport(server),
        "memory",
        ServerConfig(root=images),
        ExportDirectory(images),
        backends=lambda export: Failing(export, cached),
    )
    data = (images / "demo.erofs").read_bytes()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            _, session = await negotiate(
                client, "demo", structured=True, meta_contexts=(BASE_ALLOCATION,)
            )
            with pytest.raises(RequestError) as failed:
                await session.pread(BAD, 4096)
            assert failed.value.errno == Errno.EIO
            assert "bad sector" in str(failed.value)
            with pytest.raises(RequestError) as failed:
                await session.block_status(0, 4096)
            assert failed.value.errno == Errno.EIO
            assert await session.pread(0, 4096) == data[:4096]  # the connection goes on
            await session.disconnect()
    assert conn.stats.errors == 2
    assert conn.stats.ended == "disconnect"
    assert "READ at 8192 failed: reading the image at 8192 failed: bad sector" in caplog.text
