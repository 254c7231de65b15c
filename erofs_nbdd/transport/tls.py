"""TLS in this process, over another transport, decrypting every complete record a read
brings in one go.

trio's SSLStream returns one 16 KiB record per ``receive_some``; relaying a GiB that way costs
~65k trips through trio's machinery. Here one read of up to 256 KiB from the transport below
becomes one plaintext chunk (DESIGN.md section 4 measured ~2.5x for a relay). OpenSSL works
on memory BIOs. A server's transport may be given a ``Sealing`` strategy: after a TLS 1.3
handshake, what it sends is then sealed by ``sealing.py`` rather than by OpenSSL.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import TYPE_CHECKING

import trio

from . import handshakes
from .base import SecureTransport
from .lock import FastLock
from .slices import data_slices, file_slices

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..ranges import FileRange
    from .base import Transport
    from .sealing import Sealed, Sealing

TRANSPORT_READ = 256 * 1024


class TLSSession:
    """What a TLS transport tells of its session: ``ssl.SSLObject`` (a memory BIO) and
    ``ssl.SSLSocket`` answer alike."""

    _session: ssl.SSLObject | ssl.SSLSocket

    def version(self) -> str | None:
        return self._session.version()

    def peer_certificate(self) -> dict[str, object] | None:
        return self._session.getpeercert()  # type: ignore[return-value]

    def describe(self) -> str:
        """Version and cipher suite, for the log: TLSv1.3/TLS_AES_256_GCM_SHA384."""
        found = self._session.cipher()
        return f"{self.version()}/{found[0] if found else None}"


class TLSTransport(TLSSession, SecureTransport):
    """TLS over ``inner``, whose sends carry every record (so its policy is ``inner``'s).
    As with trio's SSLStream, closing this closes ``inner`` too."""

    def __init__(
        self,
        inner: Transport,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        sealing: Sealing | None = None,
    ) -> None:
        self.inner = inner
        self.policy = inner.policy
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._session: ssl.SSLObject = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._send_lock = FastLock()  # both directions may need to write records
        self._message_lock = FastLock()  # one reply's records all go out before another's
        self._receive_guard = FastLock()
        self._eof = False
        self._closed = False
        #: Plaintext decrypted by ``receive_nowait`` that waits for a flush first.
        self._held = b""
        self._sealing = sealing
        #: Seals what we send once the handshake is done (with ``sealing`` and TLS 1.3).
        self.sealed: Sealed | None = None

    def describe(self) -> str:
        return super().describe() + ("+sealed" if self.sealed else "")

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data and self.sealed is not None:
                data = self.sealed.reseal(data)
            if data:
                await self.inner.send_all(data)

    def _feed(self, data: bytes | bytearray) -> None:
        if not data:
            self._incoming.write_eof()
            return
        if self._sealing is not None:
            self._sealing.received(data)
        self._incoming.write(data)

    async def do_handshake(self) -> None:
        """Each step in a worker thread (``handshakes.py``); the BIOs are fed and flushed
        between steps, here, while no thread has the session. A server receives the
        ClientHello first: a step before it would only ask for it, a thread's trip for
        nothing."""
        if self._session.server_side:
            await self._receive_handshake()
        while True:
            try:
                done = await handshakes.step(self._step)
            except ssl.SSLError as exc:
                await self._flush_quietly()  # let the peer see our alert
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            if done:
                break
            await self._flush()
            await self._receive_handshake()
        if self._sealing is not None:  # before the flush: it looks at what OpenSSL wrote
            self.sealed = self._sealing.take_over(self._session, bool(self._outgoing.pending))
            self._sealing = None
        await self._flush()

    async def _receive_handshake(self) -> None:
        data = await self.inner.receive_some(TRANSPORT_READ)
        if not data:
            raise trio.BrokenResourceError("the peer closed during the TLS handshake")
        self._feed(data)

    def _step(self) -> bool:
        """One ``do_handshake`` (in a thread): True when the handshake is done, False when
        OpenSSL waits for the peer."""
        with self._sealing.stepping() if self._sealing is not None else contextlib.nullcontext():
            try:
                self._session.do_handshake()
            except ssl.SSLWantReadError:
                return False
            return True

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    def _decrypt(self, limit: int) -> bytes:
        """All plaintext OpenSSL can give now, up to ``limit``; notes a close_notify."""
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
        if chunks and self.sealed is not None and not self._eof:
            self.sealed.received(self._session)
        return b"".join(chunks)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection is closed")

    def receive_nowait(self, max_bytes: int, *, spin: bool = False) -> bytes | None:
        self._check_open()
        if self._receive_guard.locked() or self._held or self._eof:
            return None  # receive_some has it in hand
        data = self._decrypt(max_bytes)
        if not data and not self._eof:
            raw = self.inner.receive_nowait(TRANSPORT_READ, spin=spin)
            if raw is None:
                return None
            self._feed(raw)
            data = self._decrypt(max_bytes)
            if not data and not raw:  # EOF without close_notify: treat it as EOF
                self._eof = True
        if self._outgoing.pending or (not data and self._eof):
            self._held = data  # something to answer first: receive_some flushes it
            return None
        return data or None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        limit = max_bytes or TRANSPORT_READ
        async with self._receive_guard:
            while True:
                # Held, not in a local, across the flush: a cancelled receive loses nothing.
                self._held = self._held or self._decrypt(limit)
                if self._outgoing.pending:  # a post-handshake message may need an answer
                    await self._flush()
                data, self._held = self._held, b""
                if data:
                    return data
                if self._eof:
                    return b""
                raw = await self.inner.receive_some(TRANSPORT_READ)
                self._feed(raw)
                if not raw:  # EOF without close_notify: treat it as EOF
                    self._eof = True
                    return self._decrypt(limit)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # Encrypt in slices: a 32 MiB reply must not become 32 MiB more of ciphertext at once.
        self._check_open()
        if self.sealed is not None:
            async with self._send_lock:
                await self.sealed.send(self.inner, data, None)
        else:
            await self._encrypt(data_slices(data))

    async def send_file(self, head: bytes | bytearray, file: FileRange) -> None:
        """``head``, then the bytes of ``file``, read and encrypted a slice at a time."""
        self._check_open()
        if self.sealed is not None:
            async with self._send_lock:
                await self.sealed.send(self.inner, head, file)
        else:
            await self._encrypt(file_slices(head, file))

    async def _encrypt(self, pieces: Iterator[memoryview]) -> None:
        """Each piece encrypted and sent before the next is taken."""
        async with self._message_lock:
            for piece in pieces:
                try:
                    self._session.write(piece)
                except ssl.SSLError as exc:
                    raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
                await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """close_notify (for at most a second, even under cancellation), then ``inner``."""
        if self._closed:
            return
        self._closed = True
        try:
            with contextlib.suppress(ssl.SSLError):
                self._session.unwrap()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._flush_quietly()
        finally:
            await self.inner.aclose()
