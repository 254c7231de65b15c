"""The one interface the server and the client talk through, whatever carries the bytes.

A ``Transport`` is a ``trio.abc.Stream`` (so trio code and our client take it as one) that
can also send a range of an open file after a header (``send_file``: ``sendfile`` where the
kernel writes the socket, read and encrypted a slice at a time where this process encrypts),
and try a receive without waiting (``receive_nowait``). Each call to ``send_all`` or
``send_file`` goes out whole before another begins, so nothing comes between a reply's
header and its data. How long a receive retries before sleeping is the transport's
``Policy``, given when it is made. A send waits as long as the peer makes it: how long a
reply may take is the server's business (the reply timeout in ``server/transmit.py``),
measured over whole replies, which no transport sees.

Errors, in trio's words: ``trio.BrokenResourceError`` (the peer reset or broke the
connection), ``trio.ClosedResourceError`` (closed here), ``ImageUnreadable`` (the file
behind ``send_file`` failed).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    import socket

    from ..ranges import FileRange


@dataclass(frozen=True)
class Policy:
    #: Seconds ``receive_nowait(spin=True)`` retries before giving up (--busy-poll).
    busy_poll: float = 0.0


class Transport(trio.abc.Stream):
    policy: Policy

    @abstractmethod
    async def send_file(self, head: bytes | bytearray, file: FileRange) -> None:
        """``head``, then the bytes of ``file`` (which the caller found in the page cache);
        ``ImageUnreadable`` if the file fails or ends first."""

    @abstractmethod
    def receive_nowait(self, max_bytes: int, *, spin: bool = False) -> bytes | None:
        """What has arrived (b"" at EOF), or None if a receive would have to wait; with
        ``spin``, after retrying for the policy's ``busy_poll``."""

    def describe(self) -> str:
        """How the bytes are protected, for the connection's log line."""
        return "-"

    def peer_certificate(self) -> dict[str, object] | None:
        return None

    def raw_socket(self) -> socket.socket | None:
        """The socket itself, where this transport writes it directly: OpenSSL may then
        drive it and hand its keys to the kernel (kernel TLS). None for the others."""
        return None


class SecureTransport(Transport):
    """A TLS transport over another one."""

    @abstractmethod
    async def do_handshake(self) -> None:
        """``trio.BrokenResourceError`` if the peer or its certificate fails it."""
