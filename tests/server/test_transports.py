"""The transports, each as the server uses it: a receive tried without waiting says so, and
a wrapping transport closes what it wraps. (How long a reply may wait is the server's
reply timeout, over whole replies: tests/server/test_reply_timeout.py.)"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from erofs_nbdd.transport.base import Policy, Transport
from erofs_nbdd.transport.contexts import client_context, server_context
from erofs_nbdd.transport.keylog import KeyLog
from erofs_nbdd.transport.plain import PlainTransport
from erofs_nbdd.transport.sealing import Sealing
from erofs_nbdd.transport.stream import StreamTransport
from erofs_nbdd.transport.tls import TLSTransport

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

POLICY = Policy()
KINDS = ["plain", "tls-openssl", "tls-sealed", "stream"]


async def _pair(kind: str, certs: Path) -> tuple[Transport, Transport]:
    """(server side with POLICY, client side) of one kind of transport."""
    if kind == "stream":
        a, b = trio.testing.lockstep_stream_pair()  # a send waits for its reader
        return StreamTransport(a, POLICY), StreamTransport(b)
    left, right = socket.socketpair()
    for s in (left, right):
        s.setblocking(False)
    server = PlainTransport(trio.SocketStream(trio.socket.from_stdlib_socket(left)), POLICY)
    client = PlainTransport(trio.SocketStream(trio.socket.from_stdlib_socket(right)))
    if kind == "plain":
        return server, client
    ctx = server_context(certs)
    sealing = Sealing(KeyLog(ctx)) if kind == "tls-sealed" else None
    tls_server = TLSTransport(server, ctx, server_side=True, sealing=sealing)
    tls_client = TLSTransport(
        client, client_context(certs / "clients" / "alice"), server_hostname="localhost"
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tls_server.do_handshake)
            nursery.start_soon(tls_client.do_handshake)
    assert (tls_server.sealed is not None) == (kind == "tls-sealed")
    return tls_server, tls_client


@pytest.fixture(params=KINDS)
async def pair(
    request: pytest.FixtureRequest, made_certs: Path
) -> AsyncIterator[tuple[Transport, Transport]]:
    server, client = await _pair(request.param, made_certs)
    yield server, client
    for t in (server, client):
        await trio.aclose_forcefully(t)


async def test_receive_nowait_says_when_it_would_wait(pair: tuple[Transport, Transport]) -> None:
    server, client = pair
    assert server.receive_nowait(1024, spin=True) is None  # nothing sent yet
    got = b""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"request")  # a lockstep send waits for us
            while len(got) < len(b"request"):
                got += server.receive_nowait(1024) or await server.receive_some(1024)
    assert got == b"request"


async def test_closing_a_tls_transport_closes_what_it_wraps(made_certs: Path) -> None:
    server, client = await _pair("tls-openssl", made_certs)
    assert isinstance(server, TLSTransport)
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.inner.send_all(b"x")
    with trio.fail_after(10):
        assert await client.receive_some() == b""  # close_notify, then the socket's EOF
    await client.aclose()
