"""An NBD client over TLS built on the standard library alone, for tests that need the
server's records to meet OpenSSL as any client's would, and a way to make it send a TLS 1.3
KeyUpdate, which Python's ssl module does not offer."""

from __future__ import annotations

import ctypes
import socket
import ssl
import struct
import time
from pathlib import Path

#: TLS handshake message type of KeyUpdate (RFC 8446, 4.6.3).
KEY_UPDATE = 24


class StdlibTLSClient:
    """A minimal NBD client on the standard library: fixed newstyle, STARTTLS, GO, simple
    replies; nothing of ours, so the server's records meet OpenSSL as any client's would."""

    REQUEST = struct.Struct(">IHHQQI")
    REPLY = struct.Struct(">IIQ")

    def __init__(
        self,
        address: str,
        cert_dir: Path,
        export: str,
        version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
    ) -> None:
        host, _, port = address.rpartition(":")
        raw = socket.create_connection((host, int(port)), timeout=30)
        greeting = self._exact(raw, 18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        raw.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        self._option(raw, 5, b"")  # STARTTLS
        ctx = ssl.create_default_context(cafile=str(cert_dir / "ca-cert.pem"))
        ctx.load_cert_chain(cert_dir / "client-cert.pem", cert_dir / "client-key.pem")
        ctx.maximum_version = version
        self._received: list[int] = []
        self._sent: list[int] = []
        ctx._msg_callback = self._saw  # type: ignore[attr-defined]  # the hook ssl offers
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self._handshake_done = True
        assert self.sock.version() == version.name.replace("v1_", "v1.")
        name = export.encode()
        self._option(self.sock, 7, struct.pack(">I", len(name)) + name + b"\0\0")  # GO

    _handshake_done = False

    def _saw(
        self, _conn: object, direction: str, _version: object, kind: int, message: int, _data: bytes
    ) -> None:
        if self._handshake_done and kind == 22:  # handshake
            (self._received if direction == "read" else self._sent).append(int(message))

    def __enter__(self) -> StdlibTLSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    @staticmethod
    def _exact(sock: socket.socket, n: int, chunk: int = 1 << 20, pause: float = 0) -> bytes:
        out = bytearray()
        while len(out) < n:
            got = sock.recv(min(chunk, n - len(out)))
            assert got, f"the server closed after {len(out)} of {n} bytes"
            out += got
            if pause:
                time.sleep(pause)
        return bytes(out)

    def _option(self, sock: socket.socket, opt: int, data: bytes) -> None:
        sock.sendall(b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data)
        for _ in range(32):  # GO may send a few INFO replies before its ACK
            magic, got_opt, rep, length = struct.unpack(">QIII", self._exact(sock, 20))
            assert magic == 0x3E889045565A9 and got_opt == opt
            self._exact(sock, length)
            if rep == 1:  # ACK
                return
            assert rep == 3, f"option {opt} refused: reply type {rep:#x}"  # INFO
        raise AssertionError("no ACK")

    def send_read(self, cookie: int, offset: int, length: int) -> None:
        self.sock.sendall(self.REQUEST.pack(0x25609513, 0, 0, cookie, offset, length))

    def read_reply(self, reads: dict[int, tuple[int, int]], slow: bool) -> tuple[int, bytes]:
        magic, error, cookie = self.REPLY.unpack(self._exact(self.sock, 16))
        assert magic == 0x67446698 and error == 0, (magic, error)
        length = reads[cookie][1]
        # slow: 64 KiB at a time with pauses, so the server's socket fills up behind us
        return cookie, self._exact(self.sock, length, 65536, 0.002 if slow else 0)

    def disconnect(self) -> None:
        self.sock.sendall(self.REQUEST.pack(0x25609513, 0, 2, 0, 0, 0))

    def received_handshake(self) -> list[int]:
        """Types of the handshake messages received since the handshake ended."""
        return list(self._received)

    def sent_handshake(self) -> list[int]:
        """Types of the handshake messages sent since the handshake ended."""
        return list(self._sent)

    def key_update(self, *, request_peer: bool) -> None:
        """Send a KeyUpdate (with the next record) and switch to the new send key; with
        ``request_peer`` the server must answer with a KeyUpdate of its own."""
        if _LIBSSL.SSL_key_update(_ssl_pointer(self.sock), int(request_peer)) != 1:
            raise AssertionError("SSL_key_update refused")


def renegotiation_is_refused(client: StdlibTLSClient, image: bytes) -> bool:
    """A TLS 1.2 client asks to renegotiate (the ClientHello goes with its next request):
    whether the server's answer is OpenSSL's no_renegotiation. A read before it must work."""
    client.send_read(1, 0, 4096)
    assert client.read_reply({1: (0, 4096)}, slow=False)[1] == image[:4096]
    if _LIBSSL.SSL_renegotiate(_ssl_pointer(client.sock)) != 1:
        raise AssertionError("SSL_renegotiate refused")
    try:
        client.send_read(2, 0, 4096)
        client.read_reply({2: (0, 4096)}, slow=False)
    except ssl.SSLError as exc:
        return "NO_RENEGOTIATION" in str(exc)
    return False


def _libssl() -> ctypes.CDLL:
    lib = ctypes.CDLL("libssl.so.3")  # the library the ssl module is linked with, shared
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_key_update.restype = ctypes.c_int
    lib.SSL_renegotiate.argtypes = [ctypes.c_void_p]
    lib.SSL_renegotiate.restype = ctypes.c_int
    return lib


_LIBSSL = _libssl()


def _ssl_pointer(sock: ssl.SSLSocket) -> int:
    """The ``SSL *`` under an SSLSocket. CPython's ``PySSLSocket`` starts with the object
    header (two words), then the socket's weak reference, the ``SSL *`` and the context;
    the context word is checked against the object Python reports, so a layout that
    differs fails the test here instead of handing OpenSSL a wrong pointer."""
    word = ctypes.sizeof(ctypes.c_void_p)
    sslobj = sock._sslobj  # type: ignore[attr-defined]
    context = ctypes.c_void_p.from_address(id(sslobj) + 4 * word).value
    if context != id(sslobj.context):
        raise AssertionError("unknown PySSLSocket layout in this Python")
    pointer = ctypes.c_void_p.from_address(id(sslobj) + 3 * word).value
    assert pointer is not None
    return pointer


def reads_across_key_updates(client: StdlibTLSClient, image: bytes) -> dict[bool, bool]:
    """Reads of 4 KiB and 1 MiB, checked byte for byte, before a KeyUpdate and after each
    kind (the client's new key alone, then one that asks the server to update too). For each
    kind, whether the server answered with a KeyUpdate of its own."""
    cookie = 0

    def read_some() -> None:
        nonlocal cookie
        for offset, length in ((4096, 4096), (8192, 1 << 20)):
            cookie += 1
            client.send_read(cookie, offset, length)
            got, data = client.read_reply({cookie: (offset, length)}, slow=False)
            assert got == cookie and data == image[offset : offset + length], (offset, length)

    answered = {}
    read_some()
    for request_peer in (False, True):
        before = client.received_handshake().count(KEY_UPDATE)
        client.key_update(request_peer=request_peer)
        read_some()  # the KeyUpdate goes out ahead of these requests
        assert client.sent_handshake().count(KEY_UPDATE) == 1 + request_peer
        answered[request_peer] = client.received_handshake().count(KEY_UPDATE) > before
    client.disconnect()
    return answered
