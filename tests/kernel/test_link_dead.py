"""The kernel mechanism failover rests on (DESIGN.md section 3), proven with our own pieces:
a killed server makes the kernel announce LINK_DEAD for our device; I/O waits instead of
failing; RECONFIGURE with a freshly negotiated socket to the restarted server lets it finish."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client import devices, netlink
from erofs_nbd_client.negotiate import negotiate

from ..interop.conftest import start_server_process, stop_server_process
from .conftest import assert_nothing_left, cli, wait_state

# Server kills, restarts and TLS reconnects under an emulated CPU (TCG) take minutes.
pytestmark = pytest.mark.timeout(600)

if TYPE_CHECKING:
    from pathlib import Path

PORT = 10920


def _new_socket(export: str) -> socket.socket:
    """One connection negotiated for the kernel (simple replies), as a plain socket."""

    async def go() -> socket.socket:
        async with await trio.open_tcp_stream("127.0.0.1", PORT) as stream:
            await negotiate(stream, export)
            return socket.socket(fileno=os.dup(stream.socket.fileno()))

    return trio.run(go)


def test_link_dead_then_reconfigure(images: Path, source_tree: Path, mountpoint: Path) -> None:
    server = start_server_process(images, listen=f"127.0.0.1:{PORT}")
    attached = cli(
        "erofs-nbd-attach",
        f"127.0.0.1:{PORT}",
        str(mountpoint),
        "--export",
        "demo",
        "--dead-timeout",
        "120",
    )
    assert attached.returncode == 0, attached.stderr
    index = devices.device_at(str(mountpoint))
    assert index is not None
    supervisor = wait_state(index, state="watching")["pid"]
    assert isinstance(supervisor, int)
    os.kill(supervisor, signal.SIGKILL)  # this test does the supervisor's job by hand
    backend = devices.backend_of(index)
    assert backend is not None
    assert backend.startswith("erofs-nbd-attach:")
    listener = netlink.link_dead_socket(netlink.multicast_group())
    listener.settimeout(60)
    try:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        dead: list[int] = []
        while index not in dead:  # bounded by the socket timeout
            dead += netlink.parse_link_dead(listener.recv(65536))
    finally:
        listener.close()
    stop_server_process(server)  # reap; it is already dead

    # A reader on the dead link waits (DEAD_CONN_TIMEOUT) rather than failing.
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    result: dict[str, str] = {}

    def read() -> None:
        try:
            data = (mountpoint / "bin" / "random.bin").read_bytes()
            result["sha"] = hashlib.sha256(data).hexdigest()
        except OSError as exc:
            result["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(3)
    assert reader.is_alive(), result  # still waiting: no EIO

    server = start_server_process(images, listen=f"127.0.0.1:{PORT}")
    try:
        fresh = _new_socket("demo")
        netlink.reconfigure(index, backend, sockets=(fresh.fileno(),))
        fresh.close()  # the kernel holds its own reference
        reader.join(60)
        expect = hashlib.sha256((source_tree / "bin" / "random.bin").read_bytes()).hexdigest()
        assert result == {"sha": expect}
        detached = cli("erofs-nbd-detach", str(mountpoint))
        assert detached.returncode == 0, detached.stderr
        assert_nothing_left()
    finally:
        stop_server_process(server)
