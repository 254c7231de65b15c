"""The relay's ledger: whole requests out, whole replies back, the unanswered sent again
on a new connection, each once."""

from __future__ import annotations

import pytest

from erofs_nbdd.protocol import Cmd, RemoteProtocolError, wire
from erofs_nbdd.protocol.ledger import Ledger


def read(cookie: int, offset: int = 0, length: int = 4096) -> bytes:
    return wire.request(Cmd.READ, cookie, offset, length)


def reply(cookie: int, data: bytes = b"", error: int = 0) -> bytes:
    return wire.simple_reply(cookie, error) + data


def test_requests_are_forwarded_whole_and_in_order_each_once() -> None:
    ledger = Ledger()
    stream = read(1) + read(2, 4096) + read(3, 8192)
    ledger.requests(stream[:30])  # one whole request and two bytes of the next
    assert ledger.unsent() == read(1)
    ledger.requests(stream[30:])
    assert ledger.unsent() == read(2, 4096) + read(3, 8192)
    assert ledger.unsent() == b""  # nothing goes twice on one connection
    assert ledger.unanswered == 3


def test_replies_pass_only_whole() -> None:
    ledger = Ledger()
    ledger.requests(read(7, 0, 8) + wire.request(Cmd.FLUSH, 8, 0, 0))
    ledger.unsent()
    whole = reply(7, b"abcdefgh")
    assert ledger.replies(whole[:20]) == b""  # header and four of eight data bytes
    assert ledger.replies(whole[20:] + reply(8)) == whole + reply(8)
    assert ledger.unanswered == 0


def test_an_error_reply_carries_no_data() -> None:
    ledger = Ledger()
    ledger.requests(read(1) + read(2))
    assert ledger.replies(reply(1, error=5)) == reply(1, error=5)
    assert ledger.unanswered == 1


def test_a_new_connection_gets_every_unanswered_request_again_not_half_a_reply() -> None:
    ledger = Ledger()
    ledger.requests(read(1) + read(2, 4096) + read(3, 8192))
    ledger.unsent()
    assert ledger.replies(reply(2, b"x" * 4096)) == reply(2, b"x" * 4096)
    assert ledger.replies(reply(1, b"y" * 100)) == b""  # cut off: the connection dies
    ledger.moved()
    ledger.requests(read(4, 12288))  # came while reconnecting
    assert ledger.unsent() == read(1) + read(3, 8192) + read(4, 12288)
    whole = reply(1, b"z" * 4096)
    assert ledger.replies(whole) == whole  # the new connection's reply, from its start


def test_disconnect_goes_last_and_ends_the_link() -> None:
    ledger = Ledger()
    disc = wire.request(Cmd.DISC, 0, 0, 0)
    ledger.requests(read(1) + disc)
    assert ledger.disconnecting
    assert ledger.unsent() == read(1) + disc
    assert ledger.unanswered == 1  # DISC has no reply


def test_write_payloads_travel_with_their_request() -> None:
    ledger = Ledger()
    write = wire.request(Cmd.WRITE, 5, 0, 6) + b"abcdef"
    ledger.requests(write[:-2])
    assert ledger.unsent() == b""
    ledger.requests(write[-2:])
    assert ledger.unsent() == write
    assert ledger.replies(reply(5, error=1)) == reply(5, error=1)


@pytest.mark.parametrize(
    ("side", "data", "message"),
    [
        ("requests", b"\x00" * 28, "bad request magic"),
        ("requests", read(1) + read(1), "two requests in flight with cookie"),
        ("replies", reply(9), "reply for unknown cookie"),
        ("replies", b"\x11" * 16, "bad reply magic"),
    ],
)
def test_a_broken_stream_is_refused(side: str, data: bytes, message: str) -> None:
    ledger = Ledger()
    with pytest.raises(RemoteProtocolError, match=message):
        getattr(ledger, side)(data)
