"""The reply timeout measures whole replies, not blocked writes: a client that reads a
trickle (always a little within the timeout, so no single write stays blocked that long)
is still dropped once no reply has gone out whole for the timeout, and what its replies
held goes back to the budget; a slow client that finishes each reply in time is served."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio

from erofs_nbd_client.negotiate import negotiate
from erofs_nbdd.config import Limits, ServerConfig
from erofs_nbdd.protocol import Cmd, wire
from erofs_nbdd.server.budget import Pool
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.server.outcome import ReplyTimeout
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.transport.plain import PlainTransport

from ..conftest import random_image

if TYPE_CHECKING:
    from pathlib import Path

TIMEOUT = 0.5
MIB = 1 << 20


def _pair(buffer: int) -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = socket.socketpair()
    for s in (left, right):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(left)),
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
    )


async def _serve(root: Path, pool: Pool, client_reads: int, pause: float) -> BaseException | None:
    """A connection asked for eight 1 MiB reads by a client that then reads
    ``client_reads`` bytes (its socket buffers' size) every ``pause`` seconds; what ended
    the connection."""
    server_stream, client_stream = _pair(client_reads)
    config = ServerConfig(root=root, limits=Limits(reply_timeout=TIMEOUT))
    conn = Connection(
        PlainTransport(server_stream), "pair", config, ExportDirectory(root), share=pool.join("a")
    )
    ended: list[BaseException | None] = []

    async def run() -> None:
        try:
            await conn.run()
            ended.append(None)
        except Exception as exc:
            ended.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        _, session = await negotiate(client_stream, "img")
        asks = [session.machine.request(Cmd.READ, i * MIB, MIB)[1] for i in range(8)]
        await client_stream.send_all(b"".join(asks))
        got = 0
        with trio.move_on_after(30):  # bounded: the connection ends long before
            while not ended and got < 8 * (MIB + 16):
                data = await client_stream.receive_some(client_reads)
                if not data:
                    break
                got += len(data)
                await trio.sleep(pause)
        if not ended:  # all read: say goodbye
            await client_stream.send_all(wire.request(Cmd.DISC, 99, 0, 0))
        with trio.fail_after(10):
            while not ended:
                await trio.sleep(0.01)
        await client_stream.aclose()
    await server_stream.aclose()  # the server's, as the listener closes it
    return ended[0]


async def test_a_trickle_reader_is_dropped(tmp_path: Path) -> None:
    """16 KiB every 0.1 s: each blocked write moves well within 0.5 s, but a 1 MiB reply
    takes 6 s. It used to keep its replies (and their budget) as long as it liked."""
    random_image(tmp_path / "images", "img", 8 * MIB)
    pool = Pool(64 * MIB)
    with trio.fail_after(20):
        ended = await _serve(tmp_path / "images", pool, 16384, 0.1)
    assert isinstance(ended, ReplyTimeout), ended
    assert "client read no reply for 0.5 s (reply timeout)" in str(ended)
    assert pool.free == pool.total  # everything its replies held is back


async def test_a_slow_reader_that_finishes_each_reply_in_time_is_served(tmp_path: Path) -> None:
    """256 KiB every 20 ms: each reply takes about 80 ms, well within the timeout."""
    random_image(tmp_path / "images", "img", 8 * MIB)
    pool = Pool(64 * MIB)
    with trio.fail_after(20):
        ended = await _serve(tmp_path / "images", pool, 256 * 1024, 0.02)
    assert ended is None, ended
    assert pool.free == pool.total
