"""Failover: the mount survives server restarts, a server gone for good, a restarted
supervisor; and refuses, safely, a different image under the same name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest

from erofs_nbd_client import devices
from erofs_nbd_client.attach import REQUEST_TIMEOUT

from ..conftest import mkfs
from ..interop.conftest import RunningServer, start_server_process, stop_server_process
from .conftest import BIN, assert_nothing_left, cli, require_tool, start_peer, wait_state

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
    """Reads every file again and again (page cache dropped each round, so every round
    goes to NBD), records any wrong byte or I/O error, and how long each round took."""

    mountpoint: Path
    expect: dict[str, str]
    #: Seconds between rounds: a reader that pauses, as a planned restart needs one to.
    pause: float = 0.0
    passes: int = 0
    errors: list[str] = field(default_factory=list)
    #: (start, end) of each finished round, monotonic seconds.
    rounds: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Reader:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
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
            self.rounds.append((began, time.monotonic()))
            self.passes += 1
            self.stop.wait(self.pause)

    def wait_passes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        target = self.passes + n
        while self.passes < target and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.passes >= target, f"reader stuck at {self.passes} passes"

    def quiet(self) -> float:
        """The slowest round so far: the baseline, taken before anything happens."""
        self.wait_passes(3)
        return max(end - began for began, end in self.rounds)

    def slowest_since(self, moment: float) -> float:
        return max(end - began for began, end in self.rounds if end > moment)

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(120)
        assert not self.thread.is_alive()


@dataclass
class Stall:
    """What an event cost the reader: its slowest round from the event on, against the
    slowest of three quiet ones before it."""

    reader: Reader
    quiet: float
    moment: float

    @classmethod
    def before(cls, reader: Reader) -> Stall:
        quiet = reader.quiet()
        return cls(reader, quiet, time.monotonic())

    def check(self, what: str, bound: float | None) -> float:
        """After the recovery: two more rounds, no failed read, and at most ``bound``
        seconds added to the slowest round; returns what was added (printed, for README)."""
        self.reader.wait_passes(2)
        self.reader.finish()
        assert self.reader.errors == []
        slowest = self.reader.slowest_since(self.moment)
        added = slowest - self.quiet
        print(
            f"STALL {what}: slowest round {slowest:.2f} s, quiet {self.quiet:.2f} s, "
            f"added {added:.2f} s"
        )
        if bound is not None:
            assert added <= bound, f"{what} added {added:.2f} s to the slowest round"
        return added


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


#: What the issue allows an event to add to the reader's slowest round (the README states
#: the figures measured). A planned restart is a clean EOF at a quiet moment and a
#: reconnect; a crash loses the requests in flight until their timeout requeues them
#: (--timeout, 4 s, fired by the block layer's timer, which rounds up to the next second).
PLANNED_BOUND = 1.5
CRASH_BOUND = 6.0


def recovered(index: int, timeout: float = 120) -> str:
    """Who brought the device back: "supervisor" (after a LINK_DEAD, new sockets by
    RECONFIGURE) or "relay" (a TLS link's relay resumed on a new server connection, the
    kernel none the wiser)."""
    deadline = time.monotonic() + timeout
    while True:
        state = devices.read_state(index)
        reconnects = state.get("reconnects", 0)
        assert isinstance(reconnects, int)
        if state.get("state") == "watching" and reconnects >= 1:
            return "supervisor"
        logs = [p.read_text(errors="replace") for p in devices.RUN_DIR.glob("*.log")]
        if any("resumed on" in text for text in logs):
            time.sleep(1)  # let every link resume; their logs, for a failure's report
            for path in devices.RUN_DIR.glob("*.log"):
                for line in path.read_text(errors="replace").splitlines():
                    print(f"{path.name}: {line}")
            return "relay"
        assert time.monotonic() < deadline, f"not recovered: {state}"
        time.sleep(0.2)


def crash_and_restart(
    reader: Reader,
    servers: list[RunningServer],
    index: int,
    restart: Callable[[], RunningServer],
    what: str,
) -> str:
    """SIGKILL the newest server and start it again 2 s later while the reader reads; the
    stall it adds beyond the time the server was away is bounded. Returns who recovered
    (``recovered``)."""
    stall = Stall.before(reader)
    kill(servers[-1])
    time.sleep(2)
    servers.append(restart())
    away = time.monotonic() - stall.moment  # 2 s, and the new server's start
    by = recovered(index)
    print(f"STALL {what}: the server was away {away:.2f} s; recovered by the {by}")
    stall.check(what, CRASH_BOUND + away - 2)
    return by


@pytest.mark.parametrize("mode", sorted(MODES))
def test_planned_restart(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
    mode: str,
) -> None:
    """The upgrade procedure: a new server on the same port (SO_REUSEPORT), then SIGTERM
    to the old one, which closes each connection at a quiet moment: a clean EOF with
    nothing in flight, so the kernel loses no request and the supervisor moves over. With
    TLS the relays move over themselves and the kernel sees nothing at all."""
    tls = mode.startswith("tls")
    servers.append(_serve(images, certs, tls, PORT_A))
    index = attach(mountpoint, *_server_arg(tls, certs, PORT_A), *MODES[mode])
    # The old server closes a connection once it has been quiet for 0.1 s; a reader that
    # never pauses meets the grace period instead (on a fast guest, rounds of reads and
    # hashing left no such gap). Real readers pause; this one does, between rounds.
    reader = Reader(mountpoint, file_digests(source_tree), pause=0.3).start()
    stall = Stall.before(reader)
    servers.append(_serve(images, certs, tls, PORT_A))
    assert stop_server_process(servers[0]) == 0
    old = servers[0].log_text()
    assert "grace period over" not in old, old
    assert "ended=server shutdown" in old
    assert recovered(index) == ("relay" if tls else "supervisor")
    stall.check(f"planned restart, {mode}", PLANNED_BOUND)
    log = (devices.RUN_DIR / f"supervisor-nbd{index}.log").read_text()
    assert ("LINK_DEAD" in log) is not tls
    detach_clean(mountpoint)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_crash_and_restart(
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
    by = crash_and_restart(
        reader, servers, index, lambda: _serve(images, certs, tls, PORT_A), f"crash, {mode}"
    )
    if by == "supervisor":
        state = devices.read_state(index)
        assert state["server"] == ("nbds" if tls else "nbd") + f"://127.0.0.1:{PORT_A}/demo"
        log = (devices.RUN_DIR / f"supervisor-nbd{index}.log").read_text()
        assert "reconnected to" in log
        assert "LINK_DEAD" in log
    else:
        assert tls  # only TLS links have a relay
    detach_clean(mountpoint)


@pytest.mark.parametrize("mode", ["plain-1", "plain-2", "relay-1", "tls-2"])
def test_failover_to_a_second_server(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
    mode: str,
) -> None:
    tls = mode.startswith("tls")
    servers.append(_serve(images, certs, tls, PORT_A))
    servers.append(_serve(images, certs, tls, PORT_B))
    (first,), (second,) = _server_arg(tls, certs, PORT_A), _server_arg(tls, certs, PORT_B)
    relay = ["--relay"] if mode.startswith("relay") else []
    index = attach(mountpoint, f"{first},{second}", "--connections", mode[-1], *relay)
    reader = Reader(mountpoint, file_digests(source_tree)).start()
    stall = Stall.before(reader)
    kill(servers[0])  # gone for good
    by = recovered(index)
    assert by == ("relay" if tls or relay else "supervisor")  # a relay resumes at once
    now_on = f"{'nbds' if tls else 'nbd'}://127.0.0.1:{PORT_B}/demo"
    if by == "supervisor":
        assert devices.read_state(index)["server"] == now_on
    (row,) = (r for r in json.loads(cli("erofs-nbd-list", "--json").stdout) if r["index"] == index)
    assert row["server"] == now_on  # erofs-nbd-list tells where the device's link went
    stall.check(f"failover, {mode}, recovered by the {by}", CRASH_BOUND)
    detach_clean(mountpoint)


def test_reattach_then_crash(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
) -> None:
    """A supervisor started by --reattach (its predecessor killed) handles a crash like
    the first one (TLS: it relays reconnected links itself)."""
    servers.append(_serve(images, certs, True, PORT_A))
    index = attach(mountpoint, *_server_arg(True, certs, PORT_A), *MODES["tls-4"])
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
    crash_and_restart(
        reader, servers, index, lambda: _serve(images, certs, True, PORT_A), "reattach, crash"
    )
    detach_clean(mountpoint)


#: Put first on a supervisor's PYTHONPATH, this holds its start back: the kernel's one
#: LINK_DEAD then goes out while nobody listens, as on a slow machine.
HOLD_SUPERVISOR = """\
import sys, time
if "erofs_nbd_client.supervisor" in sys.orig_argv:
    time.sleep(float({seconds!r}))
"""


def test_a_death_while_the_supervisor_starts_is_recovered(
    images: Path,
    source_tree: Path,
    certs: Path,
    mountpoint: Path,
    servers: list[RunningServer],
    tmp_path: Path,
) -> None:
    """The kernel announces a dead connection once, to whoever listens then. Here the
    server dies while a new supervisor (--reattach) is held back from starting, and is
    still down when it checks the device. It used to log "relying on LINK_DEAD" and wait
    for an announcement that had already gone, so reads hung until the dead timeout
    failed them. It now keeps reconnecting until the server is back."""
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(HOLD_SUPERVISOR.format(seconds=3))
    servers.append(_serve(images, certs, False, PORT_A))
    index = attach(mountpoint, f"127.0.0.1:{PORT_A}")
    reader = Reader(mountpoint, file_digests(source_tree)).start()
    reader.wait_passes(1)
    old = devices.read_state(index)["pid"]
    assert isinstance(old, int)
    os.kill(old, signal.SIGKILL)
    env = {**os.environ, "PYTHONPATH": f"{hold}:{os.environ.get('PYTHONPATH', '')}"}
    reattach = subprocess.Popen(
        [str(BIN / "erofs-nbd-attach"), "--reattach", f"/dev/nbd{index}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    kill(servers[-1])  # while the new supervisor is held back: announced to nobody
    out, _ = reattach.communicate(timeout=120)
    assert reattach.returncode == 0, out  # it returns once the new one watches
    servers.append(_serve(images, certs, False, PORT_A))
    state = wait_state(index, state="watching", min_reconnects=1, not_pid=old)
    assert state["cause"] == "no server answered the startup check"
    reader.wait_passes(2)
    reader.finish()
    assert reader.errors == []
    detach_clean(mountpoint)


def test_a_slow_live_server_is_retried_not_failed(
    images: Path, source_tree: Path, mountpoint: Path, tmp_path: Path
) -> None:
    """nbdkit's pause filter holds every request for three request timeouts: the kernel
    requeues each request that times out on a new connection ("Connection timed out,
    retrying"), the supervisor reconnects, and once nbdkit resumes every read completes:
    a slow server costs time, never an error."""
    control = tmp_path / "pause.sock"
    nbdkit = start_peer(
        [
            require_tool("nbdkit"),
            *("-f", "-r", "-i", "127.0.0.1", "-p", str(PORT_B), "--filter=pause"),
            *("file", str(images / "demo.erofs"), f"pause-control={control}"),
        ],
        PORT_B,
    )
    try:
        index = attach(mountpoint, f"127.0.0.1:{PORT_B}")
        reader = Reader(mountpoint, file_digests(source_tree)).start()
        reader.wait_passes(1)
        with socket.socket(socket.AF_UNIX) as ctl:
            ctl.settimeout(30)
            ctl.connect(str(control))
            ctl.sendall(b"p")
            assert ctl.recv(1) == b"P"
            time.sleep(3 * REQUEST_TIMEOUT)
            ctl.sendall(b"r")
            assert ctl.recv(1) == b"R"
        wait_state(index, state="watching", min_reconnects=1)
        reader.wait_passes(2)
        reader.finish()
        assert reader.errors == []
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        assert "Connection timed out, retrying" in kernel
        detach_clean(mountpoint)
    finally:
        nbdkit.terminate()
        nbdkit.communicate(timeout=10)


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
