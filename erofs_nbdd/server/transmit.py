"""The transmission phase of one connection: requests in, replies out, bounded.

Cached reads are answered inline: small ones copied and batched into one write, large ones
handed to the transport as file ranges (the kernel sends them straight from the page cache
on plaintext and kernel TLS). Reads that would block go to io_uring (or worker threads), at
most ``max_in_flight`` at once and within the byte budgets of the connection and the server,
so a client cannot queue unbounded work or pin unbounded memory.

An image that cannot be read is answered here, in one place: ``NBD_EIO`` while none of the
reply has gone out, a closed connection once its header has (``_reply_file``).

Two rules keep one connection from hurting the others. Its turn on the event loop ends
after a bounded amount of work (``QUANTUM``), whatever the requests. And while replies wait
to be sent, one of them must go out whole every reply timeout (``_watch_replies``): a
client that reads a trickle, just enough to keep a blocked write moving, still cannot keep
the bytes its replies hold.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import trio

from ..protocol import NEED_DATA, Cmd, CmdFlag, Disconnect, Errno, Request
from ..ranges import ImageUnreadable
from .budget import ByteBudget
from .outcome import ImageFailed, LimitExceeded, ReplyTimeout

if TYPE_CHECKING:
    from ..config import Limits
    from ..protocol import ServerTransmission
    from ..ranges import FileRange
    from ..storage.backend import Backend
    from ..transport.base import Transport
    from .budget import Share
    from .outcome import Stats

log = logging.getLogger("erofs_nbdd.connection")

RECEIVE_SIZE = 256 * 1024
#: Replies are gathered up to this many bytes before one write.
BATCH_BYTES = 256 * 1024
#: Reads up to this size may be answered inline from the page cache; bigger ones take the
#: budgeted path, so a connection holds at most BATCH_BYTES + INLINE_MAX outside the budgets.
INLINE_MAX = 1024 * 1024
#: Cached reads this big or bigger go to the transport as a file range: the kernel sends
#: them from the page cache (sendfile, about 3x less server CPU per MiB), or TLS in this
#: process reads and encrypts them a slice at a time; smaller ones are cheaper copied and
#: batched.
FILE_REPLY_MIN = 64 * 1024
#: The one meta context we serve, and its id after SET_META_CONTEXT.
CONTEXT_ID = 1
#: Fairness: a connection gives up the event loop once it has done this much work since it
#: last waited for its client, whatever the mix. A request costs REQUEST_COST plus its
#: length (CACHE costs like a read: WILLNEED makes the kernel read them; BLOCK_STATUS, which
#: a thread answers, only yields sooner), so a turn is at most 64 small requests or about
#: 4 MiB, well under a millisecond of this process's time. Without it a client pipelining
#: cached reads or CACHE never let the loop go: others' reads waited seconds and new
#: clients missed the handshake deadline. A connection that waits for its client (at queue
#: depth 1, or with its reads at the storage) starts a new turn and never pays for a forced
#: one.
QUANTUM = 4 * 1024 * 1024
REQUEST_COST = 64 * 1024
#: Stopping, a connection closes once it has had nothing in flight and received nothing
#: for this long: the client sees EOF between requests, none lost. Sooner, and a client
#: reading without pause would often send its next request as the close crosses it: the
#: kernel retries such a request only when its timeout fires (see README, "Restarts").
QUIET = 0.1


class Transmitter:
    """One connection's requests and replies, over the transport it is given."""

    def __init__(
        self,
        *,
        transport: Transport,
        backend: Backend,
        tx: ServerTransmission,
        limits: Limits,
        share: Share,
        stats: Stats,
        peer: str,
        verbose: bool,
    ) -> None:
        self.transport = transport
        self.backend = backend
        self.limits = limits
        self.stats = stats
        self.peer = peer
        self.verbose = verbose
        self._tx = tx
        #: Bytes of a READ reply's header: its data follows them in one buffer.
        self._head = tx.read_header_size
        self._budget = ByteBudget(limits.max_connection_buffer)
        #: This client address's part of the server-wide budget.
        self._share = share
        self._stopping = False
        self._receive_scope: trio.CancelScope | None = None
        #: Requests waiting for storage; the idle timeout runs only while there are none.
        self.in_flight = 0
        #: Every reply goes out through this, gathered and counted.
        self._replies = _Replies(transport)
        #: Work done since the connection last waited for its client (see QUANTUM).
        self._work = 0

    def stop(self) -> None:
        """The server stops: close at the first quiet moment (``QUIET``); until then,
        requests are still read and answered."""
        self._stopping = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def run(self) -> None:
        """Serve requests until the client disconnects or the server stops."""
        timeout = self.limits.reply_timeout
        error = None
        try:
            async with trio.open_nursery() as nursery:
                if timeout > 0:
                    nursery.start_soon(self._watch_replies, float(timeout))
                await self._serve()
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = _first_error(group)
        if error is not None:
            # Raised outside the handler and unnamed once raised: raised in it, the error
            # would get the group as its context, and this frame naming it is in its
            # traceback; both cycles hold every reply buffer the group's tracebacks reach
            # until a full collection (listener.py's _release_memory).
            try:
                raise error
            finally:
                del error

    async def _watch_replies(self, seconds: float) -> None:
        """``ReplyTimeout`` once replies have waited ``seconds`` with none sent whole
        (checked every quarter of it, so it fires between 1 and 1.25 times ``seconds``)."""
        timeout = seconds
        step = timeout / 4
        replies = self._replies
        stalled, last = 0.0, replies.sent
        while True:
            await trio.sleep(step)
            if replies.sending and replies.sent == last:
                stalled += step
                if stalled >= timeout:
                    raise ReplyTimeout(f"client read no reply for {timeout:g} s (reply timeout)")
            else:
                stalled = 0.0
            last = replies.sent

    async def _serve(self) -> None:
        backend, tx = self.backend, self._tx
        batch = self._replies
        slots = trio.Semaphore(self.limits.max_in_flight)
        async with trio.open_nursery() as nursery:
            while (req := await self._next_request(batch)) is not None:
                self.stats.requests += 1
                self._work += REQUEST_COST + req.length
                if self._work >= QUANTUM:  # this connection's turn is over: let others run
                    self._work = 0
                    await batch.flush()
                    await trio.lowlevel.checkpoint()
                if self.verbose:
                    log.debug("%s: %s", self.peer, req)
                error, message = tx.check(req)
                if error is not Errno.OK:
                    self.stats.errors += 1
                    batch.add(tx.error_reply(req.cookie, error, message))
                elif (
                    req.cmd == Cmd.READ
                    and req.length >= FILE_REPLY_MIN
                    and (file := backend.file_range(req.offset, req.length)) is not None
                ):
                    self.stats.bytes_read += req.length
                    await self._reply_file(batch, req, file)
                elif req.cmd == Cmd.READ and (reply := self._read_cached(req)) is not None:
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

    async def _next_request(self, batch: _Replies) -> Request | None:
        """The next request; None once the client disconnects or the server stops."""
        tx = self._tx
        while (event := tx.next_event()) is NEED_DATA:
            await batch.flush()  # about to wait for the client: send what is ready first
            data = await self._receive()
            if data is None:
                return None  # server shutdown, at a quiet moment: nothing is in flight
            if not data:
                self.stats.ended = "client closed without NBD_CMD_DISC"
                return None
            tx.receive_data(data)
        if isinstance(event, Disconnect):
            self.stats.ended = "disconnect"
            return None
        return event

    async def _receive(self) -> bytes | bytearray | None:
        """Bytes of further requests; None once the server is stopping and the connection
        has been quiet (``_receive_until_quiet``). Only this wait is ever cancelled by a
        shutdown, never a reply being written."""
        if not self._stopping:
            waiting = self.in_flight > 0
            # No spin while a read waits for storage: the spin would delay its result (on
            # a thread, it kept the GIL from it: cold 4 KiB reads at QD1 took 450 us, not
            # 380).
            data = self.transport.receive_nowait(RECEIVE_SIZE, spin=not waiting)
            if data is not None:
                return data
            self._work = 0  # the client has sent nothing more: its turn ends here anyway
            idle = self.limits.idle_timeout
            if idle <= 0 or waiting:
                idle = math.inf
            with trio.CancelScope() as scope:
                self._receive_scope = scope
                with trio.move_on_after(idle):
                    return await self.transport.receive_some(RECEIVE_SIZE)
                raise LimitExceeded(f"no request for {idle:g} s (idle timeout)")
        return await self._receive_until_quiet()  # stopped, maybe while waiting

    async def _receive_until_quiet(self) -> bytes | bytearray | None:
        """Stopping: requests are still read (and answered) until nothing has been in
        flight and nothing has arrived for ``QUIET``; then None, and the connection
        closes between requests. The grace period bounds a client that never pauses."""
        while True:
            data = self.transport.receive_nowait(RECEIVE_SIZE)
            if data is not None:
                return data
            quiet = self.in_flight == 0  # no reply to come: the client may be done
            with trio.move_on_after(QUIET):
                return await self.transport.receive_some(RECEIVE_SIZE)
            if quiet:
                return None

    def _read_cached(self, req: Request) -> bytes | bytearray | None:
        """The whole reply to a READ the page cache holds, or None if it must wait."""
        if req.length > INLINE_MAX:
            return None
        start = self._head
        buf = bytearray(start + req.length)
        try:
            if not self.backend.read_nowait(memoryview(buf)[start:], req.offset):
                return None
        except ImageUnreadable as exc:
            return self._unreadable(req, exc)
        buf[:start] = self._tx.read_reply_header(req.cookie, req.offset, req.length)
        self.stats.bytes_read += req.length
        return buf

    async def _reply_file(self, batch: _Replies, req: Request, file: FileRange) -> None:
        head = self._tx.read_reply_header(req.cookie, req.offset, req.length)
        try:
            await batch.flush(head, file)
        except ImageUnreadable as exc:  # its header is out: the reply cannot be finished
            raise ImageFailed(str(exc)) from None

    def _unreadable(self, req: Request, exc: ImageUnreadable) -> bytes | bytearray:
        """The reply to a request whose bytes cannot be read, none of it sent yet."""
        log.warning("%s: %s at %d failed: %s", self.peer, req.name, req.offset, exc)
        self.stats.errors += 1
        return self._tx.error_reply(req.cookie, Errno.EIO, str(exc))

    async def _reserve(self, req: Request, slots: trio.Semaphore, batch: _Replies) -> None:
        """A request slot and the reply's bytes in both budgets. While any is short, flush
        what is ready and stop reading requests: that is the backpressure."""
        size = req.length if req.cmd == Cmd.READ else 0
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            await batch.flush()
            await slots.acquire()
        for budget in (self._budget, self._share):
            if not budget.try_acquire(size):
                await batch.flush()
                await budget.acquire(size)
        self.in_flight += 1

    async def _slow_request(self, req: Request, slots: trio.Semaphore, batch: _Replies) -> None:
        tx = self._tx
        size = req.length if req.cmd == Cmd.READ else 0
        try:
            reply: bytes | bytearray
            try:
                if req.cmd == Cmd.READ:
                    # Read everything before any header goes out, so a failure is a clean EIO.
                    start = self._head
                    reply = bytearray(start + req.length)
                    await self.backend.read(memoryview(reply)[start:], req.offset)
                    reply[:start] = tx.read_reply_header(req.cookie, req.offset, req.length)
                    self.stats.bytes_read += req.length
                else:
                    extents = await self.backend.extents(req.offset, req.length)
                    extents = _clip_extents(extents, req)
                    reply = tx.block_status_reply(req.cookie, [(CONTEXT_ID, extents)])
            except ImageUnreadable as exc:
                reply = self._unreadable(req, exc)
            if len(reply) >= FILE_REPLY_MIN:
                await batch.send(reply)
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
            self._share.release(size)
            slots.release()


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The failure itself, out of a nursery's group: the server's handler wants it (a
    client gone mid-reply is routine, not an internal error)."""
    leaves = _leaves(group)
    return next((e for e in leaves if not isinstance(e, trio.Cancelled)), leaves[0])


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


class _Replies:
    """Every reply of a connection goes out through here: small ones gathered into one
    write (at high queue depth, one syscall answers many), and all of them counted, sends
    begun and finished, for the reply timeout."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._parts: list[bytes | bytearray] = []
        self._size = 0
        #: Sends begun and not finished, and sends finished.
        self.sending = 0
        self.sent = 0

    def add(self, part: bytes | bytearray) -> None:
        self._parts.append(part)
        self._size += len(part) + 1

    @property
    def full(self) -> bool:
        return self._size >= BATCH_BYTES

    async def flush(self, head: bytes = b"", file: FileRange | None = None) -> None:
        """Send what is gathered; with ``file``, then ``head`` and that file range, in the
        same send so nothing can come between a header and its data."""
        if head:
            self._parts.append(head)
        if not self._parts:
            return
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._size = [], 0
        self.sending += 1
        try:
            if file is None:
                await self._transport.send_all(data)
            else:
                await self._transport.send_file(data, file)
        finally:
            self.sending -= 1
        self.sent += 1

    async def send(self, reply: bytes | bytearray) -> None:
        """One reply alone, now (a large one: copying it into a batch would cost more)."""
        self.sending += 1
        try:
            await self._transport.send_all(reply)
        finally:
            self.sending -= 1
        self.sent += 1


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
