"""The fixed-newstyle handshake as two explicit state machines, one per side.

Rules (doc/proto.md "Fixed newstyle negotiation"):

* The server greets; the client answers with its flags; then the client sends one option at a
  time and MUST NOT send the next before the final reply (ACK or an error) to the previous one.
* A final ACK to GO, or the EXPORT_NAME reply, starts transmission; ACK to ABORT ends the
  session; ACK to STARTTLS hands the stream over to TLS, after which nothing negotiated before
  survives (structured replies and meta contexts are forgotten).
* Every transition is in ``TRANSITIONS`` and taken by ``HandshakeMachine._step``; every error
  is raised by ``HandshakeMachine._fail``, which leaves the machine in ERROR for good (as h11
  does: after a violation the byte stream cannot be trusted, so nothing may go on).

Neither machine does I/O: feed received bytes with ``receive_data``, pull ``next_event``, and
write the bytes that the ``send_*``/``opt_*`` methods return. This module holds what both sides
share: the states, the negotiated settings, and the parsers of option payloads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import NoReturn

from . import wire
from .constants import MAX_STRING, Opt, Rep
from .errors import LocalProtocolError, ProtocolError


class State(enum.Enum):
    AWAIT_GREETING = "await greeting"  # client only
    AWAIT_CLIENT_FLAGS = "await client flags"  # server: greeting sent; client: must send flags
    OPTIONS = "options"  # server: waiting for an option; client: free to send one
    REPLYING = "replying"  # an option is open: its final reply has not been sent/received
    TLS_HANDOVER = "tls handover"  # STARTTLS acknowledged; TLS must start before anything else
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class Step(enum.Enum):
    """What moves a handshake on: a message sent or received, or the TLS hand-over."""

    GREETING = "the greeting"  # client only: the server's greeting arrived
    CLIENT_FLAGS = "the client flags"
    OPTION = "an option"
    ACK = "a final ACK"  # to an option after which negotiation goes on
    ACK_GO = "the final ACK to GO"
    ACK_ABORT = "the final ACK to ABORT"
    ACK_STARTTLS = "the final ACK to STARTTLS"
    ERROR_REPLY = "a final error reply"
    EXPORT_NAME_REPLY = "the EXPORT_NAME reply"
    TLS_STARTED = "the start of TLS"


#: Every legal transition of both sides; anything else is an error. (The server starts in
#: AWAIT_CLIENT_FLAGS: its greeting needs no answer, so sending it changes nothing.)
TRANSITIONS: dict[tuple[State, Step], State] = {
    (State.AWAIT_GREETING, Step.GREETING): State.AWAIT_CLIENT_FLAGS,
    (State.AWAIT_CLIENT_FLAGS, Step.CLIENT_FLAGS): State.OPTIONS,
    # doc/proto.md "Fixed newstyle negotiation": no option before the final reply to the last
    (State.OPTIONS, Step.OPTION): State.REPLYING,
    (State.REPLYING, Step.ACK): State.OPTIONS,
    (State.REPLYING, Step.ERROR_REPLY): State.OPTIONS,
    (State.REPLYING, Step.ACK_GO): State.TRANSMISSION,
    (State.REPLYING, Step.EXPORT_NAME_REPLY): State.TRANSMISSION,
    (State.REPLYING, Step.ACK_ABORT): State.CLOSED,
    # doc/proto.md "NBD_OPT_STARTTLS": TLS starts right after the ACK; options go on in it
    (State.REPLYING, Step.ACK_STARTTLS): State.TLS_HANDOVER,
    (State.TLS_HANDOVER, Step.TLS_STARTED): State.OPTIONS,
}
#: The step a final ACK is, by option (plain ACK for the rest). Keys are ints, so an option
#: number this side does not know still finds its way here.
ACK_STEP: dict[int, Step] = {
    Opt.GO: Step.ACK_GO,
    Opt.ABORT: Step.ACK_ABORT,
    Opt.STARTTLS: Step.ACK_STARTTLS,
}
# Reply types that may precede the final reply of each option (client-side check).
PARTIAL_REPLIES = {
    Rep.SERVER: {Opt.LIST},
    Rep.INFO: {Opt.INFO, Opt.GO},
    Rep.META_CONTEXT: {Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT},
}

#: Longest option payload a server accepts: our largest legitimate option is a
#: SET_META_CONTEXT with a few queries; nbdkit allows 64 MiB, but nothing here needs it.
DEFAULT_MAX_OPTION_LENGTH = 16 * 1024
#: Longest option reply a client accepts (a description plus a name fit easily).
MAX_OPTION_REPLY_LENGTH = 1024 * 1024


@dataclass
class Negotiated:
    """State that the handshake settles and transmission depends on."""

    structured_replies: bool = False
    #: Meta contexts selected by SET_META_CONTEXT, by id, valid for ``meta_export`` only.
    meta_contexts: dict[int, str] = field(default_factory=dict)
    meta_export: str | None = None
    tls: bool = False
    no_zeroes: bool = False
    #: (minimum, preferred, maximum) as NBD_INFO_BLOCK_SIZE gave them in reply to the GO
    #: that started transmission, if that GO asked for them: only then must the client keep
    #: to them (doc/proto.md "NBD_INFO_BLOCK_SIZE"). None after EXPORT_NAME, after a GO that
    #: did not ask, and when the sizes came only in reply to NBD_OPT_INFO or unasked.
    block_size: tuple[int, int, int] | None = None

    @property
    def min_block(self) -> int:
        """The alignment the client agreed to: 1 (none) unless ``block_size`` says otherwise,
        the default doc/proto.md "Size constraints" says a server SHOULD then support."""
        return self.block_size[0] if self.block_size and self.block_size[0] else 1

    def copy(self) -> Negotiated:
        """A copy that shares nothing mutable, for a machine that must not see later changes."""
        return replace(self, meta_contexts=dict(self.meta_contexts))


class HandshakeMachine:
    """What both sides share: the state, the one place it changes and the one way to fail."""

    state: State

    def _step(self, step: Step) -> None:
        """Take the transition ``step`` names from the current state; none is an error."""
        target = TRANSITIONS.get((self.state, step))
        if target is None:
            self._fail(LocalProtocolError, f"{step.value} does not fit here")
        self.state = target

    def _fail(
        self, kind: type[ProtocolError], message: str, cause: BaseException | None = None
    ) -> NoReturn:
        """The one error path: the machine ends in ERROR and stays there. A local error names
        the state the call was made in, not the ERROR it leads to."""
        was, self.state = self.state, State.ERROR
        if issubclass(kind, LocalProtocolError):
            message = f"{message} (in state {was.name})"
        raise kind(message) from cause

    def _check_usable(self) -> None:
        if self.state is State.ERROR:
            self._fail(LocalProtocolError, "the handshake failed earlier; drop the connection")


def decode_name(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes; the limit is {MAX_STRING}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8") from exc


def read_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    """Parse a 32-bit length and that many bytes at ``pos``; return the text and next pos."""
    if pos + 4 > len(data):
        raise ValueError(f"{what} length runs past the end of the option")
    (n,) = wire.U32.unpack_from(data, pos)
    pos += 4
    if n > len(data) - pos:
        raise ValueError(f"{what} runs past the end of the option")
    return decode_name(data[pos : pos + n], what), pos + n


def parse_info_request(data: bytes) -> tuple[str, tuple[int, ...]]:
    """Payload of INFO/GO: name and the information types asked for."""
    name, pos = read_string(data, 0, "export name")
    if pos + 2 > len(data):
        raise ValueError("information request count is missing")
    (count,) = wire.U16.unpack_from(data, pos)
    pos += 2
    if len(data) - pos != 2 * count:
        raise ValueError(f"{count} information requests do not match the option length")
    requests = tuple(wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(count))
    return name, requests


def parse_meta_context_request(data: bytes) -> tuple[str, tuple[str, ...]]:
    """Payload of LIST/SET_META_CONTEXT: export name and the queries."""
    name, pos = read_string(data, 0, "export name")
    if pos + 4 > len(data):
        raise ValueError("query count is missing")
    (count,) = wire.U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        query, pos = read_string(data, pos, "meta context query")
        queries.append(query)
    if pos != len(data):
        raise ValueError("trailing bytes after the meta context queries")
    return name, tuple(queries)
