"""What a relay costs a link: the same reads straight to the server and through the bridge
process (as ``--relay`` and every TLS link use it), and the bridge's CPU time per request
and per GiB (from /proc, so it does not depend on how fast the client here is).

    python -m bench.relay_cost [--seconds 5]

The client is our own (Python) one on both paths; the kernel is a faster client than it,
so read the CPU figures, not the rates, as the relay's cost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from erofs_nbd_client import devices
from erofs_nbd_client.bridge import start_bridge
from erofs_nbd_client.connect import open_connections
from erofs_nbd_client.spawn import reap
from erofs_nbd_client.target import Target

from .tls_flood import free_port

if TYPE_CHECKING:
    from erofs_nbd_client.negotiate import Session


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(session: Session, size: int, length: int, depth: int, seconds: float) -> int:
    """Reads of ``length`` at random aligned offsets, ``depth`` at a time; how many."""
    done = 0
    deadline = trio.current_time() + seconds
    blocks = (size - length) // length

    async def worker() -> None:
        nonlocal done
        rng = random.Random()
        while trio.current_time() < deadline:
            await session.pread(rng.randrange(blocks) * length, length)
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(depth):
            nursery.start_soon(worker)
    return done


async def measure(port: int, size: int, seconds: float) -> Path:
    """Print the table; returns the bridge's log, for the caller to remove."""
    target = Target(host="127.0.0.1", port=port, export="bench")
    (direct,) = await open_connections(target, 1, None)
    helper = await start_bridge(target, 1, [target])
    (relayed,) = helper.connections
    print(f"{'workload':<16} {'direct':>12} {'relayed':>12} {'relay CPU':>18}")
    for name, length, depth in (("4k QD32", 4096, 32), ("1M QD8", 1 << 20, 8)):
        n_direct = await load(direct.session, size, length, depth, seconds)
        before = cpu_seconds(helper.pid)
        n_relayed = await load(relayed.session, size, length, depth, seconds)
        cpu = cpu_seconds(helper.pid) - before
        per = (
            f"{cpu / n_relayed * 1e6:.1f} us/request"
            if length < (1 << 20)
            else f"{cpu / (n_relayed * length / 2**30):.2f} s/GiB"
        )
        print(f"{name:<16} {n_direct / seconds:>10.0f}/s {n_relayed / seconds:>10.0f}/s {per:>18}")
    await trio.aclose_forcefully(direct.session.stream)
    await trio.aclose_forcefully(relayed.session.stream)  # the bridge exits: nothing left
    await trio.to_thread.run_sync(reap, helper.pid)
    return Path(helper.log_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tree, images = Path(tmp, "tree"), Path(tmp, "images")
        tree.mkdir()
        images.mkdir()
        (tree / "blob").write_bytes(os.urandom(256 << 20))
        subprocess.run(
            ["mkfs.erofs", str(images / "bench.erofs"), str(tree)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        size = (images / "bench.erofs").stat().st_size
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "erofs_nbdd",
                "serve",
                str(images),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port, server)
            helper_log = trio.run(measure, port, size, args.seconds)
            helper_log.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # made for that log, unless in use
                devices.RUN_DIR.rmdir()
        finally:
            server.terminate()
            server.wait(30)
    return 0


def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(300):  # 30 s at most
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit("the server did not start")


if __name__ == "__main__":
    sys.exit(main())
