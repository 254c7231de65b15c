"""The attach client against servers that break the protocol during the handshake: it must
end with its protocol-error status and a message naming what was wrong, never a traceback."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio

from erofs_nbd_client.connect import open_connections
from erofs_nbd_client.errors import AttachError, ExitStatus
from erofs_nbd_client.target import Target
from erofs_nbdd.protocol import Opt, Rep, wire


def _answer(opt: int, bad: str) -> bytes:
    """What the hostile server says to one option: GO and INFO get the bad reply, the
    rest are politely refused."""
    if opt not in (Opt.GO, Opt.INFO):
        return wire.option_reply(opt, Rep.ERR_UNSUP)
    if bad == "short info":
        return wire.option_reply(opt, Rep.INFO, b"\0")
    if bad == "empty info":
        return wire.option_reply(opt, Rep.INFO)
    if bad == "info export cut short":
        return wire.option_reply(opt, Rep.INFO, wire.info_export(1 << 20, 1)[:7])
    assert bad == "ack without export info"
    return wire.option_reply(opt, Rep.ACK)


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = await stream.receive_some(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


async def _serve_once(listener: trio.SocketListener, bad: str) -> None:
    """Greet, read the client's flags, then answer options until the client hangs up."""
    stream = await listener.accept()
    async with stream:
        with trio.move_on_after(10), contextlib.suppress(EOFError, trio.BrokenResourceError):
            await stream.send_all(wire.greeting(3))
            await _receive_exactly(stream, 4)
            for _ in range(16):  # bounded: the client asks a few options at most
                header = await _receive_exactly(stream, wire.OPTION_HEADER.size)
                _, opt, length = wire.OPTION_HEADER.unpack(header)
                await _receive_exactly(stream, length)
                await stream.send_all(_answer(opt, bad))


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("short info", "malformed reply"),
        ("empty info", "malformed reply"),
        ("info export cut short", "NBD_INFO_EXPORT is 7 bytes"),
        ("ack without export info", "without NBD_INFO_EXPORT"),
    ],
)
async def test_handshake_breakage_is_a_protocol_error(tmp_path: Path, bad: str, match: str) -> None:
    path = str(tmp_path / "hostile.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(1)
    listener = trio.SocketListener(sock)
    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(_serve_once, listener, bad)
        with pytest.raises(AttachError) as caught:
            await open_connections(Target(unix_path=path, export="demo"), 1, None)
        assert caught.value.status is ExitStatus.PROTOCOL_ERROR
        assert "broke the NBD protocol" in str(caught.value)
        assert match in str(caught.value)
