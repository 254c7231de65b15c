"""Connections to an export, made ready for the kernel: reach the server, negotiate
(never structured replies: the kernel understands only simple ones), check the EROFS
superblock and compute the image's identity. Attach and the supervisor both use these."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from erofs_nbdd.erofs import NotErofs, parse_superblock
from erofs_nbdd.protocol import ProtocolError, Rep, TransmissionFlag
from erofs_nbdd.transport.contexts import TLSSetupError, client_context

from .errors import AttachError, ExitStatus
from .negotiate import ExportDetails, NegotiationError, RequestError, Session, negotiate

if TYPE_CHECKING:
    import socket
    import ssl
    from collections.abc import Iterator

    from .target import Target

log = logging.getLogger("erofs_nbd_client")

PROBE_BYTES = 4096  # enough for the EROFS superblock at byte 1024

#: Reconnects, the supervisor's and the relays': the first attempt at once, then after
#: FIRST_BACKOFF, doubling up to MAX_BACKOFF, each drawn from half to all of that so that
#: the clients of a restarted server do not all come back in step. A server back after D
#: seconds is found within about D + 1 s.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 1.0
#: Seconds one reconnect may spend per connection (reach, negotiate, check the image):
#: a server that accepts and never answers, or an address that drops packets, costs this
#: long, not the minutes attach allows, before the next in the list is tried.
ATTEMPT_TIMEOUT = 5.0
#: What a reconnect attempt may meet and survive: it is logged and the next one tried.
RECONNECT_ERRORS = (
    AttachError,
    OSError,
    ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


class Notes:
    """Why each target was passed over, logged once until the reason changes: a server
    away for hours must not fill a log that lives in /run (tmpfs)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._said: dict[Target, str] = {}

    def note(self, target: Target, what: str, level: int = logging.WARNING) -> bool:
        """Log ``what`` of ``target`` unless it was the last thing said of it; whether
        it was logged."""
        if self._said.get(target) == what:
            return False
        self._said[target] = what
        self._log.log(level, "%s: %s", target.describe(), what)
        return True

    def forget(self, target: Target) -> None:
        """``target`` answered: its next failure is news again."""
        self._said.pop(target, None)


def backoff() -> Iterator[float]:
    """The pauses between reconnect attempts (FIRST_BACKOFF, MAX_BACKOFF)."""
    delay = FIRST_BACKOFF
    while True:
        yield delay * random.uniform(0.5, 1.0)
        delay = min(delay * 2, MAX_BACKOFF)


@dataclass
class Connection:
    details: ExportDetails
    session: Session


def tls_context(target: Target) -> ssl.SSLContext | None:
    if not target.tls:
        return None
    try:
        return client_context(target.cert_dir)
    except TLSSetupError as exc:
        raise AttachError(ExitStatus.TLS_FAILED, str(exc)) from exc


async def _open_stream(target: Target) -> trio.SocketStream:
    try:
        with trio.fail_after(30):
            if target.unix_path is not None:
                return await trio.open_unix_socket(target.unix_path)
            assert target.host is not None
            return await trio.open_tcp_stream(target.host, target.port)
    except (OSError, trio.TooSlowError) as exc:
        raise AttachError(
            ExitStatus.UNREACHABLE,
            f"cannot connect to {target.describe()}: {exc or 'timed out'}; "
            "is the server running and the address right?",
        ) from exc


async def open_connections(
    target: Target, count: int, context: ssl.SSLContext | None
) -> list[Connection]:
    """``count`` negotiated connections (one if the server does not allow more), never with
    structured replies: the kernel understands only simple ones."""
    out: list[Connection] = []
    try:
        while len(out) < count:
            stream = await _open_stream(target)
            try:
                with trio.fail_after(60):
                    details, session = await negotiate(
                        stream, target.export, tls=context, server_hostname=target.host
                    )
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            out.append(Connection(details, session))
            first = out[0].details
            if (details.size, details.flags) != (first.size, first.flags):
                raise AttachError(
                    ExitStatus.PROTOCOL_ERROR,
                    "connections to the same export disagree on its size or flags",
                )
            if count > 1 and not first.flags & TransmissionFlag.CAN_MULTI_CONN:
                log.warning("the server does not allow several connections; using one")
                count = 1
    except BaseException as exc:
        for conn in out:
            await trio.aclose_forcefully(conn.session.stream)
        if isinstance(exc, NegotiationError):
            raise _classify(exc, target) from exc
        if isinstance(exc, trio.TooSlowError):
            raise AttachError(ExitStatus.UNREACHABLE, "the server did not answer in 60 s") from exc
        if isinstance(exc, ProtocolError):
            raise AttachError(
                ExitStatus.PROTOCOL_ERROR, f"the server broke the NBD protocol: {exc}"
            ) from exc
        raise
    return out


def _classify(exc: NegotiationError, target: Target) -> AttachError:
    text = str(exc)
    if exc.rep in (Rep.ERR_UNKNOWN,) or "no export" in text:
        return AttachError(
            ExitStatus.EXPORT_MISSING,
            f"{target.describe()}: {text}; list the exports with: nbdinfo --list "
            f"{target.describe().rsplit('/', 1)[0]}/",
        )
    if exc.rep == Rep.ERR_POLICY and "TLS" not in text:
        return AttachError(ExitStatus.EXPORT_MISSING, f"the server refused the export: {text}")
    if exc.rep == Rep.ERR_TLS_REQD:
        return AttachError(
            ExitStatus.TLS_FAILED,
            f"the server requires TLS: use nbds:// or --tls-certificates DIR ({text})",
        )
    if "TLS" in text or "certificate" in text:
        return AttachError(ExitStatus.TLS_FAILED, text)
    return AttachError(ExitStatus.PROTOCOL_ERROR, text)


async def check_erofs(conn: Connection) -> str:
    """Check the superblock over NBD; return the image's identity: a digest of size, flags
    and the first 4 KiB (the superblock holds a random UUID, build time and checksum)."""
    size = conn.details.size
    length = min(PROBE_BYTES, size // 512 * 512)
    try:
        with trio.fail_after(30):
            head = await conn.session.pread(0, length) if length else b""
        parse_superblock(head, size)
        return hashlib.sha256(f"{size}:{conn.details.flags}:".encode() + head).hexdigest()
    except NotErofs as exc:
        raise AttachError(
            ExitStatus.NOT_EROFS, f"export {conn.details.name!r} is not an EROFS image: {exc}"
        ) from exc
    except (RequestError, ProtocolError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        raise AttachError(ExitStatus.PROTOCOL_ERROR, f"cannot read the export: {exc}") from exc


async def differs(conn: Connection, identity: str) -> str | None:
    """Why ``conn`` does not serve the image whose identity (``check_erofs``) is
    ``identity``, or None if it does. AttachError if it cannot tell: a failed read is no
    proof of another image (the server may be starting), so the caller tries again later."""
    try:
        found = await check_erofs(conn)
    except AttachError as exc:
        if exc.status is not ExitStatus.NOT_EROFS:
            raise
        return "it is not an EROFS image"
    if found != identity:
        return "a different image (size, flags or superblock changed)"
    return None


def kernel_block_size(details: ExportDetails) -> int:
    """The server's preferred block size as a power of two in 512..page size."""
    page = os.sysconf("SC_PAGE_SIZE")
    minimum, preferred = (details.block_size or (512, 4096, 0))[:2]
    size = 512
    while size < max(preferred, minimum) and size < page:
        size *= 2
    return size


def socket_of(stream: trio.abc.Stream) -> socket.socket:
    assert isinstance(stream, trio.SocketStream)
    return stream.socket  # type: ignore[return-value]
