"""Our server as a real process (through the CLI), for peers nobody here wrote."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    address: str
    root: Path
    log: list[str] = field(default_factory=list)
    drainer: threading.Thread | None = None

    def uri(self, export: str = "demo") -> str:
        return f"nbd://{self.address}/{export}"

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def log_text(self) -> str:
        return "".join(self.log)

    def rss_mib(self) -> float:
        """Resident memory of the server process now."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")


def start_server_process(
    root: Path,
    *args: str,
    listen: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    source: str | None = None,
) -> RunningServer:
    """``python -m erofs_nbdd serve`` (a free loopback port by default), with ``env`` added
    to the environment and run through ``prefix`` (such as setpriv) if given; ``source``
    (a registry) serves instead of ``root``; waits until it listens."""
    process = subprocess.Popen(
        [
            *prefix,
            *(sys.executable, "-m", "erofs_nbdd", "serve", source or str(root)),
            *args,  # more sources may come first: --listen goes last
            *("--listen", listen),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert process.stderr is not None
    lines: list[str] = []
    ready = threading.Event()
    found: list[str] = []

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"listening on (\S+) \(pid", line)
            if match:
                found.append(match.group(1).rstrip(","))
                ready.set()
        ready.set()

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    if not ready.wait(30) or not found:
        process.kill()
        process.wait()
        drainer.join(10)
        process.stderr.close()
        pytest.fail("server did not start:\n" + "".join(lines))
    return RunningServer(process, found[0], root, lines, drainer)


def stop_server_process(server: RunningServer, signum: int = signal.SIGTERM) -> int:
    """Signal the server, wait for it (bounded), and return its exit status."""
    server.process.send_signal(signum)
    try:
        return server.process.wait(30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail("server did not stop within 30 s of SIGTERM:\n" + server.log_text())
    finally:
        if server.drainer is not None:
            server.drainer.join(10)
        if server.process.stderr is not None:
            server.process.stderr.close()


@pytest.fixture(scope="module")
def served(images: Path) -> Iterator[RunningServer]:
    server = start_server_process(images)
    yield server
    status = stop_server_process(server)
    text = server.log_text()
    assert status == 0, text
    assert "Traceback" not in text and "internal error" not in text, text
    assert "server stopped" in text


def run(
    *cmd: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A peer tool; its output is part of the failure message."""
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"{cmd[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for_log(server: RunningServer, text: str, count: int) -> None:
    """Until ``text`` has been logged ``count`` times (bounded: 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.log_text().count(text) < count:
        time.sleep(0.02)
    assert server.log_text().count(text) >= count, server.log_text()
