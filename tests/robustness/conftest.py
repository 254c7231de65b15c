"""Hostile clients against our server running as a real process on loopback.

After every test the server must still serve a normal client nobody here wrote (nbdcopy,
checked byte for byte) and its log must hold no traceback and no internal error.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from erofs_nbdd.protocol import (
    NEED_DATA,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    ExportNameReply,
    OptionAck,
    OptionError,
    ReplyEvent,
    State,
)

from ..conftest import require_tool
from ..interop.conftest import RunningServer, start_server_process, stop_server_process

#: Low limits, so each limit is hit within a test's time; 1,100 connections for the flood.
HOSTILE_ARGS = (
    "--handshake-timeout",
    "3",
    "--reply-timeout",
    "3",
    "--max-connections",
    "1100",
    "--max-connections-per-client",
    "1100",
    "--max-connection-buffer",
    str(16 << 20),
    "--max-server-buffer",
    str(64 << 20),
)


def log_problems(text: str) -> list[str]:
    return [
        line
        for line in text.splitlines()
        if "Traceback" in line or "internal error" in line or " ERROR " in line
    ]


def assert_serves(
    server: RunningServer, export: str = "demo", *, tls_dir: Path | None = None
) -> None:
    """nbdcopy (libnbd) copies the whole export and it matches the image file; over TLS
    with the client certificates in ``tls_dir`` when given."""
    nbdcopy = require_tool("nbdcopy")
    uri = server.uri(export)
    if tls_dir is not None:
        uri = f"nbds://{server.address}/{export}?tls-certificates={tls_dir}"
    result = subprocess.run([nbdcopy, uri, "-"], capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    image = server.root / f"{export}.erofs"
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(image.read_bytes()).digest()


@pytest.fixture(scope="module")
def hostile_root(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the export directory: some tests change images under the server."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copy(images / "demo.erofs", root / "demo.erofs")
    (root / "team").mkdir()
    shutil.copy(images / "team" / "app-v2.erofs", root / "team" / "app-v2.erofs")
    outside = tmp_path_factory.mktemp("outside") / "secret.erofs"
    shutil.copy(images / "demo.erofs", outside)
    (root / "escape.erofs").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def module_server(hostile_root: Path) -> Iterator[RunningServer]:
    server = start_server_process(hostile_root, *HOSTILE_ARGS)
    yield server
    status = stop_server_process(server)
    text = server.log_text()
    assert status == 0, text
    assert not log_problems(text), text


@pytest.fixture
def server(module_server: RunningServer) -> Iterator[RunningServer]:
    """The shared hostile-limits server; checked after the test."""
    before = len(module_server.log)
    yield module_server
    assert module_server.process.poll() is None, "the server died:\n" + module_server.log_text()
    assert_serves(module_server)
    new = "".join(module_server.log[before:])
    assert not log_problems(new), new


class RawClient:
    """A blocking loopback client that says exactly what a test tells it to."""

    def __init__(self, address: str, *, source: str | None = None, timeout: float = 10) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection(
            (host, int(port)), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.hs = ClientHandshake()
        self.tx: ClientTransmission | None = None

    def close(self, *, reset: bool = False) -> None:
        if reset:  # RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _event(self, machine: ClientHandshake | ClientTransmission) -> object:
        for _ in range(100_000):  # bounded: each turn receives at least one byte
            event = machine.next_event()
            if event is not NEED_DATA:
                return event
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionResetError("server closed the connection")
            machine.receive_data(data)
        raise AssertionError("no event")

    def start(self) -> None:
        self._event(self.hs)  # greeting
        self.send(self.hs.send_client_flags())

    def option(self, request: bytes) -> list[object]:
        """Send one option; the replies up to the final ACK or error."""
        self.send(request)
        replies = []
        for _ in range(10_000):
            event = self._event(self.hs)
            replies.append(event)
            if isinstance(event, OptionAck | OptionError | ExportNameReply):
                return replies
        raise AssertionError("no final reply")

    def go(self, export: str = "demo", infos: tuple[int, ...] = ()) -> ClientTransmission:
        self.start()
        replies = self.option(self.hs.opt_go(export, infos))
        assert isinstance(replies[-1], OptionAck), replies
        assert self.hs.state is State.TRANSMISSION
        self.tx = ClientTransmission(self.hs.negotiated)
        self.tx.receive_data(self.hs.trailing_data)
        return self.tx

    def reply(self) -> ReplyEvent:
        assert self.tx is not None
        event = self._event(self.tx)
        return event  # type: ignore[return-value]

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        """(error, data) of one READ."""
        assert self.tx is not None
        _, request = self.tx.request(Cmd.READ, offset, length)
        self.send(request)
        event = self.reply()
        return event.error, event.data  # type: ignore[union-attr]

    def closed_within(self, seconds: float) -> bool:
        """True once the server closes (EOF or reset) within ``seconds``; data is dropped."""
        self.sock.settimeout(seconds)
        try:
            for _ in range(100_000):
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False


@pytest.fixture
def raw() -> Iterator[Callable[..., RawClient]]:
    """Make RawClients; every one is closed when the test ends."""
    made: list[RawClient] = []

    def make(address: str, **kw: Any) -> RawClient:
        client = RawClient(address, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
