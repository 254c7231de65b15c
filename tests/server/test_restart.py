"""Planned restarts: a stopping server answers every request it is sent until its client
pauses, then closes between requests; a new server can hold the port meanwhile."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client.negotiate import RequestError, negotiate
from erofs_nbdd.config import Limits, ServerConfig
from erofs_nbdd.server import transmit
from erofs_nbdd.server.listener import Server

from ..conftest import free_port
from .helpers import read_all

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Connect


async def test_a_stopping_server_answers_until_its_client_pauses(
    images: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests sent after the shutdown, with gaps shorter than QUIET, are all answered;
    the connection then closes at the first pause, with nothing in flight."""
    server = Server(ServerConfig(root=images, listen=("127.0.0.1:0",)))
    data = (images / "demo.erofs").read_bytes()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.run)
        _, session = await negotiate(await connect(address), "demo")
        assert await session.pread(0, 4096) == data[:4096]
        server.shutdown()
        for i in range(20):  # two seconds of reads, each well inside the quiet period
            offset = i * 512 % (len(data) - 4096)
            assert await session.pread(offset, 4096) == data[offset : offset + 4096]
            await trio.sleep(transmit.QUIET / 4)
        with trio.fail_after(5):  # then it closes: EOF, not a reset
            assert await read_all(session.stream) == b""
    assert "ended=server shutdown" in caplog.text
    assert "grace period over" not in caplog.text


async def test_the_grace_period_bounds_a_client_that_never_pauses(
    images: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(
        ServerConfig(root=images, listen=("127.0.0.1:0",), limits=Limits(shutdown_grace=0.5))
    )
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.run)
        _, session = await negotiate(await connect(address), "demo")
        server.shutdown()
        with trio.fail_after(10), pytest.raises(RequestError, match="server closed"):  # noqa: PT012
            for _ in range(10_000):  # bounded; the server gives up after 0.5 s
                await session.pread(0, 4096)
                await trio.sleep(transmit.QUIET / 10)
    assert "server shutdown (grace period over)" in caplog.text


async def test_a_new_server_takes_the_port_while_the_old_one_finishes(
    images: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    """SO_REUSEPORT: the new server binds the old one's port (and says so); once the old
    one stops accepting, every new connection reaches the new one, while the old one's
    client is still served."""
    port = free_port()
    listen = (f"127.0.0.1:{port}",)
    old = Server(ServerConfig(root=images, listen=listen))
    new = Server(ServerConfig(root=images, listen=listen))
    data = (images / "demo.erofs").read_bytes()
    async with trio.open_nursery() as nursery:
        await nursery.start(old.run)
        _, attached = await negotiate(await connect(f"127.0.0.1:{port}"), "demo")
        await nursery.start(new.run)
        assert f"another server of this user listens on 127.0.0.1:{port}" in caplog.text
        old.shutdown()
        for _ in range(5):
            _, session = await negotiate(await connect(f"127.0.0.1:{port}"), "demo")
            assert await session.pread(0, 4096) == data[:4096]
        assert len(new.connections) == 5
        assert await attached.pread(4096, 4096) == data[4096:8192]  # the old one's client
        new.shutdown()
