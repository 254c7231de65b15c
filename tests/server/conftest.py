from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio

from erofs_nbd_client.negotiate import Handshake

Connect = Callable[[str], Awaitable[trio.SocketStream]]
Shake = Callable[[str], Awaitable[Handshake]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Open client streams to ``HOST:PORT``; all are closed when the test ends."""
    streams: list[trio.SocketStream] = []

    async def open_one(address: str) -> trio.SocketStream:
        host, _, port = address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        streams.append(stream)
        return stream

    yield open_one
    for stream in streams:
        await trio.aclose_forcefully(stream)


@pytest.fixture
def handshake(connect: Connect) -> Shake:
    """A started handshake (greeting read, flags sent) on a new connection."""

    async def start(address: str) -> Handshake:
        hs = Handshake(await connect(address))
        await hs.start()
        return hs

    return start
