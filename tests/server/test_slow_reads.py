"""Reads that wait for storage (the page cache misses): their replies, alone and together."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client.negotiate import negotiate
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.server.transmit import FILE_REPLY_MIN
from erofs_nbdd.storage.backends import FileBackend
from erofs_nbdd.transport.plain import FastSocketStream

from ..conftest import random_image
from .helpers import check_read, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Connect

READERS = 16


class HeldStorage:
    """Every read misses the page cache and waits at the storage until ``release``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.held = 0
        gate = self._gate = trio.Event()

        async def pread(backend: FileBackend, head: bytes, offset: int, length: int) -> bytearray:
            self.held += 1
            await gate.wait()
            return bytearray(head) + os.pread(backend._fd, length, offset)

        monkeypatch.setattr(FileBackend, "pread_nowait", lambda *_: None)
        monkeypatch.setattr(FileBackend, "file_nowait", lambda *_: None)
        monkeypatch.setattr(FileBackend, "pread", pread)

    def release(self) -> None:
        self._gate.set()

    async def wait_held(self, count: int) -> None:
        while self.held < count:
            await trio.sleep(0.001)


@pytest.fixture
def storage(monkeypatch: pytest.MonkeyPatch) -> HeldStorage:
    return HeldStorage(monkeypatch)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    random_image(root, "img", 2 << 20)
    return root


async def test_slow_reads_that_finish_together_go_out_in_one_write(
    nursery: trio.Nursery,
    image_dir: Path,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    storage: HeldStorage,
) -> None:
    """Sixteen reads held at the storage and released at once: one write answers all of
    them (each its own write before, about 80 us apiece on these machines), and every
    reply is whole and goes to its own request. Large replies still go out alone."""
    writes: list[int] = []
    real_send = Connection._send

    async def counted_send(self: Connection, data: bytes | bytearray, file: object = None) -> None:
        writes.append(len(data))
        await real_send(self, data, file)  # type: ignore[arg-type]

    monkeypatch.setattr(Connection, "_send", counted_send)

    data = (image_dir / "img.erofs").read_bytes()
    address = await start_server(nursery, image_dir)
    _, session = await negotiate(await connect(address), "img")
    sizes = [4096 * (1 + i % 3) for i in range(READERS - 1)] + [FILE_REPLY_MIN]
    offsets = [i * 40960 + 512 for i in range(READERS)]
    with trio.fail_after(10):
        async with trio.open_nursery() as readers:
            for offset, size in zip(offsets, sizes, strict=True):
                readers.start_soon(check_read, session, data, offset, size)
            await storage.wait_held(READERS)
            writes.clear()
            storage.release()
    batched = sum(16 + size for size in sizes[:-1])  # simple replies: a 16-byte header each
    # fifteen small replies in one write; the big one alone, not copied into a batch
    assert sorted(writes) == sorted([batched, 16 + FILE_REPLY_MIN])
    await session.disconnect()


async def test_no_busy_poll_while_a_read_is_on_a_thread(
    nursery: trio.Nursery,
    image_dir: Path,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    storage: HeldStorage,
) -> None:
    """--busy-poll retries the socket while the client is about to send; while a read of
    this connection is on a thread, the spin would only keep the GIL from that thread."""
    spins: list[float] = []
    real_receive = FastSocketStream.receive_nowait

    def recorded(self: FastSocketStream, max_bytes: int, spin: float = 0.0) -> bytes | None:
        spins.append(spin)
        return real_receive(self, max_bytes, spin)

    monkeypatch.setattr(FastSocketStream, "receive_nowait", recorded)
    data = (image_dir / "img.erofs").read_bytes()
    address = await start_server(nursery, image_dir, busy_poll_us=30)
    _, session = await negotiate(await connect(address), "img")
    with trio.fail_after(10):
        async with trio.open_nursery() as readers:
            readers.start_soon(check_read, session, data, 4096, 4096)
            await storage.wait_held(1)
            # the server reads on for more requests: without spinning, the read being held
            assert spins[-1] == 0.0
            assert 30e-6 in spins[:-1]  # before it, with nothing in flight, it spun
            storage.release()
    await session.disconnect()
