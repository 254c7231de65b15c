"""``erofs-nbdd certs``: a CA, a server certificate and client certificates, in the directory
layout nbdkit, qemu and libnbd share.

The CA key stays in the directory (0600) so more clients can be added later by running the
command again; existing files are kept unless --force is given, so a re-run never silently
replaces a deployed certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

CA_DAYS = 3650


@dataclass(frozen=True)
class Written:
    path: Path
    what: str
    expires: datetime.datetime | None
    kept: bool


def default_hosts() -> list[str]:
    hosts = ["localhost", "127.0.0.1", "::1"]
    name = socket.gethostname()
    if name and name not in hosts:
        hosts.append(name)
    return hosts


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "erofs-nbdd"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _sign(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    days: int,
    extend: Callable[[x509.CertificateBuilder], x509.CertificateBuilder],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return extend(builder).sign(issuer_key, hashes.SHA256())


def _leaf(
    usage: x509.ObjectIdentifier, names: Sequence[str] = ()
) -> Callable[[x509.CertificateBuilder], x509.CertificateBuilder]:
    def extend(b: x509.CertificateBuilder) -> x509.CertificateBuilder:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            b = b.add_extension(
                x509.SubjectAlternativeName([_san(n) for n in names]), critical=False
            )
        return b

    return extend


def _ca_extensions(b: x509.CertificateBuilder) -> x509.CertificateBuilder:
    b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    return b.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )


def _expiry(path: Path) -> datetime.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def make_certificates(
    cert_dir: Path,
    *,
    hosts: Sequence[str] = (),
    clients: Sequence[str] = (),
    force: bool = False,
    days: int,
) -> list[Written]:
    """Create what is missing (everything, with ``force``); return what was written or kept."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    written: list[Written] = []
    ca_cert_path, ca_key_path = cert_dir / "ca-cert.pem", cert_dir / "ca-key.pem"
    if force or not (ca_cert_path.exists() and ca_key_path.exists()):
        ca_key = _key()
        ca_cert = _sign(
            "erofs-nbdd CA",
            ca_key.public_key(),
            _name("erofs-nbdd CA"),
            ca_key,
            CA_DAYS,
            _ca_extensions,
        )
        _write_key(ca_key_path, ca_key)
        _write_cert(ca_cert_path, ca_cert)
        written.append(Written(ca_cert_path, "CA", ca_cert.not_valid_after_utc, kept=False))
        force = True  # everything signed by an old CA must be re-signed
    else:
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: not an EC key made by erofs-nbdd certs")
        ca_key = loaded
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        written.append(Written(ca_cert_path, "CA", ca_cert.not_valid_after_utc, kept=True))

    def issue(
        directory: Path, stem: str, cn: str, usage: x509.ObjectIdentifier, names: Sequence[str]
    ) -> None:
        cert_path, key_path = directory / f"{stem}-cert.pem", directory / f"{stem}-key.pem"
        if not force and cert_path.exists() and key_path.exists():
            written.append(Written(cert_path, f"{stem} {cn}", _expiry(cert_path), kept=True))
            return
        directory.mkdir(parents=True, exist_ok=True)
        key = _key()
        cert = _sign(cn, key.public_key(), ca_cert.subject, ca_key, days, _leaf(usage, names))
        _write_key(key_path, key)
        _write_cert(cert_path, cert)
        written.append(Written(cert_path, f"{stem} {cn}", cert.not_valid_after_utc, kept=False))

    server_names = list(hosts) or default_hosts()
    issue(cert_dir, "server", server_names[0], ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    for client in clients:
        client_dir = cert_dir / "clients" / client
        issue(client_dir, "client", client, ExtendedKeyUsageOID.CLIENT_AUTH, ())
        ca_copy = client_dir / "ca-cert.pem"
        if force or not ca_copy.exists():  # a client directory is complete on its own
            ca_copy.write_bytes(ca_cert_path.read_bytes())
    return written
