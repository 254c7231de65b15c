"""libnbd's tools (nbdinfo, nbdcopy, nbdsh) against our server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from erofs_nbdd.protocol import Opt, Rep, wire
from erofs_nbdd.storage import uring

from ..conftest import evict, random_image, require_tool
from .conftest import run, start_server_process, stop_server_process

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .conftest import RunningServer

pytestmark = pytest.mark.interop

EXPORTS = {"demo": "demo.erofs", "team/app-v2": "team/app-v2.erofs", "alias": "alias.erofs"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nbdinfo_list(served: RunningServer) -> None:
    out = run(require_tool("nbdinfo"), "--list", "--json", served.uri("")).stdout
    listing = json.loads(out)
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert sorted(exports) == sorted(EXPORTS)
    for name, file in EXPORTS.items():
        e = exports[name]
        size = (served.root / file).stat().st_size
        assert e["export-size"] == size
        assert e["description"].startswith("EROFS, uuid ")
        assert f"({size} bytes)" in e["description"]
        assert e["is_read_only"] is True
        assert e["can_multi_conn"] is True
        assert e["block_size_minimum"] == 512
        assert e["block_size_preferred"] == 4096


def test_nbdinfo_json_one_export(served: RunningServer) -> None:
    info = json.loads(run(require_tool("nbdinfo"), "--json", served.uri("team/app-v2")).stdout)
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == (served.root / "team/app-v2.erofs").stat().st_size
    assert "base:allocation" in export["contexts"]
    assert export["can_cache"] is True
    for flag in ("can_flush", "can_trim", "can_zero", "can_fua"):
        assert export[flag] is False


def test_nbdinfo_reports_unknown_export(served: RunningServer) -> None:
    result = run(require_tool("nbdinfo"), served.uri("no/such"), check=False)
    assert result.returncode != 0
    assert "No such file or directory for export: no/such" in result.stderr  # ERR_UNKNOWN


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_nbdcopy_matches_the_file(served: RunningServer, name: str) -> None:
    nbdcopy = require_tool("nbdcopy")
    out = served.root.parent / f"copy-{name.replace('/', '_')}"
    run(nbdcopy, served.uri(name), str(out))
    assert sha256(out) == sha256(served.root / EXPORTS[name])


def test_eight_clients_at_once(served: RunningServer, tmp_path: Path) -> None:
    nbdcopy = require_tool("nbdcopy")
    want = sha256(served.root / "team/app-v2.erofs")

    def copy(i: int) -> str:
        out = tmp_path / f"c{i}"
        run(nbdcopy, "--connections=2", served.uri("team/app-v2"), str(out))
        return sha256(out)

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(copy, range(8))) == [want] * 8


@pytest.mark.parametrize(
    ("io_uring", "workers"), [("auto", "1"), ("off", "1"), ("auto", "2")], ids=str
)
def test_nbdcopy_of_an_image_not_in_the_page_cache(
    tmp_path: Path, io_uring: str, workers: str
) -> None:
    """Every read misses the page cache, so every one goes through io_uring (or, with it
    off, the thread pool, whose replies that finish together are batched): 4 KiB requests,
    64 in flight on each of 4 connections, must still each get their own bytes. With two
    worker processes, the worker that serves them starts its own ring after the fork."""
    nbdcopy = require_tool("nbdcopy")
    root = tmp_path / "images"
    image = random_image(root, "cold", 8 << 20)
    server = start_server_process(root, "--io-uring", io_uring, "--workers", workers)
    try:
        for attempt in range(2):
            evict(image)
            out = tmp_path / f"copy{attempt}"
            run(
                nbdcopy,
                "--connections=4",
                "--requests=64",
                "--request-size=4096",
                server.uri("cold"),
                str(out),
            )
            assert sha256(out) == sha256(image)
    finally:
        status = stop_server_process(server)
    text = server.log_text()
    assert status == 0, text
    assert "WARNING" not in text and "Traceback" not in text, text
    if io_uring == "off":
        said = "reads that miss the page cache go to threads (--io-uring off)"
    elif uring.refusal() is None:
        said = "reads that miss the page cache go through io_uring"
    else:
        said = f"io_uring unavailable ({uring.refusal()})"
    assert said in text, text


NBDSH_SCRIPT = textwrap.dedent(
    """
    import random, sys
    import nbd
    uri, path = sys.argv[1], sys.argv[2]
    data = open(path, "rb").read()
    h = nbd.NBD()
    h.set_strict_mode(0)  # let the server, not libnbd, judge bad requests
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    assert h.can_meta_context("base:allocation")
    assert h.get_size() == len(data), (h.get_size(), len(data))
    assert h.is_read_only() and h.can_multi_conn() and h.can_cache()
    rng = random.Random(7)
    for _ in range(300):
        n = rng.choice([512, 4096, 65536, 1048576])
        off = rng.randrange(0, len(data) - n + 1) // 512 * 512
        assert h.pread(n, off) == data[off:off + n], (off, n)
    def errno_of(fn):
        try:
            fn()
        except nbd.Error as e:
            return e.errno
        return None
    print("pwrite", errno_of(lambda: h.pwrite(b"x" * 512, 0)))
    print("trim", errno_of(lambda: h.trim(4096, 0)))
    print("past_end", errno_of(lambda: h.pread(512, len(data))))
    print("misaligned", errno_of(lambda: h.pread(512, 1)))
    h.cache(len(data), 0)
    extents = []
    h.block_status(len(data), 0, lambda ctx, off, ents, err: extents.append(ents) or 0)
    print("extents_total", sum(extents[0][0::2]))
    assert h.pread(4096, 0) == data[:4096]
    h.shutdown()
    print("ok")
    """
)


def test_nbdsh_libnbd_reads_and_errors(served: RunningServer, tmp_path: Path) -> None:
    """python3-libnbd exists for Debian's own python3 only, so run it as a subprocess."""
    require_tool("nbdsh")
    script = tmp_path / "check.py"
    script.write_text(NBDSH_SCRIPT)
    image = served.root / "demo.erofs"
    out = run("/usr/bin/python3", str(script), served.uri("demo"), str(image)).stdout
    result = dict(line.split() for line in out.splitlines() if " " in line)
    assert result == {
        "pwrite": "EPERM",
        "trim": "EPERM",
        "past_end": "EINVAL",
        "misaligned": "EINVAL",
        "extents_total": str(image.stat().st_size),
    }
    assert out.splitlines()[-1] == "ok"


def test_nbdsh_command_line(served: RunningServer) -> None:
    # nbdsh runs `python3 -m nbd`: it needs Debian's python3, where python3-libnbd lives
    script = "print(h.pread(512, 1024)[:4].hex())"
    nbdsh = require_tool("nbdsh")
    out = run(nbdsh, "-u", served.uri("demo"), "-c", script, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "e2e1f5e0"  # the EROFS magic, little-endian, at 1024


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_signal_with_a_client_attached_exits_zero(images: Path, signum: str) -> None:
    """A client mid-transmission does not stop the server from exiting cleanly."""
    import signal
    import subprocess

    from .conftest import start_server_process, stop_server_process

    server = start_server_process(images, "--shutdown-grace", "5")
    client = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-c",
            "import nbd,sys,time; h=nbd.NBD(); h.connect_uri(sys.argv[1]);"
            " h.pread(4096, 0); print('attached', flush=True); time.sleep(60)",
            server.uri("demo"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "attached"
        assert stop_server_process(server, getattr(signal, signum)) == 0
    finally:
        client.kill()
        client.communicate()
    text = server.log_text()
    assert f"{signum}: shutting down" in text
    assert "ended=server shutdown" in text
    assert "Traceback" not in text


class GoRefusingRelay:
    """A loopback relay to our server that answers NBD_OPT_GO (and INFO) itself with
    NBD_REP_ERR_UNSUP, as a server from before GO would, and passes everything else on:
    libnbd then falls back to NBD_OPT_EXPORT_NAME, which it uses with no other server here.
    ``options`` records the options the client sent, in order."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.options: list[int] = []
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> GoRefusingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):  # the listener closed: done
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._upstream)
                self._sockets += [client, server]
                self._start(self._pipe, server, client)
                self._start(self._options, client, server)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _options(self, client: socket.socket, server: socket.socket) -> None:
        """Client flags, then options one at a time (the client waits for each reply, so
        a refusal never lands inside a reply being relayed), then plain relaying."""

        def take(n: int) -> bytes:
            data = b""
            while len(data) < n:
                part = client.recv(n - len(data))
                if not part:
                    raise OSError("client closed")
                data += part
            return data

        with contextlib.suppress(OSError):
            server.sendall(take(4))
            while True:
                header = take(wire.OPTION_HEADER.size)
                _, opt, length = wire.OPTION_HEADER.unpack(header)
                data = take(length)
                self.options.append(opt)
                if opt in (Opt.GO, Opt.INFO):
                    client.sendall(wire.option_reply(opt, Rep.ERR_UNSUP))
                    continue
                server.sendall(header + data)
                if opt in (Opt.EXPORT_NAME, Opt.ABORT):
                    break
        self._pipe(client, server)


UNALIGNED_SCRIPT = textwrap.dedent(
    """
    import sys
    import nbd
    uri, path, ask = sys.argv[1], sys.argv[2], sys.argv[3] == "ask"
    data = open(path, "rb").read()
    h = nbd.NBD()
    h.set_strict_mode(0)  # let the server, not libnbd, judge every request
    h.set_request_block_size(ask)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    print("minimum", h.get_block_size(nbd.SIZE_MINIMUM))  # 0: none advertised
    size = len(data)
    for off, n in [(1, 513), (size - 1, 1), (4097, 65539), (12345, 1048583), (0, 4096)]:
        try:
            got = h.pread(n, off)
        except nbd.Error as e:
            print("read", off, n, e.errno)
        else:
            print("read", off, n, "ok" if got == data[off:off + n] else "WRONG BYTES")
    if h.can_meta_context("base:allocation"):
        for off, n in [(1, 513), (4097, 100)]:
            extents = []
            try:
                h.block_status(n, off, lambda ctx, o, ents, err: extents.extend(ents) or 0)
            except nbd.Error as e:
                print("status", off, n, e.errno)
            else:
                print("status", off, n, sum(extents[0::2]) >= n)
    assert h.pread(512, 1024)[:4] == bytes.fromhex("e2e1f5e0")  # still connected
    h.shutdown()
    print("ok")
    """
)


@pytest.mark.parametrize("how", ["GO asking for block sizes", "GO not asking", "EXPORT_NAME"])
def test_libnbd_unaligned_reads_follow_what_was_agreed(
    served: RunningServer, tmp_path: Path, how: str
) -> None:
    """libnbd with strict mode off, so the server judges: a client told 512 in the GO it
    asked in gets EINVAL for a read at offset 1 or of 513 bytes, and the connection goes
    on; a client told nothing (a GO that did not ask, or EXPORT_NAME) gets the bytes, as
    from nbdkit, qemu-nbd and nbd-server (doc/proto.md "Size constraints")."""
    require_tool("nbdsh")
    script = tmp_path / "unaligned.py"
    script.write_text(UNALIGNED_SCRIPT)
    image = served.root / "demo.erofs"
    size = image.stat().st_size
    ask = "ask" if how == "GO asking for block sizes" else "no"
    with GoRefusingRelay(served.address) as relay:
        address = relay.address if how == "EXPORT_NAME" else served.address
        uri = f"nbd://{address}/demo"
        out = run("/usr/bin/python3", str(script), uri, str(image), ask).stdout
    lines = out.splitlines()
    assert lines[-1] == "ok", out
    agreed = how == "GO asking for block sizes"
    assert lines[0] == f"minimum {512 if agreed else 0}"
    bad = "EINVAL" if agreed else None
    assert lines[1:-1] == [
        f"read 1 513 {bad or 'ok'}",
        f"read {size - 1} 1 {bad or 'ok'}",
        f"read 4097 65539 {bad or 'ok'}",
        f"read 12345 1048583 {bad or 'ok'}",
        "read 0 4096 ok",
        f"status 1 513 {bad or True}",
        f"status 4097 100 {bad or True}",
    ], out
    if how == "EXPORT_NAME":
        assert relay.options[-2:] == [Opt.GO, Opt.EXPORT_NAME], relay.options
