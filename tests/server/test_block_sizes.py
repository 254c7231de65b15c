"""Block sizes nobody agreed to are not enforced: a client that connected with EXPORT_NAME,
or with a GO that did not ask for NBD_INFO_BLOCK_SIZE, reads any byte range (doc/proto.md
"Size constraints": the server SHOULD then support a minimum block size of 1), on every
path a read takes; a client whose GO asked was told 512 and is held to it."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pytest

from erofs_nbd_client.negotiate import Handshake, RequestError, Session, negotiate
from erofs_nbdd.config import ServerConfig
from erofs_nbdd.protocol import BASE_ALLOCATION, Info
from erofs_nbdd.server.listener import serve
from erofs_nbdd.server.transmit import FILE_REPLY_MIN, INLINE_MAX
from erofs_nbdd.storage import uring
from erofs_nbdd.storage.file import FileBackend

from ..conftest import random_image

if TYPE_CHECKING:
    from pathlib import Path

    import trio

    from erofs_nbdd.ranges import FileRange
    from erofs_nbdd.storage.exports import Export

    from .conftest import Connect


class RecordingBackend(FileBackend):
    """The image file, recording which of its paths answered each read; ``cold`` makes
    every read miss the page cache, so it waits for storage (io_uring or a thread)."""

    def __init__(self, export: Export, factory: Recorder) -> None:
        super().__init__(export.image, io_uring=factory.io_uring)
        self._factory = factory

    def read_nowait(self, view: memoryview, offset: int) -> bool:
        if self._factory.cold or not super().read_nowait(view, offset):
            return False
        self._factory.paths.append("inline")
        return True

    def file_range(self, offset: int, length: int) -> FileRange | None:
        found = None if self._factory.cold else super().file_range(offset, length)
        if found is not None:
            self._factory.paths.append("sendfile")
        return found

    async def read(self, view: memoryview, offset: int) -> None:
        self._factory.paths.append("io_uring" if self._io_uring else "thread")
        await super().read(view, offset)


class Recorder:
    """The backend factory: one ``RecordingBackend`` per connection."""

    def __init__(self, io_uring: bool) -> None:
        self.io_uring = io_uring
        self.cold = False
        self.paths: list[str] = []

    def __call__(self, export: Export) -> RecordingBackend:
        return RecordingBackend(export, self)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return random_image(tmp_path / "images", "img", 3 << 20)


async def _session(stream: trio.SocketStream, how: str, *, structured: bool) -> Session:
    """A session with the block sizes ``how`` agrees on: none, or those a GO asked for."""
    hs = Handshake(stream)
    await hs.start()
    if structured:
        await hs.structured_replies()
        await hs.set_meta_context("img", (BASE_ALLOCATION,))
    if how == "EXPORT_NAME":
        await hs.export_name("img")
    else:
        infos = (Info.BLOCK_SIZE,) if how == "GO with block sizes" else (Info.NAME,)
        await hs.info("img", go=True, infos=infos)
    assert hs.done
    want = (512, 4096, 32 << 20) if how == "GO with block sizes" else None
    assert hs.negotiated.block_size == want
    return Session(hs.stream, hs.negotiated, hs.machine.trailing_data)


UNAGREED = ["EXPORT_NAME", "GO without block sizes"]


@pytest.mark.parametrize("io_uring", [True, False], ids=["io_uring on", "io_uring off"])
@pytest.mark.parametrize("how", UNAGREED)
async def test_any_byte_range_is_served_on_every_read_path(
    nursery: trio.Nursery, image: Path, connect: Connect, how: str, io_uring: bool
) -> None:
    recorder = Recorder(io_uring)
    config = ServerConfig(root=image.parent, listen=("127.0.0.1:0",), io_uring=io_uring)
    (address,) = await nursery.start(functools.partial(serve, config, backends=recorder))
    session = await _session(await connect(address), how, structured=False)
    data = image.read_bytes()
    slow = "io_uring" if io_uring and uring.refusal() is None else "thread"
    cases = [
        (False, 1, 513, "inline"),
        (False, len(data) - 1, 1, "inline"),  # the last byte alone
        (False, 4097, FILE_REPLY_MIN + 3, "sendfile"),
        (True, 1, 513, slow),
        (True, 12345, INLINE_MAX + 7, slow),
        (True, len(data) - 3, 3, slow),
    ]
    for cold, offset, length, path in cases:
        recorder.cold = cold
        recorder.paths.clear()
        assert await session.pread(offset, length) == data[offset : offset + length]
        assert recorder.paths == [path], (offset, length)
    await session.disconnect()


@pytest.mark.parametrize("how", UNAGREED)
async def test_block_status_at_any_offset(
    nursery: trio.Nursery, image: Path, connect: Connect, how: str
) -> None:
    config = ServerConfig(root=image.parent, listen=("127.0.0.1:0",))
    (address,) = await nursery.start(serve, config)
    session = await _session(await connect(address), how, structured=True)
    size = image.stat().st_size
    for offset, length in [(4097, 100), (1, 1), (size - 7, 7)]:
        extents = await session.block_status(offset, length)
        assert sum(n for n, _ in extents[1]) == length, (offset, extents)
    await session.disconnect()


async def test_a_go_that_asked_is_held_to_the_512_bytes_it_was_told(
    nursery: trio.Nursery, image: Path, connect: Connect
) -> None:
    config = ServerConfig(root=image.parent, listen=("127.0.0.1:0",))
    (address,) = await nursery.start(serve, config)
    session = await _session(await connect(address), "GO with block sizes", structured=True)
    data = image.read_bytes()
    for offset, length in [(1, 512), (0, 513), (512, 1)]:
        with pytest.raises(RequestError, match="NBD error 22: not aligned"):
            await session.pread(offset, length)
        with pytest.raises(RequestError, match="NBD error 22: not aligned"):
            await session.block_status(offset, length)
    assert await session.pread(512, 1024) == data[512:1536]  # and the connection goes on
    await session.disconnect()


async def test_our_own_client_asks_for_block_sizes_and_keeps_to_them(
    nursery: trio.Nursery, image: Path, connect: Connect
) -> None:
    """``negotiate`` (what erofs-nbd-attach uses) asks in its GO, so it is told 512."""
    config = ServerConfig(root=image.parent, listen=("127.0.0.1:0",))
    (address,) = await nursery.start(serve, config)
    details, session = await negotiate(await connect(address), "img")
    assert details.block_size == (512, 4096, 32 << 20) == session.machine.negotiated.block_size
    with pytest.raises(RequestError, match="NBD error 22"):
        await session.pread(1, 513)
    await session.disconnect()
