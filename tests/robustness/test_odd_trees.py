"""An export directory full of filesystem oddities: symlink loops, a tree 1,100 levels deep,
a name that is not UTF-8, a FIFO, a socket and a device named like images, a dangling link,
a link out of the root, files and a directory that cannot be read, a file swapped for a FIFO
between the scan's stat and its open. Each is not served, with exactly one warning, and none
of them may stop the server starting or any client's LIST, INFO or GO."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from erofs_nbd_client.negotiate import Handshake, NegotiationError, Session
from erofs_nbdd.config import ServerConfig
from erofs_nbdd.protocol import (
    ClientHandshake,
    ListOption,
    OptionAck,
    OptionError,
    Rep,
    ServerEntry,
    wire,
)
from erofs_nbdd.protocol.server_handshake import ServerHandshake
from erofs_nbdd.server.connection import Connection
from erofs_nbdd.storage import exports
from erofs_nbdd.storage.exports import MAX_DEPTH, Export, ExportDirectory
from erofs_nbdd.storage.file import FileBackend, NotRegularFile, open_regular
from erofs_nbdd.transport.stream import StreamTransport

from ..conftest import require_tool
from ..interop.conftest import run, start_server_process, stop_server_process
from .conftest import RawClient, assert_serves, log_problems

#: Directories in the deep chain: far past MAX_DEPTH, and its path (about 12,000 bytes)
#: past PATH_MAX, so it is built one directory descriptor at a time.
DEEP = 1100
DEEP_DIRS = ["deep", *(f"level-{i:04d}" for i in range(1, DEEP))]
SHALLOW = "/".join(DEEP_DIRS[:3]) + "/shallow"  # an image three levels down: served
#: The directory whose subdirectories the walk does not enter.
DEEPEST_LISTED = "/".join(DEEP_DIRS[:MAX_DEPTH])

SERVED = {"demo", "team/app-v2", SHALLOW}
#: The paths that get one warning each, in any tree build_odd_tree makes.
ODD = {
    "loop-a",
    "loop-b",
    "self.erofs",
    "bad\\xff.erofs",  # b"bad\xff.erofs", escaped as the warning shows it
    "dir\\xfe",  # a directory so named: one warning for it, none for what it holds
    "x.erofs",  # a FIFO
    "sock.erofs",
    "gone.erofs",  # a link to a file that is no more, as if removed while scanning
    "escape.erofs",
    "junk.erofs",
    DEEPEST_LISTED,
}
#: ... and with ``unreadable``: what mode 000 keeps the server out of.
UNREADABLE = {"locked.erofs", "sealed"}
LOGGER = "erofs_nbdd.storage.exports"


def _write_at(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def build_deep(root: Path, image: bytes) -> None:
    """DEEP_DIRS nested under ``root``, made relative to each parent's descriptor (their
    full path is too long for the kernel), with an image near the top and at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, name in enumerate(DEEP_DIRS, 1):
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = inner
            if depth == 3:
                _write_at(fd, "shallow.erofs", image)
        _write_at(fd, "bottom.erofs", image)
    finally:
        os.close(fd)


def build_odd_tree(root: Path, images: Path, outside: Path, *, unreadable: bool) -> set[str]:
    """SERVED and ODD (and UNREADABLE) in ``root``; the odd paths made, with a device when
    this process may make one."""
    image = (images / "demo.erofs").read_bytes()
    (root / "demo.erofs").write_bytes(image)
    (root / "team").mkdir()
    shutil.copy(images / "team" / "app-v2.erofs", root / "team" / "app-v2.erofs")
    (root / "loop-a").symlink_to("loop-b")
    (root / "loop-b").symlink_to("loop-a")
    (root / "self.erofs").symlink_to("self.erofs")
    build_deep(root, image)
    with open(os.path.join(os.fsencode(root), b"bad\xff.erofs"), "wb") as f:
        f.write(image)  # a good image: only its name keeps it out
    os.mkdir(os.path.join(os.fsencode(root), b"dir\xfe"))
    with open(os.path.join(os.fsencode(root), b"dir\xfe", b"inner.erofs"), "wb") as f:
        f.write(image)
    os.mkfifo(root / "x.erofs")
    os.mknod(root / "sock.erofs", stat.S_IFSOCK | 0o644)
    (root / "gone.erofs").symlink_to("removed.erofs")
    (outside / "secret.erofs").write_bytes(image)
    (root / "escape.erofs").symlink_to(outside / "secret.erofs")
    (root / "junk.erofs").write_text("not an image\n")
    odd = set(ODD)
    with contextlib.suppress(PermissionError):  # CAP_MKNOD: root outside a user namespace
        os.mknod(root / "null.erofs", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        odd.add("null.erofs")
    if unreadable:
        (root / "locked.erofs").write_bytes(image)
        (root / "locked.erofs").chmod(0)
        (root / "sealed").mkdir()
        (root / "sealed" / "inner.erofs").write_bytes(image)
        (root / "sealed").chmod(0)
        odd |= UNREADABLE
    return odd


def remove_odd_tree(root: Path) -> None:
    """Give back the modes taken away and remove everything (rm copes with the depth that
    shutil.rmtree would recurse past Python's limit for)."""
    for name in UNREADABLE:
        with contextlib.suppress(FileNotFoundError):
            (root / name).chmod(0o755)
    subprocess.run(["rm", "-rf", "--", str(root)], check=True, timeout=60)


def warned_paths(messages: list[str]) -> Counter[str]:
    """How often each path was warned about: a warning names its path first."""
    return Counter(m.split(": ", 1)[0] for m in messages)


def without_dac_override() -> tuple[str, ...]:
    """A prefix that runs the server as root without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, so mode 000 denies it as it denies anyone else; none is needed
    for another user."""
    if os.geteuid() != 0:
        return ()
    caps = "-dac_override,-dac_read_search"
    return (require_tool("setpriv"), f"--inh-caps={caps}", f"--bounding-set={caps}", "--")


@contextlib.contextmanager
def fifo_unblocked_after(path: Path, seconds: float) -> Iterator[None]:
    """Should something open the FIFO for reading and block (the bug under test), a writer
    opens it after ``seconds``: the test then fails on its timing instead of hanging."""
    done = threading.Event()

    def writer() -> None:
        if not done.wait(seconds):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(seconds + 5)


# -- a real server process, and peers nobody here wrote ------------------------------------


@pytest.fixture(scope="module")
def odd_root(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("odd")
    outside = tmp_path_factory.mktemp("odd-outside")
    build_odd_tree(root, images, outside, unreadable=True)
    yield root
    remove_odd_tree(root)


def test_odd_tree_is_served_with_one_warning_per_odd_path(
    odd_root: Path, raw: Callable[..., RawClient]
) -> None:
    prefix = without_dac_override()
    server = start_server_process(odd_root, prefix=prefix)  # it starts: nothing refused it
    stopped = False
    try:
        assert f"serving {len(SERVED)} export(s)" in server.log_text()
        listing = run(require_tool("nbdinfo"), "--list", "--json", server.uri("")).stdout
        names = {e["export-name"] for e in json.loads(listing)["exports"]}
        assert names == SERVED
        assert_serves(server)
        assert_serves(server, SHALLOW)
        client = raw(server.address)
        client.start()
        for name in ("x", "loop-a", "sock", "locked", "sealed/inner", "gone"):
            (refused,) = client.option(client.hs.opt_info(name))
            assert isinstance(refused, OptionError), refused
            assert refused.rep == Rep.ERR_UNKNOWN
        assert isinstance(client.option(client.hs.opt_go("demo"))[-1], OptionAck)
        client.close()
        assert stop_server_process(server) == 0
        stopped = True
    finally:
        if not stopped:
            stop_server_process(server)
    text = server.log_text()
    assert not log_problems(text), text
    marker = f" WARNING {LOGGER}["
    messages = [line.split("]: ", 1)[1] for line in text.splitlines() if marker in line]
    odd = set(ODD) | UNREADABLE | ({"null.erofs"} if (odd_root / "null.erofs").exists() else set())
    # every scan (the start, LIST, each INFO and GO, nbdcopy's connections) saw them all
    assert warned_paths(messages) == Counter(odd), text
    assert "locked.erofs: not served: Permission denied" in messages
    assert "sealed: cannot list it: Permission denied; not served" in messages


# -- the scan itself -----------------------------------------------------------------------


def scan_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    messages = [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]
    caplog.clear()
    return messages


def test_scan_of_an_odd_tree(
    images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    odd = build_odd_tree(root, images, outside, unreadable=False)
    try:
        directory = ExportDirectory(root)
        found = directory.scan()
        assert set(found) == SERVED
        assert found[SHALLOW].path == root / (SHALLOW + ".erofs")
        assert warned_paths(scan_warnings(caplog)) == Counter(odd)
        assert set(directory.scan()) == SERVED
        assert scan_warnings(caplog) == []  # once for as long as a path stays odd

        (root / "x.erofs").unlink()
        assert set(directory.scan()) == SERVED
        os.mkfifo(root / "x.erofs")  # back after it was gone: warned about again
        assert set(directory.scan()) == SERVED
        assert scan_warnings(caplog) == ["x.erofs: not served: not a regular file but a FIFO"]
    finally:
        remove_odd_tree(root)


def test_scan_refuses_an_image_swapped_for_a_fifo_after_its_stat(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    image = tmp_path / "swap.erofs"
    shutil.copy(images / "demo.erofs", image)

    def swapped(path: str) -> tuple[int, os.stat_result]:
        image.unlink()  # the scan has seen a regular file: now it is a FIFO
        os.mkfifo(image)
        return open_regular(path)

    monkeypatch.setattr(exports, "open_regular", swapped)
    with fifo_unblocked_after(image, 5):
        start = time.monotonic()
        found = ExportDirectory(tmp_path).scan()
        elapsed = time.monotonic() - start
    assert elapsed < 2, "the open waited for a writer"
    assert found == {}
    assert scan_warnings(caplog) == ["swap.erofs: not served: not a regular file but a FIFO"]


def test_open_regular_refuses_a_fifo_at_once(tmp_path: Path, images: Path) -> None:
    fifo = tmp_path / "x.erofs"
    os.mkfifo(fifo)
    with fifo_unblocked_after(fifo, 5):
        start = time.monotonic()
        with pytest.raises(NotRegularFile, match="not a regular file but a FIFO"):
            FileBackend(fifo)
        assert time.monotonic() - start < 2, "the open waited for a writer"
    with pytest.raises(NotRegularFile, match="a directory"):
        open_regular(tmp_path)
    backend = FileBackend(images / "demo.erofs")
    try:  # O_NONBLOCK was for the open only
        assert os.get_blocking(backend._fd)
    finally:
        backend.close()


async def test_go_on_an_image_swapped_for_a_fifo_gets_an_error_reply(
    images: Path, tmp_path: Path
) -> None:
    shutil.copy(images / "demo.erofs", tmp_path / "demo.erofs")
    swap = tmp_path / "swap.erofs"
    shutil.copy(images / "demo.erofs", swap)
    took: list[float] = []

    def backends(export: Export) -> FileBackend:
        if export.name == "swap":  # the scan found an image; GO opens a FIFO
            swap.unlink()
            os.mkfifo(swap)
            start = time.monotonic()
            try:
                with fifo_unblocked_after(swap, 5):
                    return FileBackend(export.image)
            finally:
                took.append(time.monotonic() - start)
        return FileBackend(export.image)

    client, server = trio.testing.memory_stream_pair()
    conn = Connection(
        StreamTransport(server),
        "memory",
        ServerConfig(root=tmp_path),
        ExportDirectory(tmp_path),
        backends=backends,
    )
    data = (tmp_path / "demo.erofs").read_bytes()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            hs = Handshake(client)
            await hs.start()
            with pytest.raises(NegotiationError, match="not a regular file but a FIFO") as refused:
                await hs.go("swap")
            assert refused.value.rep == Rep.ERR_UNKNOWN
            assert took and took[0] < 2, "the open waited for a writer"
            await hs.go("demo")  # the connection goes on
            session = Session(hs.stream, hs.negotiated, hs.machine.trailing_data)
            assert await session.pread(0, 4096) == data[:4096]
            await session.disconnect()
    assert conn.stats.ended == "disconnect"


def test_a_root_that_is_a_symlink_loop_is_an_oserror(tmp_path: Path) -> None:
    (tmp_path / "root").symlink_to("root")
    with pytest.raises(OSError, match="symbolic links"):
        ExportDirectory(tmp_path / "root")


# -- what goes on the wire ------------------------------------------------------------------


def test_every_string_on_the_wire_is_utf8() -> None:
    """A name or message that somehow kept a non-UTF-8 byte still makes a valid reply."""
    assert wire.utf8("bad\udcff.erofs") == b"bad?.erofs"
    assert wire.utf8("\u00e9" * 3, limit=5) == "\u00e9\u00e9".encode()  # cut between characters
    server, client = ServerHandshake(), ClientHandshake()
    client.receive_data(server.greeting())
    client.next_event()
    server.receive_data(client.send_client_flags())
    server.next_event()
    server.receive_data(client.opt_list())
    assert isinstance(server.next_event(), ListOption)
    client.receive_data(server.send_server("bad\udcff", "EROFS \udcfe") + server.send_ack())
    assert client.next_event() == ServerEntry("bad?", "EROFS ?")
    assert isinstance(client.next_event(), OptionAck)
