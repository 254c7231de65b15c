"""Kernel TLS in a kernel that has it: the server hands its session keys to the kernel, which
encrypts every reply, and large cached reads go out by sendfile. Checked with libnbd
(GnuTLS) and with a plain stdlib client that reads slowly, so replies meet a full socket."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from erofs_nbdd import ktls

from ..conftest import mkfs, require_tool
from ..interop.conftest import RunningServer, start_server_process, stop_server_process


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
        root, "--tls", "require", "--tls-certificates", str(certs), "--reply-timeout", "20",
        *extra,
    )  # fmt: skip


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
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip


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


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_slow_reader_gets_every_reply_whole(
    tls_module: None, big_images: Path, certs: Path, version: ssl.TLSVersion
) -> None:
    """Pipelined reads of every size (512-byte aligned), read back a little at a time:
    sendfile keeps meeting a full socket and must resume without stalling a reply."""
    image = (big_images / "big.erofs").read_bytes()
    server = _serve(big_images, certs)
    try:
        with _TLSClient(server.address, certs / "clients" / "alice", "big", version) as client:
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
        with _TLSClient(server.address, certs / "clients" / "alice", "big") as client:
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


class _TLSClient:
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
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.version() == version.name.replace("v1_", "v1.")
        name = export.encode()
        self._option(self.sock, 7, struct.pack(">I", len(name)) + name + b"\0\0")  # GO

    def __enter__(self) -> _TLSClient:
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
