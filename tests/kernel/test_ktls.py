"""Kernel TLS in a kernel that has it: the server hands its session keys to the kernel, which
encrypts every reply, and large cached reads go out by sendfile. Checked with libnbd
(GnuTLS) and with a plain stdlib client that reads slowly, so replies meet a full socket."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from erofs_nbdd.transport import ktls

from ..conftest import mkfs, require_tool
from ..interop.conftest import RunningServer, start_server_process, stop_server_process
from ..tlsclient import StdlibTLSClient, reads_across_key_updates, renegotiation_is_refused


@pytest.fixture(scope="module")
def tls_module() -> None:
    subprocess.run(["modprobe", "tls"], check=True)
    assert ktls.available()


@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image with 6 MiB of random bytes in it, so most reads are large."""
    tree = tmp_path_factory.mktemp("big-tree")
    (tree / "blob").write_bytes(os.urandom(6 << 20))
    (tree / "small.txt").write_text("small\n")
    root = tmp_path_factory.mktemp("big-images")
    mkfs(root / "big.erofs", tree)
    return root


def _serve(root: Path, certs: Path, *extra: str) -> RunningServer:
    return start_server_process(
        root,
        "--tls",
        "require",
        "--tls-certificates",
        str(certs),
        "--reply-timeout",
        "20",
        *extra,
    )


def _stop(server: RunningServer) -> str:
    assert stop_server_process(server) == 0
    text = server.log_text()
    assert "Traceback" not in text and "internal error" not in text, text
    return text


def _connection_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " export=" in line and " tls=" in line]


def _nbdcopy(server: RunningServer, certs: Path, out: Path) -> None:
    uri = f"nbds://{server.address}/big?tls-certificates={certs / 'clients' / 'alice'}"
    subprocess.run(
        [require_tool("nbdcopy"), "--connections=4", uri, str(out)],
        check=True,
        timeout=300,
        capture_output=True,
    )


def test_libnbd_reads_what_the_kernel_encrypts(
    tls_module: None, big_images: Path, certs: Path, tmp_path: Path
) -> None:
    image = (big_images / "big.erofs").read_bytes()
    server = _serve(big_images, certs)
    try:
        _nbdcopy(server, certs, tmp_path / "copy")
    finally:
        log = _stop(server)
    assert "kernel TLS: the kernel encrypts replies" in log
    assert hashlib.sha256((tmp_path / "copy").read_bytes()).digest() == (
        hashlib.sha256(image).digest()
    )
    lines = _connection_lines(log)
    assert lines and all("+ktls" in line and "ended=disconnect" in line for line in lines), log


def test_tls_kernel_off_encrypts_in_the_server(
    tls_module: None, big_images: Path, certs: Path, tmp_path: Path
) -> None:
    image = (big_images / "big.erofs").read_bytes()
    server = _serve(big_images, certs, "--tls-kernel", "off")
    try:
        _nbdcopy(server, certs, tmp_path / "copy")
    finally:
        log = _stop(server)
    assert (tmp_path / "copy").read_bytes() == image
    lines = _connection_lines(log)
    assert lines and not any("+ktls" in line for line in lines), log
    # libnbd speaks TLS 1.3, whose records the server then seals itself (records.py)
    assert all("TLSv1.3/" in line and "+sealed" in line for line in lines), log


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_slow_reader_gets_every_reply_whole(
    tls_module: None, big_images: Path, certs: Path, version: ssl.TLSVersion
) -> None:
    """Pipelined reads of every size (512-byte aligned), read back a little at a time:
    sendfile keeps meeting a full socket and must resume without stalling a reply."""
    image = (big_images / "big.erofs").read_bytes()
    server = _serve(big_images, certs)
    try:
        with StdlibTLSClient(server.address, certs / "clients" / "alice", "big", version) as client:
            size = len(image)
            reads = [(0, 4096), (512, 65536), (4096, 1 << 20), (size - 69632, 69632)]
            reads += [((i * 777_777) % (size - (1 << 20)) // 512 * 512, 1 << 20) for i in range(12)]
            reads += [(i * 8192, 512) for i in range(8)]
            for cookie, (offset, length) in enumerate(reads):
                client.send_read(cookie, offset, length)
            for _ in reads:
                cookie, data = client.read_reply(dict(enumerate(reads)), slow=True)
                offset, length = reads[cookie]
                assert data == image[offset : offset + length], (cookie, offset, length)
            client.disconnect()
    finally:
        log = _stop(server)
    lines = _connection_lines(log)
    assert len(lines) == 1 and "+ktls" in lines[0] and "ended=disconnect" in lines[0], log


def test_a_client_that_never_reads_is_dropped(
    tls_module: None, big_images: Path, certs: Path
) -> None:
    """The reply timeout holds when the kernel sends: sendfile meets a full socket that
    never drains, and the connection is dropped, not left pinning the server."""
    server = _serve(big_images, certs, "--reply-timeout", "2")
    try:
        with StdlibTLSClient(server.address, certs / "clients" / "alice", "big") as client:
            for cookie in range(200):  # 200 MiB asked for, nothing read
                client.send_read(cookie, 0, 1 << 20)
            deadline = time.monotonic() + 60
            while "(reply timeout)" not in server.log_text() and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        log = _stop(server)
    lines = _connection_lines(log)
    assert len(lines) == 1 and "+ktls" in lines[0], log
    assert "client read no reply for 2 s (reply timeout)" in lines[0], log


def test_key_updates_keep_a_kernel_tls_connection(
    tls_module: None, big_images: Path, certs: Path
) -> None:
    """A client's new send key (GnuTLS changes it after about 2^24 records, so every
    long-lived libnbd connection meets this) is OpenSSL's business: it decrypts requests
    here. A client that asks the server to change its key too gets no KeyUpdate back, as
    this kernel (6.1) cannot change a socket's send key, and replies keep the first key;
    the connection goes on. README (TLS) says so."""
    image = (big_images / "big.erofs").read_bytes()
    server = _serve(big_images, certs)
    try:
        with StdlibTLSClient(server.address, certs / "clients" / "alice", "big") as client:
            answered = reads_across_key_updates(client, image)
    finally:
        log = _stop(server)
    assert answered == {False: False, True: False}
    lines = _connection_lines(log)
    assert len(lines) == 1 and "+ktls" in lines[0] and "ended=disconnect" in lines[0], log


def test_renegotiation_is_refused_under_kernel_tls(
    tls_module: None, big_images: Path, certs: Path
) -> None:
    """TLS 1.2 renegotiation would change keys the kernel holds: OpenSSL's refusal (an
    alert it sends through the kernel) reaches the client, and the server goes on."""
    image = (big_images / "big.erofs").read_bytes()
    server = _serve(big_images, certs)
    alice = certs / "clients" / "alice"
    try:
        with StdlibTLSClient(server.address, alice, "big", ssl.TLSVersion.TLSv1_2) as client:
            assert renegotiation_is_refused(client, image)
        with StdlibTLSClient(server.address, alice, "big") as client:
            assert reads_across_key_updates(client, image) == {False: False, True: False}
    finally:
        log = _stop(server)
    lines = _connection_lines(log)
    assert len(lines) == 2 and all("+ktls" in line for line in lines), log
