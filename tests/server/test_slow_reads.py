"""Reads that wait for storage (the page cache misses): their replies, alone and together.

The storage is a backend of the test's own, given to the connection through its backend
factory (the seam a registry or a chunk store uses too): every read misses the cache and
waits until the test releases it. The connection runs over a transport of the test's own
that records what the transmitter does with it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from erofs_nbd_client.negotiate import negotiate
from erofs_nbdd.config import ServerConfig
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.server.transmit import FILE_REPLY_MIN
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.storage.file import FileBackend
from erofs_nbdd.transport.stream import StreamTransport

from ..conftest import random_image
from .helpers import check_read

if TYPE_CHECKING:
    from pathlib import Path

    from erofs_nbdd.ranges import FileRange
    from erofs_nbdd.storage.exports import Export

READERS = 16


class HeldBackend(FileBackend):
    """An image file whose every read misses the page cache and waits at the storage
    until the test lets it go."""

    def __init__(self, export: Export, storage: HeldStorage) -> None:
        super().__init__(export.image)
        self._storage = storage

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        return False

    def file_range(self, offset: int, length: int) -> FileRange | None:
        return None

    async def read(self, view: memoryview, offset: int) -> None:
        self._storage.held += 1
        await self._storage.gate.wait()
        view[:] = os.pread(self._fd, len(view), offset)


class HeldStorage:
    """The backend factory: one ``HeldBackend`` per connection."""

    def __init__(self) -> None:
        self.held = 0
        self.gate = trio.Event()

    def __call__(self, export: Export) -> HeldBackend:
        return HeldBackend(export, self)

    async def wait_held(self, count: int) -> None:
        with trio.fail_after(10):
            while self.held < count:
                await trio.sleep(0.001)


class RecordingTransport(StreamTransport):
    """Remembers the size of every write, and whether each receive was allowed to spin."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.writes: list[int] = []
        self.spins: list[bool] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await super().send_all(data)

    def receive_nowait(self, max_bytes: int, *, spin: bool = False) -> bytes | None:
        self.spins.append(spin)
        return super().receive_nowait(max_bytes, spin=spin)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    random_image(root, "img", 2 << 20)
    return root


def _connection(root: Path, storage: HeldStorage) -> tuple[Connection, trio.abc.Stream]:
    client, server = trio.testing.memory_stream_pair()
    config = ServerConfig(root=root)
    conn = Connection(
        RecordingTransport(server), "memory", config, ExportDirectory(root), backends=storage
    )
    return conn, client


async def test_slow_reads_that_finish_together_go_out_in_one_write(image_dir: Path) -> None:
    """Sixteen reads held at the storage and released at once: one write answers all of
    them (each its own write before, about 80 us apiece on these machines), and every
    reply is whole and goes to its own request. Large replies still go out alone."""
    storage = HeldStorage()
    conn, client = _connection(image_dir, storage)
    transport = conn.transport
    assert isinstance(transport, RecordingTransport)
    data = (image_dir / "img.erofs").read_bytes()
    sizes = [4096 * (1 + i % 3) for i in range(READERS - 1)] + [FILE_REPLY_MIN]
    offsets = [i * 40960 + 512 for i in range(READERS)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        _, session = await negotiate(client, "img")
        with trio.fail_after(10):
            async with trio.open_nursery() as readers:
                for offset, size in zip(offsets, sizes, strict=True):
                    readers.start_soon(check_read, session, data, offset, size)
                await storage.wait_held(READERS)
                transport.writes.clear()
                storage.gate.set()
        batched = sum(16 + size for size in sizes[:-1])  # simple replies: 16-byte headers
        # fifteen small replies in one write; the big one alone, not copied into a batch
        assert sorted(transport.writes) == sorted([batched, 16 + FILE_REPLY_MIN])
        await session.disconnect()
    assert conn.stats.ended == "disconnect"


async def test_no_busy_poll_while_a_read_waits_for_storage(image_dir: Path) -> None:
    """--busy-poll retries the socket while the client is about to send; while a read of
    this connection waits for storage (on a thread, say), the spin would only keep the
    GIL from that thread."""
    storage = HeldStorage()
    conn, client = _connection(image_dir, storage)
    transport = conn.transport
    assert isinstance(transport, RecordingTransport)
    data = (image_dir / "img.erofs").read_bytes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        _, session = await negotiate(client, "img")
        with trio.fail_after(10):
            async with trio.open_nursery() as readers:
                readers.start_soon(check_read, session, data, 4096, 4096)
                await storage.wait_held(1)
                await trio.testing.wait_all_tasks_blocked()
                # the server reads on for more requests: without spinning, the read held
                assert transport.spins[-1] is False
                assert True in transport.spins[:-1]  # before it, nothing in flight: it spun
                storage.gate.set()
        await session.disconnect()
