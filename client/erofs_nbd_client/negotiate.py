"""Drive the client-side protocol machines over a trio stream.

``negotiate`` gets a connection ready for transmission (what the kernel needs from it: size,
flags, block size); ``Session`` then issues requests on it, pipelined, for tools and tests.
The kernel only understands simple replies, so structured replies are opt-in here.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import trio

from erofs_nbdd.protocol import (
    NEED_DATA,
    BlockSizeInfo,
    BlockStatusChunk,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    DataChunk,
    DescriptionInfo,
    ErrorChunk,
    ExportInfo,
    ExportNameReply,
    HoleChunk,
    Info,
    MetaContext,
    NameInfo,
    Negotiated,
    NoneChunk,
    OptionAck,
    OptionError,
    Rep,
    ReplyEvent,
    ServerEntry,
    SimpleReply,
    State,
)
from erofs_nbdd.transport.stream import StreamTransport
from erofs_nbdd.transport.tls import TLSTransport

if TYPE_CHECKING:
    import ssl

    from erofs_nbdd.protocol import NeedData

T = TypeVar("T")
RECEIVE_SIZE = 256 * 1024


class NegotiationError(Exception):
    """The server refused an option (``rep`` says how) or broke off the handshake."""

    def __init__(self, message: str, rep: int | None = None) -> None:
        super().__init__(message)
        self.rep = rep


class RequestError(Exception):
    """A request got an error reply; ``errno`` is the NBD error number."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(f"NBD error {errno}" + (f": {message}" if message else ""))
        self.errno = errno


@dataclass
class ExportDetails:
    """What INFO/GO or EXPORT_NAME told us about an export."""

    name: str
    size: int = 0
    flags: int = 0
    canonical_name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    contexts: dict[int, str] = field(default_factory=dict)


async def _receive(stream: trio.abc.Stream, *, tls: bool = False) -> bytes:
    # TLS 1.3: a server that refuses our certificate (or its absence) is only noticed after
    # our side of the handshake has completed, as a lost connection.
    hint = " (the server may require a client certificate signed by its CA)" if tls else ""
    try:
        data = await stream.receive_some(RECEIVE_SIZE)
    except trio.BrokenResourceError as exc:
        raise NegotiationError(f"connection lost: {exc.__cause__ or exc}{hint}") from exc
    if not data:
        raise NegotiationError(f"the server closed the connection{hint}")
    return bytes(data)


class Handshake:
    """One connection's handshake, option by option."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.machine = ClientHandshake()
        self.tls = False

    async def _event(self) -> object:
        while True:
            event = self.machine.next_event()
            if event is not NEED_DATA:
                return event
            self.machine.receive_data(await _receive(self.stream, tls=self.tls))

    async def start(self) -> None:
        """Read the greeting and answer with our flags."""
        await self._event()
        await self.stream.send_all(self.machine.send_client_flags())

    async def _option(self, data: bytes) -> list[object]:
        """Send one option; return its replies up to the ACK, or raise on an error reply."""
        await self.stream.send_all(data)
        replies: list[object] = []
        while True:
            event = await self._event()
            if isinstance(event, OptionError):
                raise NegotiationError(
                    f"server refused option {event.option}: {event.rep_name}"
                    + (f" ({event.message})" if event.message else ""),
                    event.rep,
                )
            if isinstance(event, OptionAck):
                return replies
            replies.append(event)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Upgrade to TLS; a server that refuses gets no plaintext session from us."""
        try:
            await self._option(self.machine.opt_starttls())
        except NegotiationError as exc:
            raise NegotiationError(
                f"TLS was asked for but the server refused it ({exc}); not continuing in plaintext",
                exc.rep,
            ) from None
        self.machine.start_tls()
        # TLS over whatever stream it is (a socket, a socketpair end, memory in tests); the
        # TLS transport closes it when it is closed.
        stream = TLSTransport(
            StreamTransport(self.stream), context, server_hostname=server_hostname
        )
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise NegotiationError(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        self.stream = stream
        self.tls = True

    async def list_exports(self) -> list[ServerEntry]:
        return [
            r for r in await self._option(self.machine.opt_list()) if isinstance(r, ServerEntry)
        ]

    async def structured_replies(self) -> None:
        await self._option(self.machine.opt_structured_reply())

    async def set_meta_context(self, name: str, queries: tuple[str, ...]) -> dict[int, str]:
        replies = await self._option(self.machine.opt_set_meta_context(name, queries))
        return {r.context_id: r.name for r in replies if isinstance(r, MetaContext)}

    async def list_meta_context(self, name: str, queries: tuple[str, ...] = ()) -> list[str]:
        replies = await self._option(self.machine.opt_list_meta_context(name, queries))
        return [r.name for r in replies if isinstance(r, MetaContext)]

    async def info(
        self,
        name: str,
        *,
        go: bool = False,
        infos: tuple[int, ...] = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE),
    ) -> ExportDetails:
        """INFO, or GO with ``go``; asking for NBD_INFO_BLOCK_SIZE in a GO binds this side
        to the block sizes the server sends (``Negotiated.block_size``)."""
        build = self.machine.opt_go if go else self.machine.opt_info
        details = ExportDetails(name)
        for reply in await self._option(build(name, infos)):
            if isinstance(reply, ExportInfo):
                details.size, details.flags = reply.size, reply.flags
            elif isinstance(reply, NameInfo):
                details.canonical_name = reply.name
            elif isinstance(reply, DescriptionInfo):
                details.description = reply.description
            elif isinstance(reply, BlockSizeInfo):
                details.block_size = (reply.minimum, reply.preferred, reply.maximum)
        details.contexts = dict(self.machine.negotiated.meta_contexts)
        return details

    async def go(self, name: str) -> ExportDetails:
        """GO, falling back to EXPORT_NAME for servers that do not know GO."""
        try:
            return await self.info(name, go=True)
        except NegotiationError as exc:
            if exc.rep != Rep.ERR_UNSUP:
                raise
        return await self.export_name(name)

    async def export_name(self, name: str) -> ExportDetails:
        await self.stream.send_all(self.machine.opt_export_name(name))
        try:
            event = await self._event()
        except NegotiationError:
            raise NegotiationError(f"server closed the connection: no export {name!r}") from None
        assert isinstance(event, ExportNameReply)
        return ExportDetails(name, size=event.size, flags=event.flags)

    async def abort(self) -> None:
        """Soft disconnect; the server may hang up before or after its ACK."""
        with contextlib.suppress(NegotiationError, trio.BrokenResourceError):
            await self._option(self.machine.opt_abort())

    @property
    def negotiated(self) -> Negotiated:
        return self.machine.negotiated

    @property
    def done(self) -> bool:
        return self.machine.state is State.TRANSMISSION


async def negotiate(
    stream: trio.abc.Stream,
    export: str,
    *,
    structured: bool = False,
    meta_contexts: tuple[str, ...] = (),
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[ExportDetails, Session]:
    """Handshake up to transmission; structured replies only when asked (the kernel can't).
    With ``tls``, STARTTLS comes first and the session runs over the TLS stream."""
    hs = Handshake(stream)
    await hs.start()
    if tls is not None:
        await hs.starttls(tls, server_hostname)
    if structured or meta_contexts:
        await hs.structured_replies()
    if meta_contexts:
        await hs.set_meta_context(export, meta_contexts)
    details = await hs.go(export)
    return details, Session(hs.stream, hs.negotiated, hs.machine.trailing_data)


class Session:
    """Requests on a negotiated connection; replies are matched by cookie, in any order."""

    def __init__(self, stream: trio.abc.Stream, negotiated: Negotiated, trailing: bytes) -> None:
        self.stream = stream
        self.machine = ClientTransmission(negotiated)
        self.machine.receive_data(trailing)
        self._send_lock = trio.Lock()
        self._waiters: dict[int, trio.MemorySendChannel[ReplyEvent]] = {}
        self._read_lock = trio.Lock()

    async def _next_reply(self) -> ReplyEvent | NeedData:
        event = self.machine.next_event()
        if event is NEED_DATA:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise RequestError(0, "server closed the connection")
            self.machine.receive_data(data)
        return event

    async def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> list[ReplyEvent]:
        """One request; all its reply events (several chunks with structured replies)."""
        cookie, data = self.machine.request(cmd, offset, length, flags, payload)
        send, receive = trio.open_memory_channel[ReplyEvent](math.inf)
        self._waiters[cookie] = send
        async with self._send_lock:
            await self.stream.send_all(data)
        events: list[ReplyEvent] = []
        while True:
            try:
                event = receive.receive_nowait()
            except trio.WouldBlock:
                # One task at a time reads from the stream and routes replies by cookie.
                async with self._read_lock:
                    try:
                        event = receive.receive_nowait()
                    except trio.WouldBlock:
                        reply = await self._next_reply()
                        if reply is not NEED_DATA:
                            self._route(reply)
                        continue
            events.append(event)
            if _final(event):
                del self._waiters[cookie]
                return events

    def _route(self, event: ReplyEvent) -> None:
        self._waiters[event.cookie].send_nowait(event)

    async def pread(self, offset: int, length: int, flags: int = 0) -> bytes:
        buf = bytearray(length)
        for event in await self.request(Cmd.READ, offset, length, flags):
            if isinstance(event, SimpleReply):
                if event.error:
                    raise RequestError(event.error)
                buf[:] = event.data
            elif isinstance(event, ErrorChunk):
                raise RequestError(event.error, event.message)
            elif isinstance(event, DataChunk):
                buf[event.offset - offset : event.offset - offset + len(event.data)] = event.data
            elif isinstance(event, HoleChunk):
                start = event.offset - offset
                buf[start : start + event.length] = bytes(event.length)
        return bytes(buf)

    async def simple(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> None:
        """A request without data in its reply; raises RequestError on an error reply."""
        for event in await self.request(cmd, offset, length, flags):
            if isinstance(event, SimpleReply | ErrorChunk) and event.error:
                raise RequestError(event.error, getattr(event, "message", ""))

    async def block_status(
        self, offset: int, length: int, flags: int = 0
    ) -> dict[int, tuple[tuple[int, int], ...]]:
        out: dict[int, tuple[tuple[int, int], ...]] = {}
        for event in await self.request(Cmd.BLOCK_STATUS, offset, length, flags):
            if isinstance(event, ErrorChunk | SimpleReply) and event.error:
                raise RequestError(event.error, getattr(event, "message", ""))
            if isinstance(event, BlockStatusChunk):
                out[event.context_id] = event.extents
        return out

    async def disconnect(self) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.machine.disconnect())


def _final(event: ReplyEvent) -> bool:
    if isinstance(event, SimpleReply):
        return True
    assert isinstance(event, DataChunk | HoleChunk | BlockStatusChunk | ErrorChunk | NoneChunk)
    return event.done
