"""The server side of the handshake: parses options, checks the order of our replies."""

from __future__ import annotations

from . import wire
from .constants import IHAVEOPT, ClientFlag, HandshakeFlag, Info, Opt, Rep
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    AbortOption,
    ClientFlags,
    ExportNameOption,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    NeedData,
    OptionEvent,
    StartTLSOption,
    StructuredReplyOption,
    UnsupportedOption,
)
from .handshake import (
    ACK_STEP,
    DEFAULT_MAX_OPTION_LENGTH,
    HandshakeMachine,
    Negotiated,
    State,
    Step,
    decode_name,
    parse_info_request,
    parse_meta_context_request,
)
from .transmission import ExportLimits, ServerTransmission


class ServerHandshake(HandshakeMachine):
    """The server side: parses options, checks the order of our replies."""

    def __init__(self, *, max_option_length: int = DEFAULT_MAX_OPTION_LENGTH) -> None:
        self.state = State.AWAIT_CLIENT_FLAGS
        self.negotiated = Negotiated()
        self.client_flags = 0
        self._max_option_length = max_option_length
        self._buffer = wire.Buffer()
        self._option: Opt | int | None = None  # the open option while REPLYING
        self._info_export_sent = False
        # The open option is a GO that asked for NBD_INFO_BLOCK_SIZE, and what it was sent.
        self._go_asks_block_size = False
        self._pending_block_size: tuple[int, int, int] | None = None
        self._pending_contexts: dict[int, str] = {}
        self._pending_meta_export: str | None = None
        self._must_error = False

    # -- input ----------------------------------------------------------------------------

    def greeting(self) -> bytes:
        if self.state is not State.AWAIT_CLIENT_FLAGS:
            self._fail(LocalProtocolError, "the greeting comes first, and once")
        return wire.greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)

    def receive_data(self, data: bytes) -> None:
        self._buffer.feed(data)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received past the end of the handshake, which belong to what comes next."""
        return self._buffer.peek(len(self._buffer))

    def transmission(self, export: ExportLimits) -> ServerTransmission:
        """The transmission machine for the export just chosen: it has its own copy of what
        was negotiated and has been fed the bytes that came after the handshake."""
        if self.state is not State.TRANSMISSION:
            self._fail(LocalProtocolError, "transmission starts after GO or EXPORT_NAME")
        tx = ServerTransmission(self.negotiated.copy(), export)
        tx.receive_data(self.trailing_data)
        return tx

    def next_event(self) -> ClientFlags | OptionEvent | NeedData:
        self._check_usable()
        if self.state is State.AWAIT_CLIENT_FLAGS:
            if len(self._buffer) < 4:
                return NEED_DATA
            (flags,) = wire.CLIENT_FLAGS.unpack(self._buffer.take(4))
            known = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES
            # doc/proto.md "Newstyle negotiation": unknown client flags MUST end the session
            if flags & ~int(known):
                self._fail(RemoteProtocolError, f"client sent unknown flags {flags:#x}")
            if not flags & ClientFlag.C_FIXED_NEWSTYLE:
                self._fail(RemoteProtocolError, "client does not speak fixed newstyle negotiation")
            self.client_flags = flags
            self.negotiated.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
            self._step(Step.CLIENT_FLAGS)
            return ClientFlags(flags)
        if self.state is not State.OPTIONS:
            return NEED_DATA
        if len(self._buffer) < wire.OPTION_HEADER.size:
            return NEED_DATA
        magic, opt, length = wire.OPTION_HEADER.unpack(self._buffer.peek(wire.OPTION_HEADER.size))
        if magic != IHAVEOPT:
            self._fail(RemoteProtocolError, f"bad option magic {magic:#x}")
        if length > self._max_option_length:
            self._fail(
                RemoteProtocolError,
                f"option {opt} carries {length} bytes; the limit is {self._max_option_length}",
            )
        if len(self._buffer) < wire.OPTION_HEADER.size + length:
            return NEED_DATA
        self._buffer.skip(wire.OPTION_HEADER.size)
        data = self._buffer.take(length)
        event = self._parse_option(opt, data)
        self._open(opt, event)
        return event

    def _parse_option(self, opt: int, data: bytes) -> OptionEvent:
        if opt == Opt.EXPORT_NAME:
            # EXPORT_NAME cannot be answered with an error: a bad name ends the session.
            try:
                return ExportNameOption(decode_name(data, "export name"))
            except ValueError as exc:
                self._fail(RemoteProtocolError, str(exc), exc)
        try:
            return self._parse_known_option(opt, data)
        except ValueError as exc:
            return InvalidOption(opt, str(exc))

    def _parse_known_option(self, opt: int, data: bytes) -> OptionEvent:
        if opt == Opt.ABORT:
            return AbortOption()  # the spec says to ignore any data
        if opt in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY):
            if data:
                raise ValueError(f"{Opt(opt).name} takes no data, got {len(data)} bytes")
            if opt == Opt.LIST:
                return ListOption()
            if opt == Opt.STARTTLS:
                if self.negotiated.tls:
                    raise ValueError("TLS is already active")
                return StartTLSOption()
            return StructuredReplyOption()
        if opt in (Opt.INFO, Opt.GO):
            name, requests = parse_info_request(data)
            return InfoOption(name, requests, go=opt == Opt.GO)
        if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            name, queries = parse_meta_context_request(data)
            if not self.negotiated.structured_replies:
                raise ValueError("meta contexts need NBD_OPT_STRUCTURED_REPLY first")
            return MetaContextOption(name, queries, set=opt == Opt.SET_META_CONTEXT)
        return UnsupportedOption(opt)

    def _open(self, opt: int, event: OptionEvent) -> None:
        self._step(Step.OPTION)
        self._option = Opt(opt) if opt in Opt._value2member_map_ else opt
        self._info_export_sent = False
        self._go_asks_block_size = (
            isinstance(event, InfoOption) and event.go and Info.BLOCK_SIZE in event.requests
        )
        self._pending_block_size = None
        self._pending_contexts = {}
        self._pending_meta_export = None
        self._must_error = isinstance(event, InvalidOption | UnsupportedOption)

    def _close(self, step: Step) -> None:
        """The final reply went out: the option is closed and the state moves on."""
        self._step(step)
        self._option = None

    # -- replies --------------------------------------------------------------------------

    def _require(self, *options: Opt) -> int:
        if self.state is not State.REPLYING or self._option not in options:
            wanted = "/".join(o.name for o in options)
            self._fail(LocalProtocolError, f"no {wanted} option is awaiting a reply")
        assert self._option is not None
        return int(self._option)

    def _open_option(self) -> int:
        if self.state is not State.REPLYING or self._option is None:
            self._fail(LocalProtocolError, "no option is awaiting a reply")
        return int(self._option)

    def send_server(self, name: str, description: str = "") -> bytes:
        opt = self._require(Opt.LIST)
        return wire.option_reply(
            opt, Rep.SERVER, wire.rep_server(wire.utf8(name), wire.utf8(description))
        )

    def send_info_export(self, size: int, flags: int) -> bytes:
        opt = self._require(Opt.INFO, Opt.GO)
        self._info_export_sent = True
        return wire.option_reply(opt, Rep.INFO, wire.info_export(size, flags))

    def send_info_name(self, name: str) -> bytes:
        opt = self._require(Opt.INFO, Opt.GO)
        return wire.option_reply(opt, Rep.INFO, wire.info_text(Info.NAME, wire.utf8(name)))

    def send_info_description(self, description: str) -> bytes:
        opt = self._require(Opt.INFO, Opt.GO)
        text = wire.utf8(description)
        return wire.option_reply(opt, Rep.INFO, wire.info_text(Info.DESCRIPTION, text))

    def send_info_block_size(self, minimum: int, preferred: int, maximum: int) -> bytes:
        """Block size constraints; the client must keep to them only if this answers a GO
        that asked for them (``Negotiated.block_size``), so only then may they be enforced."""
        opt = self._require(Opt.INFO, Opt.GO)
        if minimum < 1 or minimum > 1 << 16 or minimum & (minimum - 1):
            # doc/proto.md "Size constraints": a power of 2, at most 2^16
            self._fail(LocalProtocolError, f"minimum block size {minimum} is not allowed")
        if self._go_asks_block_size:
            self._pending_block_size = (minimum, preferred, maximum)
        return wire.option_reply(opt, Rep.INFO, wire.info_block_size(minimum, preferred, maximum))

    def send_meta_context(self, context_id: int, name: str, export: str) -> bytes:
        opt = self._require(Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT)
        if opt == Opt.SET_META_CONTEXT:
            self._pending_contexts[context_id] = name
            self._pending_meta_export = export
        return wire.option_reply(
            opt, Rep.META_CONTEXT, wire.rep_meta_context(context_id, wire.utf8(name))
        )

    def send_ack(self) -> bytes:
        """The final ACK to the open option; the state it leads to follows the spec."""
        opt = self._open_option()
        if self._must_error:
            self._fail(
                LocalProtocolError, f"option {opt} was malformed or unknown; ACK is not allowed"
            )
        if opt in (Opt.INFO, Opt.GO) and not self._info_export_sent:
            # doc/proto.md "NBD_REP_INFO": NBD_INFO_EXPORT MUST come before the ACK
            self._fail(LocalProtocolError, "NBD_INFO_EXPORT must be sent before ACK")
        if opt == Opt.EXPORT_NAME:
            self._fail(LocalProtocolError, "EXPORT_NAME is answered with send_export_name_reply")
        if opt == Opt.STRUCTURED_REPLY:
            self.negotiated.structured_replies = True
        elif opt == Opt.SET_META_CONTEXT:
            self.negotiated.meta_contexts = self._pending_contexts
            self.negotiated.meta_export = self._pending_meta_export
        elif opt == Opt.GO:
            self.negotiated.block_size = self._pending_block_size
        self._close(ACK_STEP.get(opt, Step.ACK))
        return wire.option_reply(opt, Rep.ACK)

    def send_error(self, rep: Rep, message: str = "") -> bytes:
        """A final error reply; the client may go on with another option."""
        opt = self._open_option()
        if not rep.is_error:
            self._fail(LocalProtocolError, f"{rep.name} is not an error reply")
        if opt == Opt.EXPORT_NAME:
            # doc/proto.md "Newstyle negotiation": an unwilling server MUST end the session
            self._fail(
                LocalProtocolError, "EXPORT_NAME cannot be refused with an error; close instead"
            )
        if opt == Opt.SET_META_CONTEXT:
            # A failed SET leaves no context selected (spec: it replaces the selection).
            self.negotiated.meta_contexts = {}
            self.negotiated.meta_export = None
        self._close(Step.ERROR_REPLY)
        return wire.option_reply(opt, rep, wire.utf8(message))

    def send_export_name_reply(self, size: int, flags: int) -> bytes:
        self._require(Opt.EXPORT_NAME)
        self._close(Step.EXPORT_NAME_REPLY)
        return wire.export_name_reply(size, flags, no_zeroes=self.negotiated.no_zeroes)

    def start_tls(self) -> None:
        """Call once TLS is about to start: plaintext already buffered here is an injection
        attempt, and everything negotiated in plaintext is forgotten."""
        if self.state is not State.TLS_HANDOVER:
            self._fail(LocalProtocolError, "STARTTLS was not acknowledged")
        if len(self._buffer):
            # doc/proto.md "Client-side requirements": after the ACK, TLS at once
            self._fail(
                RemoteProtocolError,
                f"client sent {len(self._buffer)} plaintext bytes after STARTTLS",
            )
        self.negotiated = Negotiated(tls=True, no_zeroes=self.negotiated.no_zeroes)
        self._step(Step.TLS_STARTED)
