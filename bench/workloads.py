"""The client side of the benchmark: fio's nbd engine and nbdcopy (both libnbd), plus the
memory check of our server under many connections with requests in flight."""

from __future__ import annotations

import json
import random
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .servers import Server

MiB = 1 << 20


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    kind: str  # "fio" or "nbdcopy"
    rw: str = ""
    bs: str = ""
    iodepth: int = 1
    numjobs: int = 1
    #: Run with the image dropped from the page cache, not read into it: every read starts
    #: at the disk, as for an image no client has read since the server's machine booted.
    cold: bool = False


WORKLOADS = {
    w.name: w
    for w in (
        Workload("seq1m_qd8", "seq 1M QD8 (MiB/s)", "fio", "read", "1M", 8),
        Workload("rand4k_qd1", "rand 4k QD1 (IOPS)", "fio", "randread", "4k", 1),
        Workload("rand4k_qd32", "rand 4k QD32 (IOPS)", "fio", "randread", "4k", 32),
        Workload("rand4k_qd32_j2", "rand 4k QD32 x2 conn (IOPS)", "fio", "randread", "4k", 32, 2),
        Workload(
            "rand4k_qd32_cold", "rand 4k QD32 cold (IOPS)", "fio", "randread", "4k", 32, cold=True
        ),
        Workload("nbdcopy", "nbdcopy (MiB/s)", "nbdcopy"),
    )
}


def client_argv(argv: list[str], cpus: str | None, prefix: list[str]) -> list[str]:
    return (["taskset", "-c", cpus] if cpus else []) + prefix + argv


def run_fio(
    w: Workload, uri: str, seconds: float, cpus: str | None, prefix: list[str]
) -> dict[str, float]:
    argv = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.iodepth}",
        f"--numjobs={w.numjobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={seconds}",
        "--ramp_time=0.5",
        "--output-format=json",
        "--randrepeat=0",
    ]
    result = subprocess.run(
        client_argv(argv, cpus, prefix), capture_output=True, text=True, timeout=seconds + 60
    )
    if result.returncode != 0:
        raise RuntimeError(f"fio failed: {result.stderr[-1500:]}")
    job = json.loads(result.stdout[result.stdout.index("{") :])["jobs"][0]
    read = job["read"]
    if job.get("error") or read["io_bytes"] == 0:
        raise RuntimeError(f"fio read nothing: {job.get('error')}")
    pct = read["clat_ns"].get("percentile", {})
    return {
        "iops": read["iops"],
        "mib_s": read["bw_bytes"] / MiB,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


def run_nbdcopy(
    uri: str,
    size: int,
    cpus: str | None,
    prefix: list[str],
    loops: int = 2,
    timeout: float = 300.0,
) -> dict[str, float]:
    """The whole export to null:, the best of ``loops`` copies."""
    argv = client_argv(["nbdcopy", uri, "null:"], cpus, prefix)
    best = float("inf")
    for _ in range(loops):
        start = time.monotonic()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"nbdcopy failed: {result.stderr[-1500:]}")
        best = min(best, time.monotonic() - start)
    return {"mib_s": size / MiB / best, "seconds": best}


def primary(w: Workload) -> str:
    """The metric a workload is judged by."""
    return "mib_s" if w.name in ("seq1m_qd8", "nbdcopy") else "iops"


def memory_under_load(
    server: Server, size: int, connections: int = 64, depth: int = 128, hold: float = 2.0
) -> dict[str, float]:
    """RSS of ``server`` while ``connections`` clients each keep ``depth`` reads of 128 KiB
    (the kernel's usual request size) in flight without reading replies, then read them."""
    from erofs_nbdd.protocol import NEED_DATA, ClientHandshake, ClientTransmission, Cmd

    rng = random.Random(7)
    before = server.rss_mib()
    socks = []
    machines = []
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            socks.append(sock)
            hs = ClientHandshake()
            while hs.next_event() is NEED_DATA:  # greeting
                hs.receive_data(sock.recv(4096))
            sock.sendall(hs.send_client_flags() + hs.opt_go("img"))
            for _ in range(1000):
                event = hs.next_event()
                if event is NEED_DATA:
                    hs.receive_data(sock.recv(65536))
                elif type(event).__name__ in ("OptionAck", "OptionError"):
                    break
            tx = ClientTransmission(hs.negotiated)
            tx.receive_data(hs.trailing_data)
            requests = b"".join(
                tx.request(
                    Cmd.READ, rng.randrange(0, size - (128 << 10)) // 4096 * 4096, 128 << 10
                )[1]
                for _ in range(depth)
            )
            sock.sendall(requests)
            machines.append(tx)
        peak = before
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            peak = max(peak, server.rss_mib())
            time.sleep(0.05)
        replies = 0
        for sock, tx in zip(socks, machines, strict=True):
            got = 0
            for _ in range(100_000):
                if got == depth:
                    break
                reply = tx.next_event()
                if reply is NEED_DATA:
                    tx.receive_data(sock.recv(1 << 20))
                    peak = max(peak, server.rss_mib()) if got % 32 == 0 else peak
                else:
                    got += 1
            replies += got
    finally:
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    return {"rss_before_mib": before, "rss_peak_mib": peak, "replies": replies}
