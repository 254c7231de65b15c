"""The servers the benchmark compares, each serving one image as export ``img`` on
127.0.0.1, plaintext or TLS, started as process groups so they are always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
EXPORT = "img"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    name: str  # e.g. "erofs-nbdd", "nbdkit-tls"
    argv: list[str]
    port: int
    tls: bool
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.name.removesuffix("-tls")

    def uri(self) -> str:
        """fio's nbd engine may not name files in a URI, so TLS clients find their
        certificates where libnbd looks by default (see ``client_prefix``)."""
        return f"{'nbds' if self.tls else 'nbd'}://{HOST}:{self.port}/{EXPORT}"

    def start(self, cpus: str | None) -> None:
        argv = ["taskset", "-c", cpus, *self.argv] if cpus else self.argv
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded wait for the port
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port} within 30 s")

    def pids(self) -> list[int]:
        """The server's processes (a multi-process server has several)."""
        if self.process is None:
            return []
        found = [self.process.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.process.pid:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return sorted(set(found))

    def cpu_seconds(self) -> float:
        """User+system CPU of the process group so far (children reaped or not)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / tick

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(15)
        except ProcessLookupError:
            pass


def make_servers(
    names: list[str], image: Path, pki: Path, logs: Path, base_port: int, workers: int | None
) -> list[Server]:
    """Command lines for each named server; ``image`` lies in a directory of its own, so
    erofs-nbdd serves exactly it, as ``img``."""
    out = []
    for i, name in enumerate(names):
        port = base_port + i
        tls = name.endswith("-tls")
        kind = name.removesuffix("-tls")
        if kind == "erofs-nbdd":
            argv = [sys.executable, "-m", "erofs_nbdd", "serve", str(image.parent),
                    "--listen", f"{HOST}:{port}"]  # fmt: skip
            if workers is not None:
                argv += ["--workers", str(workers)]
            if tls:
                argv += ["--tls", "require", "--tls-certificates", str(pki)]
        elif kind == "nbdkit":
            argv = ["nbdkit", "-r", "-f", "-i", HOST, "-p", str(port)]
            if tls:
                argv += ["--tls=require", f"--tls-certificates={pki}"]
            argv += ["file", str(image)]
        elif kind == "qemu-nbd":
            argv = ["qemu-nbd", "-r", "-f", "raw", "-t", "-e", "0", "-x", EXPORT,
                    "-b", HOST, "-p", str(port)]  # fmt: skip
            if tls:
                argv += ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
                         "--tls-creds", "tls0"]  # fmt: skip
            argv.append(str(image))
        else:
            raise ValueError(f"unknown server {name!r}")
        out.append(Server(name, argv, port, tls, logs / f"{name}.log"))
    return out
