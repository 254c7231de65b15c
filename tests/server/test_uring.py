"""Reads through io_uring against the real kernel: the ring itself, many reads of a file
dropped from the page cache, a full ring, and the ways back to threads (refused, failed,
or short of memory for a moment)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import time
from typing import TYPE_CHECKING

import pytest
import trio

from erofs_nbdd.storage import uring

from ..conftest import evict

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def kernel_ring() -> None:
    """These tests need the kernel's io_uring: where it is refused they fail, not skip."""
    if uring.refusal() is not None:
        pytest.fail(
            f"io_uring unavailable here ({uring.refusal()}): run on Linux 5.6 or later, x86-64, "
            "with io_uring allowed (no seccomp filter against it, kernel.io_uring_disabled=0)"
        )


needs_ring = pytest.mark.usefixtures("kernel_ring")


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    """An open file of 4 MiB random bytes, dropped from the page cache."""
    data = os.urandom(4 << 20)
    path = tmp_path / "data"
    path.write_bytes(data)
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


def wait_for_completions(ring: uring.Ring, count: int) -> dict[int, int]:
    """Results as the ring's descriptor says they come (it polls readable while there are
    some to collect), until ``count`` are in or a few seconds have gone by."""
    poller = select.poll()
    poller.register(ring.fd, select.POLLIN)
    results: dict[int, int] = {}
    deadline = time.monotonic() + 5
    while len(results) < count and (left := deadline - time.monotonic()) > 0:
        if poller.poll(left * 1000):
            results.update(ring.completions())
    return results


def address(buf: bytearray) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@needs_ring
def test_ring_reads_into_memory_and_reports_errors(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    ring = uring.Ring(8)
    try:
        bufs = [bytearray(4096), bytearray(100), bytearray(50)]
        ring.read(fd, address(bufs[0]), 4096, 12345, 1)
        ring.read(fd, address(bufs[1]), 100, len(data) - 50, 2)  # past the end: short
        ring.read(-1, address(bufs[2]), 50, 0, 3)  # no such file
        results = wait_for_completions(ring, 3)
        assert results == {1: 4096, 2: 50, 3: -errno.EBADF}
        assert bufs[0] == data[12345 : 12345 + 4096]
        assert bufs[1][:50] == data[-50:]
    finally:
        ring.close()


@needs_ring
async def test_many_reads_of_an_evicted_file_each_get_their_bytes(
    data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More reads at once than the ring holds (they wait for a free entry), of all sizes,
    each checked; the file is not in the page cache, so the kernel really waits."""
    monkeypatch.setattr(uring, "ENTRIES", 16)
    fd, data = data_file

    async def one(i: int) -> None:
        size = (1, 511, 4096, 65536, 1 << 20)[i % 5]
        offset = (i * 7919 * 4096 + i) % (len(data) - size)
        buf = bytearray(size)
        await uring.read_into(fd, memoryview(buf), offset)
        assert buf == data[offset : offset + size], (i, offset, size)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    reader = uring._READER.get()
    assert reader is not None and reader.broken is None
    assert reader._ring.capacity == 16


async def test_a_read_past_the_end_of_the_image_fails(data_file: tuple[int, bytes]) -> None:
    fd, data = data_file
    with pytest.raises(OSError, match="image ends early: 10 bytes missing"):
        await uring.read_into(fd, memoryview(bytearray(110)), len(data) - 100)


@pytest.mark.parametrize("ring", [True, False], ids=["ring", "threads"])
async def test_with_io_uring_refused_or_off_reads_use_threads(
    data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch, ring: bool
) -> None:
    if ring:  # as under a seccomp filter that forbids io_uring_setup
        monkeypatch.setattr(uring, "_refused", OSError(errno.EPERM, "Operation not permitted"))
    fd, data = data_file
    buf = bytearray(4096)
    await uring.read_into(fd, memoryview(buf), 8192, ring=ring)
    assert buf == data[8192 : 8192 + 4096]
    assert uring._READER.get(None) is None


@needs_ring
async def test_a_failing_ring_hands_its_reads_to_threads(
    data_file: tuple[int, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """The kernel refuses a read (here: the ring's descriptor is not a ring): that read
    and every later one go to threads, with one warning in the log, and all are right."""
    fd, data = data_file
    buf = bytearray(4096)
    await uring.read_into(fd, memoryview(buf), 0)  # starts this run's ring
    reader = uring._READER.get()
    assert reader is not None
    real, reader._ring.fd = reader._ring.fd, os.open(os.devnull, os.O_RDONLY)
    try:
        for offset in (4096, 1 << 20, 3 << 20):
            await uring.read_into(fd, memoryview(buf), offset)
            assert buf == data[offset : offset + 4096]
    finally:
        os.close(reader._ring.fd)
        reader._ring.fd = real
    assert reader.broken is not None and reader.broken.errno == errno.EOPNOTSUPP
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "io_uring failed" in warnings[0].getMessage()


@needs_ring
async def test_a_read_the_kernel_could_not_take_for_now_is_not_left_queued(
    data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """io_uring_enter failing with EAGAIN (no memory for the request): that read goes to a
    thread, and its entry must leave the queue, or the next submission would start it
    again into a buffer that is no longer its own."""
    fd, data = data_file
    buf = bytearray(4096)
    await uring.read_into(fd, memoryview(buf), 0)  # starts this run's ring
    real = uring._syscall
    refusals: list[tuple[object, ...]] = []

    def short_of_memory(*args: object) -> int:
        if not refusals:
            refusals.append(args)
            ctypes.set_errno(errno.EAGAIN)
            return -1
        return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(uring, "_syscall", short_of_memory)
    reader = uring._READER.get()
    assert reader is not None
    tail = reader._ring._sq_tail.value
    await uring.read_into(fd, memoryview(buf), 8192)
    assert buf == data[8192 : 8192 + 4096]
    assert refusals and reader.broken is None
    assert reader._ring._sq_tail.value == tail  # else the next read would hang or worse
    for offset in (2 << 20, 12288):
        await uring.read_into(fd, memoryview(buf), offset)
        assert buf == data[offset : offset + 4096]
    assert reader._ring._sq_tail.value == tail + 2
