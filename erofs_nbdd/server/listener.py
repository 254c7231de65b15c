"""The listening side: accept loops, the connection limit, logging, graceful shutdown."""

from __future__ import annotations

import gc
import logging
import os
import resource
import select
import time
from typing import TYPE_CHECKING

import trio

from ..config import TLSMode
from ..memory import release_free_memory
from ..protocol import ProtocolError
from ..storage import uring
from ..storage.file import FileBackendFactory
from ..storage.sources import build_catalog
from ..transport import ktls
from ..transport.base import Policy
from ..transport.contexts import server_context
from ..transport.keylog import KeyLog
from ..transport.listen import bind, close_all, describe, parse_listen
from ..transport.plain import PlainTransport
from .balance import DEFER, POLL
from .budget import Pool
from .connection import Connection
from .outcome import ClientGone, ImageFailed, LimitExceeded, Refused

if TYPE_CHECKING:
    import socket

    from ..config import ServerConfig
    from ..storage.backend import BackendFactory
    from .balance import Seat
    from .outcome import Stats

log = logging.getLogger("erofs_nbdd.server")

#: Once replies held at least this much at once and all of it is back, freed buffers are
#: returned to the system (checked every RELEASE_EVERY seconds), so the resident size
#: follows what is held, not its peak.
TRIM_AFTER = 16 * 1024 * 1024
RELEASE_EVERY = 2.0


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """(host, host:port) of the client; unix-socket clients are all "unix"."""
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?", "?"
    if isinstance(name, str) or not name:
        return "unix", "unix"
    host, port = name[0], name[1]
    return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listen(listen: tuple[str, ...]) -> list[socket.socket]:
    """Every --listen address, bound and listening; all or nothing."""
    socks: list[socket.socket] = []
    try:
        for text in listen:
            socks += bind(parse_listen(text))
    except BaseException:
        close_all(socks)
        raise
    return socks


def _pending(sock: socket.socket) -> bool:
    """Whether a connection still waits on ``sock`` (another worker may have taken it)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def raise_file_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards the hard one: each connection is a descriptor,
    and the usual soft limit of 1024 is below the default connection limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class Server:
    """One server: its listeners, its connections, and how it stops."""

    def __init__(
        self,
        config: ServerConfig,
        seat: Seat | None = None,
        *,
        backends: BackendFactory | None = None,
    ) -> None:
        self.config = config
        #: Opens each connection's backend (the image files, unless told otherwise).
        self._backends = backends or FileBackendFactory(io_uring=config.io_uring)
        limits = config.limits
        self._policy = Policy(busy_poll=config.busy_poll_us / 1e6)
        #: With --workers, this worker's place on the shared load board.
        self._seat = seat
        #: Connections accepted and not yet closed (refused ones too, while refusing).
        self._held = 0
        self.exports = build_catalog(config)
        self.connections: set[Connection] = set()
        #: Each client address's connections and reply bytes.
        self.pool = Pool(limits.max_server_buffer, per_client=limits.max_client_buffer)
        config.tls.check()
        self.ssl_context = None
        #: This process's TLS secrets, when it seals TLS 1.3 records itself (records.py).
        self.keys: KeyLog | None = None
        if config.tls.mode is not TLSMode.OFF:
            assert config.tls.cert_dir is not None
            self.ssl_context = server_context(
                config.tls.cert_dir, verify_peer=config.tls.verify_peer
            )
            if config.tls.kernel and ktls.available():
                ktls.enable(self.ssl_context)
            elif config.tls.seal:
                try:
                    self.keys = KeyLog(self.ssl_context)
                except OSError as exc:
                    log.warning("TLS records will be sealed by OpenSSL: %s", exc)
        self._accepting = trio.CancelScope()
        self._grace = trio.CancelScope()
        self._next_id = 0

    async def run(
        self,
        sockets: list[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until ``shutdown`` (or cancellation) on ``sockets`` (bound by the caller,
        as worker processes share them) or on the configured addresses; ``started`` gets
        the addresses."""
        config = self.config
        found = await self.exports.files()
        if self.exports.directories:
            log.info(
                "serving %d export(s) from %s: %s",
                len(found),
                ", ".join(str(d.root) for d in self.exports.directories),
                ", ".join(found) or "-",
            )
        for registry in self.exports.registries:
            log.info("serving the EROFS images of %s (cache %s)", registry, registry.cache.root)
        default = config.default_export
        if default is not None and default not in found and not self.exports.registries:
            log.warning("--default-export %r names no export (yet)", default)
        if sockets is None:
            sockets = bind_listen(config.listen)
        addresses = [describe(s) for s in sockets]
        log.info("listening on %s (pid %d)", ", ".join(addresses), os.getpid())
        self._log_tls()
        self._log_reads()
        # per connection: its socket, its image, and with kernel TLS a duplicate socket
        per = 3 if self.ssl_context is not None and ktls.enabled(self.ssl_context) else 2
        wanted = per * config.limits.max_connections + 64
        files = raise_file_limit(wanted)
        if files < wanted:
            log.warning(
                "only %d file descriptors (ulimit -n); --max-connections %d may not be reached",
                files,
                config.limits.max_connections,
            )
        with self._grace:
            async with trio.open_nursery() as connections:
                with self._accepting:
                    async with trio.open_nursery() as acceptors:
                        for sock in sockets:
                            acceptors.start_soon(self._accept, sock, connections)
                        acceptors.start_soon(self._release_memory)
                        task_status.started(addresses)
                if self.connections:
                    log.info("stopped accepting; %d connection(s) finishing", len(self.connections))
        with trio.CancelScope(shield=True):
            await self.exports.aclose()
        log.info("server stopped")

    def _log_tls(self) -> None:
        if self.ssl_context is None:
            return
        if ktls.enabled(self.ssl_context):
            log.info("kernel TLS: the kernel encrypts replies; large reads go out by sendfile")
        elif self.config.tls.kernel:
            log.info(
                "kernel TLS unavailable (no tls module: `modprobe tls` as root, or a kernel "
                "without CONFIG_TLS): replies are encrypted in this process"
            )
        if not ktls.enabled(self.ssl_context):
            by = "erofs-nbdd" if self.keys else "OpenSSL"
            if not self.config.tls.seal:
                by += " (--tls-seal openssl)"
            log.info("TLS 1.3 records of replies are sealed by %s", by)

    def _log_reads(self) -> None:
        if not self.config.io_uring:
            log.info("reads that miss the page cache go to threads (--io-uring off)")
        elif (refused := uring.refusal()) is not None:
            log.info(
                "io_uring unavailable (%s): reads that miss the page cache use threads", refused
            )
        else:
            log.info("reads that miss the page cache go through io_uring")

    async def _release_memory(self) -> None:
        """After a burst, give the memory of its buffers back once they are all free.
        A full collection comes first: a connection torn down with replies in flight
        leaves its tasks' frames, which hold reply buffers, in reference cycles (trio
        delivers the cancellation from inside the nursery's exit, and the tracebacks
        keep that frame), and those reach the oldest generation before they are found.
        The command line freezes startup objects out of it, so it takes a few ms."""
        while True:
            await trio.sleep(RELEASE_EVERY)
            if self.pool.drained(TRIM_AFTER):
                gc.collect()
                release_free_memory()

    async def _accept(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        """Take connections from one listening socket until cancelled, then close it.
        trio's listener retries what concerns one connection only (a client that gave up,
        a firewall's EPERM); anything else (EMFILE and friends) backs off here."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        try:
            while True:
                await trio.lowlevel.wait_readable(sock)
                if not await self._turn(sock):
                    continue  # another worker took it
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                self._count(+1)
                nursery.start_soon(self._handle_accepted, stream)
        finally:
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _turn(self, sock: socket.socket) -> bool:
        """Whether this process should take the pending connection: at once unless another
        worker holds fewer connections; else once DEFER passed, if it is still there."""
        if self._seat is None:
            return True
        deadline = trio.current_time() + DEFER
        while not self._seat.least_loaded() and trio.current_time() < deadline:
            await trio.sleep(POLL)
            if not _pending(sock):
                return False
        return _pending(sock)

    def _count(self, change: int) -> None:
        self._held += change
        if self._seat is not None:
            self._seat.hold(self._held)

    async def _handle_accepted(self, stream: trio.SocketStream) -> None:
        try:
            await self.handle(stream)
        finally:
            self._count(-1)

    async def handle(self, stream: trio.SocketStream) -> None:
        self._next_id += 1
        host, name = _peer(stream)
        peer = f"#{self._next_id} {name}"
        refusal = self._admit(host)
        if refusal is not None:
            log.warning("%s: refused: %s", peer, refusal)
            await trio.aclose_forcefully(stream)
            return
        share = self.pool.join(host)
        transport = PlainTransport(stream, self._policy)
        conn = Connection(
            transport,
            peer,
            self.config,
            self.exports,
            self.ssl_context,
            share=share,
            keys=self.keys,
            backends=self._backends,
        )
        self.connections.add(conn)
        start = time.monotonic()
        level = logging.WARNING  # a connection that ended badly is worth a warning
        try:
            await conn.run()
            level = logging.INFO
        except trio.Cancelled:
            conn.stats.ended = "server shutdown (grace period over)"
            raise
        except Exception as exc:  # one client's bug must never take the server down
            ended = _ended(conn.stats, exc)
            if ended is None:
                log.exception("%s: internal error", peer)
                conn.stats.ended = f"internal error: {exc!r}"
            else:
                level = ended
        finally:
            self.connections.discard(conn)
            self.pool.leave(share)
            with trio.CancelScope(shield=True):
                try:
                    await transport.aclose()  # the connection closed what it wrapped
                except Exception:  # nor may a failure to close
                    log.exception("%s: closing the connection failed", peer)
                    await trio.aclose_forcefully(stream)
            s = conn.stats
            log.log(
                level,
                "%s export=%s requests=%d bytes_read=%d errors=%d duration=%.3fs tls=%s "
                "client=%s ended=%s",
                *(peer, s.export, s.requests, s.bytes_read, s.errors),
                *(time.monotonic() - start, s.tls, s.client, s.ended),
            )

    def _admit(self, host: str) -> str | None:
        """Why a new connection from ``host`` is refused, or None. A full table makes
        room when one address holds more connections than the newcomer's (plus one): its
        connection that has served the fewest requests is closed, so no address can lock
        the others out by holding connections open."""
        limits = self.config.limits
        mine = self.pool.connections(host)
        if limits.max_connections_per_client and mine >= limits.max_connections_per_client:
            return f"{mine} connections from {host} already (limit)"
        if len(self.connections) < limits.max_connections:
            return None
        busiest = self.pool.busiest()
        if busiest is None or busiest.address == host or busiest.connections <= mine + 1:
            return f"{len(self.connections)} connections already (limit)"
        candidates = [c for c in self.connections if c.address == busiest.address and not c.evicted]
        if not candidates:
            return f"{len(self.connections)} connections already (limit)"
        victim = min(candidates, key=lambda c: c.stats.requests)
        victim.evict(
            f"the server is full ({limits.max_connections} connections) and {host} has "
            f"{mine}, {busiest.address} {busiest.connections}: its least busy one gives way"
        )
        return None

    def shutdown(self) -> None:
        """Stop accepting (a server started on the same port takes the new connections);
        each connection closes at its first quiet moment, within the grace period."""
        self._accepting.cancel()
        for conn in list(self.connections):
            conn.stop()
        self._grace.deadline = trio.current_time() + self.config.limits.shutdown_grace


async def serve(
    config: ServerConfig,
    *,
    backends: BackendFactory | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a ``Server`` for ``config`` until cancelled."""
    await Server(config, backends=backends).run(task_status=task_status)


def _ended(stats: Stats, exc: Exception) -> int | None:
    """Record how a connection ended by ``exc``; the log level that deserves, or None for
    an internal error."""
    if isinstance(exc, LimitExceeded):
        stats.ended = f"limit: {exc}"
    elif isinstance(exc, trio.TooSlowError):
        stats.ended = "handshake timeout (limit)"
    elif isinstance(exc, Refused):
        stats.ended = f"refused: {exc}"
    elif isinstance(exc, ImageFailed):
        stats.ended = f"image failed mid-reply: {exc}"
    elif isinstance(exc, ProtocolError):
        stats.ended = f"protocol error: {exc}"
    elif isinstance(exc, ClientGone | trio.BrokenResourceError | trio.ClosedResourceError):
        if stats.ended == "closed":
            stats.ended = str(exc) if isinstance(exc, ClientGone) else f"connection lost: {exc}"
        return logging.INFO
    else:
        return None
    return logging.WARNING
