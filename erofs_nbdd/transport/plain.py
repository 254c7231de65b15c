"""Plaintext over a socket, going through trio's scheduler only when the socket would block.

``trio.SocketStream`` yields to the scheduler on every send and receive, even when the
kernel could complete them at once; at queue depth 1 those trips are a large part of a
request's cost. Here a send or receive is tried first and awaited only on EAGAIN; a
checkpoint every ``YIELD_EVERY`` calls lets cancellation in (the server's request loop
gives up its turn on its own schedule, whatever the transport).
"""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

import trio

from ..ranges import ImageUnreadable
from .base import Policy, Transport
from .lock import FastLock

if TYPE_CHECKING:
    import socket

    from ..ranges import FileRange

YIELD_EVERY = 16
RECEIVE_SIZE = 65536

#: sendfile errors that mean the connection, not the file, failed.
_PEER_ERRORS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT}


class PlainTransport(Transport):
    """Owns the socket it is given: ``aclose`` closes it."""

    def __init__(self, stream: trio.SocketStream, policy: Policy | None = None) -> None:
        self._stream = stream
        self.socket: socket.socket = stream.socket  # type: ignore[assignment]
        self._fd = stream.socket.fileno()
        self.policy = policy or Policy()
        self._calls = 0
        self._send_lock = FastLock()

    async def _maybe_yield(self) -> None:
        self._calls += 1
        if self._calls >= YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._fd < 0 or self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the connection is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        await self._maybe_yield()
        view = memoryview(data)
        if not self._send_lock.locked():  # nobody mid-send: one write usually does it all
            sent = self._write_nowait(view)
            if sent == len(view):
                return
            view = view[sent:]
        async with self._send_lock:  # taken at once if it was free above: nothing between
            await self._write(view)

    def _write_nowait(self, view: memoryview) -> int:
        """What one write takes of ``view`` now (0 if the socket is full)."""
        try:
            return os.write(self._fd, view)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                n = self._write_nowait(view[sent:])
                if not n:
                    await trio.lowlevel.wait_writable(self._fd)
                sent += n

    async def send_file(self, head: bytes | bytearray, file: FileRange) -> None:
        """``head``, then the file's bytes by ``os.sendfile``: the kernel sends them from the
        page cache, with no copy through this process."""
        self._check_open()
        await self._maybe_yield()
        async with self._send_lock:
            await self._write(head)
            offset, end = file.offset, file.offset + file.length
            while offset < end:
                try:
                    sent = os.sendfile(self._fd, file.fd, offset, end - offset)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._fd)
                    continue
                except OSError as exc:
                    if exc.errno in _PEER_ERRORS:
                        raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                    raise ImageUnreadable(f"reading the image at {offset} failed: {exc}") from exc
                if not sent:
                    left = end - offset
                    raise ImageUnreadable(f"the image ended at {offset}, {left} bytes early")
                offset += sent

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        await self._maybe_yield()
        while True:
            data = self.receive_nowait(max_bytes or RECEIVE_SIZE)
            if data is not None:
                return data
            await trio.lowlevel.wait_readable(self._fd)

    def receive_nowait(self, max_bytes: int, *, spin: bool = False) -> bytes | None:
        if self._fd < 0:
            raise trio.ClosedResourceError("the connection is closed")
        end = time.perf_counter() + (self.policy.busy_poll if spin else 0.0)
        while True:
            try:
                return os.read(self._fd, max_bytes)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    return None
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive failed: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._fd)

    def raw_socket(self) -> socket.socket:
        return self.socket

    async def aclose(self) -> None:
        self._fd = -1
        await self._stream.aclose()
