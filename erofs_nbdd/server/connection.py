"""One client connection: the handshake, then the transmission phase (``transmit.py``).

Policy lives here (which export, which limits, TLS); the protocol machines decide what is
legal. The connection owns what it opens, from the moment it opens it, in one exit stack:
the TLS transport it wraps around the server's after STARTTLS, and the backend GO or
EXPORT_NAME selects, so a reply that cannot be sent (the client gone, a cancelled
handshake, a shutdown) leaks neither.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import trio

from ..config import TLSMode
from ..protocol import (
    BASE_ALLOCATION,
    NEED_DATA,
    AbortOption,
    ClientFlags,
    ExportLimits,
    ExportNameOption,
    Info,
    InfoOption,
    InvalidOption,
    ListOption,
    MetaContextOption,
    Opt,
    OptionEvent,
    Rep,
    ServerHandshake,
    StartTLSOption,
    State,
    StructuredReplyOption,
    TransmissionFlag,
    UnsupportedOption,
)
from ..storage.catalog import Catalog
from ..storage.file import FileBackendFactory
from ..transport.contexts import peer_common_name, peer_subject
from ..transport.sealing import Sealing
from ..transport.starttls import server_tls
from .budget import Pool
from .outcome import ClientGone, LimitExceeded, Refused, Stats
from .transmit import CONTEXT_ID, Transmitter

if TYPE_CHECKING:
    import ssl

    from ..config import ServerConfig
    from ..storage.backend import Backend, BackendFactory
    from ..storage.catalog import Listed
    from ..storage.exports import Export, ExportDirectory
    from ..transport.base import Transport
    from ..transport.keylog import KeyLog
    from .budget import Share

log = logging.getLogger("erofs_nbdd.connection")

RECEIVE_SIZE = 256 * 1024
#: Options about one listed export that do not count against max_options.
LISTED_FREE = 2
BASE_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.READ_ONLY
    | TransmissionFlag.CAN_MULTI_CONN
    | TransmissionFlag.SEND_CACHE
)
#: The minimum block size told to clients that ask for block sizes; enforced only where a
#: GO asked for it (``Negotiated.min_block``). Any other client may read any byte range, as
#: doc/proto.md "Size constraints" says a server SHOULD allow, and as nbdkit, qemu-nbd and
#: nbd-server do: every read path here takes any offset and length.
MIN_BLOCK = 512


class Connection:
    def __init__(
        self,
        transport: Transport,
        peer: str,
        config: ServerConfig,
        exports: Catalog | ExportDirectory,
        ssl_context: ssl.SSLContext | None = None,
        *,
        share: Share | None = None,
        keys: KeyLog | None = None,
        backends: BackendFactory | None = None,
    ) -> None:
        #: The server's transport, then (after STARTTLS) the TLS one this connection owns.
        self.transport = transport
        self.ssl_context = ssl_context
        self._keys = keys
        self.tls = config.tls
        self._client_name: str | None = None
        self.peer = peer
        self.config = config
        self.limits = config.limits
        self.exports = exports if isinstance(exports, Catalog) else Catalog([exports])
        self._backends = backends or FileBackendFactory(io_uring=config.io_uring)
        self.stats = Stats()
        self.handshake = ServerHandshake(max_option_length=config.limits.max_option_length)
        self._handshake_scope = trio.CancelScope()
        self._stopping = False
        self._stack = contextlib.AsyncExitStack()
        self._backend: Backend | None = None
        self._export: Export | None = None
        self._options = 0
        #: After the first LIST: the questions each listed export may still get for free.
        self._listed: dict[str, int] | None = None
        #: This client address's part of the server-wide reply budget.
        self._share = share or Pool(
            config.limits.max_server_buffer, per_client=config.limits.max_client_buffer
        ).join(peer)
        self._tx: Transmitter | None = None
        #: Why the server closed this connection to make room for another, once it has.
        self.evicted: str | None = None
        self._scope = trio.CancelScope()

    @property
    def address(self) -> str:
        """The client's address, as the server counts connections and bytes by it."""
        return self._share.address

    async def _send(self, data: bytes | bytearray) -> None:
        await self.transport.send_all(data)

    async def _receive(self) -> bytes:
        return bytes(await self.transport.receive_some(RECEIVE_SIZE))

    # -- whole life ----------------------------------------------------------------------

    def stop(self) -> None:
        """Server shutdown: end a handshake at once; in transmission, close at the first
        quiet moment, answering every request read until then (the server bounds how
        long). A connection whose ending is already known (a DISC read while it closes
        what it opened) keeps it."""
        if self.stats.ended == "closed":
            self.stats.ended = "server shutdown"
        self._stopping = True
        self._handshake_scope.cancel()
        if self._tx is not None:
            self._tx.stop()

    def evict(self, reason: str) -> None:
        """Close this connection now (the server needs its place): ``run`` raises
        ``LimitExceeded`` with ``reason`` once what it opened is closed."""
        self.evicted = reason
        self._scope.cancel()

    async def run(self) -> None:
        """The whole connection; everything it opened is closed when this returns."""
        with self._scope:
            async with self._stack:
                done = False
                with self._handshake_scope, trio.fail_after(self.limits.handshake_timeout):
                    await self._send(self.handshake.greeting())
                    done = await self._negotiate()
                if done:
                    await self._transmit()
        if self.evicted is not None:
            raise LimitExceeded(f"closed to make room: {self.evicted}")

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
            if not self._listed_free(event):
                self._options += 1
                if self._options > self.limits.max_options:
                    raise LimitExceeded(f"more than {self.limits.max_options} options before GO")
            await self._answer(event)
        if hs.state is State.CLOSED:
            self.stats.ended = "abort"
            return False
        return True

    def _listed_free(self, event: OptionEvent) -> bool:
        """Whether ``event`` is one of the two questions about an export this connection's
        first LIST named that cost no option (``nbdinfo --list`` asks INFO and
        LIST_META_CONTEXT of each). Later LISTs add nothing: the budget only goes down, so
        a connection gets at most max_options + 2 per export answered."""
        if self._listed is None or not isinstance(event, InfoOption | MetaContextOption):
            return False
        left = self._listed.get(event.name, 0)
        if left <= 0:
            return False
        self._listed[event.name] = left - 1
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
            exports = [e for e in await self.exports.listing() if self._refusal(e) is None]
            if self._listed is None:
                self._listed = {e.name: LISTED_FREE for e in exports}
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

    async def _lookup(self, name: str) -> Export | tuple[Rep, str]:
        """The export a name selects, or the error reply that refuses it."""
        found = await self.exports.lookup(name)
        if isinstance(found, str):
            return Rep.ERR_UNKNOWN, found
        return self._refusal(found) or found

    def _refusal(self, export: Export | Listed) -> tuple[Rep, str] | None:
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
        sealing = Sealing(self._keys) if self._keys is not None else None
        tls = server_tls(self.transport, self.ssl_context, sealing)
        self._stack.push_async_callback(tls.aclose)
        self.transport = tls
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise Refused(f"TLS handshake failed: {exc.__cause__ or exc}") from exc
        cert = tls.peer_certificate()
        self._client_name = peer_common_name(cert)
        self.stats.tls = tls.describe()
        self.stats.client = peer_subject(cert) or "-"

    def _flags(self) -> int:
        flags = BASE_FLAGS
        if self.handshake.negotiated.structured_replies:
            flags |= TransmissionFlag.SEND_DF  # a READ is always one chunk here
        return int(flags)

    def _open(self, export: Export) -> Backend:
        """The export's backend, owned by this connection from here on."""
        backend = self._backends(export)
        self._stack.callback(backend.close)
        return backend

    async def _info(self, event: InfoOption) -> None:
        hs = self.handshake
        found = await self._lookup(event.name)
        if isinstance(found, tuple):
            await self._send(hs.send_error(*found))
            return
        size = found.size
        if event.go:
            try:
                backend = self._open(found)
            except OSError as exc:
                log.warning("%s: cannot open %s: %s", self.peer, found.path or found.name, exc)
                await self._send(hs.send_error(Rep.ERR_UNKNOWN, f"cannot open export: {exc}"))
                return
            size = self._select(found, backend)
        parts = [hs.send_info_export(size, self._flags())]
        if Info.NAME in event.requests:
            parts.append(hs.send_info_name(found.name))
        if Info.DESCRIPTION in event.requests:
            parts.append(hs.send_info_description(found.description))
        if Info.BLOCK_SIZE in event.requests:
            parts.append(
                hs.send_info_block_size(
                    MIN_BLOCK, found.superblock.block_size, self.limits.max_payload
                )
            )
        parts.append(hs.send_ack())
        await self._send(b"".join(parts))

    def _select(self, export: Export, backend: Backend) -> int:
        """Serve ``export`` from ``backend``; its size as the backend sees it."""
        self._export, self._backend = export, backend
        self.stats.export = export.name
        negotiated = self.handshake.negotiated
        if negotiated.meta_export != export.name:
            negotiated.meta_contexts = {}  # contexts were chosen for another export
        return backend.get_size()

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
            raise ClientGone(f"cannot open {found.path or found.name}: {exc}") from exc
        size = self._select(found, backend)
        await self._send(self.handshake.send_export_name_reply(size, self._flags()))

    # -- transmission --------------------------------------------------------------------

    async def _transmit(self) -> None:
        assert self._backend is not None
        export = ExportLimits(
            size=self._backend.get_size(),
            flags=self._flags(),
            min_block=self.handshake.negotiated.min_block,
            max_payload=self.limits.max_payload,
        )
        self._tx = Transmitter(
            transport=self.transport,
            backend=self._backend,
            tx=self.handshake.transmission(export),
            limits=self.limits,
            share=self._share,
            stats=self.stats,
            peer=self.peer,
            verbose=self.config.verbose,
        )
        if self._stopping:  # the shutdown came as the handshake ended
            self._tx.stop()
        await self._tx.run()
