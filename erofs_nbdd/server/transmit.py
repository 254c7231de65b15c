"""The transmission phase of one connection: requests in, replies out, bounded.

Cached reads are answered inline: small ones copied and batched into one write, large ones
handed to the stream as file ranges (the kernel sends them straight from the page cache on
plaintext and kernel TLS). Reads that would block go to io_uring (or worker threads), at most
``max_in_flight`` at once and within the byte budgets of the connection and the server, so
a client cannot queue unbounded work or pin unbounded memory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import trio

from ..protocol import (
    NEED_DATA,
    Cmd,
    CmdFlag,
    Errno,
    ExportLimits,
    Negotiated,
    ServerTransmission,
    check_request,
)
from ..protocol.events import Disconnect, Request
from .budget import ByteBudget

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from ..config import Limits
    from ..storage.backends import Backend
    from .outcome import Stats

log = logging.getLogger("erofs_nbdd.connection")

#: Bytes of an open file: (descriptor, offset, length).
FileRange = tuple[int, int, int]
if TYPE_CHECKING:
    #: How replies go out: bytes, then optionally a file range sent from the page cache.
    Send = Callable[[bytes | bytearray, FileRange | None], Awaitable[None]]

#: Replies are gathered up to this many bytes before one write.
BATCH_BYTES = 256 * 1024
#: Reads up to this size may be answered inline from the page cache; bigger ones take the
#: budgeted path, so a connection holds at most BATCH_BYTES + INLINE_MAX outside the budgets.
INLINE_MAX = 1024 * 1024
#: Cached reads this big or bigger go to ``send`` as a file range: the kernel sends them from
#: the page cache (sendfile, about 3x less server CPU per MiB), or TLS in this process reads
#: and encrypts them a slice at a time; smaller ones are cheaper copied and batched.
FILE_REPLY_MIN = 64 * 1024
#: The one meta context we serve, and its id after SET_META_CONTEXT.
CONTEXT_ID = 1


class Transmitter:
    """One connection's requests and replies; the connection passes in how to send and
    receive, so TLS, shutdown and the timeouts stay its business."""

    def __init__(
        self,
        *,
        backend: Backend,
        negotiated: Negotiated,
        trailing: bytes,
        flags: int,
        limits: Limits,
        server_budget: ByteBudget,
        stats: Stats,
        peer: str,
        verbose: bool,
        send: Send,
        receive: Callable[[], Awaitable[bytes | None]],
        send_files: bool = False,
    ) -> None:
        self.backend = backend
        self.negotiated = negotiated
        self.limits = limits
        self.stats = stats
        self.peer = peer
        self.verbose = verbose
        self._send = send
        self._receive = receive
        #: Whether ``send`` may be given a file range.
        self._send_files = send_files
        self._export = ExportLimits(
            size=backend.get_size(), flags=flags, min_block=512, max_payload=limits.max_payload
        )
        self._tx = ServerTransmission(negotiated, self._export)
        self._tx.receive_data(trailing)
        self._budget = ByteBudget(limits.max_connection_buffer)
        self._server_budget = server_budget
        #: Requests waiting for storage; the idle timeout runs only while there are none.
        self.in_flight = 0

    async def run(self) -> None:
        """Serve requests until the client disconnects or the server stops."""
        backend, negotiated, tx, limits = self.backend, self.negotiated, self._tx, self._export
        batch = _Batch(self._send)
        slots = trio.Semaphore(self.limits.max_in_flight)
        async with _one_error(), trio.open_nursery() as nursery:
            while (req := await self._next_request(batch)) is not None:
                self.stats.requests += 1
                if self.verbose:
                    log.debug("%s: %s", self.peer, req)
                error, message = check_request(req, limits, negotiated)
                if error is not Errno.OK:
                    self.stats.errors += 1
                    batch.add(tx.error_reply(req.cookie, error, message))
                elif (
                    req.cmd == Cmd.READ
                    and self._send_files
                    and req.length >= FILE_REPLY_MIN
                    and (fd := backend.file_nowait(req.offset, req.length)) is not None
                ):
                    self.stats.bytes_read += req.length
                    head = tx.read_reply_header(req.cookie, req.offset, req.length)
                    await batch.flush(head, (fd, req.offset, req.length))
                elif (
                    req.cmd == Cmd.READ
                    and req.length <= INLINE_MAX
                    and (
                        reply := backend.pread_nowait(
                            bytes(tx.read_header_size), req.offset, req.length
                        )
                    )
                    is not None
                ):
                    self.stats.bytes_read += req.length
                    # the header only now: making it retires the cookie, and a miss goes on below
                    reply[: tx.read_header_size] = tx.read_reply_header(
                        req.cookie, req.offset, req.length
                    )
                    batch.add(reply)
                elif req.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):  # must wait for storage
                    await self._reserve(req, slots, batch)
                    nursery.start_soon(self._slow_request, req, slots, batch)
                else:  # CACHE and FLUSH: nothing to wait for
                    if req.cmd == Cmd.CACHE:
                        await backend.cache(req.offset, req.length)
                    batch.add(tx.ok_reply(req.cookie))
                if batch.full:
                    await batch.flush()
            await batch.flush()
            # leaving the nursery waits for the requests still in flight (DISC rules)

    async def _next_request(self, batch: _Batch) -> Request | None:
        """The next request; None once the client disconnects or the server stops."""
        tx = self._tx
        while (event := tx.next_event()) is NEED_DATA:
            await batch.flush()  # about to wait for the client: send what is ready first
            data = await self._receive()
            if data is None:
                return None  # server shutdown: answer what is in flight, then close
            if not data:
                self.stats.ended = "client closed without NBD_CMD_DISC"
                return None
            tx.receive_data(data)
        if isinstance(event, Disconnect):
            self.stats.ended = "disconnect"
            return None
        return event

    async def _reserve(self, req: Request, slots: trio.Semaphore, batch: _Batch) -> None:
        """A request slot and the reply's bytes in both budgets. While any is short, flush
        what is ready and stop reading requests: that is the backpressure."""
        size = req.length if req.cmd == Cmd.READ else 0
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await batch.flush()
            await slots.acquire()
        for budget in (self._budget, self._server_budget):
            if not budget.try_acquire(size):
                await batch.flush()
                await budget.acquire(size)
        self.in_flight += 1

    async def _slow_request(self, req: Request, slots: trio.Semaphore, batch: _Batch) -> None:
        tx = self._tx
        size = req.length if req.cmd == Cmd.READ else 0
        try:
            reply: bytes | bytearray
            try:
                if req.cmd == Cmd.READ:
                    n = tx.read_header_size  # the header once the read worked, else EIO
                    reply = await self.backend.pread(bytes(n), req.offset, req.length)
                    reply[:n] = tx.read_reply_header(req.cookie, req.offset, req.length)
                    self.stats.bytes_read += req.length
                else:
                    extents = await self.backend.extents(req.offset, req.length)
                    extents = _clip_extents(extents, req)
                    reply = tx.block_status_reply(req.cookie, [(CONTEXT_ID, extents)])
            except OSError as exc:
                # Read everything before any header goes out, so a failure is a clean EIO.
                log.warning("%s: %s failed at %d: %s", self.peer, req.name, req.offset, exc)
                self.stats.errors += 1
                reply = tx.error_reply(req.cookie, Errno.EIO, f"read failed: {exc.strerror}")
            if len(reply) >= FILE_REPLY_MIN:
                await self._send(reply, None)
            else:
                # Reads that finish together (io_uring and the thread pool both wake them
                # in one pass) go out in one write: add, let the others add theirs, then
                # flush them all.
                # (A reply another task flushed is released below while still being sent:
                # small replies only, so the budgets are off by one batch at most.)
                batch.add(reply)
                if self.in_flight > 1:  # else no other read can add its reply: flush now
                    await trio.lowlevel.cancel_shielded_checkpoint()
                await batch.flush()
        finally:
            self.in_flight -= 1
            self._budget.release(size)
            self._server_budget.release(size)
            slots.release()


@contextlib.asynccontextmanager
async def _one_error() -> AsyncIterator[None]:
    """A nursery reports a failure as a group; the server's handler wants the failure itself
    (a client gone mid-reply is routine, not an internal error)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        first = next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])
        raise first from None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


class _Batch:
    """Replies gathered into one write: at high queue depth, one syscall answers many."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._parts: list[bytes | bytearray] = []
        self._size = 0

    def add(self, *parts: bytes | bytearray) -> None:
        self._parts.extend(parts)
        self._size += sum(len(p) for p in parts) + 1

    @property
    def full(self) -> bool:
        return self._size >= BATCH_BYTES

    async def flush(self, head: bytes = b"", file: FileRange | None = None) -> None:
        """Send what is gathered; with ``file``, then ``head`` and that file range, in the
        same locked send so nothing can come between a header and its data."""
        if head:
            self._parts.append(head)
        if self._parts:
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts, self._size = [], 0
            await self._send(data, file)


def _clip_extents(extents: list[tuple[int, int]], req: Request) -> list[tuple[int, int]]:
    """Honour REQ_ONE, and never report more than was asked."""
    out = []
    left = req.length
    for length, flags in extents:
        if left <= 0:
            break
        take = min(length, left)
        out.append((take, flags))
        left -= take
        if req.flags & CmdFlag.REQ_ONE:
            break
    return out or [(req.length, 0)]
