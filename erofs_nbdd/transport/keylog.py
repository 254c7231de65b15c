"""The server's TLS 1.3 traffic secret of each connection, for ``records.py``.

Python's ssl module shows no session keys; the one way it lets them out is
``SSLContext.keylog_filename``, OpenSSL's key log. That file here is a memfd of this process
(opened through /proc/self/fd), so no secret reaches a disk, and it is read and emptied
after every handshake step. OpenSSL writes a connection's lines synchronously inside that
connection's own ``do_handshake`` call, and a line is taken only if it carries the random
of the connection's own ClientHello; each worker process has its own memfd. Handshake steps
run in threads (``handshakes.py``), so a step and the emptying after it hold ``KeyLog.lock``:
with sealing, one handshake step at a time per process.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

#: The line with the secret of what the server sends after the handshake (NSS key log).
SERVER_SECRET = "SERVER_TRAFFIC_SECRET_0"
#: A TLS record header, a handshake header and ClientHello's legacy_version, then the random.
_RANDOM_AT = 5 + 4 + 2
_RANDOM_SIZE = 32
#: How much of what a client sends first tells its ClientHello's random.
HELLO_PREFIX = _RANDOM_AT + _RANDOM_SIZE


class KeyLog:
    def __init__(self, context: ssl.SSLContext) -> None:
        """``OSError`` where this system has no memfd or no /proc."""
        self._fd = os.memfd_create("erofs-nbdd-tls-keys", os.MFD_CLOEXEC)
        try:
            context.keylog_filename = f"/proc/self/fd/{self._fd}"
        except OSError:
            os.close(self._fd)
            raise
        #: Held around a handshake step and the ``take`` after it (``Sealing.stepping``):
        #: steps run in threads, and a ``take`` must not empty away a line another
        #: handshake is writing.
        self.lock = threading.Lock()

    def take(self, client_random: bytes) -> bytes | None:
        """Empty the log; the server's traffic secret for the connection whose ClientHello
        carried ``client_random``, if OpenSSL wrote it since the last call."""
        size = os.fstat(self._fd).st_size
        if not size:
            return None
        data = os.pread(self._fd, size, 0)
        os.ftruncate(self._fd, 0)  # OpenSSL appends (O_APPEND), so it starts again at 0
        want = client_random.hex()
        for line in data.decode("ascii", "replace").splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] == SERVER_SECRET and fields[1].lower() == want:
                return bytes.fromhex(fields[2])
        return None


def client_random(first: bytes) -> bytes | None:
    """The random of the ClientHello that ``first`` (the first bytes a client sent after
    STARTTLS) begins with; None if it is not one, or too short."""
    if len(first) < HELLO_PREFIX or first[0] != 22 or first[5] != 1:  # handshake, ClientHello
        return None
    return first[_RANDOM_AT:HELLO_PREFIX]
