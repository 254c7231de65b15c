"""Clients that break the rules, flood or stall. The server must refuse each cleanly, keep
its memory bounded, and go on serving everyone else (checked after every test)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from erofs_nbdd.protocol import Cmd, Errno, Info, Opt, OptionError, Rep

from .conftest import RawClient

Raw = Callable[..., RawClient]

if TYPE_CHECKING:
    from ..interop.conftest import RunningServer

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513


def wait_for_log(server: RunningServer, text: str, seconds: float = 10) -> str:
    """The first new log line containing ``text`` (bounded wait)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in reversed(server.log):
            if text in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}:\n" + server.log_text()[-3000:])


@pytest.mark.parametrize(
    ("flags", "after"),
    [
        (0xFFFFFFFF, b""),  # unknown client flags
        (0, b""),  # not fixed newstyle
        (3, struct.pack(">QII", 0x1122334455667788, Opt.GO, 0)),  # bad option magic
        (3, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),  # not NBD at all
    ],
)
def test_bad_magics_and_flags_close_the_connection(
    server: RunningServer, raw: Raw, flags: int, after: bytes
) -> None:
    client = raw(server.address)
    client._event(client.hs)
    client.send(struct.pack(">I", flags) + after)
    assert client.closed_within(5)


def test_bad_request_magic_closes_the_connection(server: RunningServer, raw: Raw) -> None:
    client = raw(server.address)
    client.go()
    client.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, Cmd.READ, 1, 0, 512))
    assert client.closed_within(5)
    wait_for_log(server, "bad request magic")


@pytest.mark.parametrize("length", [4097 * 4, 2**31, 2**32 - 1])
def test_huge_option_lengths_are_refused_without_reading_them(
    server: RunningServer, raw: Raw, length: int
) -> None:
    client = raw(server.address)
    client.start()
    client.send(struct.pack(">QII", IHAVEOPT, Opt.GO, length) + b"\0" * 100)
    assert client.closed_within(5)  # at once: the server does not wait for 4 GiB


def test_unknown_options_in_a_loop_hit_the_option_limit(server: RunningServer, raw: Raw) -> None:
    client = raw(server.address)
    client.start()
    errors = 0
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # noqa: PT012
        for i in range(10_000):  # bounded; the server's limit is 64
            (reply,) = client.option(client.hs.opt_raw(1000 + i))
            assert isinstance(reply, OptionError) and reply.rep == Rep.ERR_UNSUP, reply
            errors += 1
    assert 32 <= errors <= 64
    wait_for_log(server, "options before GO")


@pytest.mark.parametrize(
    ("offset", "length", "error"),
    [
        (2**64 - 512, 1024, Errno.EINVAL),  # offset + length wraps past 2**64
        (2**63, 512, Errno.EINVAL),
        (0, 2**32 - 512, Errno.EINVAL),  # over the export and the maximum payload
        (0, (32 << 20) + 512, Errno.EINVAL),  # over the maximum payload
        (0, 0, Errno.EINVAL),  # zero length
        (100, 512, Errno.EINVAL),  # misaligned: this GO asked for block sizes, told 512
    ],
)
def test_out_of_range_reads_get_einval_and_the_connection_goes_on(
    server: RunningServer, raw: Raw, offset: int, length: int, error: Errno
) -> None:
    client = raw(server.address)
    client.go(infos=(Info.BLOCK_SIZE,))
    assert client.read(offset, length) == (error, b"")
    image = (server.root / "demo.erofs").read_bytes()
    assert client.read(4096, 4096) == (0, image[4096:8192])


def test_a_client_told_no_block_sizes_reads_any_range(server: RunningServer, raw: Raw) -> None:
    client = raw(server.address)
    client.go()  # a GO that does not ask for NBD_INFO_BLOCK_SIZE agrees to no alignment
    image = (server.root / "demo.erofs").read_bytes()
    assert client.read(100, 512) == (0, image[100:612])
    assert client.read(len(image) - 1, 1) == (0, image[-1:])
    assert client.read(len(image) - 1, 2) == (Errno.EINVAL, b"")  # the end still holds


def test_slowloris_hits_the_handshake_deadline(server: RunningServer, raw: Raw) -> None:
    client = raw(server.address)
    client._event(client.hs)
    start = time.monotonic()
    flags_and_option = struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, Opt.LIST, 0)
    closed = False
    for byte in flags_and_option:  # one byte every half second; bounded by its length
        try:
            client.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        if client.closed_within(0.5):
            closed = True
            break
    assert closed
    assert 2.5 <= time.monotonic() - start <= 8  # --handshake-timeout 3
    wait_for_log(server, "handshake timeout")


def test_a_thousand_idle_connections(server: RunningServer, raw: Raw) -> None:
    """1,000 clients that negotiated and then sit idle, like mounted but unused images;
    a new client is served while they are held, and they still work afterwards."""
    from .conftest import assert_serves

    clients = []
    try:
        for _ in range(1000):
            client = raw(server.address)
            client.go()
            clients.append(client)
        assert_serves(server)
        image = (server.root / "demo.erofs").read_bytes()
        for client in clients[::97]:
            assert client.read(0, 4096) == (0, image[:4096])
    finally:
        for client in clients:
            client.close()


def test_connect_disconnect_flood(server: RunningServer, raw: Raw) -> None:
    host, _, port = server.address.rpartition(":")
    for i in range(2000):
        sock = socket.create_connection((host, int(port)), timeout=5)
        if i % 2:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def test_a_client_that_never_reads_its_replies(server: RunningServer, raw: Raw) -> None:
    """Eight clients ask for gigabytes and read nothing: the server stops reading their
    requests once the byte budgets are spent, its memory stays flat, and the reply
    timeout drops them."""
    before = server.rss_mib()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], server.rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = []
    try:
        for _ in range(8):
            client = raw(server.address, timeout=1)
            tx = client.go()
            # 2000 x 4 MiB asked (56 KB of requests), and nothing read
            client.send(b"".join(tx.request(Cmd.READ, 0, 4 << 20)[1] for _ in range(2000)))
            clients.append(client)
        # Reading anything would let the server go on: count the drops in its log instead.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and server.log_text().count("reply timeout") < 8:
            time.sleep(0.1)
        assert server.log_text().count("reply timeout") == 8, server.log_text()[-3000:]
    finally:
        stop.set()
        sampler.join(5)
        for client in clients:
            client.close()
    # 8 clients x 16 MiB per connection, capped at 64 MiB for the server, plus send buffers
    assert peak[0] - before < 120, (before, peak[0])


def test_disconnect_in_the_middle_of_replies(server: RunningServer, raw: Raw) -> None:
    for reset in (False, True):
        client = raw(server.address)
        tx = client.go()
        client.send(b"".join(tx.request(Cmd.READ, 0, 4 << 20)[1] for _ in range(20)))
        client.sock.recv(1000)
        client.close(reset=reset)


@pytest.mark.parametrize(
    ("name", "rep"),
    [
        ("..", Rep.ERR_UNKNOWN),
        ("../outside/secret", Rep.ERR_UNKNOWN),
        ("team/../../x", Rep.ERR_UNKNOWN),
        ("/etc/passwd", Rep.ERR_UNKNOWN),
        ("demo\0", Rep.ERR_UNKNOWN),
        ("demo\0/../escape", Rep.ERR_UNKNOWN),
        ("escape", Rep.ERR_UNKNOWN),  # a symlink leading out of the directory
        ("x" * 4096, Rep.ERR_UNKNOWN),
        ("x" * 4097, Rep.ERR_INVALID),
    ],
)
def test_export_names_that_escape_or_are_malformed(
    server: RunningServer, raw: Raw, name: str, rep: Rep
) -> None:
    client = raw(server.address)
    client.start()
    for ask in (client.hs.opt_info, client.hs.opt_go):
        replies = client.option(ask(name))
        assert len(replies) == 1 and isinstance(replies[0], OptionError), replies
        assert replies[0].rep == rep
    client.send(client.hs.opt_export_name(name))  # cannot be refused: the server closes
    assert client.closed_within(5)
