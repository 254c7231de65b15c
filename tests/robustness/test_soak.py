"""Soak: 16 clients doing verified random reads, plaintext and TLS mixed, some killed at
random mid-flight, against one server process. Zero wrong bytes, zero failed reads on live
connections, and the server's memory flat from warm-up to the end.

SOAK_SECONDS sets the length (default 10 in the suite; the full soak is 60:
``SOAK_SECONDS=60 ./setup.sh test-host tests/robustness/test_soak.py``).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from erofs_nbd_client.negotiate import Session, negotiate
from erofs_nbdd.transport.contexts import client_context

from ..interop.conftest import RunningServer, start_server_process, stop_server_process
from .conftest import assert_serves, log_problems

CLIENTS = 16


@dataclass
class Tally:
    reads: int = 0
    bytes: int = 0
    wrong: int = 0
    failed: int = 0
    connections: int = 0
    killed: int = 0


async def client_loop(
    i: int, server: RunningServer, data: bytes, certs: Path, deadline: float, tally: Tally
) -> None:
    rng = random.Random(i)
    host, _, port = server.address.rpartition(":")
    tls = client_context(certs / "clients" / "alice") if i % 2 else None
    structured = i % 3 == 0
    while trio.current_time() < deadline:  # bounded by the deadline
        stream = await trio.open_tcp_stream(host, int(port))
        tally.connections += 1
        kill = rng.random() < 0.3
        try:
            _, session = await negotiate(
                stream, "demo", tls=tls, server_hostname="localhost", structured=structured
            )

            async def one(session: Session, offset: int, length: int) -> None:
                got = await session.pread(offset, length)
                tally.reads += 1
                tally.bytes += length
                if got != data[offset : offset + length]:
                    tally.wrong += 1

            with trio.move_on_after(rng.uniform(0.05, 0.5) if kill else float("inf")):
                for _ in range(rng.randrange(5, 40)):  # batches of pipelined reads
                    async with trio.open_nursery() as nursery:
                        for _ in range(rng.randrange(1, 17)):
                            length = rng.choice([512, 4096, 65536, 262144])
                            offset = rng.randrange(0, len(data) - length) // 512 * 512
                            nursery.start_soon(one, session, offset, length)
                if not kill:
                    await session.disconnect()
        except Exception:
            tally.failed += 1  # a read on a connection nobody killed failed
            raise
        finally:
            if kill:
                tally.killed += 1
                sock = getattr(stream, "socket", None)
                if sock is not None:  # a reset, not a goodbye
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(stream)


async def test_soak(images: Path, made_certs: Path) -> None:
    seconds = float(os.environ.get("SOAK_SECONDS", "10"))
    server = start_server_process(images, "--tls", "on", "--tls-certificates", str(made_certs))
    try:
        data = (images / "demo.erofs").read_bytes()
        tally = Tally()
        rss: list[tuple[float, float]] = []

        async def sample() -> None:
            start = time.monotonic()
            while True:
                rss.append((time.monotonic() - start, server.rss_mib()))
                await trio.sleep(0.25)

        deadline = trio.current_time() + seconds
        with trio.fail_after(seconds + 60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                async with trio.open_nursery() as clients:
                    for i in range(CLIENTS):
                        clients.start_soon(
                            client_loop, i, server, data, made_certs, deadline, tally
                        )
                nursery.cancel_scope.cancel()
        assert tally.wrong == 0 and tally.failed == 0, tally
        assert tally.reads > 100 * seconds and tally.killed > 0, tally  # it really ran
        # Flat: the second half of the run peaks no higher than the first (allocator slack
        # aside), and the whole stays well under what one client could pin if unbounded.
        first = max(m for t, m in rss if t < seconds / 2)
        second = max(m for t, m in rss if t >= seconds / 2)
        assert second - first < 25 and second < 200, rss
        assert server.process.poll() is None
        assert_serves(server)
        print(f"soak {seconds:g}s: {tally}; server RSS peak {first:.0f} then {second:.0f} MiB")
        print("RSS MiB by second:", [round(m) for t, m in rss[::4]])
    finally:
        status = stop_server_process(server)
    text = server.log_text()
    assert status == 0, text
    assert not log_problems(text), text
