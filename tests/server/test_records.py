"""TLS 1.3 records sealed by the server itself (records.py, keylog.py), opened by OpenSSL."""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import hashes

from erofs_nbdd.cli import _config, build_parser
from erofs_nbdd.ranges import FileRange, ImageUnreadable
from erofs_nbdd.server.listener import Server
from erofs_nbdd.transport import records
from erofs_nbdd.transport.contexts import client_context, server_context
from erofs_nbdd.transport.keylog import KeyLog, client_random
from erofs_nbdd.transport.sealing import Sealing
from erofs_nbdd.transport.slices import SEND_SLICE
from erofs_nbdd.transport.stream import StreamTransport
from erofs_nbdd.transport.tls import TLSTransport

from ..tlsclient import _LIBSSL, _ssl_pointer

if TYPE_CHECKING:
    from pathlib import Path

CERTS_CLIENT = ("clients", "alice")


async def _pair(
    made_certs: Path, *, sealed: bool = True, version: ssl.TLSVersion | None = None
) -> tuple[TLSTransport, TLSTransport]:
    """A server stream (sealing, if ``sealed``) and an OpenSSL client stream, handshaken."""
    a, b = trio.testing.memory_stream_pair()
    ctx = server_context(made_certs)
    server = TLSTransport(
        StreamTransport(a), ctx, server_side=True, sealing=Sealing(KeyLog(ctx)) if sealed else None
    )
    client_ctx = client_context(made_certs.joinpath(*CERTS_CLIENT))
    if version is not None:
        client_ctx.maximum_version = version
    client = TLSTransport(StreamTransport(b), client_ctx, server_hostname="localhost")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
    return server, client


async def _received(client: TLSTransport, size: int) -> bytes:
    got = bytearray()
    with trio.fail_after(10):
        while len(got) < size:
            chunk = await client.receive_some()
            assert chunk, f"EOF after {len(got)} of {size} bytes"
            got += chunk
    return bytes(got)


SIZES = [1, records.RECORD - 16, records.RECORD, records.RECORD + 1, SEND_SLICE, SEND_SLICE + 16]
SIZES += [2 * SEND_SLICE - 1, 1 << 20, 3 * SEND_SLICE + 12345]


async def test_records_sealed_here_open_in_openssl(made_certs: Path, tmp_path: Path) -> None:
    """Replies from memory and from a file, of sizes around the record and slice bounds,
    reach an OpenSSL client byte for byte. The client checks every record's tag and its
    sequence number, so a wrong key, nonce or order fails here."""
    server, client = await _pair(made_certs)
    assert server.sealed is not None and server.describe().endswith("+sealed")
    image = tmp_path / "image"
    image.write_bytes(os.urandom(4 << 20))
    data = image.read_bytes()
    fd = os.open(image, os.O_RDONLY)
    try:
        for size in SIZES:
            head = size.to_bytes(16, "big")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, data[:size])
                assert await _received(client, size) == data[:size]
            offset = size % 4096
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_file, head, FileRange(fd, offset, size))
                got = await _received(client, 16 + size)
            assert got == head + data[offset : offset + size], size
    finally:
        os.close(fd)


async def test_a_file_that_ends_early_is_named(made_certs: Path, tmp_path: Path) -> None:
    server, _client = await _pair(made_certs)
    image = tmp_path / "short"
    image.write_bytes(b"x" * 1000)
    fd = os.open(image, os.O_RDONLY)
    try:
        with pytest.raises(ImageUnreadable, match="ended at 1000"):
            await server.send_file(b"h" * 16, FileRange(fd, 0, 5000))
    finally:
        os.close(fd)


async def test_records_openssl_wrote_after_the_handshake_leave_sealing_to_it(
    made_certs: Path,
) -> None:
    """Had OpenSSL written records after the handshake (session tickets, which the
    server's context turns off), their sequence numbers are OpenSSL's: sealing from 0 would
    use a nonce twice, so the server leaves the records to OpenSSL."""
    a, b = trio.testing.memory_stream_pair()
    ctx = server_context(made_certs)
    ctx.num_tickets = 2
    server = TLSTransport(StreamTransport(a), ctx, server_side=True, sealing=Sealing(KeyLog(ctx)))
    client = TLSTransport(
        StreamTransport(b),
        client_context(made_certs.joinpath(*CERTS_CLIENT)),
        server_hostname="localhost",
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            nursery.start_soon(client.do_handshake)
    assert server.sealed is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"t" * 40000)
        assert await _received(client, 40000) == b"t" * 40000


async def test_tls12_stays_with_openssl(made_certs: Path) -> None:
    """Only TLS 1.3 records are sealed here; a TLS 1.2 session keeps OpenSSL's."""
    server, client = await _pair(made_certs, version=ssl.TLSVersion.TLSv1_2)
    assert server.sealed is None and not server.describe().endswith("+sealed")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"z" * 70000)
        assert await _received(client, 70000) == b"z" * 70000


async def test_key_update_and_close_notify_from_openssl_are_resealed(made_certs: Path) -> None:
    """A client asks the server to change its key: OpenSSL's KeyUpdate goes out as our
    record, and both move to the next key at it (the data after it opens). The close_notify
    OpenSSL writes at close reaches the client as a clean EOF, not a bad record."""
    server, client = await _pair(made_certs)
    assert server.sealed is not None
    secret = server.sealed.sealer._secret
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"a" * 50000)
        assert await _received(client, 50000) == b"a" * 50000
    assert _LIBSSL.SSL_key_update(_ssl_pointer(client._session), 1) == 1  # type: ignore[arg-type]
    await client.send_all(b"request")  # the KeyUpdate goes with it
    with trio.fail_after(10):
        assert await server.receive_some() == b"request"
    assert server.sealed.sealer._secret != secret  # the answer went out, under the old key
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"b" * 70000)
        assert await _received(client, 70000) == b"b" * 70000
    await server.aclose()
    with trio.fail_after(10):
        assert await client.receive_some() == b""


async def test_without_the_key_update_the_client_fails(made_certs: Path) -> None:
    """The test above can fail: a sealer that skips one sequence number (as one that
    missed a record OpenSSL wrote would) makes the client refuse the next record."""
    server, client = await _pair(made_certs)
    assert server.sealed is not None
    server.sealed.sealer.seq += 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_all, b"c" * 100)
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match=r"DECRYPT|MAC"):
            await client.receive_some()


def test_reseal_refuses_what_openssl_would_not_write() -> None:
    sealer = records.Sealer(records.SUITES["TLS_AES_128_GCM_SHA256"], b"s" * 32)
    with pytest.raises(records.RecordError, match=r"not TLS 1\.3"):
        sealer.reseal(b"\x16\x03\x01\x00\x05hello")
    with pytest.raises(records.RecordError, match="part of a record"):
        sealer.reseal(b"\x17\x03\x03\x01\x00short")
    with pytest.raises(records.RecordError, match="does not open"):
        sealer.reseal(b"\x17\x03\x03\x00\x20" + b"\0" * 32)


def test_a_record_from_openssl_is_carried_at_our_sequence_number() -> None:
    """What OpenSSL sealed at its sequence number 0 comes out at ours (here 5), with the
    same content; a KeyUpdate in it moves to the next key."""
    suite = records.SUITES["TLS_CHACHA20_POLY1305_SHA256"]
    openssl, ours, reader = (records.Sealer(suite, b"k" * 32) for _ in range(3))
    ours.seq = reader.seq = 5
    key_update = bytes([records.KEY_UPDATE, 0, 0, 1, 0])
    out = ours.reseal(openssl.seal(key_update, records.HANDSHAKE))
    opened = reader._aead.decrypt(reader._nonce(5), out[5:], out[:5])
    assert opened == key_update + bytes([records.HANDSHAKE])
    assert ours.seq == 0 and ours._secret != b"k" * 32
    openssl._next_key()  # as OpenSSL does after writing its KeyUpdate
    alert = ours.reseal(openssl.seal(b"\x01\x00", 21))  # close_notify, under the new key
    reader._next_key()
    assert reader._aead.decrypt(reader._nonce(0), alert[5:], alert[:5]) == b"\x01\x00\x15"


def test_expand_label_matches_rfc8448() -> None:
    """RFC 8448 section 3: the server's handshake traffic key and IV from its secret."""
    secret = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    hash_ = hashes.SHA256()
    assert records.expand_label(secret, b"key", 16, hash_).hex() == (
        "3fce516009c21727d0f2e4e86ee403bc"
    )
    assert records.expand_label(secret, b"iv", 12, hash_).hex() == "5d313eb2671276ee13000b30"


def test_keylog_gives_only_its_own_connection_and_empties(made_certs: Path) -> None:
    keys = KeyLog(server_context(made_certs))
    path = f"/proc/self/fd/{keys._fd}"
    mine, other = b"\x01" * 32, b"\x02" * 32
    with open(path, "a") as log:  # as OpenSSL appends its lines
        log.write(f"SERVER_TRAFFIC_SECRET_0 {other.hex()} {'ab' * 48}\n")
        log.write(f"CLIENT_TRAFFIC_SECRET_0 {mine.hex()} {'cd' * 48}\n")
        log.write(f"SERVER_TRAFFIC_SECRET_0 {mine.hex()} {'ef' * 48}\n")
    assert keys.take(mine) == bytes.fromhex("ef" * 48)
    assert os.path.getsize(path) == 0
    assert keys.take(other) is None


def test_client_random_comes_from_a_client_hello() -> None:
    hello = bytes([22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3]) + bytes(range(32)) + b"more"
    assert client_random(hello) == bytes(range(32))
    assert client_random(hello[:40]) is None  # not all of it yet
    assert client_random(b"\x17" + hello[1:]) is None  # not a handshake record


def test_tls_seal_flag(images: Path, made_certs: Path) -> None:
    """``--tls-seal openssl`` leaves every record to OpenSSL; the default seals here."""
    argv = ["serve", str(images), "--tls", "on", "--tls-certificates", str(made_certs)]
    argv += ["--tls-kernel", "off"]
    auto = _config(build_parser().parse_args(argv))
    off = _config(build_parser().parse_args([*argv, "--tls-seal", "openssl"]))
    assert auto.tls.seal and not off.tls.seal
    assert Server(auto).keys is not None
    assert Server(off).keys is None


def test_without_a_memfd_openssl_seals(
    images: Path,
    made_certs: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the key log cannot be set up (no memfd, no /proc), OpenSSL seals every record,
    and the log says why."""

    def refuse(*_args: object) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", refuse)
    argv = ["serve", str(images), "--tls", "on", "--tls-certificates", str(made_certs)]
    config = _config(build_parser().parse_args([*argv, "--tls-kernel", "off"]))
    assert Server(config).keys is None
    assert "sealed by OpenSSL: [Errno 38] Function not implemented" in caplog.text
