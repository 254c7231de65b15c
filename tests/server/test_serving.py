"""The trio server driven by our own client machine, in process, over loopback TCP."""

from __future__ import annotations

import random
import shutil
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client.negotiate import NegotiationError, RequestError, Session, negotiate
from erofs_nbdd.protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    Cmd,
    CmdFlag,
    Errno,
    Rep,
    SimpleReply,
    StateFlag,
    TransmissionFlag,
)

from .helpers import read_all, start_server

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Connect, Shake


async def test_list_names_and_describes_only_erofs_images_inside_the_root(
    nursery: trio.Nursery, images: Path, handshake: Shake
) -> None:
    address = await start_server(nursery, images)
    hs = await handshake(address)
    entries = {e.name: e.description for e in await hs.list_exports()}
    assert sorted(entries) == ["alias", "demo", "team/app-v2"]  # no notes.txt, no escape
    assert entries["demo"].startswith("EROFS, uuid ")
    assert "block size 4096" in entries["demo"]
    size = (images / "demo.erofs").stat().st_size
    assert f"({size} bytes)" in entries["demo"]
    await hs.abort()


@pytest.mark.parametrize("structured", [False, True])
async def test_reads_return_the_image_bytes(
    nursery: trio.Nursery, images: Path, structured: bool, connect: Connect
) -> None:
    address = await start_server(nursery, images)
    data = (images / "team" / "app-v2.erofs").read_bytes()
    details, session = await negotiate(await connect(address), "team/app-v2", structured=structured)
    assert details.size == len(data)
    assert details.block_size == (512, 4096, 32 * 1024 * 1024)
    assert details.canonical_name == "team/app-v2"
    expect = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
    expect |= TransmissionFlag.CAN_MULTI_CONN | TransmissionFlag.SEND_CACHE
    if structured:
        expect |= TransmissionFlag.SEND_DF
    assert details.flags == expect
    rng = random.Random(1)
    checks = []

    async def one(offset: int, length: int) -> None:
        checks.append((await session.pread(offset, length)) == data[offset : offset + length])

    async with trio.open_nursery() as readers:  # pipelined: 200 requests in flight at once
        for _ in range(200):
            length = rng.choice([512, 4096, 65536, 1 << 20])
            offset = rng.randrange(0, len(data) - length + 1) // 512 * 512
            readers.start_soon(one, offset, length)
    assert len(checks) == 200
    assert all(checks)
    with pytest.raises(RequestError, match="NBD error 22"):
        await session.pread(0, 0)  # unspecified by the spec: refused
    assert await session.pread(0, len(data)) == data
    await session.disconnect()


async def test_errors_keep_the_connection_usable(
    nursery: trio.Nursery, images: Path, connect: Connect
) -> None:
    address = await start_server(nursery, images)
    size = (images / "demo.erofs").stat().st_size
    head = (images / "demo.erofs").read_bytes()[:4096]
    _, session = await negotiate(await connect(address), "demo")
    cases = [
        (Cmd.WRITE, 0, 4096, 0, b"x" * 4096, Errno.EPERM),
        (Cmd.TRIM, 0, 4096, 0, b"", Errno.EPERM),
        (Cmd.WRITE_ZEROES, 0, 4096, 0, b"", Errno.EPERM),
        (Cmd.READ, size, 512, 0, b"", Errno.EINVAL),
        (Cmd.READ, size - 512, 1024, 0, b"", Errno.EINVAL),
        (Cmd.READ, 100, 512, 0, b"", Errno.EINVAL),
        (Cmd.READ, 0, 64 << 20, 0, b"", Errno.EINVAL),
        (Cmd.READ, 0, 512, CmdFlag.FUA, b"", Errno.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 512, 0, b"", Errno.EINVAL),
        (42, 0, 512, 0, b"", Errno.EINVAL),
    ]
    for cmd, offset, length, flags, payload, errno in cases:
        (reply,) = await session.request(cmd, offset, length, flags, payload)
        assert reply.error == errno, (cmd, offset, length)  # type: ignore[union-attr]
        assert await session.pread(0, 4096) == head
    await session.simple(Cmd.CACHE, 0, size)
    await session.simple(Cmd.FLUSH)
    await session.disconnect()


async def test_block_status_and_meta_contexts(
    nursery: trio.Nursery, images: Path, handshake: Shake
) -> None:
    address = await start_server(nursery, images)
    hs = await handshake(address)
    await hs.structured_replies()
    assert await hs.list_meta_context("demo") == [BASE_ALLOCATION]
    assert await hs.list_meta_context("demo", ("base:",)) == [BASE_ALLOCATION]
    assert await hs.list_meta_context("demo", ("qemu:dirty-bitmap:x",)) == []
    with pytest.raises(NegotiationError) as excinfo:
        await hs.set_meta_context("nope", (BASE_ALLOCATION,))
    assert excinfo.value.rep == Rep.ERR_UNKNOWN
    assert await hs.set_meta_context("demo", ("base:", BASE_ALLOCATION)) == {1: BASE_ALLOCATION}
    details = await hs.go("demo")
    assert details.contexts == {1: BASE_ALLOCATION}
    session = Session(hs.stream, hs.negotiated, hs.machine.trailing_data)
    status = await session.block_status(0, details.size)
    extents = status[1]
    assert sum(n for n, _ in extents) == details.size
    assert all(flags in (0, StateFlag.HOLE | StateFlag.ZERO) for _, flags in extents)
    (one,) = (await session.block_status(0, details.size, CmdFlag.REQ_ONE))[1]
    assert 0 < one[0] <= details.size
    await session.disconnect()


async def test_meta_contexts_do_not_carry_to_another_export(
    nursery: trio.Nursery, images: Path, handshake: Shake
) -> None:
    address = await start_server(nursery, images)
    hs = await handshake(address)
    await hs.structured_replies()
    await hs.set_meta_context("demo", (BASE_ALLOCATION,))
    details = await hs.go("alias")
    assert details.contexts == {1: BASE_ALLOCATION}  # the client's view; the server forgot
    session = Session(hs.stream, hs.negotiated, hs.machine.trailing_data)
    with pytest.raises(RequestError) as excinfo:
        await session.block_status(0, 4096)
    assert excinfo.value.errno == Errno.EINVAL


async def test_default_export(
    nursery: trio.Nursery, images: Path, tmp_path: Path, connect: Connect
) -> None:
    address = await start_server(nursery, images)
    with pytest.raises(NegotiationError, match="--default-export") as excinfo:
        await negotiate(await connect(address), "")
    assert excinfo.value.rep == Rep.ERR_UNKNOWN
    address = await start_server(nursery, images, default_export="team/app-v2")
    details, _ = await negotiate(await connect(address), "")
    assert details.size == (images / "team" / "app-v2.erofs").stat().st_size
    assert details.canonical_name == "team/app-v2"
    shutil.copy(images / "demo.erofs", tmp_path / "only.erofs")
    address = await start_server(nursery, tmp_path)
    details, _ = await negotiate(await connect(address), "")
    assert details.canonical_name == "only"


async def test_images_appear_and_vanish_without_restart(
    nursery: trio.Nursery, images: Path, tmp_path: Path, handshake: Shake
) -> None:
    address = await start_server(nursery, tmp_path)
    hs = await handshake(address)
    assert await hs.list_exports() == []
    shutil.copy(images / "demo.erofs", tmp_path / "new.erofs")
    assert [e.name for e in await hs.list_exports()] == ["new"]
    details = await hs.info("new")
    assert details.size == (images / "demo.erofs").stat().st_size
    (tmp_path / "new.erofs").unlink()
    with pytest.raises(NegotiationError, match="no export named 'new'"):
        await hs.info("new")


async def test_unsupported_options_and_starttls_without_tls(
    nursery: trio.Nursery, images: Path, handshake: Shake
) -> None:
    address = await start_server(nursery, images)
    hs = await handshake(address)
    for opt, data in [(11, b""), (4, b"x"), (12345, b"y" * 100)]:
        with pytest.raises(NegotiationError) as excinfo:
            await hs._option(hs.machine.opt_raw(opt, data))
        assert excinfo.value.rep == Rep.ERR_UNSUP
    with pytest.raises(NegotiationError, match="TLS is not enabled") as excinfo:
        await hs._option(hs.machine.opt_starttls())
    assert excinfo.value.rep == Rep.ERR_POLICY
    assert (await hs.info("demo")).size > 0


async def test_export_name(nursery: trio.Nursery, images: Path, handshake: Shake) -> None:
    address = await start_server(nursery, images)
    hs = await handshake(address)
    details = await hs.export_name("demo")
    assert details.size == (images / "demo.erofs").stat().st_size
    hs = await handshake(address)
    with pytest.raises(NegotiationError, match="closed the connection: no export 'missing'"):
        await hs.export_name("missing")


async def test_disconnect_answers_what_is_in_flight(
    nursery: trio.Nursery, images: Path, connect: Connect
) -> None:
    address = await start_server(nursery, images)
    stream = await connect(address)
    _, session = await negotiate(stream, "demo")
    data = (images / "demo.erofs").read_bytes()
    wire_out = b""
    cookies = []
    for i in range(20):
        cookie, req = session.machine.request(Cmd.READ, i * 4096, 4096)
        cookies.append(cookie)
        wire_out += req
    await stream.send_all(wire_out + session.machine.disconnect())
    session.machine.receive_data(await read_all(stream))
    replies = []
    while (event := session.machine.next_event()) is not NEED_DATA:
        assert isinstance(event, SimpleReply)
        replies.append(event)
    assert sorted(r.cookie for r in replies) == cookies
    for r in replies:
        i = cookies.index(r.cookie)
        assert r.data == data[i * 4096 : (i + 1) * 4096]


async def test_a_failing_read_is_a_clean_eio(
    nursery: trio.Nursery, images: Path, tmp_path: Path, connect: Connect
) -> None:
    image = tmp_path / "shrinking.erofs"
    shutil.copy(images / "demo.erofs", image)
    address = await start_server(nursery, tmp_path)
    details, session = await negotiate(await connect(address), "shrinking")
    head = await session.pread(0, 4096)
    with image.open("r+b") as f:
        f.truncate(8192)  # the export still claims its old size
    with pytest.raises(RequestError) as excinfo, trio.fail_after(10):
        await session.pread(details.size - 65536, 65536)
    assert excinfo.value.errno == Errno.EIO
    assert await session.pread(0, 4096) == head  # the connection survives


async def test_unix_socket(nursery: trio.Nursery, images: Path, tmp_path: Path) -> None:
    from erofs_nbdd.config import ServerConfig
    from erofs_nbdd.server.listener import serve

    path = tmp_path / "nbd.sock"
    path.touch()  # a stale non-socket file is never removed: bind fails
    with pytest.raises(OSError, match="in use"):
        await nursery.start(serve, ServerConfig(root=images, listen=(f"unix:{path}",)))
    path.unlink()
    addresses = await nursery.start(serve, ServerConfig(root=images, listen=(f"unix:{path}",)))
    assert addresses == [f"unix:{path}"]
    async with await trio.open_unix_socket(str(path)) as stream:
        _, session = await negotiate(stream, "demo")
        assert await session.pread(0, 512) == (images / "demo.erofs").read_bytes()[:512]
