"""Hostile load generators, run as their own processes so they never share the measuring
process's interpreter: ``python -m tests.robustness.flood ADDRESS KIND SECONDS``.

Each negotiates ``demo`` with GO, then until SECONDS pass (or stdin closes):

* ``cache``: pipelines NBD_CMD_CACHE of 4 KiB as fast as the socket takes them, reading
  every reply;
* ``read512``: the same with 512-byte READs the page cache holds;
* ``hold``: asks for uncached 1 MiB READs at offsets spread over the image, up to the
  server's byte budgets, and then reads nothing;
* ``trickle``: as ``hold``, but reads 64 KiB of replies every 1.8 s (a client that keeps
  one blocked write moving so it never times out).

It prints ``ready`` once negotiated and flooding, so the caller knows when to measure.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time

from erofs_nbdd.protocol import NEED_DATA, ClientHandshake, Cmd, OptionAck, State, wire


def negotiate(address: str, export: str = "demo") -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    hs = ClientHandshake()
    sent_flags = False
    for _ in range(10_000):
        event = hs.next_event()
        if event is NEED_DATA:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed during the handshake")
            hs.receive_data(data)
            continue
        if not sent_flags:
            sock.sendall(hs.send_client_flags() + hs.opt_go(export))
            sent_flags = True
        elif isinstance(event, OptionAck) and hs.state is State.TRANSMISSION:
            return sock
    raise ConnectionError("no GO reply")


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


def hold(sock: socket.socket, size: int, until: float, *, trickle: bool) -> None:
    """Uncached 1 MiB reads spread over the image; then read nothing (or a trickle)."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    step = 1 << 20
    offsets = [(i * 7919 * 4096) % max(size - step, 1) // 4096 * 4096 for i in range(64)]
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
    address, kind, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    size = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    until = time.monotonic() + seconds
    sock = negotiate(address)
    if kind == "cache":
        pipeline(sock, Cmd.CACHE, 4096, until)
    elif kind == "read512":
        pipeline(sock, Cmd.READ, 512, until)
    elif kind in ("hold", "trickle"):
        hold(sock, size, until, trickle=kind == "trickle")
    else:
        raise SystemExit(f"unknown flood {kind!r}")


if __name__ == "__main__":
    main()
