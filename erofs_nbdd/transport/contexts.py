"""TLS for both sides: SSL contexts from a certificate directory, and the peer names in them.

The directory layout is the one nbdkit, qemu and libnbd share: ``ca-cert.pem``,
``server-cert.pem``, ``server-key.pem`` (server) and ``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem`` (client). The server sends no session tickets and never starts a key update,
so a client may later hand its TLS socket to kernel TLS, which fails on any non-data record.
"""

from __future__ import annotations

import ssl
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class TLSSetupError(ValueError):
    """A certificate directory or option that cannot work; the message says how to fix it."""


SERVER_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
CLIENT_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def _base_context(purpose: ssl.Purpose, *, system_store: bool = False) -> ssl.SSLContext:
    """Python's defaults (certificate and host name checks for a client), trusting the
    system's CA store only if asked: loading it takes 20 ms here, which every reconnect of
    a relay would pay, and a client given a CA must trust that CA alone."""
    if purpose is ssl.Purpose.SERVER_AUTH:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        if system_store:
            ctx.load_default_certs(purpose)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if sys.version_info >= (3, 13):  # what create_default_context adds there
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec's MUST; GnuTLS clients default to it
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 session tickets
    return ctx


def server_context(cert_dir: Path, *, verify_peer: bool = False) -> ssl.SSLContext:
    """The server's context; with ``verify_peer`` only clients the CA signed get in."""
    cert, key = cert_dir / "server-cert.pem", cert_dir / "server-key.pem"
    for path in (cert, key):
        if not path.is_file():
            raise TLSSetupError(
                f"{path} is missing: make certificates with `erofs-nbdd certs {cert_dir}`"
            )
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH)
    ctx.num_tickets = 0  # TLS 1.3: no NewSessionTicket records after the handshake
    # TLS 1.2 renegotiation would change keys the kernel holds under kernel TLS, and lets a
    # client make the server run handshakes on demand. OpenSSL 3 refuses a client's by
    # default; 1.1.1, which Python may be built with elsewhere, does not.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSSetupError(f"cannot load {cert} with {key}: {exc}") from exc
    ca = cert_dir / "ca-cert.pem"
    if verify_peer:
        if not ca.is_file():
            raise TLSSetupError(f"--tls-verify-peer needs {ca} to check client certificates")
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    cert_dir: Path | None, *, verify: bool = True, client_cert: bool = True
) -> ssl.SSLContext:
    """The client's context: trusts ``ca-cert.pem`` alone (else the system store) and
    presents ``client-cert.pem`` when the directory has one."""
    ca = cert_dir / "ca-cert.pem" if cert_dir is not None else None
    has_ca = ca is not None and ca.is_file()
    ctx = _base_context(ssl.Purpose.SERVER_AUTH, system_store=verify and not has_ca)
    if cert_dir is not None:
        if has_ca:
            ctx.load_verify_locations(ca)
        elif verify:
            raise TLSSetupError(f"{ca} is missing: copy the server's CA certificate there")
        cert, key = cert_dir / "client-cert.pem", cert_dir / "client-key.pem"
        if client_cert and cert.is_file():
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise TLSSetupError(f"cannot load {cert} with {key}: {exc}") from exc
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_subject(cert: dict[str, object] | None) -> str | None:
    """``CN=name`` style text for logs, from ``SSLObject.getpeercert()``."""
    if not cert:
        return None
    parts = []
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            short = {"commonName": "CN", "organizationName": "O"}.get(key, key)
            parts.append(f"{short}={value}")
    return ",".join(parts) or None


def peer_common_name(cert: dict[str, object] | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
