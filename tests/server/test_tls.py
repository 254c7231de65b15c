"""STARTTLS on the server and the client side, with trustme certificates."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
import trustme

from erofs_nbd_client.negotiate import Handshake, NegotiationError, negotiate
from erofs_nbdd.config import ServerConfig, TLSConfig, TLSMode, parse_allow
from erofs_nbdd.protocol import Opt, Rep, TransmissionFlag, wire
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.server.listener import Server
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.transport.contexts import TLSSetupError, client_context, server_context
from erofs_nbdd.transport.stream import StreamTransport

from .helpers import read_all

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from .conftest import Connect


@dataclass
class PKI:
    server_dir: Path
    alice: Path  # a client directory with a certificate (CN alice)
    bob: Path
    anonymous: Path  # only the CA certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ca = trustme.CA()
    root = tmp_path_factory.mktemp("pki")
    server_dir = root / "server"
    server_dir.mkdir()
    ca.cert_pem.write_to_path(str(server_dir / "ca-cert.pem"))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(server_dir / "server-cert.pem"))
    cert.private_key_pem.write_to_path(str(server_dir / "server-key.pem"))
    dirs = {}
    for name in ("alice", "bob", "anonymous"):
        d = root / name
        d.mkdir()
        ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
        if name != "anonymous":
            client = ca.issue_cert(common_name=name)
            client.cert_chain_pems[0].write_to_path(str(d / "client-cert.pem"))
            client.private_key_pem.write_to_path(str(d / "client-key.pem"))
        dirs[name] = d
    return PKI(server_dir, dirs["alice"], dirs["bob"], dirs["anonymous"])


def tls_config(pki: PKI, mode: TLSMode, **kw: object) -> TLSConfig:
    return TLSConfig(mode=mode, cert_dir=pki.server_dir, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def running(
    images: Path, pki: PKI, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Server, str]]:
    """A server whose TLS settings come from the test's ``tls`` marker-free parameter."""
    config: TLSConfig = request.param(pki) if callable(request.param) else request.param
    server = Server(ServerConfig(root=images, listen=("127.0.0.1:0",), tls=config))
    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(server.run)
        yield server, address
        nursery.cancel_scope.cancel()


def _mode(mode: TLSMode, **kw: object) -> object:
    return lambda pki: tls_config(pki, mode, **kw)


ON, REQUIRE, OFF = _mode(TLSMode.ON), _mode(TLSMode.REQUIRE), (lambda pki: TLSConfig())


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_over_memory_streams(images: Path, pki: PKI, version: ssl.TLSVersion) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    config = ServerConfig(root=images, tls=tls_config(pki, TLSMode.REQUIRE))
    server_ctx = server_context(pki.server_dir)
    conn = Connection(
        StreamTransport(server_stream), "memory", config, ExportDirectory(images), server_ctx
    )
    ctx = client_context(pki.alice)
    ctx.maximum_version = version
    data = (images / "demo.erofs").read_bytes()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        details, session = await negotiate(
            client_stream, "demo", tls=ctx, server_hostname="localhost"
        )
        assert details.size == len(data)
        assert await session.pread(0, 1 << 20) == data[: 1 << 20]
        await session.disconnect()
    assert conn.stats.tls.startswith(version.name.replace("v1_", "v1.") + "/")
    assert "GCM" in conn.stats.tls or "CHACHA20" in conn.stats.tls  # the cipher is logged too
    assert conn.stats.ended == "disconnect"


PRE_TLS_OPTIONS = [
    (Opt.LIST, b""),
    (Opt.INFO, wire.info_request(b"demo", ())),
    (Opt.GO, wire.info_request(b"demo", ())),
    (Opt.STRUCTURED_REPLY, b""),
    (Opt.LIST_META_CONTEXT, wire.meta_context_request(b"demo", ())),
    (Opt.SET_META_CONTEXT, wire.meta_context_request(b"demo", (b"base:allocation",))),
    (Opt.EXTENDED_HEADERS, b""),
    (Opt.PEEK_EXPORT, b""),
    (999, b"junk"),
    (Opt.LIST, b"malformed"),
]


@pytest.mark.parametrize("running", [REQUIRE], indirect=True)
async def test_require_mode_refuses_every_option_before_tls(
    running: tuple[Server, str], pki: PKI, connect: Connect
) -> None:
    _, address = running
    hs = Handshake(await connect(address))
    await hs.start()
    for opt, data in PRE_TLS_OPTIONS:
        with pytest.raises(NegotiationError) as excinfo:
            await hs._option(hs.machine.opt_raw(opt, data))
        assert excinfo.value.rep == Rep.ERR_TLS_REQD, opt
    await hs.starttls(client_context(pki.anonymous), "localhost")
    with pytest.raises(NegotiationError) as excinfo:  # STARTTLS twice
        await hs._option(hs.machine.opt_starttls())
    assert excinfo.value.rep == Rep.ERR_INVALID
    assert sorted(e.name for e in await hs.list_exports()) == ["alias", "demo", "team/app-v2"]
    assert (await hs.go("demo")).size > 0


@pytest.mark.parametrize("running", [REQUIRE], indirect=True)
async def test_require_mode_abort_and_export_name(
    running: tuple[Server, str], connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    _, address = running
    hs = Handshake(await connect(address))
    await hs.start()
    await hs.abort()
    assert hs.machine.state.name == "CLOSED"
    hs = Handshake(await connect(address))
    await hs.start()
    with pytest.raises(NegotiationError, match="closed the connection"):
        await hs.export_name("demo")
    await trio.sleep(0.1)
    assert "EXPORT_NAME before TLS" in caplog.text


@pytest.mark.parametrize("running", [ON], indirect=True)
async def test_plaintext_after_starttls_is_dropped(
    running: tuple[Server, str], connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    _, address = running
    stream = await connect(address)
    injected = wire.option(Opt.STRUCTURED_REPLY)
    await stream.send_all(b"\0\0\0\3" + wire.option(Opt.STARTTLS) + injected)
    received = await read_all(stream)
    assert received == wire.greeting(3) + wire.option_reply(Opt.STARTTLS, Rep.ACK)
    await trio.sleep(0.1)
    assert "plaintext bytes after STARTTLS" in caplog.text


@pytest.mark.parametrize("running", [ON], indirect=True)
async def test_on_mode_serves_plaintext_and_forgets_pre_tls_state(
    running: tuple[Server, str], pki: PKI, connect: Connect, images: Path
) -> None:
    _, address = running
    details, session = await negotiate(await connect(address), "demo")
    assert await session.pread(0, 512) == (images / "demo.erofs").read_bytes()[:512]
    hs = Handshake(await connect(address))
    await hs.start()
    await hs.structured_replies()
    await hs.starttls(client_context(pki.alice), "localhost")
    assert not hs.negotiated.structured_replies
    details = await hs.go("demo")
    assert not details.flags & TransmissionFlag.SEND_DF  # the server forgot it too


@pytest.mark.parametrize("running", [OFF], indirect=True)
async def test_client_refuses_plaintext_when_tls_was_asked(
    running: tuple[Server, str], pki: PKI, connect: Connect
) -> None:
    _, address = running
    with pytest.raises(NegotiationError, match="not continuing in plaintext") as excinfo:
        await negotiate(await connect(address), "demo", tls=client_context(pki.alice))
    assert excinfo.value.rep == Rep.ERR_POLICY


@pytest.mark.parametrize("running", [ON], indirect=True)
async def test_client_checks_the_server_name(
    running: tuple[Server, str], pki: PKI, connect: Connect
) -> None:
    _, address = running
    with pytest.raises(NegotiationError, match=r"TLS handshake failed.*(hostname|match)"):
        await negotiate(
            await connect(address), "demo", tls=client_context(pki.alice), server_hostname="evil"
        )
    other_ca = trustme.CA()
    ctx = ssl.create_default_context()
    other_ca.configure_trust(ctx)
    with pytest.raises(NegotiationError, match="certificate verify failed"):
        await negotiate(await connect(address), "demo", tls=ctx, server_hostname="localhost")


VERIFY = _mode(TLSMode.REQUIRE, verify_peer=True)
ALLOW = _mode(TLSMode.ON, verify_peer=True, allow=(parse_allow("team/*=alice,carol"),))


@pytest.mark.parametrize("running", [VERIFY], indirect=True)
async def test_verify_peer(
    running: tuple[Server, str], pki: PKI, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    _, address = running
    with pytest.raises(NegotiationError, match="require a client certificate"):
        await negotiate(
            await connect(address),
            "demo",
            tls=client_context(pki.anonymous),
            server_hostname="localhost",
        )
    _details, session = await negotiate(
        await connect(address), "demo", tls=client_context(pki.alice), server_hostname="localhost"
    )
    await session.disconnect()
    await trio.sleep(0.1)
    assert "client=" in caplog.text
    assert "CN=alice" in caplog.text
    assert "refused: TLS handshake failed" in caplog.text


@pytest.mark.parametrize("running", [ALLOW], indirect=True)
async def test_allow_list(running: tuple[Server, str], pki: PKI, connect: Connect) -> None:
    _, address = running

    async def session_as(who: Path | None) -> Handshake:
        hs = Handshake(await connect(address))
        await hs.start()
        if who is not None:
            await hs.starttls(client_context(who), "localhost")
        return hs

    alice = await session_as(pki.alice)
    assert sorted(e.name for e in await alice.list_exports()) == ["alias", "demo", "team/app-v2"]
    assert (await alice.info("team/app-v2")).size > 0
    bob = await session_as(pki.bob)
    assert sorted(e.name for e in await bob.list_exports()) == ["alias", "demo"]
    with pytest.raises(NegotiationError) as excinfo:
        await bob.info("team/app-v2")
    assert excinfo.value.rep == Rep.ERR_POLICY
    assert (await bob.info("demo")).size > 0
    plain = await session_as(None)
    assert sorted(e.name for e in await plain.list_exports()) == ["alias", "demo"]
    with pytest.raises(NegotiationError) as excinfo:
        await plain.go("team/app-v2")
    assert excinfo.value.rep == Rep.ERR_TLS_REQD


def test_tls_settings_that_cannot_work(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(TLSSetupError, match="needs --tls-certificates"):
        TLSConfig(mode=TLSMode.ON).check()
    with pytest.raises(TLSSetupError, match="needs --tls-verify-peer"):
        tls_config(pki, TLSMode.ON, allow=(parse_allow("x=y"),)).check()
    with pytest.raises(TLSSetupError, match="EXPORT=CN"):
        parse_allow("no-equals")
    with pytest.raises(TLSSetupError, match="erofs-nbdd certs"):
        server_context(tmp_path)
    with pytest.raises(TLSSetupError, match=r"ca-cert\.pem is missing"):
        client_context(tmp_path)
    ctx = server_context(pki.server_dir)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.num_tickets == 0
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.options & ssl.OP_NO_RENEGOTIATION


class _CountingStream(trio.abc.Stream):
    """A transport that remembers the size of every write and of every TLS record in them
    (each record starts with a 5-byte header whose last two bytes are its length)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[int] = []
        self.records: list[int] = []
        self._pending = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        self._pending += bytes(data)
        at = 0
        while len(self._pending) - at >= 5:
            size = int.from_bytes(self._pending[at + 3 : at + 5], "big")
            if len(self._pending) - at < 5 + size:
                break
            self.records.append(size)
            at += 5 + size
        self._pending = self._pending[at:]
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "openssl"])
async def test_tls_replies_are_encrypted_in_slices_of_whole_records(pki: PKI, sealed: bool) -> None:
    """A 256 KiB read reply plus its header is one slice and one write, not a second write
    carrying a 16-byte record; a 1 MiB reply is four, and 65 records: every record full but
    the last, so the client has no short record to read on its own. The same whether the
    server seals the records itself (records.py) or OpenSSL does."""
    from erofs_nbdd.transport.keylog import KeyLog
    from erofs_nbdd.transport.records import RECORD
    from erofs_nbdd.transport.sealing import Sealing
    from erofs_nbdd.transport.slices import SEND_SLICE
    from erofs_nbdd.transport.stream import StreamTransport
    from erofs_nbdd.transport.tls import TLSTransport

    a, b = trio.testing.memory_stream_pair()
    counted = _CountingStream(a)
    context = server_context(pki.server_dir)
    sealing = Sealing(KeyLog(context)) if sealed else None
    server = TLSTransport(StreamTransport(counted), context, server_side=True, sealing=sealing)
    client = TLSTransport(
        StreamTransport(b), client_context(pki.alice), server_hostname="localhost"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    assert (server.sealed is not None) == sealed
    cases = [(16, 1), (SEND_SLICE + 16, 1), (4 * SEND_SLICE + 16, 4), (600_000, 2), (0, 0)]
    for size, writes in cases:
        counted.writes.clear()
        counted.records.clear()
        got = bytearray()

        async def receive(size: int = size, got: bytearray = got) -> None:
            with trio.fail_after(10):
                while len(got) < size:
                    got += await client.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await server.send_all(bytes(range(256)) * (size // 256) + bytes(size % 256))
        assert len(got) == size
        assert len(counted.writes) == writes, (size, counted.writes)
        full, rest = divmod(size, RECORD)  # each record carries 17 bytes more: type and tag
        assert counted.records == [RECORD + 17] * full + [rest + 17] * bool(rest), size
