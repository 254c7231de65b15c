"""The server's side of STARTTLS: which TLS transport goes over the one a connection has.

Kernel TLS where the context lets OpenSSL hand the keys to the kernel and the transport
below writes its socket itself (``ktls.py``); else TLS in this process, sealing its own
records when given the strategy (``tls.py``, ``sealing.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import ktls
from .tls import TLSTransport

if TYPE_CHECKING:
    import ssl

    from .base import SecureTransport, Transport
    from .sealing import Sealing

log = logging.getLogger("erofs_nbdd.transport")


def server_tls(
    transport: Transport, context: ssl.SSLContext, sealing: Sealing | None
) -> SecureTransport:
    """The TLS transport over ``transport``, not yet handshaken. The caller owns it;
    closing it closes ``transport`` too."""
    if ktls.enabled(context) and transport.raw_socket() is not None:
        try:
            return ktls.KernelTLSTransport(transport, context)
        except OSError as exc:  # no descriptor to spare: TLS in this process
            log.warning("kernel TLS not used: %s", exc)
    return TLSTransport(transport, context, server_side=True, sealing=sealing)
