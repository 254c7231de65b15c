"""One Connection driven by our client over in-memory streams: no sockets involved."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from erofs_nbd_client.negotiate import Handshake, RequestError, negotiate
from erofs_nbdd.config import ServerConfig
from erofs_nbdd.protocol import Cmd, Errno
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.transport.stream import StreamTransport

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize("structured", [False, True])
async def test_connection_over_memory_streams(images: Path, structured: bool) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    config = ServerConfig(root=images)
    conn = Connection(StreamTransport(server_stream), "memory", config, ExportDirectory(images))
    data = (images / "demo.erofs").read_bytes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        hs = Handshake(client_stream)
        await hs.start()
        assert sorted(e.name for e in await hs.list_exports()) == ["alias", "demo", "team/app-v2"]
        if structured:
            await hs.structured_replies()
        details = await hs.go("demo")
        assert details.size == len(data)
        from erofs_nbd_client.negotiate import Session

        session = Session(client_stream, hs.negotiated, hs.machine.trailing_data)
        assert await session.pread(8192, 65536) == data[8192 : 8192 + 65536]
        with pytest.raises(RequestError) as excinfo:
            await session.simple(Cmd.WRITE_ZEROES, 0, 512)
        assert excinfo.value.errno == Errno.EPERM
        await session.disconnect()
    assert conn.stats.ended == "disconnect"
    assert conn.stats.requests == 2
    assert conn.stats.bytes_read == 65536


async def test_negotiate_helper_over_memory_streams(images: Path) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    conn = Connection(
        StreamTransport(server_stream), "memory", ServerConfig(root=images), ExportDirectory(images)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        details, session = await negotiate(client_stream, "team/app-v2")
        assert details.block_size == (512, 4096, 32 << 20)
        await session.disconnect()
