"""Both handshake machines, paired over a fake wire and fed bad input."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from erofs_nbdd.protocol import (
    NEED_DATA,
    AbortOption,
    BlockSizeInfo,
    ClientFlag,
    ClientFlags,
    ClientHandshake,
    Cmd,
    DescriptionInfo,
    Disconnect,
    Errno,
    ExportInfo,
    ExportLimits,
    ExportNameOption,
    ExportNameReply,
    Info,
    InfoOption,
    InvalidOption,
    ListOption,
    LocalProtocolError,
    MetaContext,
    MetaContextOption,
    NameInfo,
    Negotiated,
    Opt,
    OptionAck,
    OptionError,
    RemoteProtocolError,
    Rep,
    Request,
    ServerEntry,
    ServerGreeting,
    ServerHandshake,
    StartTLSOption,
    State,
    StructuredReplyOption,
    TransmissionState,
    UnknownInfo,
    UnsupportedOption,
    wire,
)
from erofs_nbdd.protocol.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC
from erofs_nbdd.protocol.handshake import TRANSITIONS, HandshakeMachine, Step

from .wirehelp import feed

SIZE, FLAGS = 1 << 20, 0b11


def started(*, bytewise: bool = False) -> tuple[ServerHandshake, ClientHandshake]:
    server, client = ServerHandshake(), ClientHandshake()
    assert feed(client, server.greeting(), bytewise=bytewise) == [ServerGreeting(0b11)]
    events = feed(server, client.send_client_flags(), bytewise=bytewise)
    assert events == [ClientFlags(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)]
    assert server.state is State.OPTIONS and client.state is State.OPTIONS
    return server, client


def server_with_flags(flags: int = 3) -> ServerHandshake:
    server = ServerHandshake()
    server.greeting()
    assert feed(server, struct.pack(">I", flags)) == [ClientFlags(flags)]
    return server


@pytest.mark.parametrize("bytewise", [False, True])
def test_go_pairs_with_the_client(bytewise: bool) -> None:
    server, client = started(bytewise=bytewise)
    events = feed(
        server, client.opt_go("img", (Info.NAME, Info.DESCRIPTION, 77)), bytewise=bytewise
    )
    assert events == [InfoOption("img", (Info.NAME, Info.DESCRIPTION, 77), go=True)]
    reply = (
        server.send_info_export(SIZE, FLAGS)
        + server.send_info_name("img")
        + server.send_info_description("a test image")
        + server.send_info_block_size(512, 4096, 1 << 25)
        + server.send_ack()
    )
    assert server.state is State.TRANSMISSION
    assert feed(client, reply + b"TRAILING", bytewise=bytewise) == [
        ExportInfo(SIZE, FLAGS),
        NameInfo("img"),
        DescriptionInfo("a test image"),
        BlockSizeInfo(512, 4096, 1 << 25),
        OptionAck(Opt.GO),
    ]
    assert client.state is State.TRANSMISSION
    assert client.trailing_data == b"TRAILING"


def test_requests_after_go_are_left_for_transmission() -> None:
    server, client = started()
    data = client.opt_go("") + wire.request(0, 1, 0, 512)
    assert feed(server, data) == [InfoOption("", (), go=True)]
    server.send_info_export(SIZE, FLAGS)
    server.send_ack()
    assert server.next_event() is NEED_DATA
    assert server.trailing_data == wire.request(0, 1, 0, 512)


def test_list_info_and_errors_keep_the_session_usable() -> None:
    server, client = started()
    assert feed(server, client.opt_list()) == [ListOption()]
    reply = server.send_server("a", "first") + server.send_server("b/c") + server.send_ack()
    assert feed(client, reply) == [
        ServerEntry("a", "first"),
        ServerEntry("b/c", ""),
        OptionAck(Opt.LIST),
    ]
    assert feed(server, client.opt_info("nope")) == [InfoOption("nope", (), go=False)]
    reply = server.send_error(Rep.ERR_UNKNOWN, "no export named 'nope'")
    assert feed(client, reply) == [OptionError(Opt.INFO, Rep.ERR_UNKNOWN, "no export named 'nope'")]
    assert server.state is State.OPTIONS and client.state is State.OPTIONS
    assert feed(server, client.opt_info("a")) == [InfoOption("a", (), go=False)]
    assert feed(client, server.send_info_export(SIZE, FLAGS) + server.send_ack()) == [
        ExportInfo(SIZE, FLAGS),
        OptionAck(Opt.INFO),
    ]
    assert server.state is State.OPTIONS


def test_export_name_with_and_without_zeroes() -> None:
    server, client = started()
    assert feed(server, client.opt_export_name("x")) == [ExportNameOption("x")]
    reply = server.send_export_name_reply(SIZE, FLAGS)
    assert len(reply) == 10
    assert feed(client, reply) == [ExportNameReply(SIZE, FLAGS)]
    assert client.state is State.TRANSMISSION is server.state

    server = server_with_flags(ClientFlag.C_FIXED_NEWSTYLE)
    feed(server, wire.option(Opt.EXPORT_NAME, b"x"))
    assert len(server.send_export_name_reply(SIZE, FLAGS)) == 134
    client = ClientHandshake(no_zeroes=False)
    feed(client, ServerHandshake().greeting())
    client.send_client_flags()
    client.opt_export_name("x")
    assert feed(client, wire.export_name_reply(SIZE, FLAGS, no_zeroes=False), bytewise=True) == [
        ExportNameReply(SIZE, FLAGS)
    ]


def test_structured_replies_and_meta_contexts() -> None:
    server, client = started()
    feed(server, client.opt_structured_reply())
    assert feed(client, server.send_ack()) == [OptionAck(Opt.STRUCTURED_REPLY)]
    assert server.negotiated.structured_replies and client.negotiated.structured_replies
    events = feed(server, client.opt_set_meta_context("img", ("base:allocation", "x:y")))
    assert events == [MetaContextOption("img", ("base:allocation", "x:y"), set=True)]
    reply = server.send_meta_context(1, "base:allocation", "img") + server.send_ack()
    assert feed(client, reply) == [
        MetaContext(1, "base:allocation"),
        OptionAck(Opt.SET_META_CONTEXT),
    ]
    assert server.negotiated.meta_contexts == {1: "base:allocation"}
    assert server.negotiated.meta_export == "img"
    assert client.negotiated.meta_contexts == {1: "base:allocation"}
    # LIST does not change the selection
    feed(server, client.opt_list_meta_context("img"))
    feed(client, server.send_meta_context(0, "base:allocation", "img") + server.send_ack())
    assert server.negotiated.meta_contexts == {1: "base:allocation"}


def test_meta_context_before_structured_replies_is_invalid() -> None:
    server, client = started()
    (event,) = feed(server, client.opt_set_meta_context("img", ("base:allocation",)))
    assert isinstance(event, InvalidOption)
    assert "STRUCTURED_REPLY" in event.message
    with pytest.raises(LocalProtocolError):
        server.send_ack()


def test_unknown_option_gets_unsup_and_the_next_option_parses() -> None:
    server, client = started()
    events = feed(server, client.opt_raw(Opt.EXTENDED_HEADERS) + b"")
    assert events == [UnsupportedOption(Opt.EXTENDED_HEADERS)]
    reply = server.send_error(Rep.ERR_UNSUP)
    assert feed(client, reply) == [OptionError(Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP, "")]
    events = feed(server, wire.option(999, b"payload" * 10) + wire.option(Opt.LIST))
    assert events == [UnsupportedOption(999)]
    server.send_error(Rep.ERR_UNSUP)
    assert server.next_event() == ListOption()


def test_abort_and_starttls() -> None:
    server, client = started()
    feed(server, client.opt_abort())
    assert feed(client, server.send_ack()) == [OptionAck(Opt.ABORT)]
    assert server.state is State.CLOSED is client.state

    server, client = started()
    feed(server, client.opt_structured_reply())
    feed(client, server.send_ack())
    assert feed(server, client.opt_starttls()) == [StartTLSOption()]
    feed(client, server.send_ack())
    assert server.state is State.TLS_HANDOVER is client.state
    server.start_tls()
    client.start_tls()
    assert server.negotiated.tls and not server.negotiated.structured_replies
    assert client.negotiated.tls and not client.negotiated.structured_replies
    (event,) = feed(server, client.opt_starttls())
    assert isinstance(event, InvalidOption)


def test_plaintext_after_starttls_is_an_injection() -> None:
    server = server_with_flags()
    feed(server, wire.option(Opt.STARTTLS) + wire.option(Opt.LIST))
    server.send_ack()
    with pytest.raises(RemoteProtocolError, match="plaintext"):
        server.start_tls()
    assert server.state is State.ERROR


@pytest.mark.parametrize(
    ("flags", "match"),
    [(0, "fixed newstyle"), (1 | 8, "unknown flags"), (1 << 31, "unknown flags")],
)
def test_bad_client_flags_drop_the_connection(flags: int, match: str) -> None:
    server = ServerHandshake()
    server.receive_data(struct.pack(">I", flags))
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()
    assert server.state is State.ERROR


BAD_INFO = [
    (struct.pack(">I", 100) + b"abc", "runs past"),
    (struct.pack(">I", 3) + b"abc", "count is missing"),
    (struct.pack(">I", 3) + b"abc" + struct.pack(">H", 2) + b"\0\1", "do not match"),
    (struct.pack(">I", 3) + b"abc" + struct.pack(">H", 0) + b"x", "do not match"),
    (struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0), "UTF-8"),
    (struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">H", 0), "limit is 4096"),
    (b"\0\0", "runs past"),
]


@pytest.mark.parametrize(("payload", "match"), BAD_INFO)
@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_malformed_info_requests_get_invalid(opt: Opt, payload: bytes, match: str) -> None:
    server = server_with_flags()
    (event,) = feed(server, wire.option(opt, payload))
    assert isinstance(event, InvalidOption)
    assert event.option == opt and match in event.message
    assert server.send_error(event.rep, event.message)[:4]
    assert server.state is State.OPTIONS


BAD_META = [
    (struct.pack(">I", 3) + b"img", "query count"),
    (struct.pack(">I", 3) + b"img" + struct.pack(">I", 1), "past the end"),
    (struct.pack(">I", 3) + b"img" + struct.pack(">II", 1, 50) + b"base:", "past the end"),
    (struct.pack(">I", 3) + b"img" + struct.pack(">I", 0) + b"junk", "trailing"),
]


@pytest.mark.parametrize(("payload", "match"), BAD_META)
def test_malformed_meta_context_requests_get_invalid(payload: bytes, match: str) -> None:
    server = server_with_flags()
    feed(server, wire.option(Opt.STRUCTURED_REPLY))
    server.send_ack()
    (event,) = feed(server, wire.option(Opt.LIST_META_CONTEXT, payload))
    assert isinstance(event, InvalidOption)
    assert match in event.message


@pytest.mark.parametrize("opt", [Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY])
def test_options_without_data_reject_data(opt: Opt) -> None:
    server = server_with_flags()
    (event,) = feed(server, wire.option(opt, b"x"))
    assert isinstance(event, InvalidOption)


def test_abort_ignores_its_data() -> None:
    server = server_with_flags()
    assert feed(server, wire.option(Opt.ABORT, b"whatever")) == [AbortOption()]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack(">QII", 0x1234, Opt.LIST, 0), "bad option magic"),
        (wire.OPTION_HEADER.pack(IHAVEOPT, Opt.GO, 1 << 30), "limit"),
        (wire.option(Opt.EXPORT_NAME, b"\xff"), "UTF-8"),
        (wire.option(Opt.EXPORT_NAME, b"n" * 5000), "4096"),
    ],
)
def test_fatal_option_errors(data: bytes, match: str) -> None:
    server = server_with_flags()
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        server.next_event()
    assert server.state is State.ERROR


def test_replies_out_of_order_are_our_bug() -> None:
    server = server_with_flags()
    with pytest.raises(LocalProtocolError):
        server.send_ack()
    server = server_with_flags()
    feed(server, wire.option(Opt.GO, wire.info_request(b"x", ())))
    with pytest.raises(LocalProtocolError, match="INFO_EXPORT"):
        server.send_ack()
    server = server_with_flags()
    feed(server, wire.option(Opt.LIST))
    with pytest.raises(LocalProtocolError):
        server.send_info_export(1, 1)
    server = server_with_flags()
    feed(server, wire.option(Opt.EXPORT_NAME, b"x"))
    with pytest.raises(LocalProtocolError, match="cannot be refused"):
        server.send_error(Rep.ERR_UNKNOWN)
    server = server_with_flags()
    feed(server, wire.option(Opt.LIST))
    with pytest.raises(LocalProtocolError, match="not an error"):
        server.send_error(Rep.ACK)
    client = ClientHandshake()
    with pytest.raises(LocalProtocolError):
        client.opt_list()


def _client_waiting_for(opt: Opt) -> ClientHandshake:
    client = ClientHandshake()
    feed(client, ServerHandshake().greeting())
    client.send_client_flags()
    client.opt_raw(opt, wire.info_request(b"x", ()) if opt in (Opt.GO, Opt.INFO) else b"")
    return client


@pytest.mark.parametrize(
    ("opt", "reply", "match"),
    [
        (Opt.LIST, struct.pack(">QIII", 0xBAD, Opt.LIST, Rep.ACK, 0), "magic"),
        (Opt.LIST, wire.option_reply(Opt.GO, Rep.ACK), "while option"),
        (Opt.GO, wire.option_reply(Opt.GO, Rep.ACK), "without NBD_INFO_EXPORT"),
        (Opt.GO, wire.option_reply(Opt.GO, Rep.SERVER, wire.rep_server(b"a", b"")), "does not"),
        (Opt.LIST, wire.option_reply(Opt.LIST, Rep.INFO, wire.info_export(1, 1)), "does not"),
        (Opt.GO, wire.option_reply(Opt.GO, Rep.INFO, wire.info_export(1, 1) + b"x"), "not 12"),
        (Opt.GO, wire.option_reply(Opt.GO, Rep.INFO, b"\0\3\0"), "not 14"),
        (Opt.GO, wire.option_reply(Opt.GO, Rep.INFO, b"\0"), "malformed reply"),
        (Opt.GO, wire.option_reply(Opt.GO, Rep.INFO), "malformed reply"),
        (Opt.LIST, wire.option_reply(Opt.LIST, Rep.SERVER, b"\0\0\0\x09ab"), "past the end"),
        (Opt.LIST, wire.option_reply(Opt.LIST, 77), "does not"),
        (Opt.LIST, wire.option_reply(Opt.LIST, Rep.ACK, b"x"), "carries data"),
        (Opt.LIST, wire.OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, 3, 2, 1 << 30), "long"),
    ],
)
def test_client_rejects_bad_replies(opt: Opt, reply: bytes, match: str) -> None:
    client = _client_waiting_for(opt)
    client.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()
    assert client.state is State.ERROR


def test_client_accepts_unknown_info_types_and_error_numbers() -> None:
    client = _client_waiting_for(Opt.INFO)
    events = feed(
        client,
        wire.option_reply(Opt.INFO, Rep.INFO, b"\0\x63data")
        + wire.option_reply(Opt.INFO, (1 << 31) + 99, b"odd"),
    )
    assert events == [UnknownInfo(99, b"data"), OptionError(Opt.INFO, (1 << 31) + 99, "odd")]
    assert isinstance(events[1], OptionError)
    assert events[1].rep_name == "ERR_99"


@pytest.mark.parametrize(
    ("greeting", "match"),
    [
        (struct.pack(">QQH", 1, IHAVEOPT, 3), "not an NBD server"),
        (struct.pack(">QQH", NBDMAGIC, 0x00420281861253, 3), "oldstyle"),
        (struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0), "fixed newstyle"),
    ],
)
def test_client_rejects_bad_greetings(greeting: bytes, match: str) -> None:
    client = ClientHandshake()
    client.receive_data(greeting)
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


def test_client_without_no_zeroes_server() -> None:
    client = ClientHandshake()
    feed(client, wire.greeting(1))
    assert client.send_client_flags() == struct.pack(">I", 1)
    assert not client.negotiated.no_zeroes
    with pytest.raises(LocalProtocolError):
        client.send_client_flags()


def test_description_is_capped_at_the_spec_limit() -> None:
    server = server_with_flags()
    feed(server, wire.option(Opt.INFO, wire.info_request(b"x", ())))
    reply = server.send_info_description("d" * 10000)
    assert len(reply) == 20 + 2 + 4096
    (event,) = feed(_client_waiting_for(Opt.INFO), reply)
    assert event == DescriptionInfo("d" * 4096)


def test_structured_reply_option_event() -> None:
    server = server_with_flags()
    assert feed(server, wire.option(Opt.STRUCTURED_REPLY)) == [StructuredReplyOption()]


# -- errors: one path, into ERROR, reporting the state the call was made in ----------------


def _server_replying(opt: Opt, data: bytes = b"") -> ServerHandshake:
    server = server_with_flags()
    feed(server, wire.option(opt, data))
    assert server.state is State.REPLYING
    return server


SERVER_MISUSE = [
    ("ack without option", server_with_flags, lambda s: s.send_ack()),
    ("error without option", server_with_flags, lambda s: s.send_error(Rep.ERR_UNSUP)),
    ("server entry without LIST", server_with_flags, lambda s: s.send_server("a")),
    ("ACK as error", lambda: _server_replying(Opt.LIST), lambda s: s.send_error(Rep.ACK)),
    ("info to LIST", lambda: _server_replying(Opt.LIST), lambda s: s.send_info_name("x")),
    ("ACK to unknown", lambda: _server_replying(Opt.EXTENDED_HEADERS), lambda s: s.send_ack()),
    (
        "GO without INFO_EXPORT",
        lambda: _server_replying(Opt.GO, wire.info_request(b"x", ())),
        lambda s: s.send_ack(),
    ),
    ("ACK to EXPORT_NAME", lambda: _server_replying(Opt.EXPORT_NAME), lambda s: s.send_ack()),
    (
        "minimum block size 0",
        lambda: _server_replying(Opt.GO, wire.info_request(b"x", (Info.BLOCK_SIZE,))),
        lambda s: s.send_info_block_size(0, 4096, 1 << 20),
    ),
    (
        "minimum block size not a power of 2",
        lambda: _server_replying(Opt.INFO, wire.info_request(b"x", (Info.BLOCK_SIZE,))),
        lambda s: s.send_info_block_size(768, 4096, 1 << 20),
    ),
    (
        "minimum block size over 64 KiB",
        lambda: _server_replying(Opt.GO, wire.info_request(b"x", ())),
        lambda s: s.send_info_block_size(1 << 17, 1 << 17, 1 << 20),
    ),
    (
        "error to EXPORT_NAME",
        lambda: _server_replying(Opt.EXPORT_NAME),
        lambda s: s.send_error(Rep.ERR_UNKNOWN),
    ),
    ("start_tls before ACK", server_with_flags, lambda s: s.start_tls()),
    ("second greeting", server_with_flags, lambda s: s.greeting()),
    (
        "transmission before GO",
        server_with_flags,
        lambda s: s.transmission(ExportLimits(SIZE, FLAGS)),
    ),
]


@pytest.mark.parametrize(
    ("setup", "call"), [case[1:] for case in SERVER_MISUSE], ids=[c[0] for c in SERVER_MISUSE]
)
def test_every_server_misuse_ends_in_error(
    setup: Callable[[], ServerHandshake], call: Callable[[ServerHandshake], object]
) -> None:
    server = setup()
    was = server.state
    with pytest.raises(LocalProtocolError) as caught:
        call(server)
    assert server.state is State.ERROR
    # the message names the state the call was made in, not the ERROR it led to
    assert f"in state {was.name}" in str(caught.value) and "ERROR" not in str(caught.value)


def _client(state: State) -> ClientHandshake:
    client = ClientHandshake()
    if state is not State.AWAIT_GREETING:
        feed(client, ServerHandshake().greeting())
    if state in (State.OPTIONS, State.REPLYING):
        client.send_client_flags()
    if state is State.REPLYING:
        client.opt_list()
    assert client.state is state
    return client


CLIENT_MISUSE = [
    ("flags before the greeting", State.AWAIT_GREETING, lambda c: c.send_client_flags()),
    ("flags twice", State.OPTIONS, lambda c: c.send_client_flags()),
    ("option before the flags", State.AWAIT_CLIENT_FLAGS, lambda c: c.opt_list()),
    ("option while one is open", State.REPLYING, lambda c: c.opt_go("x")),
    ("start_tls before ACK", State.OPTIONS, lambda c: c.start_tls()),
]


@pytest.mark.parametrize(
    ("state", "call"), [case[1:] for case in CLIENT_MISUSE], ids=[c[0] for c in CLIENT_MISUSE]
)
def test_every_client_misuse_ends_in_error(
    state: State, call: Callable[[ClientHandshake], object]
) -> None:
    client = _client(state)
    with pytest.raises(LocalProtocolError) as caught:
        call(client)
    assert client.state is State.ERROR
    assert f"in state {state.name}" in str(caught.value) and "ERROR" not in str(caught.value)


def test_after_an_error_the_machines_stay_in_error() -> None:
    server = _server_replying(Opt.LIST)
    with pytest.raises(LocalProtocolError):
        server.send_error(Rep.ACK)
    server.receive_data(wire.option(Opt.LIST))
    for call in (server.next_event, server.send_ack, lambda: server.send_error(Rep.ERR_UNSUP)):
        with pytest.raises(LocalProtocolError):
            call()
        assert server.state is State.ERROR
    client = _client(State.REPLYING)
    client.receive_data(b"\0" * 20)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    client.receive_data(wire.option_reply(Opt.LIST, Rep.ACK))
    for misuse in (client.next_event, client.opt_list, client.send_client_flags):
        with pytest.raises(LocalProtocolError):
            misuse()
        assert client.state is State.ERROR


@pytest.mark.parametrize("state", list(State))
def test_only_the_table_moves_a_machine(state: State) -> None:
    """Each step either follows TRANSITIONS or fails into ERROR; no state is left otherwise."""
    for step in Step:
        machine = HandshakeMachine()
        machine.state = state
        if (state, step) in TRANSITIONS:
            machine._step(step)
            assert machine.state is TRANSITIONS[state, step]
        else:
            with pytest.raises(LocalProtocolError, match=f"in state {state.name}"):
                machine._step(step)
            assert machine.state is State.ERROR
    # ERROR is in no transition: only the one error path leads there, and nothing leads out
    assert State.ERROR not in {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())


def test_client_takes_an_ack_to_an_option_it_does_not_know() -> None:
    client = _client(State.OPTIONS)
    client.opt_raw(999)
    assert feed(client, wire.option_reply(999, Rep.ACK)) == [OptionAck(999)]
    assert client.state is State.OPTIONS


def test_client_forgets_contexts_when_set_meta_context_fails() -> None:
    server, client = started()
    feed(server, client.opt_structured_reply())
    feed(client, server.send_ack())
    feed(server, client.opt_set_meta_context("img", ("base:allocation",)))
    reply = server.send_meta_context(1, "base:allocation", "img") + server.send_error(
        Rep.ERR_UNKNOWN
    )
    assert feed(client, reply)[-1] == OptionError(Opt.SET_META_CONTEXT, Rep.ERR_UNKNOWN, "")
    assert client.negotiated.meta_contexts == {} == server.negotiated.meta_contexts


# -- hand-over to transmission -----------------------------------------------------------


def _after_go(extra: bytes = b"") -> ServerHandshake:
    server, client = started()
    feed(server, client.opt_structured_reply())
    feed(client, server.send_ack())
    feed(server, client.opt_set_meta_context("img", ("base:allocation",)))
    feed(client, server.send_meta_context(1, "base:allocation", "img") + server.send_ack())
    assert feed(server, client.opt_go("img") + extra) == [InfoOption("img", (), go=True)]
    server.send_info_export(SIZE, FLAGS)
    server.send_ack()
    assert server.state is State.TRANSMISSION
    return server


def test_transmission_gets_its_own_settings_and_the_bytes_after_go() -> None:
    export = ExportLimits(SIZE, FLAGS, min_block=512)
    server = _after_go(wire.request(0, 7, 0, 512) + wire.request(2, 8, 0, 0)[:5])
    tx = server.transmission(export)
    assert tx.export is export and tx.state is TransmissionState.TRANSMISSION
    assert tx.negotiated == server.negotiated
    # later changes to the handshake's settings do not reach the transmission machine
    server.negotiated.structured_replies = False
    server.negotiated.meta_contexts[2] = "other"
    contexts = {1: "base:allocation"}
    assert tx.negotiated == Negotiated(True, contexts, meta_export="img", no_zeroes=True)
    assert tx.next_event() == Request(0, 0, 7, 0, 512)
    assert tx.outstanding == 1 and tx.next_event() is NEED_DATA
    tx.receive_data(wire.request(2, 8, 0, 0)[5:])
    assert tx.next_event() == Disconnect(8)
    assert server.trailing_data  # still there, for callers that read it


def test_transmission_after_export_name() -> None:
    server = server_with_flags()
    feed(server, wire.option(Opt.EXPORT_NAME, b"x") + wire.request(0, 1, 0, 512))
    with pytest.raises(LocalProtocolError, match="in state REPLYING"):
        server.transmission(ExportLimits(SIZE, FLAGS))
    server = server_with_flags()
    feed(server, wire.option(Opt.EXPORT_NAME, b"x") + wire.request(0, 1, 0, 512))
    server.send_export_name_reply(SIZE, FLAGS)
    tx = server.transmission(ExportLimits(SIZE, FLAGS))
    assert tx.next_event() == Request(0, 0, 1, 0, 512)
    assert not tx.negotiated.structured_replies
    assert tx.read_header_size == 16


# -- block sizes: binding only where a GO asked for them ---------------------------------

BLOCK_SIZES = (512, 4096, 1 << 25)


def _go(
    infos: tuple[int, ...], *, send_block_size: bool = True
) -> tuple[ServerHandshake, ClientHandshake]:
    """Both sides after a GO asking for ``infos``, answered with block sizes (asked or not)."""
    server, client = started()
    assert feed(server, client.opt_go("img", infos)) == [InfoOption("img", infos, go=True)]
    reply = server.send_info_export(SIZE, FLAGS)
    if send_block_size:
        reply += server.send_info_block_size(*BLOCK_SIZES)
    feed(client, reply + server.send_ack())
    assert server.state is State.TRANSMISSION is client.state
    return server, client


def _unaligned_read_error(server: ServerHandshake) -> Errno:
    """What a READ of 513 bytes at offset 1 gets, with the limits our server builds."""
    limits = ExportLimits(SIZE, FLAGS, min_block=server.negotiated.min_block)
    tx = server.transmission(limits)
    tx.receive_data(wire.request(Cmd.READ, 1, 1, 513))
    request = tx.next_event()
    assert isinstance(request, Request)
    return tx.check(request)[0]


def test_a_go_that_asked_for_block_sizes_binds_the_client_to_them() -> None:
    server, client = _go((Info.BLOCK_SIZE,))
    assert server.negotiated.block_size == BLOCK_SIZES == client.negotiated.block_size
    assert server.negotiated.min_block == 512 == client.negotiated.min_block
    assert _unaligned_read_error(server) is Errno.EINVAL


@pytest.mark.parametrize(
    ("infos", "send_block_size"),
    [((Info.NAME,), True), ((), False), ((Info.BLOCK_SIZE,), False)],
    ids=["sent unasked", "neither asked nor sent", "asked, not sent"],
)
def test_a_go_that_was_not_told_block_sizes_it_asked_for_binds_to_nothing(
    infos: tuple[int, ...], send_block_size: bool
) -> None:
    """doc/proto.md "NBD_INFO_BLOCK_SIZE": a GO without the request does not commit the
    client, even if the server sends sizes anyway; the default minimum is 1."""
    server, client = _go(infos, send_block_size=send_block_size)
    assert server.negotiated.block_size is None is client.negotiated.block_size
    assert server.negotiated.min_block == 1 == client.negotiated.min_block
    assert _unaligned_read_error(server) is Errno.OK


def test_export_name_binds_the_client_to_no_block_size() -> None:
    server, client = started()
    feed(server, client.opt_export_name("img"))
    feed(client, server.send_export_name_reply(SIZE, FLAGS))
    assert server.negotiated.block_size is None is client.negotiated.block_size
    assert server.negotiated.min_block == 1
    assert _unaligned_read_error(server) is Errno.OK


def test_block_sizes_seen_in_info_or_a_failed_go_do_not_carry_over() -> None:
    """Only the GO that starts transmission counts: sizes from NBD_OPT_INFO (which the spec
    says commits nobody) or from a GO refused after them are forgotten."""
    server, client = started()
    feed(server, client.opt_info("img", (Info.BLOCK_SIZE,)))
    reply = server.send_info_export(SIZE, FLAGS) + server.send_info_block_size(*BLOCK_SIZES)
    assert feed(client, reply + server.send_ack())[1] == BlockSizeInfo(*BLOCK_SIZES)
    feed(server, client.opt_go("img", (Info.BLOCK_SIZE,)))
    reply = server.send_info_block_size(*BLOCK_SIZES) + server.send_error(Rep.ERR_UNKNOWN)
    assert feed(client, reply)[-1] == OptionError(Opt.GO, Rep.ERR_UNKNOWN, "")
    assert server.negotiated.block_size is None is client.negotiated.block_size
    feed(server, client.opt_go("img"))
    feed(client, server.send_info_export(SIZE, FLAGS) + server.send_ack())
    assert server.negotiated.block_size is None is client.negotiated.block_size
    assert _unaligned_read_error(server) is Errno.OK


def test_a_client_told_a_minimum_of_0_keeps_no_alignment() -> None:
    """A server may not send 0 (ours cannot); a client that is sent it aligns to nothing."""
    assert Negotiated(block_size=(0, 4096, 1 << 20)).min_block == 1
    assert Negotiated(block_size=(4096, 4096, 1 << 20)).min_block == 4096
