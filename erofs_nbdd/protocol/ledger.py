"""What a relay between an NBD client and its server has passed on, so that it can move
the client to a new server connection without the client noticing.

A relay that only copies bytes cannot tell, when its server connection ends, which
requests went unanswered; the kernel's NBD client then retries them only once their
timeout fires. Fed both directions, the ledger frames whole requests (to forward as they
came) and whole simple replies (forwarded only once complete, so a reply cut off by a
dying connection never reaches the client), keeps the requests still unanswered in the
order they came, and says which of them a new connection must be sent again.

Simple replies only: the relay serves the kernel, which never negotiates structured ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import wire
from .constants import DEFAULT_MAX_PAYLOAD, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Cmd
from .errors import RemoteProtocolError


@dataclass(slots=True)
class _Unanswered:
    cmd: int
    length: int
    #: The request as it came, payload included, to send again unchanged.
    raw: bytes


class Ledger:
    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._requests = wire.Buffer()
        self._replies = wire.Buffer()
        #: Requests without a (whole) reply yet, in the order they came.
        self._unanswered: dict[int, _Unanswered] = {}
        #: Cookies of those not yet sent on the current connection, in order.
        self._unsent: list[int] = []
        #: The client's NBD_CMD_DISC, until sent; it has no reply.
        self._disc = b""
        #: The client sent NBD_CMD_DISC: the server will close, and that is the end.
        self.disconnecting = False

    @property
    def unanswered(self) -> int:
        return len(self._unanswered)

    def requests(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client; whole requests join the unanswered (``unsent``)."""
        buf = self._requests
        buf.feed(data)
        while len(buf) >= wire.REQUEST.size:
            magic, _, cmd, cookie, _, length = buf.peek_unpack(wire.REQUEST)
            if magic != REQUEST_MAGIC:
                raise RemoteProtocolError(f"bad request magic {magic:#x} from the client")
            payload = length if cmd == Cmd.WRITE else 0
            if payload > self._max_payload:
                raise RemoteProtocolError(f"WRITE payload of {length} bytes is over the limit")
            if len(buf) < wire.REQUEST.size + payload:
                return
            raw = buf.take(wire.REQUEST.size + payload)
            if cmd == Cmd.DISC:
                self.disconnecting = True
                self._disc = raw
            elif cookie in self._unanswered:
                raise RemoteProtocolError(f"two requests in flight with cookie {cookie:#x}")
            else:
                self._unanswered[cookie] = _Unanswered(cmd, length, raw)
                self._unsent.append(cookie)

    def unsent(self) -> bytes:
        """The requests not yet sent on the current connection, in order (a DISC last),
        counted as sent from now on: nothing goes twice on one connection."""
        unanswered = self._unanswered
        parts = [unanswered[c].raw for c in self._unsent if c in unanswered]
        self._unsent = []
        if self._disc:
            parts.append(self._disc)
            self._disc = b""
        return b"".join(parts)

    def replies(self, data: bytes | bytearray | memoryview) -> bytes:
        """Feed bytes from the server; the replies now whole, to pass on."""
        buf = self._replies
        buf.feed(data)
        parts = []
        while len(buf) >= wire.SIMPLE_REPLY.size:
            magic, error, cookie = buf.peek_unpack(wire.SIMPLE_REPLY)
            if magic != SIMPLE_REPLY_MAGIC:
                raise RemoteProtocolError(f"bad reply magic {magic:#x} from the server")
            req = self._unanswered.get(cookie)
            if req is None:
                raise RemoteProtocolError(f"reply for unknown cookie {cookie:#x}")
            data_len = req.length if req.cmd == Cmd.READ and error == 0 else 0
            if len(buf) < wire.SIMPLE_REPLY.size + data_len:
                break
            parts.append(buf.take(wire.SIMPLE_REPLY.size + data_len))
            del self._unanswered[cookie]
        return b"".join(parts)

    def moved(self) -> None:
        """The server connection was replaced: what the old one had sent of a reply is
        dropped, and every unanswered request is unsent on the new one."""
        self._replies = wire.Buffer()
        self._unsent = list(self._unanswered)
