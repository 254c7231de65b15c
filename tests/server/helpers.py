"""Running our server in-process and talking to it with our own client machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from erofs_nbdd.config import Limits, ServerConfig
from erofs_nbdd.server.listener import serve

if TYPE_CHECKING:
    from pathlib import Path

    from erofs_nbd_client.negotiate import Session


async def start_server(
    nursery: trio.Nursery, root: Path, *, limits: Limits | None = None, **kw: object
) -> str:
    config = ServerConfig(
        root=root,
        listen=("127.0.0.1:0",),
        limits=limits or Limits(),
        **kw,  # type: ignore[arg-type]
    )
    addresses: list[str] = await nursery.start(serve, config)
    return addresses[0]


async def read_all(stream: trio.abc.ReceiveStream, limit: float = 5) -> bytes:
    """Everything the peer sends until it closes (bounded in time)."""
    out = bytearray()
    with trio.fail_after(limit):
        while chunk := await stream.receive_some(65536):
            out += chunk
    return bytes(out)


async def check_read(session: Session, data: bytes, offset: int, length: int) -> None:
    """One read through ``session`` returns ``data``'s bytes there."""
    assert await session.pread(offset, length) == data[offset : offset + length]
