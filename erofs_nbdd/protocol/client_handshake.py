"""The client side of the handshake: builds options, checks that replies fit what was asked."""

from __future__ import annotations

from . import wire
from .constants import (
    EXPORT_NAME_ZEROES,
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    BlockSizeInfo,
    DescriptionInfo,
    ExportInfo,
    ExportNameReply,
    HandshakeReply,
    MetaContext,
    NameInfo,
    NeedData,
    OptionAck,
    OptionError,
    ServerEntry,
    ServerGreeting,
    UnknownInfo,
)
from .handshake import (
    ACK_STEP,
    MAX_OPTION_REPLY_LENGTH,
    PARTIAL_REPLIES,
    HandshakeMachine,
    Negotiated,
    State,
    Step,
    decode_name,
    read_string,
)


class ClientHandshake(HandshakeMachine):
    """The client side: builds options, checks that replies fit what was asked."""

    def __init__(self, *, no_zeroes: bool = True) -> None:
        self.state = State.AWAIT_GREETING
        self.negotiated = Negotiated()
        self.server_flags = 0
        self._want_no_zeroes = no_zeroes
        self._buffer = wire.Buffer()
        self._option: int | None = None
        self._export_seen = False
        # The open option is a GO that asked for NBD_INFO_BLOCK_SIZE, and what it got.
        self._go_asks_block_size = False
        self._block_size: tuple[int, int, int] | None = None

    def receive_data(self, data: bytes) -> None:
        self._buffer.feed(data)

    @property
    def trailing_data(self) -> bytes:
        return self._buffer.peek(len(self._buffer))

    def next_event(self) -> HandshakeReply | NeedData:
        self._check_usable()
        if self.state is State.AWAIT_GREETING:
            if len(self._buffer) < wire.GREETING.size:
                return NEED_DATA
            magic, ihaveopt, flags = wire.GREETING.unpack(self._buffer.take(wire.GREETING.size))
            if magic != NBDMAGIC:
                self._fail(RemoteProtocolError, f"not an NBD server (magic {magic:#x})")
            if ihaveopt != IHAVEOPT:
                self._fail(
                    RemoteProtocolError,
                    "server speaks oldstyle negotiation, which is not supported",
                )
            if not flags & HandshakeFlag.FIXED_NEWSTYLE:
                self._fail(RemoteProtocolError, "server does not speak fixed newstyle negotiation")
            self.server_flags = flags
            self._step(Step.GREETING)
            return ServerGreeting(flags)
        if self.state is not State.REPLYING:
            return NEED_DATA
        assert self._option is not None
        if self._option == Opt.EXPORT_NAME:
            return self._export_name_reply()
        if len(self._buffer) < wire.OPTION_REPLY_HEADER.size:
            return NEED_DATA
        magic, opt, rep, length = wire.OPTION_REPLY_HEADER.unpack(
            self._buffer.peek(wire.OPTION_REPLY_HEADER.size)
        )
        if magic != OPTION_REPLY_MAGIC:
            self._fail(RemoteProtocolError, f"bad option reply magic {magic:#x}")
        if opt != self._option:
            self._fail(
                RemoteProtocolError, f"reply to option {opt} while option {self._option} is open"
            )
        if length > MAX_OPTION_REPLY_LENGTH:
            self._fail(RemoteProtocolError, f"option reply of {length} bytes is too long")
        if len(self._buffer) < wire.OPTION_REPLY_HEADER.size + length:
            return NEED_DATA
        self._buffer.skip(wire.OPTION_REPLY_HEADER.size)
        return self._reply(opt, rep, self._buffer.take(length))

    def _export_name_reply(self) -> ExportNameReply | NeedData:
        want = wire.EXPORT_NAME_REPLY.size + (
            0 if self.negotiated.no_zeroes else EXPORT_NAME_ZEROES
        )
        if len(self._buffer) < want:
            return NEED_DATA
        size, flags = wire.EXPORT_NAME_REPLY.unpack(self._buffer.take(want)[:10])
        self._close(Step.EXPORT_NAME_REPLY)
        return ExportNameReply(size, flags)

    def _close(self, step: Step) -> None:
        """The final reply arrived: the option is closed and the state moves on."""
        self._step(step)
        self._option = None

    def _reply(self, opt: int, rep: int, data: bytes) -> HandshakeReply:
        if rep & (1 << 31):
            if opt == Opt.SET_META_CONTEXT:
                self.negotiated.meta_contexts = {}  # a failed SET selects nothing
            self._close(Step.ERROR_REPLY)
            return OptionError(opt, rep, data.decode("utf-8", "replace"))
        if rep == Rep.ACK:
            if data:
                self._fail(RemoteProtocolError, "ACK reply carries data")
            if opt == Opt.GO and not self._export_seen:
                self._fail(RemoteProtocolError, "server acknowledged GO without NBD_INFO_EXPORT")
            if opt == Opt.STRUCTURED_REPLY:
                self.negotiated.structured_replies = True
            elif opt == Opt.GO:
                self.negotiated.block_size = self._block_size
            self._close(ACK_STEP.get(opt, Step.ACK))
            return OptionAck(opt)
        allowed = PARTIAL_REPLIES.get(Rep(rep) if rep in Rep._value2member_map_ else Rep.ACK)
        if allowed is None or opt not in allowed:
            self._fail(RemoteProtocolError, f"reply type {rep} does not answer option {opt}")
        try:
            return self._partial(opt, Rep(rep), data)
        except wire.MALFORMED as exc:
            self._fail(RemoteProtocolError, f"malformed reply to option {opt}: {exc}", exc)

    def _partial(self, opt: int, rep: Rep, data: bytes) -> HandshakeReply:
        if rep is Rep.SERVER:
            name, pos = read_string(data, 0, "export name")
            return ServerEntry(name, data[pos:].decode("utf-8", "replace"))
        if rep is Rep.META_CONTEXT:
            if len(data) < 4:
                raise ValueError("meta context reply is too short")
            (context_id,) = wire.U32.unpack_from(data)
            name = decode_name(data[4:], "meta context name")
            if opt == Opt.SET_META_CONTEXT:
                self.negotiated.meta_contexts[context_id] = name
            return MetaContext(context_id, name)
        (info,) = wire.U16.unpack_from(data)
        if info == Info.EXPORT:
            if len(data) != wire.INFO_EXPORT.size:
                raise ValueError(f"NBD_INFO_EXPORT is {len(data)} bytes, not 12")
            _, size, flags = wire.INFO_EXPORT.unpack(data)
            self._export_seen = True
            return ExportInfo(size, flags)
        if info == Info.NAME:
            return NameInfo(decode_name(data[2:], "export name"))
        if info == Info.DESCRIPTION:
            return DescriptionInfo(data[2:].decode("utf-8", "replace"))
        if info == Info.BLOCK_SIZE:
            if len(data) != wire.INFO_BLOCK_SIZE.size:
                raise ValueError(f"NBD_INFO_BLOCK_SIZE is {len(data)} bytes, not 14")
            _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(data)
            if self._go_asks_block_size:  # these bind us (doc/proto.md "NBD_INFO_BLOCK_SIZE")
                self._block_size = (minimum, preferred, maximum)
            return BlockSizeInfo(minimum, preferred, maximum)
        return UnknownInfo(info, data[2:])

    # -- output ---------------------------------------------------------------------------

    def send_client_flags(self) -> bytes:
        if self.state is not State.AWAIT_CLIENT_FLAGS:
            self._fail(LocalProtocolError, "client flags are sent once, after the greeting")
        flags = ClientFlag.C_FIXED_NEWSTYLE
        if self._want_no_zeroes and self.server_flags & HandshakeFlag.NO_ZEROES:
            flags |= ClientFlag.C_NO_ZEROES
            self.negotiated.no_zeroes = True
        self._step(Step.CLIENT_FLAGS)
        return wire.CLIENT_FLAGS.pack(flags)

    def _send(self, opt: int, data: bytes = b"") -> bytes:
        if self.state is not State.OPTIONS:
            # doc/proto.md "Fixed newstyle negotiation": one option at a time
            self._fail(LocalProtocolError, f"cannot send option {opt}")
        self._step(Step.OPTION)
        self._option = opt
        self._export_seen = False
        self._go_asks_block_size, self._block_size = False, None
        if opt == Opt.SET_META_CONTEXT:
            self.negotiated.meta_contexts = {}
        return wire.option(opt, data)

    def opt_go(self, name: str, infos: tuple[int, ...] = ()) -> bytes:
        data = self._send(Opt.GO, wire.info_request(name.encode(), infos))
        self._go_asks_block_size = Info.BLOCK_SIZE in infos
        return data

    def opt_info(self, name: str, infos: tuple[int, ...] = ()) -> bytes:
        return self._send(Opt.INFO, wire.info_request(name.encode(), infos))

    def opt_list(self) -> bytes:
        return self._send(Opt.LIST)

    def opt_abort(self) -> bytes:
        return self._send(Opt.ABORT)

    def opt_starttls(self) -> bytes:
        return self._send(Opt.STARTTLS)

    def opt_structured_reply(self) -> bytes:
        return self._send(Opt.STRUCTURED_REPLY)

    def opt_list_meta_context(self, name: str, queries: tuple[str, ...] = ()) -> bytes:
        return self._send(
            Opt.LIST_META_CONTEXT, wire.meta_context_request(name.encode(), _enc(queries))
        )

    def opt_set_meta_context(self, name: str, queries: tuple[str, ...]) -> bytes:
        return self._send(
            Opt.SET_META_CONTEXT, wire.meta_context_request(name.encode(), _enc(queries))
        )

    def opt_export_name(self, name: str) -> bytes:
        return self._send(Opt.EXPORT_NAME, name.encode())

    def opt_raw(self, opt: int, data: bytes = b"") -> bytes:
        """Any option, for probing servers (and for testing ours with bad input)."""
        return self._send(opt, data)

    def start_tls(self) -> None:
        if self.state is not State.TLS_HANDOVER:
            self._fail(LocalProtocolError, "STARTTLS was not acknowledged")
        if len(self._buffer):
            self._fail(
                RemoteProtocolError, "server sent plaintext bytes after acknowledging STARTTLS"
            )
        self.negotiated = Negotiated(tls=True, no_zeroes=self.negotiated.no_zeroes)
        self._step(Step.TLS_STARTED)


def _enc(queries: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(q.encode() for q in queries)
