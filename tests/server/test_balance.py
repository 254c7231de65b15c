"""Workers share the listening socket and the least loaded takes each connection
(``balance.py``). Two ``Server`` objects in one trio loop stand in for two worker processes:
each has its own descriptor for the same socket and its own seat on one board."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import trio

from erofs_nbdd.config import Limits, ServerConfig
from erofs_nbdd.server.balance import LoadBoard
from erofs_nbdd.server.listener import Server, bind_listen
from erofs_nbdd.transport.listen import describe

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Connect


async def start_workers(
    nursery: trio.Nursery, images: Path, board: LoadBoard, count: int = 2
) -> tuple[str, list[Server]]:
    """``count`` servers on one listening socket, seats 0 to count-1 of ``board``."""
    (sock,) = bind_listen(("127.0.0.1:0",))
    address = describe(sock)
    config = ServerConfig(root=images, listen=(address,), limits=Limits())
    servers = []
    for i in range(count):
        mine = socket.socket(fileno=os.dup(sock.fileno()))
        server = Server(config, board.seat(i))
        await nursery.start(server.run, [mine])
        servers.append(server)
    sock.close()
    return address, servers


async def held(servers: list[Server], total: int) -> list[int]:
    """Connections each server holds, once they hold ``total`` between them."""
    with trio.fail_after(5):
        while sum(len(s.connections) for s in servers) < total:
            await trio.sleep(0.005)
    return [len(s.connections) for s in servers]


async def test_the_least_loaded_worker_takes_each_connection(
    nursery: trio.Nursery, images: Path, connect: Connect
) -> None:
    address, servers = await start_workers(nursery, images, LoadBoard(2))
    streams = []
    for n in range(1, 7):
        streams.append(await connect(address))
        counts = await held(servers, n)
        assert sorted(counts) == [n // 2, n - n // 2], counts
    # The first worker's clients leave: the next three connections all go to it.
    first = servers[0]
    ports = {c.peer.rpartition(":")[2] for c in first.connections}
    for stream in streams:
        if str(stream.socket.getsockname()[1]) in ports:
            await trio.aclose_forcefully(stream)
    with trio.fail_after(5):
        while first.connections:
            await trio.sleep(0.005)
    for n in range(1, 4):
        await connect(address)
        assert await held(servers, 3 + n) == [n, 3]


async def test_a_stuck_worker_does_not_stop_the_others(
    nursery: trio.Nursery, images: Path, connect: Connect
) -> None:
    """A worker that holds fewer connections but never accepts (here: a seat with no server)
    delays the others by at most ``DEFER``; they still take every connection."""
    board = LoadBoard(2)
    address, servers = await start_workers(nursery, images, board, count=1)
    board.seat(1).hold(0)
    for n in range(1, 4):
        await connect(address)
        assert await held(servers, n) == [n]
