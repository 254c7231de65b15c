"""Kernel TLS on the host: detection, settings, and the path where OpenSSL drives the socket
but the kernel takes no keys (this host's kernel has no TLS module). The kernel's own
encryption is tested in the VM (tests/kernel/test_ktls.py)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client.negotiate import Session, negotiate
from erofs_nbdd.cli import _config, build_parser
from erofs_nbdd.config import Limits, TLSConfig, TLSMode
from erofs_nbdd.protocol import Cmd
from erofs_nbdd.ranges import FileRange, ImageUnreadable
from erofs_nbdd.server.listener import Server
from erofs_nbdd.transport import ktls
from erofs_nbdd.transport.contexts import client_context
from erofs_nbdd.transport.ktls import KernelTLSTransport
from erofs_nbdd.transport.slices import SEND_SLICE, file_slices

from ..conftest import mkfs, require_tool
from ..tlsclient import StdlibTLSClient, reads_across_key_updates, renegotiation_is_refused
from .helpers import start_server

if TYPE_CHECKING:
    from .conftest import Connect

KERNEL_HAS_TLS = ktls.available()


@pytest.fixture
def kernel_tls_claimed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server believes the kernel can take TLS keys: it lets OpenSSL drive the socket
    and try. On a kernel without the tls module the try fails and OpenSSL encrypts."""
    monkeypatch.setattr(ktls, "available", lambda: True)


def test_available_reads_the_kernels_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ulp = tmp_path / "tcp_available_ulp"
    monkeypatch.setattr(ktls, "ULP_LIST", ulp)
    assert not ktls.available()  # no such file: no kernel TLS
    ulp.write_text("mptcp\n")
    assert not ktls.available()
    ulp.write_text("mptcp tls_other\n")  # a name, not a substring
    assert not ktls.available()
    ulp.write_text("mptcp tls\n")
    assert ktls.available()


def test_a_plain_socket_is_not_encrypted_by_the_kernel() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        assert not ktls.sending(client)


def test_tls_kernel_off_keeps_encryption_here(
    images: Path, made_certs: Path, kernel_tls_claimed: None
) -> None:
    argv = ["serve", str(images), "--tls", "on", "--tls-certificates", str(made_certs)]
    on = _config(build_parser().parse_args(argv))
    off = _config(build_parser().parse_args([*argv, "--tls-kernel", "off"]))
    assert on.tls.kernel and not off.tls.kernel
    on_ctx, off_ctx = Server(on).ssl_context, Server(off).ssl_context
    assert on_ctx is not None and off_ctx is not None
    assert ktls.enabled(on_ctx)
    assert not ktls.enabled(off_ctx)


async def test_the_log_says_whether_the_kernel_encrypts(
    nursery: trio.Nursery,
    images: Path,
    made_certs: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="erofs_nbdd")
    tls = TLSConfig(mode=TLSMode.ON, cert_dir=made_certs)
    monkeypatch.setattr(ktls, "available", lambda: False)
    await start_server(nursery, images, tls=tls)
    assert "kernel TLS unavailable (no tls module: `modprobe tls`" in caplog.text
    caplog.clear()
    monkeypatch.setattr(ktls, "available", lambda: True)
    await start_server(nursery, images, tls=tls)
    assert "kernel TLS: the kernel encrypts replies" in caplog.text


def test_slices_of_a_file_follow_the_head(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 * SEND_SLICE + 1000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for head, offset, length in [(b"H" * 16, 0, len(data)), (b"x", 5, 100), (b"", 7, 70000)]:
            pieces = [bytes(p) for p in file_slices(head, FileRange(fd, offset, length))]
            assert b"".join(pieces) == head + data[offset : offset + length]
            assert max(map(len, pieces)) <= SEND_SLICE * 3 // 2  # slices, not one buffer
        with pytest.raises(ImageUnreadable, match="ended at"):
            list(file_slices(b"H", FileRange(fd, len(data) - 10, 20)))
    finally:
        os.close(fd)


async def test_openssl_encrypts_when_the_kernel_takes_no_keys(
    nursery: trio.Nursery,
    images: Path,
    made_certs: Path,
    connect: Connect,
    kernel_tls_claimed: None,
) -> None:
    data = (images / "demo.erofs").read_bytes()
    tls = TLSConfig(mode=TLSMode.REQUIRE, cert_dir=made_certs)
    server_address = await start_server(nursery, images, tls=tls)
    ctx = client_context(made_certs / "clients" / "alice")
    _, session = await negotiate(
        await connect(server_address), "demo", tls=ctx, server_hostname="localhost"
    )
    async with trio.open_nursery() as readers:  # pipelined: small batched, large as files
        for i in range(24):
            offset, length = (i * 4096, 4096) if i % 2 else (i * 512, min(len(data), 256 << 10))
            length = min(length, len(data) - offset)
            readers.start_soon(_check, session, data, offset, length)
    assert await session.pread(0, len(data)) == data
    await session.disconnect()


async def _check(session: Session, data: bytes, offset: int, length: int) -> None:
    assert await session.pread(offset, length) == data[offset : offset + length]


async def test_nbdcopy_through_a_socket_openssl_drives(
    images: Path, made_certs: Path, tmp_path: Path, kernel_tls_claimed: None
) -> None:
    """libnbd (GnuTLS) reads the whole export over several connections; every connection
    went through KernelTLSTransport, and only a kernel with TLS encrypts for it."""
    nbdcopy = require_tool("nbdcopy")
    streams: list[KernelTLSTransport] = []
    real_init = KernelTLSTransport.__init__

    def spy(self: KernelTLSTransport, *args: object) -> None:
        real_init(self, *args)  # type: ignore[arg-type]
        streams.append(self)

    data = (images / "demo.erofs").read_bytes()
    out = tmp_path / "copy"
    certs = made_certs / "clients" / "alice"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KernelTLSTransport, "__init__", spy)
        async with trio.open_nursery() as nursery:
            address = await start_server(
                nursery, images, tls=TLSConfig(mode=TLSMode.REQUIRE, cert_dir=made_certs)
            )
            uri = f"nbds://{address}/demo?tls-certificates={certs}"
            with trio.fail_after(60):
                await trio.run_process([nbdcopy, "--connections=4", uri, str(out)])
            nursery.cancel_scope.cancel()
    assert out.read_bytes() == data
    assert streams
    assert all(s.kernel is KERNEL_HAS_TLS for s in streams)


async def test_a_tls_client_that_never_reads_is_dropped(
    nursery: trio.Nursery,
    tmp_path: Path,
    made_certs: Path,
    connect: Connect,
    caplog: pytest.LogCaptureFixture,
    kernel_tls_claimed: None,
) -> None:
    """Replies that OpenSSL writes on the socket are bounded by the reply timeout too."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(4 << 20))
    mkfs(tmp_path / "images" / "big.erofs", tree)
    (tmp_path / "images" / "big.erofs").read_bytes()  # cached: large reads go as files
    caplog.set_level(logging.INFO, logger="erofs_nbdd")
    tls = TLSConfig(mode=TLSMode.REQUIRE, cert_dir=made_certs)
    address = await start_server(
        nursery, tmp_path / "images", tls=tls, limits=Limits(reply_timeout=1)
    )
    ctx = client_context(made_certs / "clients" / "alice")
    _, session = await negotiate(
        await connect(address), "big", tls=ctx, server_hostname="localhost"
    )
    asks = [session.machine.request(Cmd.READ, 0, 1 << 20)[1] for _ in range(200)]
    await session.stream.send_all(b"".join(asks))  # 200 MiB asked for, nothing read
    with trio.fail_after(30):
        while "(reply timeout)" not in caplog.text:
            await trio.sleep(0.1)
    assert "client read no reply for 1 s (reply timeout)" in caplog.text


def test_kernel_tls_needs_openssls_option() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert not ktls.enabled(ctx)
    ktls.enable(ctx)
    assert ktls.enabled(ctx)
    assert ctx.options & 8  # SSL_OP_ENABLE_KTLS in OpenSSL 3


@pytest.fixture(params=["sealed", "memory-bio", "openssl-socket"])
async def in_process_tls_server(
    request: pytest.FixtureRequest,
    nursery: trio.Nursery,
    images: Path,
    made_certs: Path,
) -> str:
    """A TLS server's address, on each path where this process encrypts: records sealed by
    the server itself (records.py), by OpenSSL to a memory BIO, and by OpenSSL on the socket
    (told the kernel has TLS, which this host refuses)."""
    if request.param == "openssl-socket":
        request.getfixturevalue("kernel_tls_claimed")
    tls = TLSConfig(mode=TLSMode.REQUIRE, cert_dir=made_certs, seal=request.param == "sealed")
    return await start_server(nursery, images, tls=tls)


async def test_key_updates_keep_the_connection_and_are_answered(
    in_process_tls_server: str, images: Path, made_certs: Path
) -> None:
    """A TLS 1.3 client may change its send key at any time (GnuTLS does after about 2^24
    records, so a long-lived libnbd connection will) and may ask the server to change its
    own. In this process OpenSSL does both. (With the kernel encrypting, see
    tests/kernel/test_ktls.py.)"""
    image = (images / "demo.erofs").read_bytes()

    def run() -> dict[bool, bool]:
        alice = made_certs / "clients" / "alice"
        with StdlibTLSClient(in_process_tls_server, alice, "demo") as client:
            return reads_across_key_updates(client, image)

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(run) == {False: False, True: True}


async def test_renegotiation_is_refused_and_the_server_goes_on(
    in_process_tls_server: str, images: Path, made_certs: Path
) -> None:
    """TLS 1.2 renegotiation would change keys that kernel TLS holds, and makes the server
    run handshakes on a client's demand: refused (OP_NO_RENEGOTIATION), that connection
    ends, and the next client is served."""
    image = (images / "demo.erofs").read_bytes()
    alice = made_certs / "clients" / "alice"
    v12 = ssl.TLSVersion.TLSv1_2

    def renegotiate() -> bool:
        with StdlibTLSClient(in_process_tls_server, alice, "demo", v12) as client:
            return renegotiation_is_refused(client, image)

    def read_on() -> dict[bool, bool]:
        with StdlibTLSClient(in_process_tls_server, alice, "demo") as client:
            return reads_across_key_updates(client, image)

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(renegotiate)
        assert await trio.to_thread.run_sync(read_on) == {False: False, True: True}
