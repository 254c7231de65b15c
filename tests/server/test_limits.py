"""Misbehaving clients are disconnected and logged; everyone else keeps being served."""

from __future__ import annotations

import os
import resource
import socket
import struct
from typing import TYPE_CHECKING

import pytest
import trio
import trio.lowlevel

from erofs_nbd_client.negotiate import Handshake, NegotiationError, negotiate
from erofs_nbdd.config import Limits, ServerConfig
from erofs_nbdd.protocol import Cmd, Opt, wire
from erofs_nbdd.protocol.constants import IHAVEOPT
from erofs_nbdd.server.listener import Server

from .helpers import read_all, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Connect, Shake

GREETING = wire.greeting(3)


async def assert_still_serving(address: str, connect: Connect, images: Path) -> None:
    _, session = await negotiate(await connect(address), "demo")
    assert await session.pread(0, 4096) == (images / "demo.erofs").read_bytes()[:4096]


async def test_handshake_deadline(
    nursery: trio.Nursery, images: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_server(nursery, images, limits=Limits(handshake_timeout=0.3))
    idle = await connect(address)
    await assert_still_serving(address, connect, images)  # transmission has no deadline
    assert await read_all(idle) == GREETING  # then EOF
    await trio.sleep(0.1)
    assert "handshake timeout (limit)" in caplog.text


@pytest.mark.parametrize(
    ("sent", "logged"),
    [
        (wire.option(Opt.STRUCTURED_REPLY) * 6, "more than 5 options"),
        (wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 1 << 20), "the limit is 16384"),
        (struct.pack(">QII", 0xDEADBEEF, Opt.LIST, 0), "bad option magic"),
    ],
)
async def test_option_limits(
    nursery: trio.Nursery,
    images: Path,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
    sent: bytes,
    logged: str,
) -> None:
    address = await start_server(nursery, images, limits=Limits(max_options=5))
    stream = await connect(address)
    await stream.send_all(struct.pack(">I", 3) + sent)
    received = await read_all(stream)
    assert received.startswith(GREETING)
    assert len(received) < len(GREETING) + 6 * 20  # cut off before answering everything
    await assert_still_serving(address, connect, images)
    assert logged in caplog.text


@pytest.mark.parametrize("flags", [0, 4, 0xFFFFFFFF])
async def test_bad_client_flags_close_the_connection(
    nursery: trio.Nursery, images: Path, connect: Connect, flags: int
) -> None:
    address = await start_server(nursery, images)
    stream = await connect(address)
    await stream.send_all(struct.pack(">I", flags) + wire.option(Opt.LIST))
    assert await read_all(stream) == GREETING
    await assert_still_serving(address, connect, images)


async def test_garbage_and_bad_request_magic(
    nursery: trio.Nursery, images: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    address = await start_server(nursery, images)
    junk = await connect(address)
    await junk.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
    assert (await read_all(junk)).startswith(GREETING)
    stream = await connect(address)
    _, session = await negotiate(stream, "demo")
    await session.pread(0, 512)
    await stream.send_all(struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512))
    assert await read_all(stream) == b""
    await assert_still_serving(address, connect, images)
    assert "bad request magic" in caplog.text


async def test_connection_limit(nursery: trio.Nursery, images: Path, connect: Connect) -> None:
    address = await start_server(nursery, images, limits=Limits(max_connections=2))
    first, second = await connect(address), await connect(address)
    for stream in (first, second):
        with trio.fail_after(5):
            assert await stream.receive_some(len(GREETING)) == GREETING
    third = await connect(address)
    assert await read_all(third) == b""  # refused without a greeting
    await trio.aclose_forcefully(first)
    with trio.fail_after(5):
        while True:  # the slot frees once the server has seen the close
            hs_stream = await connect(address)
            if await hs_stream.receive_some(len(GREETING)):
                break
            await trio.sleep(0.05)


async def test_reset_in_the_middle_of_big_pipelined_replies(
    nursery: trio.Nursery, images: Path, connect: Connect
) -> None:
    """nbdkit was seen to abort here; a reset must only end that one connection."""
    address = await start_server(nursery, images)
    size = (images / "demo.erofs").stat().st_size
    for _ in range(3):
        stream = await connect(address)
        _, session = await negotiate(stream, "demo")
        requests = b"".join(
            session.machine.request(Cmd.READ, 0, size // 512 * 512)[1] for _ in range(40)
        )
        await stream.send_all(requests)
        await stream.receive_some(1000)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await trio.aclose_forcefully(stream)  # RST with replies still being written
    await assert_still_serving(address, connect, images)


async def test_write_payload_is_drained_even_when_refused(
    nursery: trio.Nursery, images: Path, connect: Connect
) -> None:
    address = await start_server(nursery, images)
    _, session = await negotiate(await connect(address), "demo")
    (reply,) = await session.request(Cmd.WRITE, 0, 1 << 20, 0, b"\x25\x60\x95\x13" * (1 << 18))
    assert reply.error == 1  # type: ignore[union-attr]
    assert await session.pread(0, 512) == (images / "demo.erofs").read_bytes()[:512]


async def test_shutdown_finishes_in_flight_requests_then_returns(
    images: Path, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(ServerConfig(root=images, listen=("127.0.0.1:0",)))
    data = (images / "demo.erofs").read_bytes()
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.run)
        in_handshake = await connect(address)
        stream = await connect(address)
        _, session = await negotiate(stream, "demo")
        # 8 x 16 KiB: the replies fit the socket buffers while this client does not read
        requests = b"".join(session.machine.request(Cmd.READ, 0, 16384)[1] for _ in range(8))
        await stream.send_all(requests)
        await trio.lowlevel.checkpoint()
        with trio.fail_after(10):  # bounded wait until the server has parsed all eight
            while sum(c.stats.requests for c in server.connections) < 8:
                await trio.sleep(0.01)
        server.shutdown()
        received = await read_all(stream)
        session.machine.receive_data(received)
        replies = [session.machine.next_event() for _ in range(8)]
        assert all(r.data == data[:16384] for r in replies)  # type: ignore[union-attr]
        assert await read_all(in_handshake) == GREETING
        with pytest.raises(OSError, match="all attempts to connect"):
            await connect(address)
    assert "server stopped" in caplog.text


async def test_handshake_clients_are_refused_quickly_when_not_negotiating(
    nursery: trio.Nursery, images: Path, handshake: Shake
) -> None:
    address = await start_server(nursery, images)
    hs = await handshake(address)
    with pytest.raises(NegotiationError):
        await hs.info("../outside")
    with pytest.raises(NegotiationError):
        await hs.info("/etc/passwd")
    with pytest.raises(NegotiationError):
        await hs.info("escape")
    assert (await hs.info("alias")).size > 0


async def test_an_accept_the_server_cannot_take_backs_off_and_serves_later(
    nursery: trio.Nursery, images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of descriptors (EMFILE), accept fails for the server, not for one connection:
    it is logged and retried after a pause, and the connection waiting is served once a
    descriptor is free. (Failures that concern one connection only, such as a firewall's
    EPERM, trio's listener retries quietly.)"""
    address = await start_server(nursery, images)
    host, _, port = address.rpartition(":")
    client = trio.socket.socket()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The limit bounds descriptor numbers: fill the gaps below the highest one in use,
    # then allow no higher one.
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers = []
    while (fd := os.open(os.devnull, os.O_RDONLY)) <= highest:
        fillers.append(fd)
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        await client.connect((host, int(port)))  # queued: the server has no fd to take it
        with trio.fail_after(10):
            while "accept failed" not in caplog.text:
                await trio.sleep(0.01)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fillers:
            os.close(fd)
    assert "Too many open files" in caplog.text
    stream = trio.SocketStream(client)
    try:
        hs = Handshake(stream)
        with trio.fail_after(10):
            await hs.start()
            assert (await hs.info("demo")).size > 0
    finally:
        await trio.aclose_forcefully(stream)
