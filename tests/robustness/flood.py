"""Hostile load generators, run as their own processes so they never share the measuring
process's interpreter: ``python -m tests.robustness.flood ADDRESS KIND SECONDS``.

Each negotiates ``demo`` with GO (from ``--source`` if given), then until SECONDS pass (or
stdin closes):

* ``cache``: pipelines NBD_CMD_CACHE of 4 KiB as fast as the socket takes them, reading
  every reply;
* ``read512``: the same with 512-byte READs the page cache holds;
* ``hold``: asks for 64 READs of 1 MiB at offsets spread over the image (``--size``), and
  then reads nothing;
* ``trickle``: as ``hold``, but reads 64 KiB of replies every 1.8 s (a client that keeps
  one blocked write moving so it never times out).

It prints ``ready`` once negotiated and flooding, so the caller knows when to measure.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from erofs_nbdd.protocol import NEED_DATA, ClientHandshake, Cmd, OptionAck, State, wire


def negotiate(
    address: str, export: str = "demo", source: str | None = None, tls: Path | None = None
) -> socket.socket:
    """A socket in transmission with ``export``; over TLS (STARTTLS) with the client
    certificates in ``tls``."""
    host, _, port = address.rpartition(":")
    bind = (source, 0) if source else None
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=bind)
    hs = ClientHandshake()

    def until(done: Callable[[object], bool]) -> None:
        for _ in range(10_000):
            event = hs.next_event()
            if event is NEED_DATA:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed during the handshake")
                hs.receive_data(data)
            elif done(event):
                return
        raise ConnectionError("no reply")

    until(lambda _event: True)  # the greeting
    sock.sendall(hs.send_client_flags())
    if tls is not None:
        sock.sendall(hs.opt_starttls())
        until(lambda event: isinstance(event, OptionAck))
        hs.start_tls()
        ctx = ssl.create_default_context(cafile=str(tls / "ca-cert.pem"))
        ctx.load_cert_chain(tls / "client-cert.pem", tls / "client-key.pem")
        sock = ctx.wrap_socket(sock, server_hostname="localhost")
    sock.sendall(hs.opt_go(export))
    until(lambda event: isinstance(event, OptionAck) and hs.state is State.TRANSMISSION)
    return sock


def _drain(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not sock.recv(1 << 20):
                return
        except OSError:
            return


def pipeline(sock: socket.socket, cmd: int, length: int, until: float) -> None:
    """Requests as fast as the socket takes them; a thread reads every reply."""
    batch = b"".join(wire.request(cmd, i, 0, length) for i in range(256))
    stop = threading.Event()
    reader = threading.Thread(target=_drain, args=(sock, stop), daemon=True)
    reader.start()
    print("ready", flush=True)
    try:
        while time.monotonic() < until and not _stdin_closed():
            sock.sendall(batch)
    except OSError:
        pass
    stop.set()


def hold(sock: socket.socket, size: int, until: float, seed: int, *, trickle: bool) -> None:
    """1 MiB reads spread over the image (``seed`` picks where, so connections given
    different seeds miss the page cache); then read nothing (or a trickle)."""
    sock.settimeout(None)
    step = 1 << 20
    blocks = max((size - step) // 4096, 1)
    offsets = [(seed * 64 + i) * 7919 % blocks * 4096 for i in range(64)]
    sock.sendall(b"".join(wire.request(Cmd.READ, i, off, step) for i, off in enumerate(offsets)))
    print("ready", flush=True)
    while time.monotonic() < until and not _stdin_closed():
        if trickle:
            try:
                sock.recv(65536)
            except OSError:
                return
        time.sleep(1.8 if trickle else 0.2)


def _stdin_closed() -> bool:
    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(readable) and not os.read(sys.stdin.fileno(), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("kind", choices=["cache", "read512", "hold", "trickle"])
    parser.add_argument("seconds", type=float)
    parser.add_argument("--size", type=int, default=0, help="the image's size (hold, trickle)")
    parser.add_argument("--source", help="the local address to connect from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tls", type=Path, help="client certificates: STARTTLS first")
    args = parser.parse_args()
    until = time.monotonic() + args.seconds
    sock = negotiate(args.address, source=args.source, tls=args.tls)
    if args.kind == "cache":
        pipeline(sock, Cmd.CACHE, 4096, until)
    elif args.kind == "read512":
        pipeline(sock, Cmd.READ, 512, until)
    else:
        hold(sock, args.size, until, args.seed, trickle=args.kind == "trickle")


if __name__ == "__main__":
    main()
