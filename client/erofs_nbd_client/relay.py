"""Relays between the kernel's end of a socketpair and a (TLS) connection to the server,
which outlive that connection.

The kernel speaks plaintext NBD, so with TLS a relay stands between it and the server (in
the bridge process, and in the supervisor for links it reconnected). A relay that only
copies bytes must drop the kernel's socket when its server connection ends; the kernel
then retries the requests that were in flight only when their timeout fires, seconds
later. This one keeps a ``Ledger`` of what it passed on. When the server connection ends
(a server closing at a quiet moment on shutdown, a crash, a lost link), it reconnects
along the target list with backoff, checks that it finds the same image, sends the
unanswered requests again and goes on, and the kernel sees nothing but a slower reply.
Replies reach the kernel only whole, so one cut off by a dying connection never does.

If the server stays away longer than the kernel's request timeout while a request waits,
the kernel gives up on the link itself: it shuts its socket, the relay ends, and the
supervisor's LINK_DEAD path takes over. An idle link has nothing to time out: its relay
keeps trying until a server answers or the kernel closes its side.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from erofs_nbdd.protocol import ProtocolError
from erofs_nbdd.protocol.ledger import Ledger

from .connect import (
    ATTEMPT_TIMEOUT,
    RECONNECT_ERRORS,
    Notes,
    backoff,
    differs,
    open_connections,
    tls_context,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from .target import Target

log = logging.getLogger("erofs_nbd_client.relay")

RELAY_CHUNK = 1024 * 1024
#: Seconds the kernel's last requests get to reach the server once the kernel has closed
#: its side (its DISC, say).
LAST_SEND = 2.0


@dataclass(frozen=True)
class Resume:
    """Where a relay reconnects: the targets, tried in order, and the image it must find
    there (``connect.check_erofs``'s identity)."""

    targets: list[Target]
    identity: str
    notes: Notes = field(default_factory=lambda: Notes(log), compare=False)

    async def connect(self) -> tuple[Target, trio.abc.Stream] | None:
        """A new connection to the first target that serves the image, or None. Whatever
        one target does (refuse, reset, never answer, break the protocol) costs at most
        ATTEMPT_TIMEOUT and is logged once per kind of failure."""
        for target in self.targets:
            conn = None
            try:
                with trio.fail_after(ATTEMPT_TIMEOUT):
                    (conn,) = await open_connections(target, 1, tls_context(target))
                    different = await differs(conn, self.identity)
            except RECONNECT_ERRORS as exc:
                self.notes.note(target, f"{exc or type(exc).__name__}")
                different = "?"
            except Exception as exc:  # a bug of ours meeting this server: logged, not fatal
                if self.notes.note(target, f"resuming failed: {exc!r}"):
                    log.exception("%s: the failure", target.describe())
                different = "?"
            except BaseException:
                if conn is not None:
                    await trio.aclose_forcefully(conn.session.stream)
                raise
            if different is None and conn is not None:
                self.notes.forget(target)
                return target, conn.session.stream
            if conn is not None:
                if different != "?":
                    self.notes.note(target, f"serves {different}: not resuming there")
                await trio.aclose_forcefully(conn.session.stream)
        return None


class Relay:
    """One kernel link: requests from the kernel to the server, replies back."""

    def __init__(
        self,
        number: int,
        kernel: trio.abc.Stream,
        server: trio.abc.Stream,
        resume: Resume,
        on_resume: Callable[[Target], None] | None = None,
    ) -> None:
        self.number = number
        self.kernel = kernel
        self.server = server
        self.resume = resume
        #: Told where the link went after each resume (in a thread: it writes records).
        self.on_resume = on_resume
        self.ledger = Ledger()
        #: Sends to the server, so that what a reconnect sends again and what comes
        #: meanwhile go in order, each once.
        self._sending = trio.Lock()
        self._connected = True
        #: Set when the kernel's requests wait to be forwarded.
        self._pending = trio.Event()
        self.ended = "?"
        #: Times the server connection was replaced.
        self.resumed = 0

    async def run(self) -> None:
        """Relay until the kernel closes its side (or breaks the protocol); then close. A
        failure ends this link only (the kernel then sees it die), never the process
        other links live in."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._requests, nursery.cancel_scope)
                nursery.start_soon(self._forward)
                nursery.start_soon(self._replies, nursery.cancel_scope)
        except Exception as exc:  # one link's failure, logged; the others go on
            log.exception("connection %d failed", self.number)
            self.ended = f"internal error: {exc!r}"
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(2):
                    await self.server.aclose()
                await trio.aclose_forcefully(self.server)
                await trio.aclose_forcefully(self.kernel)
            log.info("connection %d ended: %s", self.number, self.ended)

    async def _requests(self, scope: trio.CancelScope) -> None:
        """Read the kernel's requests into the ledger (``_forward`` sends them), always
        reading, so the kernel closing its side is seen even while the server is away or
        does not read."""
        try:
            while data := await self.kernel.receive_some(RELAY_CHUNK):
                self.ledger.requests(data)
                self._pending.set()
            self.ended = "kernel side closed"
            # What came last (a DISC, as the kernel closes right after it) still goes.
            with trio.move_on_after(LAST_SEND):
                async with self._sending:
                    if self._connected:
                        await self._send(self.ledger.unsent())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.ended = f"kernel side: {exc.__cause__ or exc or 'connection lost'}"
        except ProtocolError as exc:
            self.ended = f"kernel side broke the protocol: {exc}"
        scope.cancel()

    async def _forward(self) -> None:
        """Send what the kernel asked, in order; while the server connection is being
        replaced, nothing: the reconnect sends it all."""
        while True:
            await self._pending.wait()
            self._pending = trio.Event()
            async with self._sending:
                if self._connected:
                    await self._send(self.ledger.unsent())

    async def _send(self, data: bytes) -> None:
        """To the server; a failure is the replies side's to notice (the connection is
        broken for both) and the requests stay unanswered, to go again."""
        if data:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.server.send_all(data)

    async def _replies(self, scope: trio.CancelScope) -> None:
        """Server to kernel; a server connection that ends is replaced."""
        while True:
            try:
                while data := await self.server.receive_some(RELAY_CHUNK):
                    if whole := self.ledger.replies(data):
                        try:
                            await self.kernel.send_all(whole)
                        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                            self.ended = f"kernel side: {exc.__cause__ or exc}"
                            scope.cancel()
                            return
                cause = "the server closed the connection"
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = f"the server connection was lost ({exc.__cause__ or exc})"
            except ProtocolError as exc:
                self.ended = f"the server broke the protocol: {exc}"
                scope.cancel()
                return
            if self.ledger.disconnecting:
                self.ended = "disconnected"
                scope.cancel()
                return
            await self._move(cause)

    async def _move(self, cause: str) -> None:
        """Replace the server connection (until one answers, or the kernel gives up on
        this link and closes it, which cancels us) and send the unanswered again."""
        self._connected = False
        started = time.monotonic()
        log.warning(
            "connection %d: %s with %d request(s) unanswered; reconnecting",
            self.number,
            cause,
            self.ledger.unanswered,
        )
        await trio.aclose_forcefully(self.server)
        pauses = backoff()
        while (found := await self.resume.connect()) is None:
            await trio.sleep(next(pauses))
        target, self.server = found
        async with self._sending:
            self.ledger.moved()
            again = self.ledger.unanswered
            self._connected = True
            await self._send(self.ledger.unsent())
        self.resumed += 1
        if self.on_resume is not None:
            await trio.to_thread.run_sync(self.on_resume, target)
        log.warning(
            "connection %d: resumed on %s after %.2f s, %d request(s) sent again",
            self.number,
            target.describe(),
            time.monotonic() - started,
            again,
        )
