"""Any trio stream as a transport: memory streams in tests, or a peer reached through
something other than a socket of ours. Nothing is tried without waiting, every send goes
through the stream, and the reply timeout bounds each send as a whole (a timer per send:
this is not the server's fast path, ``PlainTransport`` is)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Policy, Transport
from .lock import FastLock
from .slices import file_slices

if TYPE_CHECKING:
    import trio

    from ..ranges import FileRange

RECEIVE_SIZE = 65536


class StreamTransport(Transport):
    """Owns the stream it is given: ``aclose`` closes it."""

    def __init__(self, stream: trio.abc.Stream, policy: Policy | None = None) -> None:
        self._stream = stream
        self.policy = policy or Policy()
        self._send_lock = FastLock()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._send_lock:
            await self._stream.send_all(data)

    async def send_file(self, head: bytes | bytearray, file: FileRange) -> None:
        async with self._send_lock:
            for piece in file_slices(head, file):
                await self._stream.send_all(piece)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes or RECEIVE_SIZE))

    def receive_nowait(self, max_bytes: int, *, spin: bool = False) -> bytes | None:
        return None

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
