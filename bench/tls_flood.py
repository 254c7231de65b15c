"""What a burst of TLS handshakes costs the clients a server already has (issue 19).

A victim client, connected before the burst, reads 4 KiB at a time (one request in flight)
and records each read's latency; then ``--clients`` clients, each stopped just after its
STARTTLS was acknowledged, start their TLS handshakes at once. The burst runs in a process of
its own (``flood``), so its threads take no GIL from the victim. Reported: the victim's worst
read before and during the burst, and how long the handshakes took.

    python -m bench.tls_flood                      # erofs-nbdd serve --tls on, then nbdkit
    python -m bench.tls_flood --servers erofs-nbdd --repeat 5

Needs mkfs.erofs and, for the comparison, nbdkit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
OPT_MAGIC = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
READ_SIZE = 4096


def _exact(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError(f"the server closed after {len(out)} of {n} bytes")
        out += got
    return bytes(out)


def _option(sock: socket.socket | ssl.SSLSocket, opt: int, data: bytes = b"") -> None:
    """Send an option; its replies up to the ACK (an error raises)."""
    sock.sendall(OPT_MAGIC + struct.pack(">II", opt, len(data)) + data)
    for _ in range(32):  # GO sends a few INFO replies before its ACK
        magic, got, rep, length = struct.unpack(">QIII", _exact(sock, 20))
        if magic != REPLY_MAGIC or got != opt:
            raise ConnectionError("not an option reply")
        _exact(sock, length)
        if rep == 1:
            return
        if rep != 3:
            raise ConnectionError(f"option {opt} refused: {rep:#x}")
    raise ConnectionError("no ACK")


def client_context(client_dir: Path) -> ssl.SSLContext:
    """From a client's directory of ``erofs-nbdd certs``: the CA and its certificate."""
    ctx = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
    ctx.load_cert_chain(client_dir / "client-cert.pem", client_dir / "client-key.pem")
    return ctx


def open_starttls(address: tuple[str, int]) -> socket.socket:
    """A connection whose STARTTLS the server has acknowledged: its next byte is TLS."""
    sock = socket.create_connection(address, timeout=60)
    if _exact(sock, 18)[:16] != b"NBDMAGICIHAVEOPT":
        raise ConnectionError("not a fixed newstyle server")
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    _option(sock, 5)  # STARTTLS
    return sock


def open_victim(
    address: tuple[str, int], export: str, ctx: ssl.SSLContext | None
) -> socket.socket | ssl.SSLSocket:
    """A connection in transmission, over TLS when given ``ctx``."""
    sock: socket.socket | ssl.SSLSocket
    if ctx is None:
        sock = socket.create_connection(address, timeout=60)
        _exact(sock, 18)
        sock.sendall(struct.pack(">I", 3))
    else:
        sock = ctx.wrap_socket(open_starttls(address), server_hostname="localhost")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    name = export.encode()
    _option(sock, 7, struct.pack(">I", len(name)) + name + b"\0\0")  # GO
    return sock


def read_loop(
    sock: socket.socket | ssl.SSLSocket, stop: threading.Event, size: int, limit: int
) -> list[tuple[float, float]]:
    """4 KiB reads, one at a time, until ``stop`` (at most ``limit``): (start, latency)."""
    out: list[tuple[float, float]] = []
    blocks = max(1, size // READ_SIZE)
    for i in range(limit):
        if stop.is_set():
            break
        start = time.perf_counter()
        sock.sendall(REQUEST.pack(0x25609513, 0, 0, i, (i * 7919 % blocks) * READ_SIZE, READ_SIZE))
        magic, error, _ = REPLY.unpack(_exact(sock, REPLY.size))
        if magic != 0x67446698 or error:
            raise ConnectionError(f"read failed: {magic:#x} {error}")
        _exact(sock, READ_SIZE)
        out.append((start, time.perf_counter() - start))
    return out


def flood(address: tuple[str, int], client_dir: Path, clients: int) -> dict[str, Any]:
    """``clients`` connections up to STARTTLS, then all their handshakes at once (threads:
    OpenSSL lets go of the GIL while it works). The handshake times and failures."""
    ctx = client_context(client_dir)
    socks = [open_starttls(address) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    times: list[float] = []
    errors: list[str] = []
    tls: list[ssl.SSLSocket] = []
    lock = threading.Lock()

    def one(sock: socket.socket) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            wrapped = ctx.wrap_socket(sock, server_hostname="localhost")
        except (OSError, ssl.SSLError) as exc:
            with lock:
                errors.append(str(exc))
            return
        with lock:
            times.append(time.perf_counter() - start)
            tls.append(wrapped)

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join(120)
    wall = time.perf_counter() - started
    for s in tls:
        s.close()
    for raw in socks:
        raw.close()
    times.sort()
    return {
        "released": started,
        "finished": started + wall,
        "completed": len(times),
        "errors": errors[:5],
        "failed": len(errors),
        "p50": statistics.median(times) if times else None,
        "max": times[-1] if times else None,
        "wall": wall,
    }


@dataclass
class Result:
    before: float  # the victim's worst read before the burst
    connecting: float  # its worst while the burst's clients connect and ask for STARTTLS
    during: float  # its worst while their TLS handshakes run, all at once
    reads: int  # reads during the handshakes
    handshakes: dict[str, Any]  # what flood returned


def measure(
    address: tuple[str, int],
    client_dir: Path,
    *,
    export: str,
    size: int,
    clients: int = 200,
    victim: str = "tls",
    settle: float = 0.5,
    nice: int = 0,
) -> Result:
    """One run: the victim reads for ``settle`` seconds, then during the burst (run by
    ``python -m bench.tls_flood flood`` in a process of its own) and ``settle`` after."""
    sock = open_victim(address, export, client_context(client_dir) if victim != "plain" else None)
    stop = threading.Event()
    reads: list[tuple[float, float]] = []
    limit = 0 if victim == "idle" else 10_000_000
    reader = threading.Thread(
        target=lambda: reads.extend(read_loop(sock, stop, size, limit)), daemon=True
    )
    try:
        reader.start()
        time.sleep(settle)
        begin = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        argv = [sys.executable, "-m", "bench.tls_flood", "flood", f"{address[0]}:{address[1]}"]
        out = subprocess.run(
            [*argv, str(client_dir), str(clients), "--nice", str(nice)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=True,
        ).stdout
        time.sleep(settle)
    finally:
        stop.set()
        reader.join(30)
        sock.close()
    found = json.loads(out)
    released, finished = found["released"], found["finished"]  # the same clock, CLOCK_MONOTONIC

    def worst(start: float, stop: float) -> list[float]:
        return [lat for at, lat in reads if start <= at < stop or start < at + lat <= stop]

    during = worst(released, finished)
    return Result(
        max(worst(0, begin), default=0.0),
        max(worst(begin, released), default=0.0),
        max(during, default=0.0),
        len(during),
        found,
    )


@contextlib.contextmanager
def running(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process listening on ``port`` (bounded wait), stopped afterwards."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited:\n{log.read_text()[-2000:]}")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_argv(
    kind: str, root: Path, image: Path, certs: Path, port: int, extra: list[str]
) -> list[str]:
    if kind == "erofs-nbdd":
        return [
            sys.executable,
            "-m",
            "erofs_nbdd",
            "serve",
            str(root),
            "--listen",
            f"{HOST}:{port}",
            "--tls",
            "on",
            "--tls-certificates",
            str(certs),
            *extra,
        ]
    return [
        "nbdkit",
        "-r",
        "-f",
        "-i",
        HOST,
        "-p",
        str(port),
        "--tls=on",
        f"--tls-certificates={certs}",
        "file",
        str(image),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_flood", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    f = sub.add_parser("flood", help="the burst alone (what measure runs); prints JSON")
    f.add_argument("address")
    f.add_argument("client_dir", type=Path)
    f.add_argument("clients", type=int)
    f.add_argument("--nice", type=int, default=0)
    parser.add_argument("--servers", default="erofs-nbdd,nbdkit")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="the burst's process at this niceness: its own crypto then takes less of the "
        "CPUs from the server and the victim, as clients on other machines would",
    )
    parser.add_argument(
        "--victim",
        choices=["tls", "plain", "idle"],
        default="tls",
        help="the victim's connection; idle: connected over TLS, reading nothing (for the "
        "handshake times alone)",
    )
    parser.add_argument(
        "--serve-args", default="", help="more options for erofs-nbdd serve, one string"
    )
    args = parser.parse_args(argv)
    if args.command == "flood":
        host, _, port = args.address.rpartition(":")
        os.nice(args.nice)
        print(json.dumps(flood((host, int(port)), args.client_dir, args.clients)))
        return 0
    with tempfile.TemporaryDirectory(prefix="erofs-nbdd-tls-flood-") as tmp:
        work = Path(tmp)
        certs = work / "pki"
        subprocess.run(
            [sys.executable, "-m", "erofs_nbdd", "certs", str(certs), "--client", "victim"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        tree = work / "tree"
        tree.mkdir()
        (tree / "data.bin").write_bytes(os.urandom(8 << 20))
        root = work / "export"
        root.mkdir()
        image = root / "img.erofs"
        subprocess.run(["mkfs.erofs", str(image), str(tree)], check=True, capture_output=True)
        for kind in args.servers.split(","):
            port = free_port()
            argv = server_argv(kind, root, image, certs, port, args.serve_args.split())
            export = "img" if kind == "erofs-nbdd" else ""
            with running(argv, port, work / f"{kind}.log"):
                runs = [
                    measure(
                        (HOST, port),
                        certs / "clients" / "victim",
                        export=export,
                        size=image.stat().st_size,
                        clients=args.clients,
                        victim=args.victim,
                        nice=args.nice,
                    )
                    for _ in range(args.repeat)
                ]
            for r in runs:
                h = r.handshakes
                print(
                    f"{kind}: victim worst read {r.before * 1e3:.1f} ms before, "
                    f"{r.connecting * 1e3:.1f} ms while connecting, "
                    f"{r.during * 1e3:.1f} ms during the handshakes ({r.reads} reads); handshakes "
                    f"{h['completed']}/{args.clients} done, {h['failed']} failed, "
                    f"p50 {(h['p50'] or 0) * 1e3:.1f} ms, max {(h['max'] or 0) * 1e3:.1f} ms, "
                    f"burst {h['wall'] * 1e3:.0f} ms",
                    flush=True,
                )
            worst = statistics.median(r.during for r in runs)
            print(f"{kind}: median of the worst reads during a burst: {worst * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
