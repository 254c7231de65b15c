"""``erofs-nbdd certs``: what it writes, and that it never silently replaces anything."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from erofs_nbdd.cli import ExitStatus, main
from erofs_nbdd.transport.contexts import client_context, server_context

if TYPE_CHECKING:
    from pathlib import Path


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_layout_permissions_and_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "pki"
    args = ["certs", str(d), "--host", "nbd.example", "--host", "10.1.2.3", "--client", "ci-1"]
    assert main(args) == ExitStatus.OK
    out = capsys.readouterr().out
    assert "expires" in out
    assert "written" in out
    for name in ("ca-key.pem", "server-key.pem", "clients/ci-1/client-key.pem"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    server = load(d / "server-cert.pem")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["nbd.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    client = load(d / "clients/ci-1/client-cert.pem")
    assert client.subject.rfc4514_string() == "CN=ci-1,O=erofs-nbdd"
    assert client.issuer == load(d / "ca-cert.pem").subject
    assert (d / "clients/ci-1/ca-cert.pem").read_bytes() == (d / "ca-cert.pem").read_bytes()
    # the files work as Python contexts on both sides
    server_context(d, verify_peer=True)
    client_context(d / "clients/ci-1")


def test_default_hosts_cover_loopback(tmp_path: Path) -> None:
    assert main(["certs", str(tmp_path)]) == ExitStatus.OK
    san = load(tmp_path / "server-cert.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)
    ips = san.value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips


def test_existing_files_are_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", str(tmp_path), "--client", "a"]) == ExitStatus.OK
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.pem")}
    assert main(["certs", str(tmp_path), "--client", "a", "--client", "b"]) == ExitStatus.OK
    assert "kept (use --force to replace)" in capsys.readouterr().out
    assert all(p.read_bytes() == data for p, data in before.items())
    b = load(tmp_path / "clients/b/client-cert.pem")
    assert b.issuer == load(tmp_path / "ca-cert.pem").subject  # signed by the kept CA
    assert main(["certs", str(tmp_path), "--force"]) == ExitStatus.OK
    assert (tmp_path / "ca-cert.pem").read_bytes() != before[tmp_path / "ca-cert.pem"]
    assert (tmp_path / "server-key.pem").read_bytes() != before[tmp_path / "server-key.pem"]


def test_a_new_ca_resigns_everything(tmp_path: Path) -> None:
    assert main(["certs", str(tmp_path)]) == ExitStatus.OK
    (tmp_path / "ca-key.pem").unlink()
    assert main(["certs", str(tmp_path)]) == ExitStatus.OK
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca-cert.pem"))
    assert ctx  # the server certificate must chain to the new CA:
    server = load(tmp_path / "server-cert.pem")
    ca = load(tmp_path / "ca-cert.pem")
    server.verify_directly_issued_by(ca)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ""])
def test_client_names_are_plain(tmp_path: Path, name: str) -> None:
    assert main(["certs", str(tmp_path), "--client", name]) == ExitStatus.USAGE
    assert not (tmp_path / "clients").exists()
