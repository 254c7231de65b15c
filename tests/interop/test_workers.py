"""``--workers N``: several processes share the listening socket, the least loaded taking
each connection; signals reach them all, and a worker that dies is replaced."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..conftest import require_tool
from .conftest import start_server_process, stop_server_process, wait_for_log

if TYPE_CHECKING:
    from pathlib import Path


def copy(uri: str) -> str:
    out = subprocess.run(
        [require_tool("nbdcopy"), uri, "-"], capture_output=True, timeout=60, check=True
    ).stdout
    return hashlib.sha256(out).hexdigest()


def worker_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", log)]


def test_workers_share_the_load_and_stop_together(images: Path) -> None:
    server = start_server_process(images, "--workers", "2")
    try:
        want = hashlib.sha256((images / "demo.erofs").read_bytes()).hexdigest()
        with ThreadPoolExecutor(8) as pool:
            digests = list(pool.map(copy, [server.uri("demo")] * 16))
        assert digests == [want] * 16
        pids = worker_pids(server.log_text())
        assert len(pids) == 2
        served_by = set(re.findall(r"\[(\d+)\]: #\d+ .* export=demo", server.log_text()))
        assert served_by <= {str(p) for p in pids}
        assert len(served_by) == 2, server.log_text()  # 16 connections, both took some

        # A worker killed outright is replaced; the server keeps serving.
        os.kill(pids[0], signal.SIGKILL)
        wait_for_log(server, " started (pid ", 3)
        assert len(worker_pids(server.log_text())) == 3, server.log_text()
        assert "died unexpectedly" in server.log_text()
        assert copy(server.uri("demo")) == want
    finally:
        status = stop_server_process(server)
    text = server.log_text()
    assert status == 0, text
    assert text.count("server stopped") == 2, text  # both live workers shut down cleanly
    assert "Traceback" not in text
    for pid in worker_pids(text):
        assert not os.path.exists(f"/proc/{pid}")  # reaped by the parent, none left behind


def test_connections_held_at_once_are_spread_evenly(images: Path) -> None:
    """Four connections held open together land two on each worker, every time. (Where the
    kernel hashed connections to workers with SO_REUSEPORT, 2+2 came up 3 times in 8.)"""
    server = start_server_process(images, "--workers", "2")
    try:
        wait_for_log(server, "listening on", 2)  # both workers, not just the first
        rounds = []
        for n in range(1, 4):
            socks = []
            for _ in range(4):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                socks.append(sock)
                assert sock.recv(8) == b"NBDMAGIC"  # accepted (and counted) by now
            rounds.append([s.getsockname()[1] for s in socks])
            for sock in socks:
                sock.close()
            wait_for_log(server, " ended=", 4 * n)  # all gone before the next round
        worker_of = {
            int(port): pid
            for pid, port in re.findall(r"\[(\d+)\]: #\d+ 127\.0\.0\.1:(\d+) ", server.log_text())
        }
        for ports in rounds:
            spread = sorted([worker_of[p] for p in ports].count(w) for w in set(worker_of.values()))
            assert spread == [2, 2], server.log_text()
    finally:
        assert stop_server_process(server) == 0, server.log_text()


def test_an_upgrade_hands_every_new_connection_to_the_new_server(
    images: Path, tmp_path: Path
) -> None:
    """The README's upgrade with --workers: the new server on the same port, then SIGTERM
    to the old one. While the old one's busy client keeps it draining, every new
    connection reaches the new server: the old parent closed its copy of the socket too
    (else about half would wait in a queue nobody accepts from)."""
    import shutil
    import time

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(images / "demo.erofs", fresh / "fresh.erofs")
    old = start_server_process(images, "--workers", "2", "--shutdown-grace", "8")
    busy = subprocess.Popen(  # never pauses 0.1 s: the old server drains it until the grace
        [
            "/usr/bin/python3",
            "-c",
            "import nbd,sys,time\nh=nbd.NBD(); h.connect_uri(sys.argv[1]); print(1, flush=True)\n"
            "end=time.monotonic()+30\nwhile time.monotonic()<end:\n"
            " h.pread(4096, 0); time.sleep(0.02)",
            old.uri("demo"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    new = None
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == "1"
        new = start_server_process(fresh, listen=old.address)
        assert "another server of this user listens" in new.log_text()
        old.process.send_signal(signal.SIGTERM)
        wait_for_log(old, "SIGTERM: shutting down", 2)  # both workers
        time.sleep(0.5)  # the parent's close comes with the signal; let it land
        info = require_tool("nbdinfo")
        for _ in range(12):
            listed = subprocess.run(
                [info, "--list", f"nbd://{old.address}/"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            assert listed.returncode == 0, listed.stderr
            assert "fresh" in listed.stdout and "demo" not in listed.stdout, listed.stdout
        assert old.process.poll() is None  # still draining its busy client
    finally:
        busy.kill()
        busy.communicate()
        assert stop_server_process(old) == 0
        if new is not None:
            assert stop_server_process(new) == 0
