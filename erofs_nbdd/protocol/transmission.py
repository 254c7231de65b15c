"""The transmission phase, both sides: framing of requests and replies, and the request rules.

Rules (doc/proto.md "Transmission"): requests carry a cookie the reply echoes; replies may come
in any order; a WRITE's payload follows its header; with structured replies negotiated, every
reply with a payload is a chunk and READ never gets a simple reply. ``check_request`` holds the
"SHOULD reply EINVAL/EPERM" rules so the server's policy layer never re-derives them.

The server's machine also keeps the cookies awaiting a reply, so a request answered twice (or
a reply made up for a request that never came) is caught here rather than by a confused client.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from . import wire
from .constants import (
    DEFAULT_MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    BlockStatusChunk,
    DataChunk,
    Disconnect,
    ErrorChunk,
    HoleChunk,
    NeedData,
    NoneChunk,
    ReplyEvent,
    Request,
    SimpleReply,
)

if TYPE_CHECKING:
    from .handshake import Negotiated

# Command flags each command may carry; anything else is EINVAL.
_ALLOWED_FLAGS = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
_WRITES = frozenset({int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)})
#: The same as plain ints, for ``check_request``.
_ALLOWED = {int(cmd): int(flags) for cmd, flags in _ALLOWED_FLAGS.items()}
_READ, _FLUSH, _BLOCK_STATUS = int(Cmd.READ), int(Cmd.FLUSH), int(Cmd.BLOCK_STATUS)
_PAYLOADS = frozenset({_READ, int(Cmd.WRITE)})
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_OK = (Errno.OK, "")


@dataclass(frozen=True, slots=True)
class ExportLimits:
    """What the server promised about one export during the handshake."""

    size: int
    flags: int
    min_block: int = 1
    max_payload: int = DEFAULT_MAX_PAYLOAD


def check_request(req: Request, limits: ExportLimits, negotiated: Negotiated) -> tuple[Errno, str]:
    """The error a request must get before any data is touched, or ``(Errno.OK, "")``.

    Every request passes here, so it compares plain ints (an enum lookup or an IntFlag
    operation costs more than all the checks together) and builds a message only for an
    error."""
    cmd, flags, offset, length = req.cmd, req.flags, req.offset, req.length
    allowed = _ALLOWED.get(cmd)
    if allowed is None:
        return Errno.EINVAL, f"unknown command {cmd}"
    if cmd == _READ and not negotiated.structured_replies:
        allowed = 0  # DF only means something with structured replies
    if flags & ~allowed:
        return Errno.EINVAL, f"flags {flags:#x} are not valid on {Cmd(cmd).name}"
    if cmd in _WRITES and limits.flags & _READ_ONLY:
        return Errno.EPERM, "the export is read-only"
    if cmd == _FLUSH:
        if offset or length:
            return Errno.EINVAL, "FLUSH must have offset and length 0"
        return _OK
    if not length:
        # Unspecified by the spec, and a structured read reply cannot carry 0 bytes.
        return Errno.EINVAL, f"{Cmd(cmd).name} of 0 bytes"
    if offset > limits.size or length > limits.size - offset:
        return Errno.EINVAL, f"{length} bytes at {offset} run past the end ({limits.size})"
    if offset % limits.min_block or length % limits.min_block:
        return Errno.EINVAL, f"not aligned to the minimum block size {limits.min_block}"
    if length > limits.max_payload and cmd in _PAYLOADS:
        return Errno.EINVAL, f"{length} bytes exceed the maximum payload {limits.max_payload}"
    if cmd == _BLOCK_STATUS and not negotiated.meta_contexts:
        return Errno.EINVAL, "BLOCK_STATUS needs a meta context (NBD_OPT_SET_META_CONTEXT)"
    return _OK


class TransmissionState(enum.Enum):
    TRANSMISSION = "transmission"  # requests are parsed and answered
    CLOSED = "closed"  # NBD_CMD_DISC came: answer what is outstanding, parse nothing more
    ERROR = "error"


class _Step(enum.Enum):
    DISCONNECT = "NBD_CMD_DISC"


#: Every legal transition of ServerTransmission; errors lead to ERROR, by ``_fail`` only.
_TRANSITIONS = {
    (TransmissionState.TRANSMISSION, _Step.DISCONNECT): TransmissionState.CLOSED,
}
#: States in which replies may still go out. After DISC too: doc/proto.md "NBD_CMD_DISC" says
#: the server MUST handle all outstanding requests before it closes.
_REPLYING = frozenset({TransmissionState.TRANSMISSION, TransmissionState.CLOSED})


class ServerTransmission:
    """Parses requests, frames replies in the negotiated style, and checks that each request
    gets exactly one reply (doc/proto.md "Transmission": one simple reply or one series of
    chunks per request)."""

    def __init__(self, negotiated: Negotiated, export: ExportLimits) -> None:
        #: Our own copy: nothing the handshake does later can change how replies are framed.
        self.negotiated = negotiated.copy()
        self._structured = self.negotiated.structured_replies
        self.export = export
        self.state = TransmissionState.TRANSMISSION
        self._buffer = wire.Buffer()
        self._skipping: Request | None = None  # a WRITE whose payload is being dropped
        self._skip_left = 0
        # Requests awaiting a reply, by cookie. A count, not a set: the spec only says a
        # client SHOULD keep cookies of requests in flight distinct, so reuse is no error.
        self._outstanding: dict[int, int] = {}

    @property
    def outstanding(self) -> int:
        """Requests returned by ``next_event`` and not yet answered."""
        return sum(self._outstanding.values())

    @property
    def read_header_size(self) -> int:
        """Length of the header ``read_reply_header`` returns for a non-empty read, so one
        buffer can be allocated for header and data before the header is made."""
        if self.negotiated.structured_replies:
            return wire.CHUNK_HEADER.size + wire.U64.size  # OFFSET_DATA header and its offset
        return wire.SIMPLE_REPLY.size

    def check(self, req: Request) -> tuple[Errno, str]:
        """``check_request`` against this export and what was negotiated."""
        return check_request(req, self.export, self.negotiated)

    def _step(self, step: _Step) -> None:
        target = _TRANSITIONS.get((self.state, step))
        if target is None:
            self._fail(LocalProtocolError, f"{step.value} does not fit here")
        self.state = target

    def _fail(self, kind: type[ProtocolError], message: str) -> NoReturn:
        """The one error path: the machine ends in ERROR and stays there. A local error says
        which state the call was made in."""
        was, self.state = self.state, TransmissionState.ERROR
        if issubclass(kind, LocalProtocolError):
            message = f"{message} (in state {was.name})"
        raise kind(message)

    # -- requests -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        # doc/proto.md "NBD_CMD_DISC": the client MUST NOT send more; ignore it if it does.
        if self.state is TransmissionState.TRANSMISSION:
            self._buffer.feed(data)

    def next_event(self) -> Request | Disconnect | NeedData:
        if self.state is TransmissionState.ERROR:
            self._fail(LocalProtocolError, "transmission failed earlier; drop the connection")
        if self._skipping is not None:
            self._skip_left -= self._buffer.skip(self._skip_left)
            if self._skip_left:
                return NEED_DATA
            req, self._skipping = self._skipping, None
            return self._accept(req)
        if self.state is not TransmissionState.TRANSMISSION:
            return NEED_DATA
        if len(self._buffer) < wire.REQUEST.size:
            return NEED_DATA
        magic, flags, type_, cookie, offset, length = self._buffer.unpack(wire.REQUEST)
        if magic != REQUEST_MAGIC:
            self._fail(RemoteProtocolError, f"bad request magic {magic:#x}")
        if type_ == Cmd.DISC:
            self._step(_Step.DISCONNECT)
            return Disconnect(cookie)
        req = Request(type_, flags, cookie, offset, length)
        if type_ == Cmd.WRITE and length:
            if length > self.export.max_payload:
                self._fail(
                    RemoteProtocolError,
                    f"WRITE payload of {length} bytes is over the limit {self.export.max_payload}",
                )
            self._skipping, self._skip_left = req, length
            return self.next_event()
        return self._accept(req)

    def _accept(self, req: Request) -> Request:
        outstanding = self._outstanding
        outstanding[req.cookie] = outstanding.get(req.cookie, 0) + 1
        return req

    def pending_bytes(self) -> int:
        """Bytes buffered but not yet parsed (a partial request)."""
        return len(self._buffer)

    # -- replies: headers only; READ data is written right after, unchanged ---------------

    def _answer(self, cookie: int) -> None:
        """A reply to one request with ``cookie`` is being made: that request is answered.
        (Every reply passes here, so the usual case is one dictionary operation.)"""
        left = self._outstanding.pop(cookie, 0) - 1
        if left > 0:
            self._outstanding[cookie] = left
        elif left < 0 or self.state is TransmissionState.ERROR:
            if self.state not in _REPLYING:
                self._fail(LocalProtocolError, f"no reply is allowed (cookie {cookie:#x})")
            self._fail(LocalProtocolError, f"no request with cookie {cookie:#x} awaits a reply")

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The header of a successful READ's reply; ``length`` bytes of data follow it."""
        self._answer(cookie)
        if not self._structured:
            return wire.simple_reply(cookie)
        if length == 0:
            return wire.done_chunk(cookie)
        return wire.offset_data_header(cookie, offset, length, done=True)

    def ok_reply(self, cookie: int) -> bytes:
        self._answer(cookie)
        if self.negotiated.structured_replies:
            return wire.done_chunk(cookie)
        return wire.simple_reply(cookie)

    def error_reply(self, cookie: int, error: Errno, message: str = "") -> bytes:
        self._answer(cookie)
        if not error:  # Errno.OK, or a plain 0: that would be a success reply
            self._fail(LocalProtocolError, "an error reply needs an error")
        if self.negotiated.structured_replies:
            return wire.error_chunk(cookie, error, wire.utf8(message))
        return wire.simple_reply(cookie, error)

    def block_status_reply(
        self, cookie: int, per_context: list[tuple[int, list[tuple[int, int]]]]
    ) -> bytes:
        """One chunk per context; doc/proto.md "NBD_REPLY_TYPE_BLOCK_STATUS": exactly one per
        negotiated context, each with at least one extent."""
        self._answer(cookie)
        if not self.negotiated.structured_replies:
            self._fail(LocalProtocolError, "BLOCK_STATUS needs structured replies")
        ids = sorted(cid for cid, _ in per_context)
        if ids != sorted(self.negotiated.meta_contexts):
            self._fail(LocalProtocolError, f"contexts {ids} are not the negotiated ones")
        if not all(extents for _, extents in per_context):
            self._fail(LocalProtocolError, "a block status chunk needs at least one extent")
        last = len(per_context) - 1
        reply = b"".join(
            wire.block_status_chunk(cookie, cid, extents, done=i == last)
            for i, (cid, extents) in enumerate(per_context)
        )
        return reply


@dataclass(slots=True)
class _InFlight:
    cmd: int
    offset: int
    length: int


class ClientTransmission:
    """Frames requests, matches replies to them by cookie."""

    def __init__(self, negotiated: Negotiated, *, max_reply_payload: int = DEFAULT_MAX_PAYLOAD):
        self.negotiated = negotiated
        self._max_reply = max_reply_payload + 4096
        self._buffer = wire.Buffer()
        self._next_cookie = 1
        self._in_flight: dict[int, _InFlight] = {}

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> tuple[int, bytes]:
        """A request and the cookie its reply will carry."""
        cookie = self._next_cookie
        self._next_cookie += 1
        self._in_flight[cookie] = _InFlight(cmd, offset, length)
        return cookie, wire.request(cmd, cookie, offset, length, flags) + payload

    def disconnect(self) -> bytes:
        return wire.request(Cmd.DISC, 0, 0, 0)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.feed(data)

    def next_event(self) -> ReplyEvent | NeedData:
        if len(self._buffer) < 4:
            return NEED_DATA
        (magic,) = wire.U32.unpack(self._buffer.peek(4))
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple()
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.negotiated.structured_replies:
                raise RemoteProtocolError("structured reply without negotiating it")
            return self._chunk()
        raise RemoteProtocolError(f"bad reply magic {magic:#x}")

    def _lookup(self, cookie: int) -> _InFlight:
        try:
            return self._in_flight[cookie]
        except KeyError:
            raise RemoteProtocolError(f"reply for unknown cookie {cookie:#x}") from None

    def _simple(self) -> SimpleReply | NeedData:
        if len(self._buffer) < wire.SIMPLE_REPLY.size:
            return NEED_DATA
        _, error, cookie = wire.SIMPLE_REPLY.unpack(self._buffer.peek(wire.SIMPLE_REPLY.size))
        req = self._lookup(cookie)
        data_len = req.length if req.cmd == Cmd.READ and error == 0 else 0
        if req.cmd == Cmd.READ and self.negotiated.structured_replies:
            raise RemoteProtocolError("simple reply to READ after structured replies were agreed")
        if len(self._buffer) < wire.SIMPLE_REPLY.size + data_len:
            return NEED_DATA
        self._buffer.skip(wire.SIMPLE_REPLY.size)
        del self._in_flight[cookie]
        return SimpleReply(cookie, error, self._buffer.take(data_len))

    def _chunk(self) -> ReplyEvent | NeedData:
        if len(self._buffer) < wire.CHUNK_HEADER.size:
            return NEED_DATA
        _, flags, type_, cookie, length = wire.CHUNK_HEADER.unpack(
            self._buffer.peek(wire.CHUNK_HEADER.size)
        )
        req = self._lookup(cookie)
        if length > self._max_reply:
            raise RemoteProtocolError(f"reply chunk of {length} bytes is too long")
        if len(self._buffer) < wire.CHUNK_HEADER.size + length:
            return NEED_DATA
        self._buffer.skip(wire.CHUNK_HEADER.size)
        payload = self._buffer.take(length)
        done = bool(flags & ReplyFlag.DONE)
        if done:
            del self._in_flight[cookie]
        try:
            return self._parse_chunk(type_, cookie, payload, done, req)
        except wire.MALFORMED as exc:
            raise RemoteProtocolError(f"malformed reply chunk type {type_}: {exc}") from exc

    def _parse_chunk(
        self, type_: int, cookie: int, payload: bytes, done: bool, req: _InFlight
    ) -> ReplyEvent:
        if type_ == ReplyType.NONE:
            if payload:
                raise ValueError("NONE chunk with a payload")
            return NoneChunk(cookie, done)
        if type_ == ReplyType.OFFSET_DATA:
            (offset,) = wire.U64.unpack_from(payload)
            data = payload[8:]
            _check_inside(req, offset, len(data))
            return DataChunk(cookie, offset, data, done)
        if type_ == ReplyType.OFFSET_HOLE:
            offset, size = (wire.U64.unpack_from(payload)[0], wire.U32.unpack_from(payload, 8)[0])
            _check_inside(req, offset, size)
            return HoleChunk(cookie, offset, size, done)
        if type_ == ReplyType.BLOCK_STATUS:
            (context_id,) = wire.U32.unpack_from(payload)
            if (len(payload) - 4) % 8:
                raise ValueError("extents are not whole")
            extents = tuple(
                wire.EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)
            )
            return BlockStatusChunk(cookie, context_id, extents, done)
        if type_ & (1 << 15):  # error chunks, known or not; an error of 0 is still one
            error, msg_len = wire.ERROR_CHUNK.unpack_from(payload)
            error = error or Errno.EINVAL
            end = wire.ERROR_CHUNK.size + msg_len  # where the message ends
            tail = 8 if type_ == ReplyType.ERROR_OFFSET else 0
            if end + tail > len(payload):
                raise ValueError(f"error message of {msg_len} bytes runs past the chunk")
            if type_ not in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
                return ErrorChunk(cookie, error, "", None, done)
            message = payload[wire.ERROR_CHUNK.size : end].decode("utf-8", "replace")
            offset = None
            if tail:
                (offset,) = wire.U64.unpack_from(payload, end)
                _check_inside(req, offset, 1)
            return ErrorChunk(cookie, error, message, offset, done)
        raise ValueError(f"unknown chunk type {type_}")


def _check_inside(req: _InFlight, offset: int, length: int) -> None:
    if offset < req.offset or offset + length > req.offset + req.length:
        raise ValueError(f"chunk at {offset}+{length} lies outside the request")
