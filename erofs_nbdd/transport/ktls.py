"""Kernel TLS: after the handshake the kernel encrypts what the server writes to the socket.

OpenSSL (3.0 here, built with kTLS) hands the session keys to the kernel when the context has
``SSL_OP_ENABLE_KTLS`` and the socket is its own (not a memory BIO). From then on a plain
``os.write`` on the socket sends a TLS record, and ``os.sendfile`` sends image bytes from the
page cache encrypted by the kernel: no copy through this process and no encryption under the
GIL, the same zero-copy path as plaintext. Receiving stays in OpenSSL (requests are small).

The kernel needs the ``tls`` module (CONFIG_TLS); without it the server keeps TLS on a memory
BIO (``tls.py``), and where the kernel refuses the cipher, OpenSSL encrypts on the same
socket: only speed differs. The server
context sends no session tickets and never starts a key update (see ``contexts.py``): the kernel
would have to carry them as control records.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import handshakes
from .base import SecureTransport
from .lock import FastLock
from .slices import data_slices, file_slices
from .tls import TLSSession

if TYPE_CHECKING:
    from ..ranges import FileRange
    from .base import Transport

#: ``SSL_OP_ENABLE_KTLS`` (``ssl.OP_ENABLE_KTLS`` from Python 3.12 on).
OP_ENABLE_KTLS = 1 << 3
SOL_TLS = 282
TLS_TX = 1
#: ``struct tls_crypto_info`` (version, cipher): the one size every cipher answers to.
_CRYPTO_INFO_SIZE = 4
_TCP_NOTSENT_LOWAT = 25
ULP_LIST = Path("/proc/sys/net/ipv4/tcp_available_ulp")


def available() -> bool:
    """Whether this kernel can take TLS sessions now (the ``tls`` module is loaded)."""
    try:
        return "tls" in ULP_LIST.read_text().split()
    except OSError:
        return False


def enable(context: ssl.SSLContext) -> None:
    context.options |= OP_ENABLE_KTLS


def enabled(context: ssl.SSLContext) -> bool:
    return bool(context.options & OP_ENABLE_KTLS)


def sending(sock: socket.socket) -> bool:
    """Whether the kernel encrypts what is written to ``sock`` (its TLS_TX keys are set)."""
    try:
        sock.getsockopt(SOL_TLS, TLS_TX, _CRYPTO_INFO_SIZE)
    except OSError:
        return False
    return True


class KernelTLSTransport(TLSSession, SecureTransport):
    """TLS on a socket OpenSSL drives itself, so it can hand the keys to the kernel.

    With the kernel encrypting, sends go straight through the plaintext transport below
    (``send_all``, ``send_file``: sendfile from the page cache), with its policy; that
    transport must write its socket itself (``raw_socket``). Otherwise
    they go through ``SSL_write`` on the same socket, bounded by the same reply timeout.
    Receives always go through OpenSSL, on a duplicate of the descriptor, which this
    transport owns; closing it closes ``inner`` too.
    """

    def __init__(self, inner: Transport, context: ssl.SSLContext) -> None:
        sock = inner.raw_socket()
        if sock is None:
            raise ValueError("kernel TLS needs a transport that writes its socket itself")
        self.inner = inner
        self.policy = inner.policy
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        dup.setblocking(False)
        try:
            self._session: ssl.SSLSocket = context.wrap_socket(
                dup, server_side=True, do_handshake_on_connect=False
            )
        except BaseException:
            dup.close()
            raise
        self._fd = self._session.fileno()
        #: Whether the kernel encrypts our records (known after the handshake).
        self.kernel = False
        self._send_lock = FastLock()
        self._receive_guard = FastLock()

    def describe(self) -> str:
        return super().describe() + ("+ktls" if self.kernel else "")

    async def do_handshake(self) -> None:
        """Each step in a worker thread (``handshakes.py``), on the non-blocking socket;
        waiting for it to turn readable or writable is done here, first for the
        ClientHello (a step before it would only ask for it)."""
        await trio.lowlevel.wait_readable(self._fd)
        while True:
            try:
                await handshakes.step(self._session.do_handshake)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self._fd)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self._fd)
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            else:
                break
        self.kernel = sending(self._session)
        if self.kernel:
            # Kernel TLS (6.1) leaves the records of a sendfile cut short by EAGAIN corked in
            # TCP, waiting for more, and waits for room without pushing them (plain TCP
            # pushes first). trio's limit on unsent bytes (TCP_NOTSENT_LOWAT, 16 KiB) is then
            # never met, the socket never turns writable, and the reply stalls. Without the
            # limit, writable means room in the send buffer, as for any socket.
            self._session.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, 2**31 - 1)

    def _check_open(self) -> None:
        if self._fd < 0:
            raise trio.ClosedResourceError("the connection is closed")

    def _recv(self, limit: int) -> bytes:
        """What OpenSSL has decrypted, with every record already in without another
        syscall; ``ssl.SSLWantReadError`` if nothing is there."""
        try:
            data = self._session.recv(limit)
            while (more := self._session.pending()) and len(data) < limit:
                data += self._session.recv(min(more, limit - len(data)))
            return data
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # EOF, with close_notify or not
            return b""
        except ssl.SSLWantReadError:
            raise
        except (ssl.SSLError, OSError) as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    def receive_nowait(self, max_bytes: int, *, spin: bool = False) -> bytes | None:
        self._check_open()
        if self._receive_guard.locked():
            return None
        end = time.perf_counter() + (self.policy.busy_poll if spin else 0.0)
        while True:
            try:
                return self._recv(max_bytes)
            except ssl.SSLWantReadError:
                if time.perf_counter() >= end:
                    return None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check_open()
        limit = max_bytes or 65536
        async with self._receive_guard:
            while True:
                try:
                    return self._recv(limit)
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(self._fd)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        if self.kernel:
            await self.inner.send_all(data)
            return
        async with self._send_lock:
            for piece in data_slices(data):
                await self._write(piece)

    async def send_file(self, head: bytes | bytearray, file: FileRange) -> None:
        """As the plain transport's ``send_file``: by the kernel from the page cache when it
        encrypts, else read here a slice at a time and sent through OpenSSL."""
        self._check_open()
        if self.kernel:
            await self.inner.send_file(head, file)
            return
        async with self._send_lock:
            for piece in file_slices(head, file):
                await self._write(piece)

    async def _write(self, piece: memoryview) -> None:
        sent = 0
        while sent < len(piece):
            try:
                sent += self._session.send(piece[sent:])
            except ssl.SSLWantWriteError:
                # the retry passes the same bytes, as OpenSSL requires
                await trio.lowlevel.wait_writable(self._fd)
            except (ssl.SSLError, OSError) as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """close_notify if the socket takes it at once, then close both descriptors."""
        if self._fd >= 0:  # a second aclose finds it closed
            self._fd = -1
            with contextlib.suppress(ssl.SSLError, OSError):
                self._session.unwrap()  # sends close_notify; the peer's is not awaited
            self._session.close()
        await self.inner.aclose()
