"""A socket stream that goes through trio's scheduler only when the socket would block.

``trio.SocketStream`` yields to the scheduler on every send and receive, even when the
kernel could complete them at once; at queue depth 1 those trips are a large part of a
request's cost. Here a send or receive is tried first and awaited only on EAGAIN; a
checkpoint every ``YIELD_EVERY`` calls keeps a busy connection from starving the others and
lets cancellation in. A send that cannot progress for ``send_timeout`` seconds raises
``trio.TooSlowError``; the timer exists only while a send is blocked.
"""

from __future__ import annotations

import errno
import os
import time

import trio

YIELD_EVERY = 16


#: sendfile errors that mean the connection, not the file, failed.
_PEER_ERRORS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT}


class SourceFailed(Exception):
    """A file being sent ended early or failed to read, after the reply's header went
    out: the reply cannot be finished, so the connection must close."""


class FastLock:
    """A lock for tasks whose uncontended acquire does not pass through the scheduler.

    ``trio.Lock`` checkpoints on every acquire, a full scheduler round (with an epoll poll)
    per reply sent; a profile of TLS reads put 9 % of the server's time there, and its owner
    bookkeeping another 3 %. The streams here checkpoint on their own schedule. Waiters are
    served in order: release hands the lock straight to the first of them.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        if self._held:
            await self._waiters.park()  # returns holding the lock (see __aexit__)
        else:
            self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        if self._waiters:
            self._waiters.unpark()  # ownership passes on; _held stays True
        else:
            self._held = False


class FastSocketStream(trio.abc.Stream):
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.socket = stream.socket
        self._fd = stream.socket.fileno()
        self._calls = 0
        self.send_timeout = float("inf")
        #: Seconds a receive keeps retrying before it sleeps in epoll (see --busy-poll).
        self.spin = 0.0

    async def _maybe_yield(self) -> None:
        self._calls += 1
        if self._calls >= YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.checkpoint()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd < 0 or self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the connection is closed")
        await self._maybe_yield()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += os.write(self._fd, view[sent:])
                except BlockingIOError:
                    with trio.fail_after(self.send_timeout):
                        await trio.lowlevel.wait_writable(self._fd)
                except OSError as exc:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc

    async def send_file(self, head: bytes | bytearray, fd: int, offset: int, length: int) -> None:
        """``head``, then ``length`` bytes of file ``fd`` from ``offset`` by ``os.sendfile``:
        the kernel sends them from the page cache, with no copy through this process.
        ``SourceFailed`` if the file ends first (it shrank) or cannot be read."""
        await self.send_all(head)
        end = offset + length
        while offset < end:
            try:
                sent = os.sendfile(self._fd, fd, offset, end - offset)
            except BlockingIOError:
                with trio.fail_after(self.send_timeout):
                    await trio.lowlevel.wait_writable(self._fd)
                continue
            except OSError as exc:
                if exc.errno in _PEER_ERRORS:
                    raise trio.BrokenResourceError(f"send failed: {exc}") from exc
                raise SourceFailed(f"reading the image at {offset} failed: {exc}") from exc
            if not sent:
                raise SourceFailed(f"the image ended at {offset}, {end - offset} bytes early")
            offset += sent

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._fd < 0 or self.socket.fileno() < 0:
            raise trio.ClosedResourceError("the connection is closed")
        await self._maybe_yield()
        while True:
            data = self.receive_nowait(max_bytes or 65536, self.spin)
            if data is not None:
                return data
            await trio.lowlevel.wait_readable(self._fd)

    def receive_nowait(self, max_bytes: int, spin: float = 0.0) -> bytes | None:
        """What the socket holds now (b"" at EOF), or None if a receive would block even
        after retrying for ``spin`` seconds."""
        if self._fd < 0:
            raise trio.ClosedResourceError("the connection is closed")
        end = time.perf_counter() + spin
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

    async def aclose(self) -> None:
        self._fd = -1
        await self._stream.aclose()
