"""Who closes what: the connection owns the backend from the moment GO or EXPORT_NAME
selects it, and the TLS transport it wraps; the server owns the socket. Each is closed
however the connection ends: a reply that cannot be sent, a cancelled handshake, a shutdown.

The backends come from a factory of the test's own (the server's seam for other storage)
that counts those still open; a lockstep stream holds the server's reply to GO unsent for as
long as the test likes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from erofs_nbd_client.negotiate import negotiate
from erofs_nbdd.config import Limits, ServerConfig
from erofs_nbdd.protocol import NEED_DATA, ClientHandshake, Cmd, wire
from erofs_nbdd.server import Server
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.storage.file import FileBackend
from erofs_nbdd.transport.stream import StreamTransport

if TYPE_CHECKING:
    from pathlib import Path

    from erofs_nbdd.storage.exports import Export


class Counted(FileBackend):
    def __init__(self, export: Export, opened: set[Counted]) -> None:
        super().__init__(export.image)
        self._opened = opened
        opened.add(self)

    def close(self) -> None:
        self._opened.discard(self)
        super().close()


class CountingFactory:
    def __init__(self) -> None:
        self.opened: set[Counted] = set()
        self.made = 0

    def __call__(self, export: Export) -> Counted:
        self.made += 1
        return Counted(export, self.opened)


async def _select(stream: trio.abc.Stream, option: str) -> None:
    """Read the greeting, send flags and GO (or EXPORT_NAME) for demo; read nothing more."""
    hs = ClientHandshake()
    with trio.fail_after(5):
        while hs.next_event() is NEED_DATA:
            hs.receive_data(bytes(await stream.receive_some()))
    flags = hs.send_client_flags()
    request = hs.opt_go("demo") if option == "go" else hs.opt_export_name("demo")
    await stream.send_all(flags + request)


@pytest.mark.parametrize("option", ["go", "export_name"])
@pytest.mark.parametrize("end", ["handshake timeout", "shutdown", "client gone"])
async def test_the_backend_is_closed_when_the_reply_cannot_go_out(
    images: Path, option: str, end: str
) -> None:
    factory = CountingFactory()
    client, server = trio.testing.lockstep_stream_pair()  # a send waits for its reader
    config = ServerConfig(root=images, limits=Limits(handshake_timeout=0.5))
    conn = Connection(
        StreamTransport(server), "memory", config, ExportDirectory(images), backends=factory
    )
    raised: list[Exception] = []

    async def run() -> None:
        try:
            await conn.run()
        except Exception as exc:  # what the server's handler would log as the ending
            raised.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await _select(client, option)
            while not factory.made:  # the reply to GO waits for a reader that never comes
                await trio.sleep(0.01)
            assert factory.opened
            if end == "shutdown":
                conn.stop()
            elif end == "client gone":
                await client.aclose()
            # (the handshake timeout ends it on its own)
    expected = {"handshake timeout": trio.TooSlowError, "client gone": trio.BrokenResourceError}
    assert [type(e) for e in raised] == ([expected[end]] if end in expected else [])
    assert factory.made == 1
    assert not factory.opened


async def test_shutdown_with_connections_mid_handshake_closes_everything(images: Path) -> None:
    """A server with connections at every step of the handshake (connected only, flags
    sent, GO sent and its reply unread) shuts down: the process holds the descriptors it
    held before, and every backend was closed."""
    factory = CountingFactory()
    config = ServerConfig(root=images, listen=("127.0.0.1:0",))
    server = Server(config, backends=factory)
    before = len(os.listdir("/proc/self/fd"))
    streams: list[trio.SocketStream] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            (address,) = await nursery.start(server.run)
            host, _, port = address.rpartition(":")
            for i in range(30):
                stream = await trio.open_tcp_stream(host, int(port))
                streams.append(stream)
                stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
                if i % 3:
                    await _select(stream, "go" if i % 3 == 2 else "export_name")
            while factory.made < 20 or len(server.connections) < 30:
                await trio.sleep(0.01)
            server.shutdown()
    for stream in streams:
        await trio.aclose_forcefully(stream)
    assert not factory.opened
    assert not server.connections
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_disconnect_that_came_with_the_shutdown_is_still_read(
    images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's NBD_CMD_DISC already in the socket when the server stops is read, not
    cut off: the connection ends as the client ended it."""
    config = ServerConfig(root=images, listen=("127.0.0.1:0",))
    server = Server(config)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            (address,) = await nursery.start(server.run)
            host, _, port = address.rpartition(":")
            stream = await trio.open_tcp_stream(host, int(port))
            await negotiate(stream, "demo")
            await trio.testing.wait_all_tasks_blocked()  # the server waits for a request
            # the DISC, and the shutdown before the server runs again
            os.write(stream.socket.fileno(), wire.request(Cmd.DISC, 0, 0, 0))
            server.shutdown()
        await trio.aclose_forcefully(stream)
    assert "ended=disconnect" in caplog.text, caplog.text
