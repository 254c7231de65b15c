"""Property-based tests of the protocol machines (hypothesis).

Any byte stream into a machine yields well-framed replies or a ProtocolError, never another
exception; every message survives encode and decode between our client and server machines.
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from erofs_nbdd.protocol import (
    NEED_DATA,
    BlockSizeInfo,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    CmdFlag,
    DataChunk,
    DescriptionInfo,
    Errno,
    ErrorChunk,
    ExportInfo,
    ExportLimits,
    Info,
    InfoOption,
    MetaContext,
    MetaContextOption,
    NameInfo,
    Negotiated,
    Opt,
    OptionAck,
    OptionError,
    ProtocolError,
    Rep,
    ReplyType,
    Request,
    ServerEntry,
    ServerHandshake,
    ServerTransmission,
    SimpleReply,
    State,
    wire,
)
from erofs_nbdd.protocol.constants import (
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyFlag,
)

from .drive import (
    IHAVEOPT,
    REQUEST_MAGIC,
    Closed,
    chunked,
    drive_client_handshake,
    drive_client_transmission,
    drive_server_handshake,
    drive_server_session,
    drive_server_transmission,
    good_client_stream,
    good_server_replies,
    good_server_stream,
)
from .wirehelp import feed

SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
sizes = st.lists(st.integers(1, 64), min_size=1, max_size=20)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.text(st.characters(codec="utf-8"), max_size=40)


def _framed(draw: st.DrawFn, payloads: st.SearchStrategy[bytes]) -> tuple[int, bytes]:
    """A payload and its length field: mostly right, sometimes anything."""
    payload = draw(payloads)
    return (draw(u32) if draw(st.integers(0, 9)) == 0 else len(payload)), payload


@st.composite
def option_bytes(draw: st.DrawFn) -> bytes:
    """One option: mostly well framed, with payloads that are right, wrong or random."""
    opt = draw(st.sampled_from([*Opt, *Opt, 0, 99, 2**32 - 1]))
    name = draw(st.sampled_from([b"demo", b"", b"team/app-v2", b"../x", b"a\0b", b"\xff"]))
    length, payload = _framed(
        draw,
        st.one_of(
            st.binary(max_size=8),
            st.binary(max_size=64),
            st.just(struct.pack(">I", len(name)) + name + struct.pack(">H", 0)),
            st.just(struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.NAME)),
            st.just(
                struct.pack(">I", len(name))
                + name
                + struct.pack(">I", 1)
                + struct.pack(">I", 15)
                + b"base:allocation"
            ),
            st.just(name),
        ),
    )
    return struct.pack(">QII", IHAVEOPT, int(opt), length) + payload


@st.composite
def client_stream(draw: st.DrawFn) -> bytes:
    flags = draw(st.one_of(st.sampled_from([1, 3]), u32))
    options = draw(st.lists(option_bytes(), max_size=8))
    tail = draw(st.binary(max_size=64))
    return struct.pack(">I", flags) + b"".join(options) + tail


@SETTINGS
@given(st.one_of(client_stream(), st.binary(max_size=300)), sizes)
@example(good_client_stream(), [1])
@example(good_client_stream(), [1000])
def test_server_handshake_takes_any_bytes(data: bytes, cuts: list[int]) -> None:
    try:
        hs, trailing = drive_server_handshake(chunked(data, cuts))
    except (ProtocolError, Closed):
        return
    assert hs.state in (State.OPTIONS, State.AWAIT_CLIENT_FLAGS, State.TRANSMISSION, State.CLOSED)
    if hs.state is State.TRANSMISSION:
        assert data.endswith(trailing)


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    magic = draw(st.one_of(st.just(REQUEST_MAGIC), u32))
    cmd = draw(st.sampled_from([*Cmd, 99, 0xFFFF]))
    flags = draw(st.one_of(st.sampled_from([0, *CmdFlag]), st.integers(0, 0xFFFF)))
    offset = draw(
        st.one_of(
            st.integers(0, 1 << 21).map(lambda v: v // 512 * 512), st.integers(0, 1 << 21), u64
        )
    )
    length = draw(st.one_of(st.sampled_from([0, 1, 513, 512, 4096, 1 << 20, (1 << 20) + 512]), u32))
    out = struct.pack(">IHHQQI", magic, flags, int(cmd), 7, offset, length)
    if cmd == Cmd.WRITE and length <= 4096:
        out += bytes(length)
    return out


@SETTINGS
@given(
    st.lists(request_bytes(), max_size=10).map(b"".join),
    st.binary(max_size=30),
    sizes,
    st.booleans(),
    st.sampled_from([None, (512, 4096, 1 << 20)]),
)
def test_server_transmission_takes_any_bytes(
    data: bytes,
    tail: bytes,
    cuts: list[int],
    structured: bool,
    block_size: tuple[int, int, int] | None,
) -> None:
    negotiated = Negotiated(
        structured_replies=structured, meta_contexts={1: "base:allocation"}, block_size=block_size
    )
    with contextlib.suppress(ProtocolError):
        drive_server_transmission(chunked(data + tail, cuts), negotiated)


@SETTINGS
@given(client_stream(), st.lists(request_bytes(), max_size=6).map(b"".join), sizes)
def test_server_session_takes_any_bytes(data: bytes, requests: bytes, cuts: list[int]) -> None:
    """Handshake, hand-over and transmission in one stream: every request parsed after GO
    is answered exactly once (``serve`` checks), or the input is refused."""
    with contextlib.suppress(ProtocolError, Closed):
        drive_server_session(chunked(data + requests, cuts))


@pytest.mark.parametrize("cuts", [[1], [7, 3], [10000]])
def test_good_client_stream_is_served_after_the_hand_over(cuts: list[int]) -> None:
    hs, served = drive_server_session(chunked(good_client_stream(), cuts))
    assert hs.state is State.TRANSMISSION
    assert served == [Request(Cmd.READ, 0, 1, 0, 4096)]


@st.composite
def option_reply_bytes(draw: st.DrawFn) -> bytes:
    """One option reply to what drive_client_handshake asks: fields right, wrong or random,
    with payloads shaped like INFO and SERVER replies or cut short."""
    opt = draw(st.sampled_from([Opt.INFO, Opt.LIST, Opt.GO, Opt.GO, 99]))
    rep = draw(st.sampled_from([*Rep, Rep.INFO, Rep.INFO, 2**31 + 5, 77]))
    info = draw(st.sampled_from([*Info, 99]))
    length, payload = _framed(
        draw,
        st.one_of(
            st.binary(max_size=16),
            st.builds(wire.info_export, u64, st.integers(0, 0xFFFF)),
            st.builds(wire.info_block_size, u32, u32, u32),
            st.binary(max_size=14).map(lambda b: struct.pack(">H", int(info)) + b),
            st.builds(wire.rep_server, st.binary(max_size=8), st.binary(max_size=8)),
        ),
    )
    magic = draw(st.sampled_from([OPTION_REPLY_MAGIC] * 9 + [1]))
    return wire.OPTION_REPLY_HEADER.pack(magic, int(opt), int(rep), length) + payload


@st.composite
def reply_bytes(draw: st.DrawFn) -> bytes:
    """One reply to what drive_client_transmission asks: simple or any chunk type, for
    cookies in flight or not, with payloads of sensible shape or cut short."""
    cookie = draw(st.integers(0, 7))
    if draw(st.booleans()):
        error = draw(st.sampled_from([0, 0, Errno.EIO, 2**32 - 1]))
        data = draw(st.sampled_from([b"", bytes(512), bytes(1024)]))
        return wire.simple_reply(cookie, error) + data
    type_ = draw(st.sampled_from([*ReplyType, 2**15 + 9, 2**16 - 1, 77]))
    offset = draw(st.one_of(st.integers(0, 4096), u64))
    length, payload = _framed(
        draw,
        st.one_of(
            st.binary(max_size=20),
            st.binary(max_size=64).map(lambda b: struct.pack(">Q", offset) + b),
            st.tuples(u32, st.binary(max_size=8)).map(
                lambda e: struct.pack(">IH", e[0], len(e[1])) + e[1] + struct.pack(">Q", offset)
            ),
            st.lists(st.tuples(u32, u32), max_size=4).map(
                lambda ex: struct.pack(">I", 1) + b"".join(struct.pack(">II", *x) for x in ex)
            ),
        ),
    )
    flags = draw(st.sampled_from([0, ReplyFlag.DONE, 0xFFFF]))
    magic = draw(st.sampled_from([STRUCTURED_REPLY_MAGIC] * 9 + [SIMPLE_REPLY_MAGIC]))
    return wire.CHUNK_HEADER.pack(magic, flags, int(type_), cookie, length) + payload


@SETTINGS
@given(
    st.one_of(st.lists(option_reply_bytes(), max_size=8).map(b"".join), st.binary(max_size=400)),
    sizes,
)
@example(good_server_stream()[18:], [1])
def test_client_handshake_takes_any_bytes(data: bytes, cuts: list[int]) -> None:
    greeting = struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT, 3)
    with contextlib.suppress(ProtocolError):
        drive_client_handshake(chunked(greeting + data, cuts))


@SETTINGS
@given(
    st.one_of(st.lists(reply_bytes(), max_size=8).map(b"".join), st.binary(max_size=400)),
    sizes,
    st.booleans(),
)
@example(good_server_replies(structured=True), [3], True)
@example(good_server_replies(structured=False), [3], False)
def test_client_transmission_takes_any_bytes(
    data: bytes, cuts: list[int], structured: bool
) -> None:
    with contextlib.suppress(ProtocolError):
        drive_client_transmission(chunked(data, cuts), structured)


@pytest.mark.parametrize("cuts", [[1], [7, 3], [10000]])
def test_good_server_streams_go_all_the_way(cuts: list[int]) -> None:
    """The fuzz seeds for the client machines reach what they claim: GO accepted, and every
    request answered in each reply shape."""
    events = drive_client_handshake(chunked(good_server_stream(), cuts))
    assert [e.option for e in events if isinstance(e, OptionAck)] == [Opt.INFO, Opt.LIST, Opt.GO]
    for structured, requests in ((False, 4), (True, 5)):
        stream = chunked(good_server_replies(structured), cuts)
        replies = drive_client_transmission(stream, structured)
        finished = [e.cookie for e in replies if getattr(e, "done", True)]
        assert finished == list(range(1, requests + 1))
        assert any(isinstance(e, ErrorChunk) and e.offset == 1600 for e in replies) == structured


# -- round trips: what one machine encodes, the other decodes to the same thing ---------


def _handshake_pair() -> tuple[ClientHandshake, ServerHandshake]:
    client, server = ClientHandshake(), ServerHandshake()
    feed(client, server.greeting())
    feed(server, client.send_client_flags())
    return client, server


@SETTINGS
@given(
    names,
    st.lists(st.sampled_from([*Info, 77]), max_size=5).map(tuple),
    st.booleans(),
    st.integers(0, 2**63),
    st.integers(0, 0xFFFF),
    names,
)
def test_info_and_go_round_trip(
    name: str, infos: tuple[int, ...], go: bool, size: int, flags: int, description: str
) -> None:
    client, server = _handshake_pair()
    request = client.opt_go(name, infos) if go else client.opt_info(name, infos)
    assert feed(server, request) == [InfoOption(name, infos, go=go)]
    reply = (
        server.send_info_export(size, flags)
        + server.send_info_name(name)
        + server.send_info_description(description)
        + server.send_info_block_size(512, 4096, 1 << 25)
        + server.send_ack()
    )
    opt = Opt.GO if go else Opt.INFO
    assert feed(client, reply) == [
        ExportInfo(size, flags),
        NameInfo(name),
        DescriptionInfo(description),
        BlockSizeInfo(512, 4096, 1 << 25),
        OptionAck(opt),
    ]
    assert client.state is server.state
    # binding only as the reply to a GO that asked (doc/proto.md "NBD_INFO_BLOCK_SIZE")
    agreed = (512, 4096, 1 << 25) if go and Info.BLOCK_SIZE in infos else None
    assert client.negotiated.block_size == agreed == server.negotiated.block_size


@SETTINGS
@given(
    st.lists(st.tuples(names, names), max_size=5),
    st.sampled_from([r for r in Rep if r.is_error]),
    names,
)
def test_list_and_errors_round_trip(exports: list[tuple[str, str]], rep: Rep, message: str) -> None:
    client, server = _handshake_pair()
    feed(server, client.opt_list())
    reply = b"".join(server.send_server(n, d) for n, d in exports) + server.send_ack()
    assert feed(client, reply) == [*(ServerEntry(n, d) for n, d in exports), OptionAck(Opt.LIST)]
    feed(server, client.opt_info("x"))
    assert feed(client, server.send_error(rep, message)) == [OptionError(Opt.INFO, rep, message)]


@SETTINGS
@given(names, st.lists(names, max_size=4).map(tuple), st.booleans(), u32)
def test_meta_context_round_trip(
    name: str, queries: tuple[str, ...], set_: bool, context_id: int
) -> None:
    client, server = _handshake_pair()
    feed(server, client.opt_structured_reply())
    feed(client, server.send_ack())
    request = (
        client.opt_set_meta_context(name, queries)
        if set_
        else client.opt_list_meta_context(name, queries)
    )
    assert feed(server, request) == [MetaContextOption(name, queries, set=set_)]
    reply = server.send_meta_context(context_id, "base:allocation", name) + server.send_ack()
    events = feed(client, reply)
    assert events[0] == MetaContext(context_id, "base:allocation")
    if set_:
        assert client.negotiated.meta_contexts == server.negotiated.meta_contexts


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from([Cmd.READ, Cmd.CACHE, Cmd.FLUSH, Cmd.BLOCK_STATUS, Cmd.TRIM]),
            u64,
            st.integers(0, 1 << 16),
            st.sampled_from([0, *CmdFlag]),
        ),
        max_size=12,
    ),
    st.booleans(),
    sizes,
)
def test_requests_and_replies_round_trip(
    requests: list[tuple[Cmd, int, int, int]], structured: bool, cuts: list[int]
) -> None:
    negotiated = Negotiated(structured_replies=structured, meta_contexts={1: "base:allocation"})
    client = ClientTransmission(negotiated)
    server = ServerTransmission(negotiated, ExportLimits(size=2**64 - 1, flags=0))
    sent = {}
    wire_bytes = b""
    for cmd, offset, length, flags in requests:
        cookie, data = client.request(cmd, offset, length, flags)
        sent[cookie] = Request(int(cmd), flags, cookie, offset, length)
        wire_bytes += data
    got: list[object] = []
    for piece in chunked(wire_bytes, cuts):
        got += feed(server, piece)
    assert got == list(sent.values())
    # The server answers each: a READ with its bytes, an error, or a plain OK.
    replies = b""
    expect: dict[int, bytes | int] = {}
    for req in sent.values():
        if req.cmd == Cmd.READ and req.length and req.length % 3:
            data = bytes([req.cookie % 251]) * req.length
            replies += server.read_reply_header(req.cookie, req.offset, len(data)) + data
            expect[req.cookie] = data
        elif req.cmd == Cmd.BLOCK_STATUS and structured:
            replies += server.error_reply(req.cookie, Errno.EINVAL, "no")
            expect[req.cookie] = Errno.EINVAL
        elif req.cmd == Cmd.READ:
            replies += server.error_reply(req.cookie, Errno.EIO, "bad block")
            expect[req.cookie] = Errno.EIO
        else:
            replies += server.ok_reply(req.cookie)
            expect[req.cookie] = b""
    seen: dict[int, bytes | int] = {}
    for event in feed(client, replies):
        if isinstance(event, SimpleReply):
            seen[event.cookie] = event.error or event.data
        elif isinstance(event, DataChunk):
            seen[event.cookie] = event.data
        elif isinstance(event, ErrorChunk):
            seen[event.cookie] = event.error
        else:
            seen.setdefault(getattr(event, "cookie", -1), b"")
    assert seen == expect
    assert client.in_flight == 0 and server.outstanding == 0
    assert client.next_event() is NEED_DATA
