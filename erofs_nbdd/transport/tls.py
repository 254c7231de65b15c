"""A TLS ``trio.abc.Stream`` that decrypts every complete record a read brings in one go.

trio's SSLStream returns one 16 KiB record per ``receive_some``; relaying a GiB that way costs
~65k trips through trio's machinery. Here one transport read of up to 256 KiB becomes one
plaintext chunk (DESIGN.md section 4 measured ~2.5x for a relay). On the server, once a TLS
1.3 handshake is done, what it sends is sealed by ``records.py`` rather than by OpenSSL.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import ssl
from typing import TYPE_CHECKING, ClassVar

import trio

from . import records
from .keylog import HELLO_PREFIX, client_random
from .plain import FastLock, SourceFailed

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .keylog import KeyLog

TRANSPORT_READ = 256 * 1024
RECORD = records.RECORD
SEND_SLICE = 16 * RECORD


def slices(total: int) -> list[tuple[int, int]]:
    """Where ``total`` bytes are cut to be encrypted and sent: SEND_SLICE each, a whole
    number of full records, the last slice taking the rest as well. So a 256 KiB reply and
    its 16-byte header go in one write, not a second one carrying a 16-byte record, and
    1 MiB plus its header makes 65 records, the fewest. (Slices evened out to 262,148 bytes
    made 68: each ended in a 4-byte record that the client reads and decrypts on its own.)
    One slice, empty, for nothing."""
    count = max(1, total // SEND_SLICE)
    return [(i * SEND_SLICE, (i + 1) * SEND_SLICE) for i in range(count - 1)] + [
        ((count - 1) * SEND_SLICE, total)
    ]


def data_slices(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """``data`` as views cut by ``slices``."""
    view = memoryview(data)
    for start, end in slices(len(view)):
        yield view[start:end]


def file_slices(head: bytes | bytearray, fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """``head`` and ``length`` bytes of file ``fd`` from ``offset``, cut by ``slices`` and
    read for encryption one slice at a time into one buffer, each slice a view of it valid
    until the next: the buffer stays in the CPU cache, and a reply-sized one is never
    allocated and zeroed. It lives only as long as the reply: kept per connection, among
    short-lived replies in the heap, it fragmented it (a soak's RSS grew 50 % faster).
    ``SourceFailed`` if the file ends early or cannot be read."""
    cuts = slices(len(head) + length)
    first, last = cuts[0], cuts[-1]
    assert len(head) <= first[1] - first[0], "a reply header fits in its first slice"
    view = memoryview(bytearray(last[1] - last[0]))  # the last slice is the largest
    view[: len(head)] = head
    filled = len(head)
    for start, end in cuts:
        offset = read_file(fd, offset, [view[filled : end - start]])
        yield view[: end - start]
        filled = 0


def read_file(fd: int, offset: int, views: list[memoryview]) -> int:
    """Fill ``views`` from file ``fd`` at ``offset`` (``preadv``, again after a short read);
    returns the offset after them. ``SourceFailed`` if the file ends first or fails."""
    while views:
        try:
            got = os.preadv(fd, views, offset)
        except OSError as exc:
            raise SourceFailed(f"reading the image at {offset} failed: {exc}") from exc
        if not got:
            left = sum(len(v) for v in views)
            raise SourceFailed(f"the image ended at {offset}, {left} bytes early")
        offset += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views = views[1:]
        if views and got:
            views = [views[0][got:], *views[1:]]
    return offset


class Slab:
    """Room for one slice as records: the plaintext slots and the sealed records. Taken
    for one slice's read, seal and send, then handed back; a few are kept per process
    (``mmap``, outside the heap, so none fragments it)."""

    RECORDS = 2 * SEND_SLICE // RECORD  # the last slice is under twice the others
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


class TLSSession:
    """What a TLS stream tells of its session: ``ssl.SSLObject`` (a memory BIO) and
    ``ssl.SSLSocket`` answer alike."""

    _session: ssl.SSLObject | ssl.SSLSocket

    def version(self) -> str | None:
        return self._session.version()

    def getpeercert(self) -> dict[str, object] | None:
        return self._session.getpeercert()  # type: ignore[return-value]

    def describe(self) -> str:
        """Version and cipher suite, for the log: TLSv1.3/TLS_AES_256_GCM_SHA384."""
        found = self._session.cipher()
        return f"{self.version()}/{found[0] if found else None}"


class TLSStream(TLSSession, trio.abc.Stream):
    def __init__(
        self,
        transport: trio.abc.Stream,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        keys: KeyLog | None = None,
    ) -> None:
        """With ``keys`` (a server's), TLS 1.3 records of what it sends are sealed here
        (``records.py``) rather than by OpenSSL, where the suite is one ``records`` knows."""
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._session = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._send_lock = FastLock()  # both directions may need to write records
        self._receive_guard = FastLock()
        self._eof = False
        self._keys = keys
        self._hello = b""  # the start of the ClientHello, for its random
        self._secret: bytes | None = None
        #: Seals what we send, once the handshake is done (with ``keys`` and TLS 1.3).
        self.sealer: records.Sealer | None = None

    def describe(self) -> str:
        return super().describe() + ("+sealed" if self.sealer else "")

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data and self.sealer is not None:
                try:
                    data = self.sealer.reseal(data)
                except records.RecordError as exc:
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if data:
                await self.transport.send_all(data)

    async def _fill(self) -> bool:
        data = await self.transport.receive_some(TRANSPORT_READ)
        if not data:
            self._incoming.write_eof()
            return False
        if self._keys is not None and len(self._hello) < HELLO_PREFIX:
            self._hello += data[: HELLO_PREFIX - len(self._hello)]
        self._incoming.write(data)
        return True

    def _step(self) -> None:
        """One ``do_handshake`` call, and the traffic secret OpenSSL logged in it."""
        try:
            self._session.do_handshake()
        finally:
            if self._keys is not None and (random := client_random(self._hello)) is not None:
                self._secret = self._keys.take(random) or self._secret

    def _take_over(self) -> None:
        """Seal what we send from now on, if the session allows (see records.py)."""
        suite = records.SUITES.get((self._session.cipher() or ("",))[0])
        if (
            self._secret is not None
            and suite is not None
            and self._session.version() == "TLSv1.3"
            and not self._outgoing.pending  # OpenSSL wrote nothing under the new key
        ):
            self.sealer = records.Sealer(suite, self._secret)
        self._secret = None
        self._keys = None

    async def do_handshake(self) -> None:
        while True:
            try:
                self._step()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise trio.BrokenResourceError(
                        "the peer closed during the TLS handshake"
                    ) from None
                continue
            except ssl.SSLError as exc:
                await self._flush_quietly()  # let the peer see our alert
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            if self._keys is not None:
                self._take_over()  # before the flush: it looks at what OpenSSL just wrote
            await self._flush()
            return

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        limit = max_bytes or TRANSPORT_READ
        async with self._receive_guard:
            while True:
                chunks: list[bytes] = []
                total = 0
                try:
                    while total < limit:
                        chunk = self._session.read(limit - total)
                        if not chunk:
                            break
                        chunks.append(chunk)
                        total += len(chunk)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:  # close_notify
                    self._eof = True
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                if self.sealer is not None and chunks and not self._eof:
                    # OpenSSL answers a KeyUpdate that asks for one on its next write,
                    # and it makes none of its own now: an empty write lets it out.
                    try:
                        self._session.write(b"")
                    except ssl.SSLError as exc:
                        raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                if self._outgoing.pending:  # a post-handshake message may need an answer
                    await self._flush()
                if chunks:
                    return b"".join(chunks)
                if self._eof:
                    return b""
                if not await self._fill():  # EOF without close_notify: treat it as EOF
                    self._eof = True
                    return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # Encrypt in slices: a 32 MiB reply must not become 32 MiB more of ciphertext at once.
        if self.sealer is not None:
            await self._seal(data, -1, 0, 0)
        else:
            await self._encrypt(data_slices(data))

    async def send_file(self, head: bytes | bytearray, fd: int, offset: int, length: int) -> None:
        """``head``, then ``length`` bytes of file ``fd`` from ``offset`` (which the caller
        found in the page cache), read and encrypted a slice at a time."""
        if self.sealer is not None:
            await self._seal(head, fd, offset, length)
        else:
            await self._encrypt(file_slices(head, fd, offset, length))

    async def _seal(
        self, head: bytes | bytearray | memoryview, fd: int, offset: int, length: int
    ) -> None:
        """``head``, then ``length`` bytes of file ``fd`` from ``offset`` (none for
        ``send_all``), as our own records a slice at a time: read (or copied) straight into
        the record slots of a slab, sealed into its other half, sent from there."""
        assert self.sealer is not None
        head = memoryview(head)
        if not len(head) + length:
            return
        slab = Slab.take()
        try:
            async with self._send_lock:
                for start, end in slices(len(head) + length):
                    sizes = records.layout(slab.plain, end - start)
                    views = records.data_views(slab.plain, sizes)
                    if start < len(head):  # the head (all of send_all's data) comes first
                        views = _copy_into(views, head[start:end])
                    if views:
                        offset = read_file(fd, offset, views)
                    size = self.sealer.seal_slots(slab.plain, sizes, slab.sealed)
                    await self.transport.send_all(slab.sealed[:size])
        finally:
            slab.give_back()

    async def _encrypt(self, pieces: Iterator[memoryview]) -> None:
        """Each piece encrypted and sent before the next is taken."""
        for piece in pieces:
            try:
                self._session.write(piece)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._session.unwrap()
        try:
            with trio.move_on_after(1):
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()
