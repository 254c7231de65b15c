"""Images changed under a running server, the per-client and idle limits, and TLS downgrade
attempts: each gives a clean error or consistent data, never a crash or a foreign byte."""

from __future__ import annotations

import os
import shutil
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from erofs_nbdd.protocol import Errno, Opt, OptionAck, OptionError, Rep

from ..interop.conftest import RunningServer, start_server_process, stop_server_process
from .conftest import RawClient, assert_serves, log_problems
from .test_hostile_clients import wait_for_log

Raw = Callable[..., RawClient]


@pytest.fixture
def own_server(images: Path, tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """A server of its own, on a private copy of demo.erofs, checked when the test ends."""
    started: list[RunningServer] = []
    tls: dict[int, Path] = {}

    def start(*args: str, tls_dir: Path | None = None) -> RunningServer:
        root = tmp_path / f"root{len(started)}"
        root.mkdir()
        shutil.copy(images / "demo.erofs", root / "demo.erofs")
        server = start_server_process(root, *args)
        started.append(server)
        if tls_dir is not None:
            tls[id(server)] = tls_dir
        return server

    yield start
    for server in started:
        assert server.process.poll() is None, server.log_text()
        assert_serves(server, tls_dir=tls.get(id(server)))
        assert stop_server_process(server) == 0
        assert not log_problems(server.log_text()), server.log_text()


def test_image_replaced_or_truncated_while_served(
    own_server: Callable[..., RunningServer], raw: Raw, tmp_path: Path
) -> None:
    server = own_server()
    image = server.root / "demo.erofs"
    original = image.read_bytes()
    size = len(original)
    old = raw(server.address)
    old.go()
    assert old.read(0, 8192) == (0, original[:8192])

    # Replaced (a new file renamed over the name, as image registries publish): a client
    # attached before keeps the bytes it started with; a new client gets the new image.
    replacement = bytearray(original)
    replacement[size // 2 : size // 2 + 4096] = b"\xab" * 4096
    staged = server.root / ".staged"
    staged.write_bytes(replacement)
    os.replace(staged, image)
    half = size // 2 // 512 * 512
    assert old.read(half, 8192) == (0, original[half : half + 8192])
    new = raw(server.address)
    new.go()
    assert new.read(half, 8192) == (0, bytes(replacement[half : half + 8192]))

    # Truncated in place: what is gone is an EIO, what is left is still right, and the
    # connection goes on.
    with image.open("r+b") as f:
        f.truncate(half)
    tail = size // 512 * 512 - 65536
    assert new.read(tail, 65536) == (Errno.EIO, b"")
    assert new.read(0, 4096) == (0, bytes(replacement[:4096]))
    # Grown again with other bytes: the client's export keeps its size, so the bytes past
    # the old end are never served, and the grown middle reads as what is there now.
    with image.open("ab") as f:
        f.write(b"\xcd" * (size * 2 - half))
    assert new.read(size // 512 * 512, 512)[0] == Errno.EINVAL  # past the export's end
    assert new.read(tail, 4096) == (0, b"\xcd" * 4096)
    # The old client still reads its own file, untouched by all of this.
    assert old.read(0, size // 512 * 512) == (0, original[: size // 512 * 512])
    # Put the image back, for the check made when the test ends.
    staged.write_bytes(original)
    os.replace(staged, image)


def test_connections_per_client_address(own_server: Callable[..., RunningServer], raw: Raw) -> None:
    server = own_server("--max-connections-per-client", "4")
    held = [raw(server.address) for _ in range(4)]
    for client in held:
        client.go()
    extra = raw(server.address)
    assert extra.closed_within(5)
    wait_for_log(server, "connections from 127.0.0.1 already (limit)")
    other = raw(server.address, source="127.0.0.2")  # another address is not held back
    other.go()
    assert other.read(0, 512)[0] == 0
    held.pop().close()
    time.sleep(0.2)
    again = raw(server.address)
    again.go()  # a freed slot is reusable


def test_idle_timeout(own_server: Callable[..., RunningServer], raw: Raw) -> None:
    server = own_server("--idle-timeout", "1")
    busy, idle = raw(server.address), raw(server.address)
    busy.go()
    idle.go()
    for _ in range(6):  # a client making requests is never idle
        assert busy.read(0, 512)[0] == 0
        time.sleep(0.3)
    assert idle.closed_within(5)
    assert busy.read(0, 512)[0] == 0
    wait_for_log(server, "idle timeout")


def test_tls_downgrade_attempts_in_require_mode(
    own_server: Callable[..., RunningServer], raw: Raw, made_certs: Path
) -> None:
    server = own_server(
        "--tls",
        "require",
        "--tls-certificates",
        str(made_certs),
        tls_dir=made_certs / "clients" / "alice",
    )
    client = raw(server.address)
    client.start()
    # Every option but STARTTLS and ABORT is refused before TLS.
    for ask in (client.hs.opt_list, client.hs.opt_structured_reply):
        (reply,) = client.option(ask())
        assert isinstance(reply, OptionError) and reply.rep == Rep.ERR_TLS_REQD
    for go in (client.hs.opt_info, client.hs.opt_go):
        (reply,) = client.option(go("demo"))
        assert isinstance(reply, OptionError) and reply.rep == Rep.ERR_TLS_REQD
    # EXPORT_NAME cannot be refused with an error: the server hangs up.
    client.send(client.hs.opt_export_name("demo"))
    assert client.closed_within(5)

    # STARTTLS with a plaintext GO smuggled right behind it: the injected bytes are dropped
    # with the connection, never answered.
    sneaky = raw(server.address)
    sneaky.start()
    injected = struct.pack(">QII", 0x49484156454F5054, Opt.GO, 6) + b"\0\0\0\0\0\0"
    sneaky.send(sneaky.hs.opt_starttls() + injected)
    assert isinstance(sneaky._event(sneaky.hs), OptionAck)
    assert sneaky.closed_within(5)
    wait_for_log(server, "plaintext bytes after STARTTLS")

    # The real thing works: STARTTLS, then GO inside TLS.
    good = raw(server.address)
    good.start()
    assert isinstance(good.option(good.hs.opt_starttls())[0], OptionAck)
    good.hs.start_tls()
    context = ssl.create_default_context(cafile=str(made_certs / "ca-cert.pem"))
    good.sock = context.wrap_socket(good.sock, server_hostname="localhost")
    assert isinstance(good.option(good.hs.opt_go("demo"))[-1], OptionAck)
