"""Transmission framing on both sides, and the request rules of check_request."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from erofs_nbdd.protocol import (
    NEED_DATA,
    BlockStatusChunk,
    ClientTransmission,
    Cmd,
    CmdFlag,
    DataChunk,
    Disconnect,
    Errno,
    ErrorChunk,
    ExportLimits,
    HoleChunk,
    LocalProtocolError,
    Negotiated,
    NoneChunk,
    RemoteProtocolError,
    ReplyType,
    Request,
    ServerTransmission,
    SimpleReply,
    StateFlag,
    TransmissionFlag,
    TransmissionState,
    check_request,
    wire,
)

from .wirehelp import feed

SIZE = 1 << 20
RO = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
LIMITS = ExportLimits(size=SIZE, flags=RO, min_block=512, max_payload=1 << 25)
SIMPLE = Negotiated()
STRUCTURED = Negotiated(structured_replies=True, meta_contexts={1: "base:allocation"})

RULES = [
    # (cmd, flags, offset, length, negotiated, expected errno)
    (Cmd.READ, 0, 0, 512, SIMPLE, Errno.OK),
    (Cmd.READ, 0, SIZE - 512, 512, SIMPLE, Errno.OK),
    (Cmd.READ, 0, 0, 0, SIMPLE, Errno.EINVAL),
    (Cmd.READ, 0, SIZE, 0, STRUCTURED, Errno.EINVAL),
    (Cmd.CACHE, 0, 0, 0, SIMPLE, Errno.EINVAL),
    (Cmd.BLOCK_STATUS, 0, 0, 0, STRUCTURED, Errno.EINVAL),
    (Cmd.READ, 0, SIZE - 512, 1024, SIMPLE, Errno.EINVAL),
    (Cmd.READ, 0, SIZE + 512, 512, SIMPLE, Errno.EINVAL),
    (Cmd.READ, 0, (1 << 64) - 512, 512, SIMPLE, Errno.EINVAL),
    (Cmd.READ, 0, 1, 512, SIMPLE, Errno.EINVAL),
    (Cmd.READ, 0, 0, 100, SIMPLE, Errno.EINVAL),
    (Cmd.READ, CmdFlag.DF, 0, 512, SIMPLE, Errno.EINVAL),
    (Cmd.READ, CmdFlag.DF, 0, 512, STRUCTURED, Errno.OK),
    (Cmd.READ, CmdFlag.FUA, 0, 512, SIMPLE, Errno.EINVAL),
    (Cmd.READ, 1 << 12, 0, 512, STRUCTURED, Errno.EINVAL),
    (Cmd.WRITE, 0, 0, 512, SIMPLE, Errno.EPERM),
    (Cmd.WRITE, CmdFlag.FUA, SIZE * 2, 512, SIMPLE, Errno.EPERM),
    (Cmd.TRIM, 0, 0, 4096, SIMPLE, Errno.EPERM),
    (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 0, 4096, SIMPLE, Errno.EPERM),
    (Cmd.WRITE, CmdFlag.REQ_ONE, 0, 512, SIMPLE, Errno.EINVAL),
    (Cmd.FLUSH, 0, 0, 0, SIMPLE, Errno.OK),
    (Cmd.FLUSH, 0, 512, 0, SIMPLE, Errno.EINVAL),
    (Cmd.CACHE, 0, 0, SIZE, SIMPLE, Errno.OK),
    (Cmd.CACHE, 0, 0, SIZE + 512, SIMPLE, Errno.EINVAL),
    (Cmd.BLOCK_STATUS, 0, 0, SIZE, SIMPLE, Errno.EINVAL),
    (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE, STRUCTURED, Errno.OK),
    (Cmd.BLOCK_STATUS, CmdFlag.FUA, 0, SIZE, STRUCTURED, Errno.EINVAL),
    (Cmd.RESIZE, 0, 0, 0, SIMPLE, Errno.EINVAL),
    (99, 0, 0, 512, SIMPLE, Errno.EINVAL),
]


@pytest.mark.parametrize(("cmd", "flags", "offset", "length", "negotiated", "errno"), RULES)
def test_request_rules(
    cmd: int, flags: int, offset: int, length: int, negotiated: Negotiated, errno: Errno
) -> None:
    error, message = check_request(Request(cmd, flags, 7, offset, length), LIMITS, negotiated)
    assert error is errno
    assert bool(message) == (errno is not Errno.OK)


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "negotiated", "errno"),
    [
        (Cmd.READ, 1, 513, SIMPLE, Errno.OK),
        (Cmd.READ, 0, 1, SIMPLE, Errno.OK),
        (Cmd.READ, SIZE - 1, 1, SIMPLE, Errno.OK),
        (Cmd.CACHE, 3, 5, SIMPLE, Errno.OK),
        (Cmd.BLOCK_STATUS, 4097, 100, STRUCTURED, Errno.OK),
        (Cmd.READ, SIZE - 1, 2, SIMPLE, Errno.EINVAL),  # past the end
        (Cmd.READ, 1, 4097, SIMPLE, Errno.EINVAL),  # over the maximum payload
        (Cmd.READ, 1, 0, SIMPLE, Errno.EINVAL),
    ],
)
def test_without_a_minimum_block_size_any_range_of_the_export_is_valid(
    cmd: int, offset: int, length: int, negotiated: Negotiated, errno: Errno
) -> None:
    """A client told no block sizes (doc/proto.md "Size constraints": the default minimum
    is 1); the maximum payload still holds."""
    limits = ExportLimits(size=SIZE, flags=RO, max_payload=4096)
    assert limits.min_block == 1
    error, _ = check_request(Request(cmd, 0, 7, offset, length), limits, negotiated)
    assert error is errno


def test_oversized_read_is_einval() -> None:
    limits = ExportLimits(size=1 << 30, flags=RO, min_block=512, max_payload=1 << 20)
    error, message = check_request(Request(Cmd.READ, 0, 1, 0, 2 << 20), limits, SIMPLE)
    assert error is Errno.EINVAL
    assert "maximum payload" in message


@pytest.mark.parametrize("bytewise", [False, True])
def test_simple_requests_and_replies_pair(bytewise: bool) -> None:
    client, server = ClientTransmission(Negotiated()), ServerTransmission(Negotiated(), LIMITS)
    c1, r1 = client.request(Cmd.READ, 0, 8)
    c2, r2 = client.request(Cmd.WRITE, 512, 4, payload=b"abcd")
    c3, r3 = client.request(Cmd.FLUSH)
    events = feed(server, r1 + r2 + r3 + client.disconnect(), bytewise=bytewise)
    assert events == [
        Request(Cmd.READ, 0, c1, 0, 8),
        Request(Cmd.WRITE, 0, c2, 512, 4),
        Request(Cmd.FLUSH, 0, c3, 0, 0),
        Disconnect(0),
    ]
    assert server.state is TransmissionState.CLOSED and server.pending_bytes() == 0
    replies = (
        server.error_reply(c2, Errno.EPERM)
        + server.ok_reply(c3)
        + server.read_reply_header(c1, 0, 8)
        + b"12345678"
    )
    assert client.in_flight == 3
    assert feed(client, replies, bytewise=bytewise) == [
        SimpleReply(c2, Errno.EPERM, b""),
        SimpleReply(c3, 0, b""),
        SimpleReply(c1, 0, b"12345678"),
    ]
    assert client.in_flight == 0


def test_structured_replies_pair() -> None:
    negotiated = Negotiated(structured_replies=True, meta_contexts={1: "base:allocation"})
    client, server = ClientTransmission(negotiated), ServerTransmission(negotiated, LIMITS)
    c1, r1 = client.request(Cmd.READ, 4096, 4)
    c2, r2 = client.request(Cmd.READ, 0, 512)
    c3, r3 = client.request(Cmd.BLOCK_STATUS, 0, 8192)
    c4, r4 = client.request(Cmd.READ, 0, 0)
    c5, r5 = client.request(Cmd.CACHE, 0, 512)
    assert len(feed(server, r1 + r2 + r3 + r4 + r5)) == server.outstanding == 5
    replies = (
        server.read_reply_header(c1, 4096, 4)
        + b"data"
        + server.error_reply(c2, Errno.EIO, "disk on fire")
        + server.block_status_reply(c3, [(1, [(4096, 0), (4096, StateFlag.HOLE | StateFlag.ZERO)])])
        + server.read_reply_header(c4, 0, 0)
        + server.ok_reply(c5)
    )
    assert feed(client, replies, bytewise=True) == [
        DataChunk(c1, 4096, b"data", done=True),
        ErrorChunk(c2, Errno.EIO, "disk on fire", None, done=True),
        BlockStatusChunk(c3, 1, ((4096, 0), (4096, 3)), done=True),
        NoneChunk(c4, done=True),
        NoneChunk(c5, done=True),
    ]
    assert client.in_flight == 0 == server.outstanding


def test_client_parses_error_offsets_and_unknown_error_types() -> None:
    client = ClientTransmission(Negotiated(structured_replies=True))
    c1, _ = client.request(Cmd.READ, 4096, 1024)
    c2, _ = client.request(Cmd.READ, 0, 512)
    c3, _ = client.request(Cmd.READ, 0, 512)
    offset_error = struct.pack(">IH", Errno.EIO, 3) + b"bad" + struct.pack(">Q", 5119)
    unknown_error = struct.pack(">IH", Errno.EIO, 1) + b"?"
    zero_error = struct.pack(">IH", 0, 0)  # the spec says nonzero; still no success
    data = (
        wire.chunk(c1, ReplyType.ERROR_OFFSET, len(offset_error), done=True)
        + offset_error
        + wire.chunk(c2, (1 << 15) + 77, len(unknown_error), done=True)
        + unknown_error
        + wire.chunk(c3, ReplyType.ERROR, len(zero_error), done=True)
        + zero_error
    )
    assert feed(client, data, bytewise=True) == [
        ErrorChunk(c1, Errno.EIO, "bad", 5119, done=True),
        ErrorChunk(c2, Errno.EIO, "", None, done=True),
        ErrorChunk(c3, Errno.EINVAL, "", None, done=True),
    ]


def test_client_parses_holes_and_multi_chunk_replies() -> None:
    negotiated = Negotiated(structured_replies=True)
    client = ClientTransmission(negotiated)
    cookie, _ = client.request(Cmd.READ, 0, 1024)
    data = (
        wire.chunk(cookie, ReplyType.OFFSET_HOLE, 12, done=False)
        + struct.pack(">QI", 0, 512)
        + wire.offset_data_header(cookie, 512, 512, done=False)
        + b"x" * 512
        + wire.done_chunk(cookie)
    )
    assert feed(client, data) == [
        HoleChunk(cookie, 0, 512, done=False),
        DataChunk(cookie, 512, b"x" * 512, done=False),
        NoneChunk(cookie, done=True),
    ]


@pytest.mark.parametrize(
    ("negotiated", "reply", "match"),
    [
        (Negotiated(), wire.simple_reply(999), "unknown cookie"),
        (Negotiated(), b"\xde\xad\xbe\xef" + bytes(12), "bad reply magic"),
        (Negotiated(), wire.done_chunk(1), "without negotiating"),
        (Negotiated(structured_replies=True), wire.simple_reply(1), "simple reply to READ"),
        (
            Negotiated(structured_replies=True),
            wire.offset_data_header(1, 4096, 4, done=True) + b"abcd",
            "outside the request",
        ),
        (
            Negotiated(structured_replies=True),
            wire.chunk(1, ReplyType.OFFSET_DATA, 1 << 30, done=True),
            "too long",
        ),
        (Negotiated(structured_replies=True), wire.chunk(1, 77, 0, done=True), "unknown chunk"),
        # Error chunks too short for what they say (a fuzzer found the first one crashing).
        *(
            (Negotiated(structured_replies=True), wire.chunk(1, type_, len(p), done=True) + p, m)
            for type_, p, m in [
                (ReplyType.ERROR, b"", "malformed"),
                (ReplyType.ERROR, struct.pack(">IH", 5, 3) + b"ab", "runs past"),
                (ReplyType.ERROR_OFFSET, struct.pack(">IH", 5, 0), "runs past"),
                (ReplyType.ERROR_OFFSET, struct.pack(">IHQ", 5, 0, 512), "outside the request"),
                ((1 << 15) + 77, b"\0\0", "malformed"),
            ]
        ),
    ],
)
def test_client_rejects_bad_replies(negotiated: Negotiated, reply: bytes, match: str) -> None:
    client = ClientTransmission(negotiated)
    client.request(Cmd.READ, 0, 512)
    client.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


def test_server_rejects_bad_magic_and_huge_writes() -> None:
    server = ServerTransmission(Negotiated(), LIMITS)
    server.receive_data(struct.pack(">IHHQQI", 0x12345678, 0, 0, 1, 0, 512))
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.next_event()
    assert server.state is TransmissionState.ERROR
    limits = ExportLimits(size=SIZE, flags=RO, min_block=512, max_payload=4096)
    server = ServerTransmission(Negotiated(), limits)
    server.receive_data(wire.request(Cmd.WRITE, 1, 0, 4096) + bytes(4096))
    assert server.next_event() == Request(Cmd.WRITE, 0, 1, 0, 4096)  # at the limit: fine
    server.receive_data(wire.request(Cmd.WRITE, 2, 0, 4096 + 512))
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        server.next_event()
    assert server.state is TransmissionState.ERROR


def test_server_ignores_bytes_after_disc_and_rejects_bad_reply_calls() -> None:
    server = ServerTransmission(Negotiated(), LIMITS)
    assert feed(server, wire.request(Cmd.DISC, 5, 0, 0) + wire.request(Cmd.READ, 1, 0, 512)) == [
        Disconnect(5)
    ]
    server.receive_data(b"more")
    assert server.pending_bytes() == wire.REQUEST.size  # what came with DISC, never parsed
    assert server.next_event() is NEED_DATA
    assert server.outstanding == 0  # DISC has no reply (doc/proto.md "NBD_CMD_DISC")
    server = _serving(Negotiated(), wire.request(Cmd.READ, 1, 0, 512))
    with pytest.raises(LocalProtocolError):
        server.error_reply(1, Errno.OK)
    server = _serving(Negotiated(), wire.request(Cmd.BLOCK_STATUS, 1, 0, 512))
    with pytest.raises(LocalProtocolError):
        server.block_status_reply(1, [(1, [(512, 0)])])


def _serving(negotiated: Negotiated, *requests: bytes) -> ServerTransmission:
    """A server machine that has parsed ``requests``, so they await replies."""
    server = ServerTransmission(negotiated, LIMITS)
    feed(server, b"".join(requests))
    return server


def test_error_messages_only_travel_in_structured_replies() -> None:
    simple = _serving(Negotiated(), wire.request(Cmd.READ, 3, 0, 512))
    assert simple.error_reply(3, Errno.EIO, "x") == wire.simple_reply(3, Errno.EIO)
    structured = _serving(Negotiated(structured_replies=True), wire.request(Cmd.READ, 3, 0, 512))
    assert b"boom" in structured.error_reply(3, Errno.EIO, "boom")


# -- the server machine: export limits, one reply per request, an explicit state ---------


@pytest.mark.parametrize(("cmd", "flags", "offset", "length", "negotiated", "errno"), RULES)
def test_check_applies_the_rules_to_its_export(
    cmd: int, flags: int, offset: int, length: int, negotiated: Negotiated, errno: Errno
) -> None:
    server = ServerTransmission(negotiated, LIMITS)
    assert server.export is LIMITS
    req = Request(cmd, flags, 7, offset, length)
    assert server.check(req) == check_request(req, LIMITS, negotiated)
    assert server.check(req)[0] is errno


def test_the_machine_keeps_its_own_copy_of_the_settings() -> None:
    negotiated = Negotiated(structured_replies=True, meta_contexts={1: "base:allocation"})
    server = ServerTransmission(negotiated, LIMITS)
    negotiated.structured_replies = False
    negotiated.meta_contexts.clear()
    assert server.negotiated == STRUCTURED
    assert server.check(Request(Cmd.BLOCK_STATUS, 0, 1, 0, 512))[0] is Errno.OK


@pytest.mark.parametrize("negotiated", [SIMPLE, STRUCTURED], ids=["simple", "structured"])
def test_read_header_size_leaves_room_for_the_header(negotiated: Negotiated) -> None:
    client = ClientTransmission(negotiated)
    cookie, request = client.request(Cmd.READ, 4096, 512)
    server = _serving(negotiated, request)
    size = server.read_header_size
    assert size == (28 if negotiated.structured_replies else 16)
    buf = bytearray(size) + b"d" * 512  # allocated first, as a backend fills it
    buf[:size] = server.read_reply_header(cookie, 4096, 512)
    (event,) = feed(client, bytes(buf))
    assert isinstance(event, SimpleReply | DataChunk) and event.data == b"d" * 512


REPLIES: list[tuple[str, Callable[[ServerTransmission, int], bytes]]] = [
    ("read", lambda s, c: s.read_reply_header(c, 0, 512)),
    ("empty read", lambda s, c: s.read_reply_header(c, 0, 0)),
    ("ok", lambda s, c: s.ok_reply(c)),
    ("error", lambda s, c: s.error_reply(c, Errno.EIO, "no")),
    ("block status", lambda s, c: s.block_status_reply(c, [(1, [(512, 0)])])),
]


@pytest.mark.parametrize("reply", [r for _, r in REPLIES], ids=[n for n, _ in REPLIES])
def test_each_request_gets_exactly_one_reply(
    reply: Callable[[ServerTransmission, int], bytes],
) -> None:
    server = _serving(STRUCTURED, wire.request(Cmd.READ, 1, 0, 512))
    assert server.outstanding == 1
    assert reply(server, 1)
    assert server.outstanding == 0
    with pytest.raises(LocalProtocolError, match=r"cookie 0x1 .*in state TRANSMISSION"):
        reply(server, 1)  # a second reply to the same request
    assert server.state is TransmissionState.ERROR
    server = _serving(STRUCTURED, wire.request(Cmd.READ, 1, 0, 512))
    with pytest.raises(LocalProtocolError, match="cookie 0x2 "):
        reply(server, 2)  # a cookie that never came
    assert server.state is TransmissionState.ERROR
    with pytest.raises(LocalProtocolError):
        reply(server, 1)  # and in ERROR nothing more goes out
    assert server.state is TransmissionState.ERROR


def test_a_cookie_reused_in_flight_is_counted_not_refused() -> None:
    """doc/proto.md "Transmission": a client only SHOULD keep cookies in flight distinct."""
    server = _serving(
        SIMPLE,
        wire.request(Cmd.READ, 5, 0, 512),
        wire.request(Cmd.WRITE, 5, 0, 4) + b"abcd",  # outstanding once its payload is skipped
        wire.request(Cmd.WRITE, 5, 0, 0),
        wire.request(Cmd.FLUSH, 6, 0, 0),
    )
    assert server.outstanding == 4
    server.read_reply_header(5, 0, 512)
    server.error_reply(5, Errno.EPERM)
    server.ok_reply(6)
    server.error_reply(5, Errno.EPERM)
    assert server.outstanding == 0 and server.state is TransmissionState.TRANSMISSION
    with pytest.raises(LocalProtocolError):
        server.ok_reply(5)


def test_a_write_is_outstanding_only_once_its_payload_is_in() -> None:
    server = ServerTransmission(SIMPLE, LIMITS)
    server.receive_data(wire.request(Cmd.WRITE, 3, 0, 8) + b"abcd")
    assert server.next_event() is NEED_DATA and server.outstanding == 0
    with pytest.raises(LocalProtocolError):
        server.error_reply(3, Errno.EPERM)
    server = ServerTransmission(SIMPLE, LIMITS)
    server.receive_data(wire.request(Cmd.WRITE, 3, 0, 8) + b"abcd")
    assert server.next_event() is NEED_DATA
    server.receive_data(b"efgh")
    assert server.next_event() == Request(Cmd.WRITE, 0, 3, 0, 8)
    assert server.outstanding == 1
    assert server.error_reply(3, Errno.EPERM) == wire.simple_reply(3, Errno.EPERM)


def test_requests_in_flight_at_disc_are_still_answered() -> None:
    """doc/proto.md "NBD_CMD_DISC": the server MUST handle all outstanding requests first."""
    server = ServerTransmission(STRUCTURED, LIMITS)
    events = feed(
        server,
        wire.request(Cmd.READ, 1, 0, 512)
        + wire.request(Cmd.BLOCK_STATUS, 2, 0, 512)
        + wire.request(Cmd.DISC, 3, 0, 0)
        + wire.request(Cmd.READ, 4, 0, 512),  # the client MUST NOT send this: never parsed
    )
    assert [type(e) for e in events] == [Request, Request, Disconnect]
    assert (server.state, server.outstanding) == (TransmissionState.CLOSED, 2)
    server.block_status_reply(2, [(1, [(512, 0)])])
    server.read_reply_header(1, 0, 512)
    assert (server.outstanding, server.state) == (0, TransmissionState.CLOSED)
    with pytest.raises(LocalProtocolError, match="in state CLOSED"):
        server.ok_reply(4)
    assert server.state is TransmissionState.ERROR


def test_bad_input_ends_in_error_and_stays_there() -> None:
    server = _serving(SIMPLE, wire.request(Cmd.READ, 1, 0, 512))
    server.receive_data(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    assert server.state is TransmissionState.ERROR
    server.receive_data(wire.request(Cmd.READ, 2, 0, 512))
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        server.next_event()
    with pytest.raises(LocalProtocolError):
        server.read_reply_header(1, 0, 512)  # the connection is to be dropped, not answered
    assert server.state is TransmissionState.ERROR


@pytest.mark.parametrize(
    ("per_context", "match"),
    [
        ([], "not the negotiated ones"),
        ([(2, [(512, 0)])], "not the negotiated ones"),
        ([(1, [(512, 0)]), (1, [(512, 0)])], "not the negotiated ones"),
        ([(1, [])], "at least one extent"),
    ],
)
def test_block_status_reply_has_one_chunk_per_context(
    per_context: list[tuple[int, list[tuple[int, int]]]], match: str
) -> None:
    """doc/proto.md "NBD_REPLY_TYPE_BLOCK_STATUS": exactly one chunk per negotiated context."""
    server = _serving(STRUCTURED, wire.request(Cmd.BLOCK_STATUS, 1, 0, 512))
    with pytest.raises(LocalProtocolError, match=match):
        server.block_status_reply(1, per_context)
    assert server.state is TransmissionState.ERROR
