"""Sealing the TLS 1.3 records of what the server sends in this process: the strategy a
``TLSTransport`` is given, and all it does, in one place.

OpenSSL runs the handshake and decrypts what is received. ``Sealing`` watches the handshake
for the traffic secret (``keylog.py``, matched by the ClientHello's random) and, once it is
done, hands the transport a ``Sealed`` sender if the session allows it: TLS 1.3, a suite
``records.py`` knows, and nothing written by OpenSSL under the new key yet (its sequence
numbers would collide with ours). From then on ``Sealed`` reads the image straight into
record slots, seals them with ``cryptography`` (``records.Sealer``), reseals what OpenSSL
itself still writes (alerts, a KeyUpdate a client asks for), and lets OpenSSL answer a
KeyUpdate request by an empty write after each read.
"""

from __future__ import annotations

import contextlib
import mmap
import ssl
from typing import TYPE_CHECKING, ClassVar

import trio

from . import records
from .keylog import HELLO_PREFIX, client_random
from .slices import SEND_SLICE, read_file, slices

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..ranges import FileRange
    from .base import Transport
    from .keylog import KeyLog


class Slab:
    """Room for one slice as records: the plaintext slots and the sealed records. Taken
    for one slice's read, seal and send, then handed back; a few are kept per process
    (``mmap``, outside the heap, so none fragments it)."""

    RECORDS = 2 * SEND_SLICE // records.RECORD  # the last slice is under twice the others
    KEEP = 4
    _free: ClassVar[list[Slab]] = []  # this process's spares

    def __init__(self) -> None:
        self.plain = memoryview(mmap.mmap(-1, self.RECORDS * records.PLAIN_STRIDE))
        self.sealed = memoryview(mmap.mmap(-1, self.RECORDS * records.SEALED_STRIDE))

    @classmethod
    def take(cls) -> Slab:
        return cls._free.pop() if cls._free else cls()

    def give_back(self) -> None:
        if len(self._free) < self.KEEP:
            self._free.append(self)


def _copy_into(views: list[memoryview], data: memoryview) -> list[memoryview]:
    """Copy ``data`` into ``views`` in order; the part of them it did not fill."""
    at = 0
    for i, view in enumerate(views):
        n = min(len(view), len(data) - at)
        view[:n] = data[at : at + n]
        at += n
        if n < len(view):
            return [view[n:], *views[i + 1 :]]
    return []


class Sealing:
    """What one server connection needs to seal its own records: this process's key log,
    and what the handshake told of the secret."""

    def __init__(self, keys: KeyLog) -> None:
        self._keys = keys
        self._hello = b""  # the start of the ClientHello, for its random
        self._secret: bytes | None = None

    def received(self, data: bytes | bytearray) -> None:
        """Bytes received during the handshake (the ClientHello comes first)."""
        if len(self._hello) < HELLO_PREFIX:
            self._hello += data[: HELLO_PREFIX - len(self._hello)]

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """Around each ``do_handshake`` step (in a worker thread): the traffic secret
        OpenSSL logged in it is taken after it. The key log's lock is held throughout, as
        taking empties a log other handshakes write to."""
        with self._keys.lock:
            try:
                yield
            finally:
                if (random := client_random(self._hello)) is not None:
                    self._secret = self._keys.take(random) or self._secret

    def take_over(self, session: ssl.SSLObject, openssl_wrote: bool) -> Sealed | None:
        """A sender that seals from now on, if the session allows (see the module). Called
        before the handshake's last output is flushed: ``openssl_wrote`` says whether
        OpenSSL wrote anything under the new key (a session ticket, say)."""
        suite = records.SUITES.get((session.cipher() or ("",))[0])
        secret, self._secret = self._secret, None
        if secret is None or suite is None or session.version() != "TLSv1.3" or openssl_wrote:
            return None
        return Sealed(records.Sealer(suite, secret))


class Sealed:
    """The sending half of a TLS 1.3 connection once the server seals its records."""

    def __init__(self, sealer: records.Sealer) -> None:
        self.sealer = sealer

    async def send(
        self, transport: Transport, head: bytes | bytearray | memoryview, file: FileRange | None
    ) -> None:
        """``head``, then the bytes of ``file`` if given, as our own records a slice at a
        time: read (or copied) straight into the record slots of a slab, sealed into its
        other half, sent from there. The caller holds the send lock."""
        head = memoryview(head)
        fd, offset, length = file if file is not None else (-1, 0, 0)
        if not len(head) + length:
            return
        slab = Slab.take()
        try:
            for start, end in slices(len(head) + length):
                sizes = records.layout(slab.plain, end - start)
                views = records.data_views(slab.plain, sizes)
                if start < len(head):  # the head (all of send_all's data) comes first
                    views = _copy_into(views, head[start:end])
                if views:
                    offset = read_file(fd, offset, views)
                size = self.sealer.seal_slots(slab.plain, sizes, slab.sealed)
                await transport.send_all(slab.sealed[:size])
        finally:
            slab.give_back()

    def reseal(self, data: bytes) -> bytes:
        """What OpenSSL wrote, as records at our sequence numbers."""
        try:
            return self.sealer.reseal(data)
        except records.RecordError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    def received(self, session: ssl.SSLObject) -> None:
        """After a read that brought data: OpenSSL answers a KeyUpdate that asks for one on
        its next write, and it makes none of its own now, so an empty write lets it out."""
        try:
            session.write(b"")
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
