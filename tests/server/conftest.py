from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

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


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Whatever a test's client does, the server logs no ERROR (an internal error is logged
    with its traceback at that level)."""
    yield
    errors = [
        r
        for r in caplog.get_records("call")
        if r.name.startswith("erofs_nbdd") and r.levelno >= logging.ERROR
    ]
    assert not errors, "\n".join(caplog.text.splitlines()[-40:])
