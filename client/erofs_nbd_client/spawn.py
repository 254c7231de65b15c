"""Helper processes (the bridge, the ioctl holder): started detached in their own session so
they outlive attach, with chosen fds inherited, and a status pipe attach waits on."""

from __future__ import annotations

import os
import select
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def spawn(module: str, args: list[str], fds: list[int], log_path: Path) -> int:
    """Run ``python -m module args`` with ``fds`` inherited and output to ``log_path``."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", module, *args],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log_fd)


def read_line(fd: int, timeout: float) -> bytes:
    """One line from a status pipe; empty if the helper died or said nothing in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def reap(pid: int, timeout: float = 5) -> None:
    """Collect a helper that is ours and exiting, so it leaves no zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
