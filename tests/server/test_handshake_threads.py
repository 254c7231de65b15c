"""TLS handshake steps run in worker threads (handshakes.py), one thread per session at a
time, and sealing still finds each connection's secret when many handshakes overlap."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

import trio
import trio.testing

from erofs_nbdd.transport import handshakes
from erofs_nbdd.transport.contexts import client_context, server_context
from erofs_nbdd.transport.keylog import KeyLog
from erofs_nbdd.transport.sealing import Sealing
from erofs_nbdd.transport.stream import StreamTransport
from erofs_nbdd.transport.tls import TLSTransport

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

CERTS_CLIENT = ("clients", "alice")


def _pair(made_certs: Path, keys: _Keys | None = None) -> tuple[TLSTransport, TLSTransport]:
    """A server side (sealing with ``keys``, on their context) and a client, not handshaken."""
    a, b = trio.testing.memory_stream_pair()
    ctx = server_context(made_certs) if keys is None else keys.context
    server = TLSTransport(
        StreamTransport(a),
        ctx,
        server_side=True,
        sealing=Sealing(keys) if keys is not None else None,
    )
    client = TLSTransport(
        StreamTransport(b),
        client_context(made_certs.joinpath(*CERTS_CLIENT)),
        server_hostname="localhost",
    )
    return server, client


class _Keys(KeyLog):
    """A key log that remembers its context, for pairs that share one."""

    def __init__(self, made_certs: Path) -> None:
        self.context = server_context(made_certs)
        super().__init__(self.context)


async def test_handshake_steps_run_off_the_event_loop(
    made_certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step of both sides runs in a thread, never on the loop's."""
    where: list[threading.Thread] = []
    real = TLSTransport._step

    def spy(self: TLSTransport) -> bool:
        where.append(threading.current_thread())
        return real(self)

    monkeypatch.setattr(TLSTransport, "_step", spy)
    server, client = _pair(made_certs)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
    assert len(where) >= 4  # at least two steps a side
    assert threading.main_thread() not in where
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"after")
        assert await client.receive_some() == b"after"


async def test_overlapping_handshakes_each_find_their_own_secret(
    made_certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps of many connections in threads at once: each still takes its own traffic
    secret from the shared key log (none is emptied away by another's take, made slow
    here so that others write meanwhile), so each server side seals its own records,
    and the client reads them."""
    pread = os.pread

    def slow_pread(fd: int, size: int, offset: int) -> bytes:
        time.sleep(0.002)  # without the lock, 22 of 24 lose their secret
        return pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", slow_pread)
    keys = _Keys(made_certs)
    pairs = [_pair(made_certs, keys) for _ in range(24)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for server, client in pairs:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
    assert all(server.sealed is not None for server, _ in pairs)
    for i, (server, client) in enumerate(pairs):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_all, b"%d" % i)
            assert await client.receive_some() == b"%d" % i


async def test_a_cancelled_handshake_waits_for_its_step(
    made_certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled (the handshake timeout, a shutdown) while a step runs in its thread, the
    handshake returns only once the step is over: the session is never left to a thread
    while the connection goes on to close it."""
    step_over = threading.Event()
    started = threading.Event()
    real = TLSTransport._step

    def slow(self: TLSTransport) -> bool:
        started.set()
        time.sleep(0.2)
        try:
            return real(self)
        finally:
            step_over.set()

    monkeypatch.setattr(TLSTransport, "_step", slow)
    _, client = _pair(made_certs)  # a client steps at once (a server waits for its hello)
    with trio.fail_after(10):
        with trio.move_on_after(0.05) as scope:
            await client.do_handshake()
    assert scope.cancelled_caught
    assert started.is_set() and step_over.is_set()
    await client.aclose()


async def test_steps_at_once_are_bounded_by_the_limiter(
    made_certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No more than ``THREADS`` steps run at a time, however many handshakes wait."""
    running = 0
    most = 0
    lock = threading.Lock()

    def step() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(4 * handshakes.THREADS):
            nursery.start_soon(handshakes.step, step)
    assert 2 <= most <= handshakes.THREADS
