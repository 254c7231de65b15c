"""Failover: the mount survives server restarts, a server gone for good, a restarted
supervisor; and refuses, safely, a different image under the same name."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from erofs_nbd_client import devices

from ..conftest import mkfs
from ..interop.conftest import RunningServer, start_server_process, stop_server_process
from .conftest import assert_nothing_left, cli, wait_state

# Server kills, restarts and TLS reconnects under an emulated CPU (TCG) take minutes.
pytestmark = pytest.mark.timeout(600)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

PORT_A, PORT_B = 10930, 10931


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@dataclass
class Reader:
    """Reads every file again and again (page cache dropped each pass, so every pass goes
    to NBD) and records any wrong byte or I/O error."""

    mountpoint: Path
    expect: dict[str, str]
    passes: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Reader:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            for rel, digest in self.expect.items():
                try:
                    got = hashlib.sha256((self.mountpoint / rel).read_bytes()).hexdigest()
                except OSError as exc:
                    self.errors.append(f"{rel}: {exc}")
                    continue
                if got != digest:
                    self.errors.append(f"{rel}: wrong bytes")
            self.passes += 1

    def wait_passes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        target = self.passes + n
        while self.passes < target and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.passes >= target, f"reader stuck at {self.passes} passes"

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(120)
        assert not self.thread.is_alive()


def kill(server: RunningServer) -> None:
    server.process.send_signal(signal.SIGKILL)
    stop_server_process(server)  # reaps and closes its pipes


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    """Servers a test starts; whatever is still running at the end is stopped."""
    started: list[RunningServer] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            stop_server_process(server)


def attach(mountpoint: Path, server_arg: str, *extra: str) -> int:
    result = cli("erofs-nbd-attach", server_arg, str(mountpoint), "--export", "demo", *extra)
    assert result.returncode == 0, result.stderr
    index = devices.device_at(str(mountpoint))
    assert index is not None
    wait_state(index, state="watching", reconnects=0)
    return index


def detach_clean(mountpoint: Path) -> None:
    result = cli("erofs-nbd-detach", str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert_nothing_left()


MODES = {
    "plain-1": [],
    "tls-4": ["--connections", "4"],
}


def _serve(images: Path, certs: Path, tls: bool, port: int) -> RunningServer:
    args = ["--tls", "require", "--tls-certificates", str(certs)] if tls else []
    return start_server_process(images, *args, listen=f"127.0.0.1:{port}")


def _server_arg(tls: bool, certs: Path, port: int) -> list[str]:
    if tls:
        return [f"nbds://127.0.0.1:{port}/demo?tls-certificates={certs}/clients/alice"]
    return [f"127.0.0.1:{port}"]


def restart_while_reading(
    reader: Reader, servers: list[RunningServer], index: int, restart: Callable[[], RunningServer]
) -> dict[str, object]:
    """Kill the newest server, start it again 2 s later, and check the reader saw every byte
    right throughout; returns the supervisor's state after the reconnect."""
    reader.wait_passes(1)
    kill(servers[-1])
    time.sleep(2)
    servers.append(restart())
    state = wait_state(index, state="watching", min_reconnects=1)
    reader.wait_passes(2)
    reader.finish()
    assert reader.errors == []
    return state


@pytest.mark.parametrize("mode", sorted(MODES))
def test_server_restart(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
    mode: str,
) -> None:
    tls = mode.startswith("tls")
    servers.append(_serve(images, certs, tls, PORT_A))
    index = attach(mountpoint, *_server_arg(tls, certs, PORT_A), *MODES[mode])
    reader = Reader(mountpoint, file_digests(source_tree)).start()
    state = restart_while_reading(
        reader, servers, index, lambda: _serve(images, certs, tls, PORT_A)
    )
    assert state["server"] == ("nbds" if tls else "nbd") + f"://127.0.0.1:{PORT_A}/demo"
    log = (devices.RUN_DIR / f"supervisor-nbd{index}.log").read_text()
    assert "reconnected to" in log
    assert "LINK_DEAD" in log
    detach_clean(mountpoint)


def test_failover_to_a_second_server(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
) -> None:
    servers.append(_serve(images, certs, False, PORT_A))
    servers.append(_serve(images, certs, False, PORT_B))
    index = attach(mountpoint, f"127.0.0.1:{PORT_A},127.0.0.1:{PORT_B}")
    reader = Reader(mountpoint, file_digests(source_tree)).start()
    reader.wait_passes(1)
    kill(servers[0])  # gone for good
    state = wait_state(index, state="watching", min_reconnects=1)
    assert state["server"] == f"nbd://127.0.0.1:{PORT_B}/demo"
    reader.wait_passes(2)
    reader.finish()
    assert reader.errors == []
    detach_clean(mountpoint)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reattach_then_restart(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
    mode: str,
) -> None:
    tls = mode.startswith("tls")
    servers.append(_serve(images, certs, tls, PORT_A))
    index = attach(mountpoint, *_server_arg(tls, certs, PORT_A), *MODES[mode])
    reader = Reader(mountpoint, file_digests(source_tree)).start()
    old = devices.read_state(index)["pid"]
    assert isinstance(old, int)
    os.kill(old, signal.SIGKILL)
    listed = cli("erofs-nbd-list")
    assert "supervisor gone" in listed.stdout
    result = cli("erofs-nbd-attach", "--reattach", f"/dev/nbd{index}")
    assert result.returncode == 0, result.stderr
    new = wait_state(index, state="watching", not_pid=old)["pid"]
    assert new != old
    restart_while_reading(reader, servers, index, lambda: _serve(images, certs, tls, PORT_A))
    detach_clean(mountpoint)


def test_a_death_no_supervisor_heard_is_recovered(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
) -> None:
    """The kernel announces a dead connection once, to whoever listens then. Here the
    server dies while no supervisor runs, and a new one (--reattach) starts while it is
    still down: its startup check finds no server. It used to log "relying on LINK_DEAD"
    and wait for an announcement that had already gone, so reads hung until the dead
    timeout failed them. It now keeps reconnecting until the server is back."""
    servers.append(_serve(images, certs, False, PORT_A))
    index = attach(mountpoint, f"127.0.0.1:{PORT_A}")
    reader = Reader(mountpoint, file_digests(source_tree)).start()
    reader.wait_passes(1)
    old = devices.read_state(index)["pid"]
    assert isinstance(old, int)
    os.kill(old, signal.SIGKILL)
    kill(servers[-1])  # announced to nobody
    result = cli("erofs-nbd-attach", "--reattach", f"/dev/nbd{index}")
    assert result.returncode == 0, result.stderr  # it returns once the new one watches
    time.sleep(2)
    servers.append(_serve(images, certs, False, PORT_A))
    state = wait_state(index, state="watching", min_reconnects=1, not_pid=old)
    assert state["cause"] == "no server answered the startup check"
    reader.wait_passes(2)
    reader.finish()
    assert reader.errors == []
    detach_clean(mountpoint)


def test_a_different_image_is_refused(
    images: Path,
    source_tree: Path,
    mountpoint: Path,
    tmp_path: Path,
    servers: list[RunningServer],
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    mkfs(other / "demo.erofs", source_tree)  # same files, but a new image (new UUID)
    assert (other / "demo.erofs").read_bytes() != (images / "demo.erofs").read_bytes()
    servers.append(start_server_process(images, listen=f"127.0.0.1:{PORT_A}"))
    index = attach(mountpoint, f"127.0.0.1:{PORT_A}", "--dead-timeout", "10")
    kill(servers[0])
    servers.append(start_server_process(other, listen=f"127.0.0.1:{PORT_A}"))
    state = wait_state(index, state="refusing")
    assert state["refused"] == f"nbd://127.0.0.1:{PORT_A}/demo"
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    with pytest.raises(OSError, match="Input/output error"):  # once the dead timeout passes
        (mountpoint / "bin" / "random.bin").read_bytes()
    log = (devices.RUN_DIR / f"supervisor-nbd{index}.log").read_text()
    assert "serves a different image" in log
    detach_clean(mountpoint)
    shutil.rmtree(other)
    assert not os.path.ismount(mountpoint)
