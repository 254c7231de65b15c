"""TLS 1.3 records of what the server sends, sealed here instead of by OpenSSL.

Python's ssl module encrypts through ``SSL_write`` into a memory BIO: each reply is copied
into OpenSSL's record buffer, encrypted by the system's OpenSSL, copied into the BIO and
copied out again into a bytes object. Here the image is read straight into record-sized slots
and each record is sealed by ``cryptography``'s AEAD into the buffer that goes to the socket:
no copy between the read and the socket but the encryption itself, and the newer OpenSSL that
``cryptography`` carries seals AES-GCM about twice as fast (figures in README).

OpenSSL still runs the handshake and everything received; it gives up sending application
data only. The keys come from the server's traffic secret (``keylog.py``) by RFC 8446 section
7. Whatever OpenSSL itself still writes after the hand-over (an alert, the KeyUpdate a client
may ask for) is opened with the key and sequence number OpenSSL used and sealed again with
ours (``reseal``), so one sequence of records reaches the client. Pure code: no sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cryptography.hazmat.primitives import hashes

#: The most plaintext one record carries (RFC 8446 5.1).
RECORD = 16 * 1024
HEADER = 5
TAG = 16
#: A plaintext slot: the record's data, then its inner content type.
PLAIN_STRIDE = RECORD + 1
#: A sealed record as sent: header, data and content type encrypted, tag.
SEALED_STRIDE = HEADER + RECORD + 1 + TAG

APPLICATION_DATA = 23
HANDSHAKE = 22
KEY_UPDATE = 24
#: TLS 1.3 records all say "application data, TLS 1.2" on the outside (RFC 8446 5.2).
_OUTER = bytes([APPLICATION_DATA, 3, 3])


class AEAD(Protocol):
    """What ``cryptography``'s AESGCM and ChaCha20Poly1305 offer that is used here."""

    def encrypt_into(
        self, nonce: bytes, data: memoryview, associated_data: bytes, buf: memoryview
    ) -> int: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes) -> bytes: ...


class RecordError(Exception):
    """OpenSSL wrote something that cannot be carried over into our records."""


@dataclass(frozen=True)
class Suite:
    """A TLS 1.3 cipher suite by the names of its parts in ``cryptography``, which is
    imported only when a connection needs it (it adds about 7 MiB to the process)."""

    aead: str
    key_size: int
    hash: str

    def make(self, key: bytes) -> AEAD:
        from cryptography.hazmat.primitives.ciphers import aead

        made: AEAD = getattr(aead, self.aead)(key)
        return made

    def hash_algorithm(self) -> hashes.HashAlgorithm:
        from cryptography.hazmat.primitives import hashes

        algorithm: hashes.HashAlgorithm = getattr(hashes, self.hash)()
        return algorithm


#: The TLS 1.3 suites OpenSSL offers by default; any other stays with OpenSSL.
SUITES = {
    "TLS_AES_128_GCM_SHA256": Suite("AESGCM", 16, "SHA256"),
    "TLS_AES_256_GCM_SHA384": Suite("AESGCM", 32, "SHA384"),
    "TLS_CHACHA20_POLY1305_SHA256": Suite("ChaCha20Poly1305", 32, "SHA256"),
}


def expand_label(
    secret: bytes, label: bytes, length: int, hash: hashes.HashAlgorithm, context: bytes = b""
) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1)."""
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    return HKDFExpand(hash, length, info).derive(secret)


class Sealer:
    """The server's sending half of a TLS 1.3 connection from its traffic secret on.

    ``seq`` counts the records we sent under the current key; ``_theirs`` counts those
    OpenSSL wrote under it, which ``reseal`` needs to open them. A KeyUpdate that OpenSSL
    writes moves both to the next key, as it moves OpenSSL's own.
    """

    def __init__(self, suite: Suite, secret: bytes) -> None:
        self.suite = suite
        self._hash = suite.hash_algorithm()
        self._use(secret)

    def _use(self, secret: bytes) -> None:
        self._secret = secret
        key = expand_label(secret, b"key", self.suite.key_size, self._hash)
        self._aead = self.suite.make(key)
        self._iv = int.from_bytes(expand_label(secret, b"iv", 12, self._hash), "big")
        self.seq = 0
        self._theirs = 0

    def _next_key(self) -> None:
        """Both OpenSSL and we move to the next key after its KeyUpdate (RFC 8446 7.2)."""
        size = self._hash.digest_size
        self._use(expand_label(self._secret, b"traffic upd", size, self._hash))

    def _nonce(self, seq: int) -> bytes:
        return (self._iv ^ seq).to_bytes(12, "big")

    def seal_into(self, plain: memoryview, out: memoryview) -> int:
        """Seal ``plain`` (up to RECORD bytes of data and the content type after them) as
        the next record into ``out``; returns the record's length."""
        size = len(plain) + TAG
        header = _OUTER + size.to_bytes(2, "big")
        out[:HEADER] = header
        self._aead.encrypt_into(self._nonce(self.seq), plain, header, out[HEADER : HEADER + size])
        self.seq += 1
        return HEADER + size

    def seal(self, data: bytes, content_type: int) -> bytes:
        """One record of ``data`` (at most RECORD bytes) of ``content_type``."""
        plain = data + bytes([content_type])
        out = bytearray(HEADER + len(plain) + TAG)
        self.seal_into(memoryview(plain), memoryview(out))
        return bytes(out)

    def seal_slots(self, plain: memoryview, sizes: Sequence[int], out: memoryview) -> int:
        """Seal the records laid out in ``plain`` at PLAIN_STRIDE, of ``sizes`` bytes of
        application data each, into ``out`` one after the other; returns the bytes
        written. The caller put each record's content type right after its data."""
        written = 0
        for i, size in enumerate(sizes):
            start = i * PLAIN_STRIDE
            written += self.seal_into(plain[start : start + size + 1], out[written:])
        return written

    def reseal(self, data: bytes) -> bytes:
        """Records OpenSSL wrote (under the key it shares with us, at its own sequence
        numbers) as our records. ``RecordError`` if they are not what it would write."""
        from cryptography.exceptions import InvalidTag

        out = bytearray()
        at = 0
        while at < len(data):
            if len(data) - at < HEADER or data[at : at + 3] != _OUTER:
                raise RecordError("OpenSSL wrote a record that is not TLS 1.3")
            size = int.from_bytes(data[at + 3 : at + 5], "big")
            end = at + HEADER + size
            if end > len(data):
                raise RecordError("OpenSSL wrote part of a record")
            try:
                inner = self._aead.decrypt(
                    self._nonce(self._theirs), data[at + HEADER : end], data[at : at + HEADER]
                )
            except InvalidTag:
                raise RecordError("a record OpenSSL wrote does not open with its key") from None
            self._theirs += 1
            body = inner.rstrip(b"\0")  # padding, which OpenSSL adds only when asked
            if not body:
                raise RecordError("OpenSSL wrote a record with no content type")
            kind, body = body[-1], body[:-1]
            out += self.seal(body, kind)
            if kind == HANDSHAKE and _ends_with_key_update(body):
                self._next_key()
            at = end
        return bytes(out)


def _ends_with_key_update(messages: bytes) -> bool:
    """Whether the last handshake message in ``messages`` is a KeyUpdate (which must end
    its record, RFC 8446 5.1)."""
    at, last = 0, -1
    while at + 4 <= len(messages):
        last = messages[at]
        at += 4 + int.from_bytes(messages[at + 1 : at + 4], "big")
    return last == KEY_UPDATE


def layout(plain: memoryview, total: int) -> list[int]:
    """Cut ``total`` bytes into records; put each record's content type (application data)
    right after its data in ``plain``. Returns the records' sizes."""
    sizes = [RECORD] * (total // RECORD) + ([total % RECORD] if total % RECORD else [])
    for i, size in enumerate(sizes):
        plain[i * PLAIN_STRIDE + size] = APPLICATION_DATA
    return sizes


def data_views(plain: memoryview, sizes: Sequence[int]) -> list[memoryview]:
    """Where each record's data goes in ``plain`` (for ``preadv`` or a copy)."""
    return [plain[i * PLAIN_STRIDE : i * PLAIN_STRIDE + size] for i, size in enumerate(sizes)]
