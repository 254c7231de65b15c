"""Cached reads sent by sendfile straight from the page cache, and what happens when they
cannot be: evicted pages, TLS, an image that shrinks under a reply."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbd_client.negotiate import negotiate
from erofs_nbdd.config import TLSConfig, TLSMode
from erofs_nbdd.ranges import FileRange, ImageUnreadable
from erofs_nbdd.server.transmit import FILE_REPLY_MIN
from erofs_nbdd.storage import pagecache
from erofs_nbdd.storage.exports import ExportDirectory
from erofs_nbdd.storage.file import FileBackend
from erofs_nbdd.storage.pagecache import PAGE, PageCache
from erofs_nbdd.transport.contexts import client_context
from erofs_nbdd.transport.plain import PlainTransport

from ..conftest import evict, random_image
from .helpers import check_read, start_server

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .conftest import Connect


@contextlib.contextmanager
def _pinned(path: Path) -> Iterator[bytes]:
    """The file's bytes, its pages read into the page cache and locked there (mlock on a
    shared mapping) while the block runs. The machines these tests run on reclaim page cache
    on their own; one page reclaimed under a test of cached reads sends that read through a
    thread and fails a count of sendfile bytes for a reason that is not the server's. Where
    mlock is refused (no CAP_IPC_LOCK, a small RLIMIT_MEMLOCK) the pages are only read."""
    data = path.read_bytes()
    libc = pagecache._LIBC  # already declares mmap and munmap
    if libc is None:
        yield data
        return
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, len(data), mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    mapped = address not in (None, pagecache._MAP_FAILED)
    try:
        if mapped:
            libc.mlock(address, len(data))  # a read-only shared mapping: the cache's own pages
        yield data
    finally:
        if mapped:
            libc.munmap(address, len(data))  # unlocks too


@pytest.fixture
def big_image(tmp_path: Path) -> Path:
    """An export directory holding one 8 MiB image of random bytes, written and synced."""
    root = tmp_path / "images"
    random_image(root, "big", 8 << 20)
    return root


@pytest.fixture
def sendfile_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every os.sendfile the server makes, as (offset, bytes sent); the real call runs."""
    calls: list[tuple[int, int]] = []
    real = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        calls.append((offset or 0, sent))
        return sent

    monkeypatch.setattr(os, "sendfile", spy)
    return calls


def test_page_cache_residency_follows_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        cache = PageCache(fd, 64 * PAGE)
        assert cache.active  # we own the file
        os.pread(fd, 64 * PAGE, 0)
        assert cache.resident(0, 64 * PAGE)
        assert cache.resident(100, 5000)  # unaligned ranges round out to pages
        evict(path)
        assert not cache.resident(0, PAGE)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what we read
        os.pread(fd, 16 * PAGE, 0)
        assert cache.resident(0, 16 * PAGE)
        assert not cache.resident(0, 17 * PAGE)  # one absent page is enough
        os.truncate(path, 8 * PAGE)  # lost pages are absent, and reading nothing faults us
        assert cache.resident(0, 8 * PAGE)
        assert not cache.resident(8 * PAGE, PAGE)
        assert not cache.resident(60 * PAGE, 8 * PAGE)  # beyond the mapping
        cache.close()
        assert not cache.resident(0, PAGE)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_a_file_whose_cache_linux_hides_counts_as_absent(tmp_path: Path) -> None:
    """To a process that neither owns nor may write a file, mincore calls every page
    resident (Linux >= 5.2): trusting it would stall the event loop on the disk."""
    path = tmp_path / "root-owned"
    path.write_bytes(os.urandom(16 * PAGE))
    path.chmod(0o644)
    fd = os.open(path, os.O_RDONLY)
    try:
        as_root = PageCache(fd, 16 * PAGE)
        evict(path)
        assert not as_root.resident(0, 16 * PAGE)
        os.seteuid(65534)  # nobody: may read the file, neither owns nor may write it
        try:
            assert as_root.resident(0, 16 * PAGE)  # the kernel's cover story
            as_nobody = PageCache(fd, 16 * PAGE)
            assert not as_nobody.active  # so we do not ask
            assert not as_nobody.resident(0, PAGE)
        finally:
            os.seteuid(0)
        assert not as_root.resident(0, 16 * PAGE)
        as_root.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("structured", [False, True])
async def test_cached_large_reads_go_by_sendfile_and_evicted_ones_do_not(
    nursery: trio.Nursery,
    big_image: Path,
    connect: Connect,
    sendfile_calls: list[tuple[int, int]],
    structured: bool,
) -> None:
    image = big_image / "big.erofs"
    address = await start_server(nursery, big_image)
    _, session = await negotiate(await connect(address), "big", structured=structured)
    with _pinned(image) as data:
        cases = [(0, 1 << 20), (4096, 4 << 20), (len(data) - FILE_REPLY_MIN, FILE_REPLY_MIN)]
        for offset, length in cases:
            assert await session.pread(offset, length) == data[offset : offset + length]
        sent = sum(n for _, n in sendfile_calls)
        assert sent == sum(length for _, length in cases)  # every byte, by sendfile
        # Pipelined, mixed with small reads that are copied and batched:
        sendfile_calls.clear()
        async with trio.open_nursery() as readers:
            for i in range(40):
                offset, length = (i * 65536, 4096) if i % 2 else (i * 131072, 131072)
                readers.start_soon(check_read, session, data, offset, length)
        assert sum(n for _, n in sendfile_calls) == 20 * 131072  # the large ones only
    # Evicted: the read must not stall the event loop on the disk, so it takes a thread.
    sendfile_calls.clear()
    evict(image)
    assert await session.pread(1 << 20, 2 << 20) == data[1 << 20 : 3 << 20]
    assert sendfile_calls == []
    await session.disconnect()


async def test_tls_reads_are_encrypted_here_not_sent_from_the_file(
    nursery: trio.Nursery,
    big_image: Path,
    made_certs: Path,
    connect: Connect,
    sendfile_calls: list[tuple[int, int]],
) -> None:
    data = (big_image / "big.erofs").read_bytes()
    tls = TLSConfig(mode=TLSMode.REQUIRE, cert_dir=made_certs, kernel=False)
    address = await start_server(nursery, big_image, tls=tls)
    ctx = client_context(made_certs / "clients" / "alice")
    _, session = await negotiate(
        await connect(address), "big", tls=ctx, server_hostname="localhost"
    )
    assert await session.pread(0, 4 << 20) == data[: 4 << 20]
    assert sendfile_calls == []
    await session.disconnect()


async def test_an_image_that_ends_under_a_reply_fails_the_send() -> None:
    """The race mincore cannot close: the file shrinks between the check and sendfile.
    The header is out, so the reply cannot turn into an error; the send fails instead, and
    the connection (not the server) ends, logged as the image failing."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    stream = PlainTransport(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    with tempfile.TemporaryFile() as f:
        f.write(b"x" * 10000)
        f.flush()
        with pytest.raises(ImageUnreadable, match="ended at 10000, 6384 bytes early"):
            await stream.send_file(b"HEAD", FileRange(f.fileno(), 0, 16384))
    assert b.recv(1 << 20) == b"HEAD" + b"x" * 10000
    await stream.aclose()
    b.close()


@pytest.mark.parametrize("nowait", [True, False])
def test_cached_reads_are_answered_without_a_thread_and_misses_are_not(
    tmp_path: Path, nowait: bool
) -> None:
    """RWF_NOWAIT first where the file system has it; mincore alone where it has not (or
    where a readahead mark makes RWF_NOWAIT refuse cached pages)."""
    path = tmp_path / "img"
    data = os.urandom(256 * PAGE)
    path.write_bytes(data)
    backend = FileBackend(path)
    try:
        backend._nowait = nowait  # as on a file system without RWF_NOWAIT
        evict(path)
        assert backend.file_range(0, 64 * PAGE) is None  # would block: a thread's
        buf = bytearray(64 * PAGE)
        if backend.read_nowait(memoryview(buf), 0):
            # RWF_NOWAIT refused, but started reading the pages in, and mincore then found
            # them read already (a fast disk; seen once in a full run): cached by then.
            assert nowait and bytes(buf) == data[: 64 * PAGE]
        os.pread(backend._fd, 128 * PAGE, 0)
        assert backend.read_nowait(memoryview(buf), 4096)
        assert bytes(buf) == data[4096 : 4096 + 64 * PAGE]
        assert backend.file_range(4096, 64 * PAGE) == FileRange(backend._fd, 4096, 64 * PAGE)
    finally:
        backend.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_an_image_whose_cache_is_hidden_is_named_in_the_log(
    images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = Path(tempfile.mkdtemp(prefix="erofs-nbdd-hidden-"))
    try:
        root.chmod(0o755)
        shutil.copy(images / "demo.erofs", root / "mine.erofs")
        shutil.copy(images / "demo.erofs", root / "theirs.erofs")
        os.chown(root / "mine.erofs", 65534, 65534)
        (root / "theirs.erofs").chmod(0o644)  # root's, readable by all
        caplog.set_level(logging.INFO, logger="erofs_nbdd")
        os.seteuid(65534)
        try:
            exports = ExportDirectory(root).scan()
        finally:
            os.seteuid(0)
        assert sorted(exports) == ["mine", "theirs"]  # both served either way
        hints = [r.getMessage() for r in caplog.records if "hides its page cache" in r.message]
        assert len(hints) == 1
        assert hints[0].startswith("theirs.erofs: owned by uid 0 and not writable here")
        assert "chown it to uid 65534" in hints[0]
    finally:
        shutil.rmtree(root)
