"""``--workers N``: N server processes accepting from the same listening sockets.

One Python process serves with one core; several spread connections over the cores (the
least loaded takes each: ``balance.py``). The parent binds the sockets, forks the workers
(before any trio loop exists), forwards SIGINT/SIGTERM to them, restarts one that dies
unexpectedly, and exits when all have stopped. Server-wide limits are split between the
workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from ..transport.listen import close_all

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence

    from ..config import ServerConfig
    from .balance import LoadBoard

log = logging.getLogger("erofs_nbdd.workers")

#: More unexpected worker deaths than this within RESTART_WINDOW seconds: give up.
MAX_RESTARTS = 10
RESTART_WINDOW = 60.0


def share(config: ServerConfig, workers: int) -> ServerConfig:
    """Each worker's part of the server-wide limits (rounded up)."""
    lim = config.limits

    def part(total: int) -> int:
        return max(1, -(-total // workers))

    limits = dataclasses.replace(
        lim,
        max_connections=part(lim.max_connections),
        max_connections_per_client=part(lim.max_connections_per_client)
        if lim.max_connections_per_client
        else 0,
        max_server_buffer=max(part(lim.max_server_buffer), lim.max_payload),
        max_client_buffer=part(lim.max_client_buffer) if lim.max_client_buffer else 0,
    )
    return dataclasses.replace(config, limits=limits)


def run_workers(
    board: LoadBoard,
    count: int,
    serve: Callable[[int], int],
    listening: Sequence[socket.socket] = (),
) -> int:
    """Fork ``count`` processes, each running ``serve(its index)``; supervise them until
    they have all exited after a signal. Returns the exit status for the parent. The
    parent holds the ``listening`` sockets for workers it restarts, and closes them when
    told to stop: a new server sharing the port (SO_REUSEPORT) then gets every new
    connection, none waits in a queue nobody accepts from."""
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            close_all(list(listening))
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def spawn(index: int) -> int:
        pid = os.fork()
        if pid == 0:  # the worker: default signal handling, its own trio loop
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            status = 1
            try:
                status = serve(index)
            finally:
                os._exit(status)
        log.info("worker %d started (pid %d)", index, pid)
        return pid

    children: dict[int, int] = {}  # pid -> worker index
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for i in range(count):
        children[spawn(i)] = i
    # The parent keeps the sockets (a restarted worker needs them) but never accepts.
    deaths: list[float] = []
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (code if code > 0 else 0)
            continue
        log.error("worker %d (pid %d) died unexpectedly (status %d)", index, pid, code)
        board.clear(index)
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
        if len(deaths) > MAX_RESTARTS:
            log.error("workers keep dying (%d in %.0f s); stopping", len(deaths), RESTART_WINDOW)
            forward(signal.SIGTERM, None)
            status = 1
            continue
        children[spawn(index)] = index
    return status
