"""One client connection: the handshake, then the transmission phase (``transmit.py``).

Policy lives here (which export, which limits, TLS); the protocol machines decide what is
legal. The connection owns the stream: sends, receives that a shutdown may cancel, and the
idle and reply timeouts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    Info,
    Opt,
    Rep,
    ServerHandshake,
    State,
    TransmissionFlag,
)
from ..protocol.events import (
    AbortOption,
    ClientFlags,
    ExportNameOption,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    OptionEvent,
    StartTLSOption,
    StructuredReplyOption,
    UnsupportedOption,
)
from ..storage.backends import Backend, FileBackend
from ..transport import ktls
from ..transport.contexts import TLSMode, peer_common_name, peer_subject
from ..transport.ktls import KernelTLSStream
from ..transport.plain import FastLock, FastSocketStream, SourceFailed
from ..transport.tls import TLSStream
from .budget import ByteBudget
from .outcome import ClientGone, ImageFailed, LimitExceeded, Refused, Stats
from .transmit import CONTEXT_ID, FileRange, Transmitter

if TYPE_CHECKING:
    import ssl

    from ..config import ServerConfig
    from ..storage.exports import Export, ExportDirectory
    from ..transport.keylog import KeyLog

log = logging.getLogger("erofs_nbdd.connection")

RECEIVE_SIZE = 256 * 1024
#: Streams that take a reply's data as a file range (``send_file``).
FILE_STREAMS = (FastSocketStream, TLSStream, KernelTLSStream)
BASE_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.READ_ONLY
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_CACHE
)


class Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        peer: str,
        config: ServerConfig,
        exports: ExportDirectory,
        ssl_context: ssl.SSLContext | None = None,
        server_budget: ByteBudget | None = None,
        keys: KeyLog | None = None,
    ) -> None:
        self.stream = stream
        self.ssl_context = ssl_context
        self._keys = keys
        self.tls = config.tls
        self._client_name: str | None = None
        self.peer = peer
        self.config = config
        self.limits = config.limits
        self.exports = exports
        self.stats = Stats()
        self.handshake = ServerHandshake(max_option_length=config.limits.max_option_length)
        self._handshake_scope = trio.CancelScope()
        self._receive_scope: trio.CancelScope | None = None
        self._stopping = False
        self._send_lock = FastLock()
        self._backend: Backend | None = None
        self._export: Export | None = None
        self._options = 0
        self._option_budget = config.limits.max_options
        self._server_budget = server_budget or ByteBudget(config.limits.max_server_buffer)
        self._tx: Transmitter | None = None
        # The reply timeout lives in the socket stream, so a timer exists only while a send
        # is blocked (and covers TLS, whose records go through the same socket).
        self._socket = stream if isinstance(stream, FastSocketStream) else None
        #: --busy-poll in seconds: while no read of this connection waits for storage, a receive
        #: retries this long before sleeping (TLS reads go through the socket too).
        self._spin = config.busy_poll_us / 1e6
        if self._socket is not None:
            self._socket.spin = self._spin
            if config.limits.reply_timeout > 0:
                self._socket.send_timeout = config.limits.reply_timeout

    # -- I/O helpers ---------------------------------------------------------------------

    async def _send(self, data: bytes | bytearray, file: FileRange | None = None) -> None:
        """``data``, then the bytes of ``file`` if given (``Transmitter.send_files``): from
        the page cache by the kernel, or a slice at a time through TLS in this process."""
        async with self._send_lock:
            try:
                if file is None:
                    await self.stream.send_all(data)
                else:
                    assert isinstance(self.stream, FILE_STREAMS)
                    await self.stream.send_file(data, *file)
            except SourceFailed as exc:
                raise ImageFailed(str(exc)) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone("connection lost while sending") from exc
            except trio.TooSlowError:  # the socket's send_timeout: see __init__
                timeout = self.limits.reply_timeout
                raise LimitExceeded(
                    f"client read no reply for {timeout:g} s (reply timeout)"
                ) from None

    async def _receive(self) -> bytes:
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone("connection reset") from exc
        return bytes(data)

    async def _receive_requests(self) -> bytes | None:
        """Bytes of further requests; None once the server is stopping. Only this wait is
        ever cancelled by a shutdown, never a reply being written."""
        if self._stopping:
            return None
        waiting = self._tx is not None and self._tx.in_flight > 0
        if self._socket is not None:
            # No spin while a read waits for storage: the spin would delay its result (on a
            # thread, it kept the GIL from it: cold 4 KiB reads at QD1 took 450 us, not 380).
            self._socket.spin = 0.0 if waiting else self._spin
        if self._socket is not None and self.stream is self._socket:  # plaintext: try first
            try:
                data = self._socket.receive_nowait(RECEIVE_SIZE, self._socket.spin)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone("connection reset") from exc
            if data is not None:
                return data
        idle = self.limits.idle_timeout
        if idle <= 0 or waiting:
            idle = float("inf")
        with trio.CancelScope() as scope:
            self._receive_scope = scope
            with trio.move_on_after(idle):
                return await self._receive()
            raise LimitExceeded(f"no request for {idle:g} s (idle timeout)")
        return None

    # -- whole life ----------------------------------------------------------------------

    def stop(self) -> None:
        """Server shutdown: end a handshake at once; in transmission, read no more requests
        but let those in flight finish (the server bounds how long)."""
        self.stats.ended = "server shutdown"
        self._stopping = True
        self._handshake_scope.cancel()
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def run(self) -> None:
        done = False
        with self._handshake_scope, trio.fail_after(self.limits.handshake_timeout):
            await self._send(self.handshake.greeting())
            done = await self._negotiate()
        if done:
            await self._transmit()

    async def _negotiate(self) -> bool:
        """Run the handshake; True when transmission starts, False when the client left."""
        hs = self.handshake
        while hs.state not in (State.TRANSMISSION, State.CLOSED):
            event = hs.next_event()
            if event is NEED_DATA:
                data = await self._receive()
                if not data:
                    self.stats.ended = "client left during handshake"
                    return False
                hs.receive_data(data)
                continue
            if isinstance(event, ClientFlags):
                continue
            self._options += 1
            if self._options > self._option_budget:
                raise LimitExceeded(f"more than {self._option_budget} options before GO")
            await self._answer(event)
        if hs.state is State.CLOSED:
            self.stats.ended = "abort"
            return False
        return True

    def _allowed_before_tls(self, event: OptionEvent) -> bool:
        """FORCEDTLS: before TLS, only STARTTLS and ABORT are answered normally."""
        if self.tls.mode is not TLSMode.REQUIRE or self.handshake.negotiated.tls:
            return True
        if isinstance(event, InvalidOption):
            return event.option == Opt.STARTTLS
        return isinstance(event, StartTLSOption | AbortOption)

    async def _answer(self, event: OptionEvent) -> None:
        hs = self.handshake
        if not self._allowed_before_tls(event):
            if isinstance(event, ExportNameOption):  # cannot be refused: end the session
                raise Refused("EXPORT_NAME before TLS; TLS is required")
            await self._send(
                hs.send_error(Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
            )
            return
        if isinstance(event, AbortOption):
            await self._send(hs.send_ack())
        elif isinstance(event, ListOption):
            exports = [e for e in (await self._scan()).values() if self._refusal(e) is None]
            self._option_budget += 2 * len(exports)
            parts = [hs.send_server(e.name, e.description) for e in exports]
            await self._send(b"".join([*parts, hs.send_ack()]))
        elif isinstance(event, StartTLSOption):
            await self._start_tls()
        elif isinstance(event, StructuredReplyOption):
            await self._send(hs.send_ack())
        elif isinstance(event, InfoOption):
            await self._info(event)
        elif isinstance(event, MetaContextOption):
            await self._meta_context(event)
        elif isinstance(event, ExportNameOption):
            await self._export_name(event)
        elif isinstance(event, UnsupportedOption):
            await self._send(
                hs.send_error(Rep.ERR_UNSUP, f"option {event.option} is not supported")
            )
        elif isinstance(event, InvalidOption):
            await self._send(hs.send_error(event.rep, event.message))

    async def _scan(self) -> dict[str, Export]:
        return await trio.to_thread.run_sync(self.exports.scan)

    async def _lookup(self, name: str) -> Export | tuple[Rep, str]:
        """The export a name selects, or the error reply that refuses it."""
        found = self.exports.resolve_name(name, await self._scan())
        if isinstance(found, str):
            return Rep.ERR_UNKNOWN, found
        return self._refusal(found) or found

    def _refusal(self, export: Export) -> tuple[Rep, str] | None:
        """Why this client may not use ``export`` (--tls-allow), or None."""
        names = self.tls.restricted(export.name)
        if names is None:
            return None
        if not self.handshake.negotiated.tls:
            return Rep.ERR_TLS_REQD, f"export {export.name!r} needs TLS with a client certificate"
        if self._client_name not in names:
            return Rep.ERR_POLICY, f"client {self._client_name!r} may not use {export.name!r}"
        return None

    async def _start_tls(self) -> None:
        hs = self.handshake
        if self.ssl_context is None:
            await self._send(
                hs.send_error(Rep.ERR_POLICY, "TLS is not enabled on this server (--tls on)")
            )
            return
        await self._send(hs.send_ack())
        hs.start_tls()  # plaintext that came after STARTTLS is an injection: dropped here
        stream = self._tls_stream(self.ssl_context)
        self.stream = stream
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise Refused(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        cert = stream.getpeercert()
        self._client_name = peer_common_name(cert)
        self.stats.tls = stream.describe()
        self.stats.client = peer_subject(cert) or "-"

    def _tls_stream(self, context: ssl.SSLContext) -> TLSStream | KernelTLSStream:
        """OpenSSL on the socket itself where the kernel may take the keys, else on a
        memory BIO (see ktls.py)."""
        if ktls.enabled(context) and self._socket is not None:
            try:
                return KernelTLSStream(self._socket, context)
            except OSError as exc:  # no descriptor to spare: TLS in this process, as before
                log.warning("%s: kernel TLS not used: %s", self.peer, exc)
        return TLSStream(self.stream, context, server_side=True, keys=self._keys)

    def _flags(self) -> int:
        flags = BASE_FLAGS
        if self.handshake.negotiated.structured_replies:
            flags |= TransmissionFlag.SEND_DF  # a READ is always one chunk here
        return int(flags)

    def _open(self, export: Export) -> FileBackend:
        return FileBackend(
            export.path,
            preferred_block=max(512, export.superblock.block_size),
            max_payload=self.limits.max_payload,
            io_uring=self.config.io_uring,
        )

    async def _info(self, event: InfoOption) -> None:
        hs = self.handshake
        found = await self._lookup(event.name)
        if isinstance(found, tuple):
            await self._send(hs.send_error(*found))
            return
        backend: FileBackend | None = None
        if event.go:
            try:
                backend = self._open(found)
            except OSError as exc:
                log.warning("%s: cannot open %s: %s", self.peer, found.path, exc)
                await self._send(hs.send_error(Rep.ERR_UNKNOWN, f"cannot open export: {exc}"))
                return
        parts = [hs.send_info_export(found.size, self._flags())]
        if Info.NAME in event.requests:
            parts.append(hs.send_info_name(found.name))
        if Info.DESCRIPTION in event.requests:
            parts.append(hs.send_info_description(found.description))
        if Info.BLOCK_SIZE in event.requests:
            parts.append(
                hs.send_info_block_size(512, found.superblock.block_size, self.limits.max_payload)
            )
        if event.go:
            self._select(found, backend)
        parts.append(hs.send_ack())
        await self._send(b"".join(parts))

    def _select(self, export: Export, backend: Backend | None) -> None:
        self._export, self._backend = export, backend
        self.stats.export = export.name
        negotiated = self.handshake.negotiated
        if negotiated.meta_export != export.name:
            negotiated.meta_contexts = {}  # contexts were chosen for another export

    async def _meta_context(self, event: MetaContextOption) -> None:
        hs = self.handshake
        found = await self._lookup(event.name)
        if isinstance(found, tuple):
            await self._send(hs.send_error(*found))
            return
        if event.set:
            match = BASE_ALLOCATION in event.queries
        else:
            match = not event.queries or any(q in ("base:", BASE_ALLOCATION) for q in event.queries)
        parts = []
        if match:
            parts.append(
                hs.send_meta_context(CONTEXT_ID if event.set else 0, BASE_ALLOCATION, found.name)
            )
        parts.append(hs.send_ack())
        await self._send(b"".join(parts))

    async def _export_name(self, event: ExportNameOption) -> None:
        found = await self._lookup(event.name)
        if isinstance(found, tuple):
            # The spec allows no error reply here: the session ends.
            self.stats.ended = f"EXPORT_NAME refused: {found[1]}"
            raise ClientGone(found[1])
        try:
            backend = self._open(found)
        except OSError as exc:
            raise ClientGone(f"cannot open {found.path}: {exc}") from exc
        self._select(found, backend)
        await self._send(self.handshake.send_export_name_reply(found.size, self._flags()))

    # -- transmission --------------------------------------------------------------------

    async def _transmit(self) -> None:
        assert self._backend is not None
        self._tx = Transmitter(
            backend=self._backend,
            negotiated=self.handshake.negotiated,
            trailing=self.handshake.trailing_data,
            flags=self._flags(),
            limits=self.limits,
            server_budget=self._server_budget,
            stats=self.stats,
            peer=self.peer,
            verbose=self.config.verbose,
            send=self._send,
            receive=self._receive_requests,
            send_files=isinstance(self.stream, FILE_STREAMS),
        )
        try:
            await self._tx.run()
        finally:
            self._backend.close()
