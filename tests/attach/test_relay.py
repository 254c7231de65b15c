"""The relay the kernel's TLS links go through outlives its server connection: a server
that stops, closes a connection or is replaced costs the kernel's side a slower reply,
never an error, and a server with another image is never resumed on. The kernel's side
here is our own client on a socketpair end, as the kernel would hold it."""

from __future__ import annotations

import logging
import socket
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
import trio.lowlevel

from erofs_nbd_client import relay as relay_module
from erofs_nbd_client.connect import check_erofs, open_connections, tls_context
from erofs_nbd_client.negotiate import Session
from erofs_nbd_client.relay import Relay, Resume
from erofs_nbd_client.target import Target
from erofs_nbdd.config import ServerConfig, TLSConfig, TLSMode
from erofs_nbdd.protocol import Cmd, Negotiated, wire
from erofs_nbdd.server import transmit
from erofs_nbdd.server.listener import Server

from ..conftest import free_port, mkfs

if TYPE_CHECKING:
    from pathlib import Path


def server(images: Path, port: int, certs: Path | None = None) -> Server:
    tls = TLSConfig(mode=TLSMode.REQUIRE, cert_dir=certs) if certs else TLSConfig()
    return Server(ServerConfig(root=images, listen=(f"127.0.0.1:{port}",), tls=tls))


async def start_relay(
    nursery: trio.Nursery, target: Target, targets: list[Target] | None = None
) -> tuple[Session, Relay, list[Target]]:
    """A relay to ``target`` as the bridge makes one, and the kernel's side of it; the
    list it returns is where the relay resumed, in order."""
    (conn,) = await open_connections(target, 1, tls_context(target))
    identity = await check_erofs(conn)
    kernel_end, ours = socket.socketpair()
    plain = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    moves: list[Target] = []
    relay = Relay(
        0, plain, conn.session.stream, Resume(targets or [target], identity), moves.append
    )
    nursery.start_soon(relay.run)
    kernel = trio.SocketStream(trio.socket.from_stdlib_socket(kernel_end))
    return Session(kernel, Negotiated(), b""), relay, moves


async def read_many(session: Session, data: bytes, count: int) -> None:
    """``count`` reads at once, all in flight together, each checked."""

    async def one(i: int) -> None:
        offset = i * 4096 % (len(data) - 65536)
        assert await session.pread(offset, 65536) == data[offset : offset + 65536]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)


@pytest.mark.parametrize("tls", [False, True])
async def test_a_planned_restart_is_invisible(
    images: Path, made_certs: Path, tls: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Old server, then a new one on the same port, then the old one stops: it closes the
    relay's connection at a quiet moment and the relay moves to the new one."""
    port = free_port()
    certs = made_certs if tls else None
    client_dir = made_certs / "clients" / "alice" if tls else None
    target = Target(host="127.0.0.1", port=port, export="demo", tls=tls, cert_dir=client_dir)
    data = (images / "demo.erofs").read_bytes()
    old, new = server(images, port, certs), server(images, port, certs)
    async with trio.open_nursery() as nursery:
        await nursery.start(old.run)
        session, relay, moves = await start_relay(nursery, target)
        await read_many(session, data, 8)
        await nursery.start(new.run)
        old.shutdown()
        with trio.fail_after(20):
            while relay.resumed == 0:  # reads with pauses: the old server finds its moment
                await read_many(session, data, 4)
                await trio.sleep(transmit.QUIET * 2)
        await read_many(session, data, 8)
        assert "grace period over" not in caplog.text
        assert len(new.connections) == 1
        assert moves == [target]
        await trio.aclose_forcefully(session.stream)  # the kernel side closes: the relay ends
        new.shutdown()


async def test_requests_in_flight_on_a_lost_connection_are_sent_again(
    images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    target = Target(host="127.0.0.1", port=port, export="demo")
    data = (images / "demo.erofs").read_bytes()
    srv = server(images, port)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        session, relay, moves = await start_relay(nursery, target)
        for round_ in range(3):
            async with trio.open_nursery() as readers:
                readers.start_soon(read_many, session, data, 32)
                with trio.fail_after(10):
                    while not any(c.stats.requests for c in srv.connections):
                        await trio.lowlevel.checkpoint()
                (conn,) = srv.connections
                conn.evict("the test cuts the connection")  # replies in flight are lost
            assert relay.resumed == round_ + 1
        assert moves == [target] * 3
        assert "request(s) sent again" in caplog.text
        await trio.aclose_forcefully(session.stream)
        srv.shutdown()


async def test_a_relay_never_resumes_on_another_image(
    images: Path, tmp_path: Path, source_tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first server goes; the second in the list serves another image under the same
    name: the relay keeps trying, never sends the kernel's requests there, and ends when
    the kernel side closes."""
    other = tmp_path / "other"
    mkfs(other / "demo.erofs", source_tree)  # same files, a new image (new UUID)
    port_a, port_b = free_port(), free_port()
    a = Target(host="127.0.0.1", port=port_a, export="demo")
    b = Target(host="127.0.0.1", port=port_b, export="demo")
    first, second = server(images, port_a), server(other, port_b)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        session, relay, moves = await start_relay(nursery, a, [a, b])
        assert await session.pread(0, 4096) == (images / "demo.erofs").read_bytes()[:4096]
        first.shutdown()
        with trio.fail_after(10):
            while "serves a different image" not in caplog.text:
                await trio.sleep(0.05)
        with trio.move_on_after(0.5):
            await session.pread(0, 4096)
            pytest.fail("a read was answered by another image")
        assert all(c.stats.requests == 1 for c in second.connections)  # the check only
        assert relay.resumed == 0
        assert moves == []
        await trio.aclose_forcefully(session.stream)
        with trio.fail_after(5):
            while "connection 0 ended: kernel side closed" not in caplog.text:
                await trio.sleep(0.05)
        second.shutdown()


async def test_a_broken_or_silent_server_in_the_list_is_passed_over(
    images: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Resuming, the relay meets a server that greets and hangs up (as one shutting down
    does) and one that accepts and never says a word: neither ends the relay nor holds it
    longer than the attempt timeout; it resumes on the next server in the list."""
    monkeypatch.setattr(relay_module, "ATTEMPT_TIMEOUT", 0.5)

    async def greet_and_hang_up(stream: trio.SocketStream) -> None:
        await stream.send_all(wire.greeting(3))
        await trio.aclose_forcefully(stream)

    async def say_nothing(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = free_port()
    good = Target(host="127.0.0.1", port=port, export="demo")
    data = (images / "demo.erofs").read_bytes()
    srv = server(images, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        bad = []
        for handler in (greet_and_hang_up, say_nothing):
            serve = partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            (listener,) = await nursery.start(serve)
            bad.append(Target(host="127.0.0.1", port=listener.socket.getsockname()[1]))
        session, relay, moves = await start_relay(nursery, good, [*bad, good])
        await read_many(session, data, 4)
        (conn,) = srv.connections
        conn.evict("the test cuts the connection")
        await read_many(session, data, 8)
        assert relay.resumed == 1
        assert moves == [good]  # told where it went
        assert f"127.0.0.1:{bad[1].port}" in caplog.text  # noted, once
        await trio.aclose_forcefully(session.stream)
        srv.shutdown()
        nursery.cancel_scope.cancel()


async def test_the_kernels_disconnect_reaches_the_server(
    images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel sends NBD_CMD_DISC and closes its side at once: the relay still passes
    the DISC on, so the server sees a proper disconnect."""
    caplog.set_level(logging.INFO)
    port = free_port()
    target = Target(host="127.0.0.1", port=port, export="demo")
    srv = server(images, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        session, _, _ = await start_relay(nursery, target)
        assert await session.pread(0, 512) == (images / "demo.erofs").read_bytes()[:512]
        await session.stream.send_all(wire.request(Cmd.DISC, 0, 0, 0))
        await trio.aclose_forcefully(session.stream)
        with trio.fail_after(10):
            while "ended=disconnect" not in caplog.text:
                await trio.sleep(0.05)
        srv.shutdown()
