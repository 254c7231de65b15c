"""Drive the protocol machines with arbitrary bytes, the way the server and client do.

Shared by the property tests (hypothesis) and the coverage-guided fuzz target (atheris): each
``drive_*`` feeds a byte stream in the given chunks, answers every event as our server (or
client) would, checks each reply it produced is well framed, and lets only the protocol's own
``ProtocolError`` escape.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator

from erofs_nbdd.protocol import (
    NEED_DATA,
    AbortOption,
    ClientFlags,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    Disconnect,
    Errno,
    ExportLimits,
    ExportNameOption,
    HandshakeReply,
    Info,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    Negotiated,
    Opt,
    Rep,
    ReplyEvent,
    ReplyType,
    Request,
    ServerHandshake,
    ServerTransmission,
    StartTLSOption,
    State,
    StructuredReplyOption,
    TransmissionFlag,
    UnsupportedOption,
    wire,
)

OPTION_REPLY_MAGIC = 0x3E889045565A9
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EXPORTS = {"demo": 1 << 20, "": 1 << 20, "team/app-v2": 8192}
FLAGS = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)
MAX_PAYLOAD = 1 << 20


class Closed(Exception):
    """The server ends the session by policy (EXPORT_NAME of an unknown export)."""


class BadReply(AssertionError):
    """A reply our machines produced that a peer could not parse: a bug of ours."""


def chunked(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """``data`` cut at the given sizes, cycled until it is used up."""
    sizes = [max(1, size) for size in sizes] or [len(data)]
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            return
        yield data[pos : pos + size]
        pos += size


def check_option_replies(data: bytes, opt: int) -> None:
    """Every option reply in ``data`` is framed right and answers ``opt``."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 20:
            raise BadReply(f"truncated option reply header: {data[pos:]!r}")
        magic, got, rep, length = struct.unpack_from(">QIII", data, pos)
        if magic != OPTION_REPLY_MAGIC or got != opt:
            raise BadReply(f"reply magic {magic:#x} for option {got}, expected {opt}")
        if pos + 20 + length > len(data):
            raise BadReply("option reply runs past its data")
        if rep == Rep.ACK and length:
            raise BadReply("ACK with data")
        pos += 20 + length


def answer_option(hs: ServerHandshake, event: object) -> bytes:
    """The replies our server gives, with EXPORTS standing for the image directory."""
    if isinstance(event, AbortOption | StructuredReplyOption):
        return hs.send_ack()
    if isinstance(event, ListOption):
        return b"".join([*(hs.send_server(n, "d") for n in EXPORTS if n), hs.send_ack()])
    if isinstance(event, StartTLSOption):
        return hs.send_error(Rep.ERR_POLICY, "no TLS here")
    if isinstance(event, UnsupportedOption):
        return hs.send_error(Rep.ERR_UNSUP, "unsupported")
    if isinstance(event, InvalidOption):
        return hs.send_error(event.rep, event.message)
    if isinstance(event, ExportNameOption):
        if event.name not in EXPORTS:
            raise Closed(event.name)  # EXPORT_NAME cannot be refused with an error
        return hs.send_export_name_reply(EXPORTS[event.name], FLAGS)
    if isinstance(event, InfoOption):
        if event.name not in EXPORTS:
            return hs.send_error(Rep.ERR_UNKNOWN, f"no export {event.name!r}")
        parts = [hs.send_info_export(EXPORTS[event.name], FLAGS)]
        if Info.NAME in event.requests:
            parts.append(hs.send_info_name(event.name))
        if Info.DESCRIPTION in event.requests:
            parts.append(hs.send_info_description("x" * 5000))
        if Info.BLOCK_SIZE in event.requests:
            parts.append(hs.send_info_block_size(512, 4096, MAX_PAYLOAD))
        return b"".join([*parts, hs.send_ack()])
    if isinstance(event, MetaContextOption):
        parts = []
        if "base:allocation" in event.queries or not event.queries:
            parts.append(hs.send_meta_context(1, "base:allocation", event.name))
        return b"".join([*parts, hs.send_ack()])
    raise AssertionError(f"unexpected event {event!r}")


def drive_server_handshake(chunks: Iterable[bytes]) -> tuple[ServerHandshake, bytes]:
    """Feed a client's bytes to a server handshake; return it and the bytes after it.
    Raises only ProtocolError or Closed (a clean disconnect), or BadReply (our bug)."""
    hs = ServerHandshake(max_option_length=4096)
    pieces = iter(chunks)
    for chunk in pieces:
        hs.receive_data(chunk)
        while hs.state not in (State.TRANSMISSION, State.CLOSED, State.TLS_HANDOVER):
            event = hs.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, ClientFlags):
                continue
            opt = hs._option  # the option being answered, for the framing check
            reply = answer_option(hs, event)
            if isinstance(event, ExportNameOption):
                if len(reply) not in (10, 134):
                    raise BadReply(f"EXPORT_NAME reply of {len(reply)} bytes")
            else:
                assert isinstance(opt, int)
                check_option_replies(reply, opt)
        if hs.state is not State.OPTIONS and hs.state is not State.AWAIT_CLIENT_FLAGS:
            break
    return hs, hs.trailing_data + b"".join(pieces)  # what the transmission phase gets


def export_limits(negotiated: Negotiated, size: int = 1 << 20) -> ExportLimits:
    """The limits our server enforces: a minimum block size only where the client agreed."""
    return ExportLimits(size, FLAGS, min_block=negotiated.min_block, max_payload=MAX_PAYLOAD)


def drive_server_transmission(
    chunks: Iterable[bytes], negotiated: Negotiated, size: int = 1 << 20
) -> list[Request]:
    """Feed requests to a server transmission machine and answer each as the server does
    (data of the right length for a good READ). Returns the requests that were served."""
    return serve(ServerTransmission(negotiated, export_limits(negotiated, size)), chunks)


def serve(tx: ServerTransmission, chunks: Iterable[bytes]) -> list[Request]:
    """Answer every request ``tx`` parses (from what it holds, then from ``chunks``); after
    DISC, or the end of the bytes, every request has had exactly one reply."""
    pieces = iter(chunks)
    served: list[Request] = []
    size = tx.export.size
    while True:
        event = tx.next_event()
        if event is NEED_DATA:
            if (chunk := next(pieces, None)) is None:
                break
            tx.receive_data(chunk)
            continue
        if isinstance(event, Disconnect):
            break
        error, _ = tx.check(event)
        if error is not Errno.OK:
            tx.error_reply(event.cookie, error, "refused")
            continue
        if event.offset + event.length > size or event.length > MAX_PAYLOAD:
            raise BadReply(f"{event} passed the checks but is outside the export")
        if (event.offset | event.length) % tx.export.min_block:
            raise BadReply(f"{event} passed the checks but is not aligned")
        if event.cmd == Cmd.READ:
            head = tx.read_reply_header(event.cookie, event.offset, event.length)
            if len(head) != tx.read_header_size:
                raise BadReply(f"READ header of {len(head)} bytes, not {tx.read_header_size}")
        elif event.cmd == Cmd.BLOCK_STATUS:
            tx.block_status_reply(event.cookie, [(1, [(event.length, 0)])])
        else:
            tx.ok_reply(event.cookie)
        served.append(event)
    if tx.outstanding:
        raise BadReply(f"{tx.outstanding} requests left without a reply")
    return served


def drive_server_session(chunks: Iterable[bytes]) -> tuple[ServerHandshake, list[Request]]:
    """A whole session: the handshake, then (if it got there) its own transmission machine,
    handed over with the bytes that came behind GO; the requests served."""
    hs, after = drive_server_handshake(chunks)
    if hs.state is not State.TRANSMISSION:
        return hs, []
    tx = hs.transmission(export_limits(hs.negotiated))
    if tx.negotiated is hs.negotiated or tx.negotiated != hs.negotiated:
        raise BadReply("the transmission machine must get a copy of the negotiated settings")
    if tx.pending_bytes() != len(hs.trailing_data):
        raise BadReply("the transmission machine was not fed the bytes behind the handshake")
    return hs, serve(tx, [after[len(hs.trailing_data) :]])


def drive_client_handshake(chunks: Iterable[bytes]) -> list[HandshakeReply]:
    """A client asking INFO, then LIST, then GO, fed arbitrary server bytes; the events
    it saw, up to transmission (or the end of the bytes)."""
    hs = ClientHandshake()
    events: list[HandshakeReply] = []
    asked = 0
    for chunk in chunks:
        hs.receive_data(chunk)
        while (event := hs.next_event()) is not NEED_DATA:
            events.append(event)
            if hs.state is State.AWAIT_CLIENT_FLAGS:
                hs.send_client_flags()
            if hs.state is State.OPTIONS:
                if asked == 0:
                    hs.opt_info("demo", (Info.BLOCK_SIZE,))
                elif asked == 1:
                    hs.opt_list()
                elif asked == 2:
                    hs.opt_go("demo")
                else:
                    return events
                asked += 1
            if hs.state in (State.TRANSMISSION, State.TLS_HANDOVER):
                return events
    return events


def drive_client_transmission(chunks: Iterable[bytes], structured: bool) -> list[ReplyEvent]:
    """A client with reads and a block status in flight, fed arbitrary server bytes; the
    replies it parsed."""
    negotiated = Negotiated(structured_replies=structured, meta_contexts={1: "base:allocation"})
    tx = ClientTransmission(negotiated, max_reply_payload=MAX_PAYLOAD)
    for i in range(4):
        tx.request(Cmd.READ, 512 * i, 512 * (i + 1))
    if structured:
        tx.request(Cmd.BLOCK_STATUS, 0, 1 << 20)
    events: list[ReplyEvent] = []
    for chunk in chunks:
        tx.receive_data(chunk)
        while (event := tx.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def good_client_stream() -> bytes:
    """A plausible client session, as a seed for fuzzing and a sanity check."""
    out = struct.pack(">I", 3)
    out += struct.pack(">QII", IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
    out += struct.pack(">QII", IHAVEOPT, Opt.LIST, 0)
    name = b"demo"
    info = struct.pack(">I", len(name)) + name + struct.pack(">HHH", 2, Info.NAME, Info.BLOCK_SIZE)
    out += struct.pack(">QII", IHAVEOPT, Opt.INFO, len(info)) + info
    out += struct.pack(">QII", IHAVEOPT, Opt.GO, len(info)) + info
    out += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.READ, 1, 0, 4096)
    out += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, Cmd.DISC, 2, 0, 0)
    return out


def good_server_stream() -> bytes:
    """What a server answers drive_client_handshake: INFO, LIST and GO, all accepted."""
    export = wire.option_reply(Opt.INFO, Rep.INFO, wire.info_export(1 << 20, FLAGS))
    out = wire.greeting(3)
    out += export + wire.option_reply(Opt.INFO, Rep.INFO, wire.info_block_size(512, 4096, 1 << 25))
    out += wire.option_reply(Opt.INFO, Rep.ACK)
    out += wire.option_reply(Opt.LIST, Rep.SERVER, wire.rep_server(b"demo", b"a demo"))
    out += wire.option_reply(Opt.LIST, Rep.ACK)
    go = wire.option_reply(Opt.GO, Rep.INFO, wire.info_export(1 << 20, FLAGS))
    return out + go + wire.option_reply(Opt.GO, Rep.ACK)


def good_server_replies(structured: bool) -> bytes:
    """Replies to what drive_client_transmission asks, in several of the shapes allowed."""
    if not structured:
        return (
            wire.simple_reply(1)
            + b"a" * 512
            + wire.simple_reply(2)
            + b"b" * 1024
            + wire.simple_reply(3, Errno.EIO)
            + wire.simple_reply(4)
            + b"d" * 2048
        )
    error_at = struct.pack(">IH", Errno.EIO, 3) + b"bad" + struct.pack(">Q", 1600)
    return (
        wire.offset_data_header(1, 0, 512, done=True)
        + b"a" * 512
        + wire.chunk(2, ReplyType.OFFSET_HOLE, 12, done=False)
        + struct.pack(">QI", 512, 256)
        + wire.offset_data_header(2, 768, 768, done=False)
        + b"b" * 768
        + wire.done_chunk(2)
        + wire.error_chunk(3, Errno.EIO, b"disk on fire")
        + wire.chunk(4, ReplyType.ERROR_OFFSET, len(error_at), done=True)
        + error_at
        + wire.block_status_chunk(5, 1, [(4096, 0), (4096, 3)], done=True)
    )
