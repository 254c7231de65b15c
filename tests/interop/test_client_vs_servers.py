"""Our client-side machines against servers nobody here wrote: nbdkit and qemu-nbd."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from erofs_nbd_client.negotiate import Handshake, NegotiationError, Session, negotiate
from erofs_nbdd.protocol import BASE_ALLOCATION, Rep, TransmissionFlag

from ..conftest import require_tool

pytestmark = pytest.mark.interop


def _start(cmd: list[str], socket: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, err = process.communicate()
            pytest.fail(f"{cmd[0]} did not start: {err.decode()}")
        time.sleep(0.05)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


@pytest.fixture(params=["nbdkit", "qemu-nbd"])
def peer(request: pytest.FixtureRequest, images: Path, tmp_path: Path) -> Iterator[Path]:
    socket = tmp_path / "peer.sock"
    image = str(images / "demo.erofs")
    if request.param == "nbdkit":
        cmd = [
            require_tool("nbdkit"),
            "-f",
            "-r",
            "-U",
            str(socket),
            "--filter=exportname",
            "file",
            image,
            "exportname=demo",
            "exportname-list=explicit",
            "exportname-strict=true",
            "exportdesc=fixed:demo image",
        ]
    else:
        cmd = [
            require_tool("qemu-nbd"),
            "-r",
            "-k",
            str(socket),
            "-f",
            "raw",
            "-x",
            "demo",
            "-D",
            "demo image",
            "-e",
            "4",
            "-t",
            image,
        ]
    process = _start(cmd, socket)
    yield socket
    _stop(process)


async def test_list_info_go_and_reads(peer: Path, images: Path) -> None:
    data = (images / "demo.erofs").read_bytes()
    async with await trio.open_unix_socket(str(peer)) as stream:
        hs = Handshake(stream)
        await hs.start()
        entries = await hs.list_exports()
        assert [e.name for e in entries] == ["demo"]
        assert entries[0].description == "demo image"
        with pytest.raises(NegotiationError) as excinfo:
            await hs.info("no-such-export")
        assert excinfo.value.rep in (Rep.ERR_UNKNOWN, Rep.ERR_POLICY)
        details = await hs.info("demo")
        assert details.size == len(data)
        assert details.flags & TransmissionFlag.READ_ONLY
        await hs.abort()


@pytest.mark.parametrize("structured", [False, True])
async def test_negotiate_then_pipelined_reads(peer: Path, images: Path, structured: bool) -> None:
    data = (images / "demo.erofs").read_bytes()
    async with await trio.open_unix_socket(str(peer)) as stream:
        details, session = await negotiate(
            stream, "demo", meta_contexts=(BASE_ALLOCATION,) if structured else ()
        )
        assert details.size == len(data)
        results: list[bool] = []

        async def one(offset: int) -> None:
            results.append(await session.pread(offset, 65536) == data[offset : offset + 65536])

        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, (i * 65536) % (len(data) - 65536))
        assert results == [True] * 32
        if structured:
            (context_id,) = details.contexts
            status = await session.block_status(0, len(data))
            assert sum(n for n, _ in status[context_id]) <= len(data)
        await session.disconnect()


async def test_export_name_fallback_path(peer: Path, images: Path) -> None:
    async with await trio.open_unix_socket(str(peer)) as stream:
        hs = Handshake(stream)
        await hs.start()
        details = await hs.export_name("demo")
        assert details.size == (images / "demo.erofs").stat().st_size
        session = Session(stream, hs.negotiated, hs.machine.trailing_data)
        assert await session.pread(1024, 512) == (images / "demo.erofs").read_bytes()[1024:1536]
        await session.disconnect()
