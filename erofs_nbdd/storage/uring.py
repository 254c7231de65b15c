"""Reads that miss the page cache, through io_uring: the kernel does the waiting, and the
event loop only queues each read and collects its result.

Through threads (``threads.py``) every miss cost the loop about 100 us: the hand-over, the
wake-up and the thread taking the GIL to give its result back. Cold random 4 KiB at QD32
came to 7-8k reads/s that way, where nbdkit's C threads did 22-57k. Here a read is one
64-byte entry written to a shared ring and one ``io_uring_enter``; the loop learns of the
results by polling the ring's descriptor in its own epoll, and collects them all at once:
15-18k reads/s on the same machine.

The rings are read and written here with plain loads and stores, which is enough only
where the CPU keeps loads in order with loads and stores with stores (x86-64's TSO):
elsewhere, and wherever the kernel refuses io_uring (a seccomp filter, the
``kernel.io_uring_disabled`` sysctl, an old kernel), reads go to the threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import platform
import struct
from typing import Literal

import outcome
import trio

from . import threads

log = logging.getLogger("erofs_nbdd.uring")

_SETUP, _ENTER = 425, 426  # the same numbers on every architecture
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000
_FEAT_SINGLE_MMAP, _FEAT_RW_CUR_POS = 1 << 0, 1 << 3
_OP_READ = 22
#: An entry: opcode, flags, ioprio, fd, offset, address, length, rw flags, user data, and
#: 24 bytes of fields a read leaves at zero.
_SQE = struct.Struct("=BBHiQQIIQ24x")
_CQE = struct.Struct("=Qi4x")  # user data, result, flags
#: Reads one ring holds at once; a trio run with more in flight waits for a free entry.
ENTRIES = 256


_U32, _U64 = ctypes.c_uint32, ctypes.c_uint64


class _SqOffsets(ctypes.Structure):
    _fields_ = [
        ("head", _U32),
        ("tail", _U32),
        ("ring_mask", _U32),
        ("ring_entries", _U32),
        ("flags", _U32),
        ("dropped", _U32),
        ("array", _U32),
        ("resv1", _U32),
        ("user_addr", _U64),
    ]


class _CqOffsets(ctypes.Structure):
    _fields_ = [
        ("head", _U32),
        ("tail", _U32),
        ("ring_mask", _U32),
        ("ring_entries", _U32),
        ("overflow", _U32),
        ("cqes", _U32),
        ("flags", _U32),
        ("resv1", _U32),
        ("user_addr", _U64),
    ]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", _U32),
        ("cq_entries", _U32),
        ("flags", _U32),
        ("sq_thread_cpu", _U32),
        ("sq_thread_idle", _U32),
        ("features", _U32),
        ("wq_fd", _U32),
        ("resv", _U32 * 3),
        ("sq_off", _SqOffsets),
        ("cq_off", _CqOffsets),
    ]


_LIBC = ctypes.CDLL(None, use_errno=True)
_syscall = _LIBC.syscall
_syscall.restype = ctypes.c_long


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


class Ring:
    """One io_uring instance that reads files: no trio in here, so tests can drive it."""

    def __init__(self, entries: int) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError(errno.ENOTSUP, "the rings are read without barriers: x86-64 only")
        params = _Params()
        self.fd = _check(_syscall(_SETUP, ctypes.c_uint(entries), ctypes.byref(params)))
        try:
            if not params.features & _FEAT_RW_CUR_POS:  # came with IORING_OP_READ, in 5.6
                raise OSError(errno.ENOTSUP, "this kernel's io_uring is older than Linux 5.6")
            self._map(params)
        except BaseException:
            os.close(self.fd)
            raise
        #: Reads this ring may have in flight: every result then has a place to go.
        self.capacity = min(params.sq_entries, params.cq_entries)

    def _map(self, params: _Params) -> None:
        sq, cq = params.sq_off, params.cq_off
        sq_size = sq.array + params.sq_entries * 4
        cq_size = cq.cqes + params.cq_entries * _CQE.size
        flags, prot = mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE
        if params.features & _FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        self._sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=_OFF_SQ_RING)
        self._cq = (
            self._sq
            if params.features & _FEAT_SINGLE_MMAP
            else mmap.mmap(self.fd, cq_size, flags, prot, offset=_OFF_CQ_RING)
        )
        self._sqes = mmap.mmap(
            self.fd, params.sq_entries * _SQE.size, flags, prot, offset=_OFF_SQES
        )
        u32 = ctypes.c_uint32.from_buffer
        self._sq_tail, self._sq_mask = u32(self._sq, sq.tail), u32(self._sq, sq.ring_mask).value
        self._cq_head, self._cq_tail = u32(self._cq, cq.head), u32(self._cq, cq.tail)
        self._cq_mask, self._cqes = u32(self._cq, cq.ring_mask).value, cq.cqes
        # Entry i of the queue is always entry i of the array: set that up once.
        struct.pack_into(f"={params.sq_entries}I", self._sq, sq.array, *range(params.sq_entries))

    def read(self, fd: int, address: int, length: int, offset: int, user_data: int) -> None:
        """Start reading ``length`` bytes at ``offset`` of ``fd`` into memory at ``address``,
        which must stay valid until the result comes back with ``user_data``. If the kernel
        does not take the read, OSError, and the read is not made."""
        tail = self._sq_tail.value
        _SQE.pack_into(
            self._sqes,
            (tail & self._sq_mask) * _SQE.size,
            _OP_READ,
            0,
            0,
            fd,
            offset,
            address,
            length,
            0,
            user_data,
        )
        self._sq_tail.value = tail + 1  # the kernel reads the entry on this thread, below
        taken = _syscall(_ENTER, self.fd, 1, 0, 0, None, 0)
        if taken != 1:
            self._sq_tail.value = tail  # not taken: unmade (only this thread submits)
            code = ctypes.get_errno() if taken < 0 else errno.EAGAIN
            raise OSError(code, os.strerror(code))

    def completions(self) -> list[tuple[int, int]]:
        """The results come back so far: (user data, bytes read or -errno)."""
        head, tail = self._cq_head.value, self._cq_tail.value
        out = [
            _CQE.unpack_from(self._cq, self._cqes + (i & self._cq_mask) * _CQE.size)
            for i in range(head, tail)
        ]
        self._cq_head.value = tail  # after the loads above: x86 does not reorder them
        return out

    def close(self) -> None:
        del self._sq_tail, self._cq_head, self._cq_tail  # views would keep the maps open
        for m in {id(m): m for m in (self._sq, self._cq, self._sqes)}.values():
            with contextlib.suppress(BufferError):  # someone holds a view: unmapped with it
                m.close()
        os.close(self.fd)


class _Reader:
    """One trio run's ring and the tasks waiting for its reads."""

    def __init__(self, ring: Ring) -> None:
        self._ring = ring
        self._free = trio.Semaphore(ring.capacity)
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        self._next = 0
        #: Why the ring stopped taking reads, if it did: they go to threads then.
        self.broken: OSError | None = None

    async def read(self, fd: int, view: memoryview, offset: int) -> int:
        """Bytes read into ``view``: all of it, or fewer at the end of the file."""
        try:
            self._free.acquire_nowait()
        except trio.WouldBlock:
            await self._free.acquire()
        try:
            if self.broken is None:  # (it may have broken while this read waited)
                key = self._next = self._next + 1
                address = ctypes.addressof(ctypes.c_char.from_buffer(view))
                try:
                    self._ring.read(fd, address, len(view), offset, key)
                except OSError as exc:
                    self._not_taken(exc)
                else:
                    self._waiting[key] = trio.lowlevel.current_task()
                    # The kernel writes into ``view`` until the result is in: no abandoning it.
                    result: int = await trio.lowlevel.wait_task_rescheduled(threads.no_abort)
                    if result < 0:
                        raise OSError(-result, os.strerror(-result))
                    return result
        finally:
            self._free.release()
        return await threads.run_sync(os.preadv, fd, [view], offset)

    def _not_taken(self, exc: OSError) -> None:
        """The ring did not take a read: that one goes to a thread, and if the kernel is
        not just short of memory for the moment, every later one too."""
        if exc.errno not in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
            log.warning("io_uring failed (%s): reads that miss the page cache use threads now", exc)
            self.broken = exc

    async def reap(self) -> None:
        """Hand every result to its task, for as long as the run lasts; then close."""
        ring, waiting, reschedule = self._ring, self._waiting, trio.lowlevel.reschedule
        try:
            while True:
                await trio.lowlevel.wait_readable(ring.fd)
                for key, result in ring.completions():
                    reschedule(waiting.pop(key), outcome.Value(result))
        finally:
            ring.close()


_READER: trio.lowlevel.RunVar[_Reader | None] = trio.lowlevel.RunVar("erofs_nbdd_uring")
#: Whether this process may have rings: None until asked, then why not (or False: it may).
_refused: OSError | Literal[False] | None = None


def refusal() -> OSError | None:
    """Why this process cannot read through io_uring, or None if it can (asked of the kernel
    once, with a small ring)."""
    global _refused
    if _refused is None:
        try:
            Ring(2).close()
            _refused = False
        except OSError as exc:
            _refused = exc
    return _refused or None


def _reader() -> _Reader | None:
    """This run's reader, started on first use; None where io_uring is refused."""
    global _refused
    try:
        return _READER.get()
    except LookupError:
        pass
    reader = None
    if refusal() is None:
        try:
            reader = _Reader(Ring(ENTRIES))
        except OSError as exc:  # a small ring worked; this one did not (memory, a limit)
            _refused = exc
            log.warning("io_uring refused (%s): reads that miss the page cache use threads", exc)
        else:
            trio.lowlevel.spawn_system_task(reader.reap, name="erofs_nbdd io_uring")
    _READER.set(reader)
    return reader


def read_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``, blocking (the threads' way)."""
    done = 0
    while done < len(view):
        done += _short(os.preadv(fd, [view[done:]], offset + done), view, done, offset)


async def read_into(fd: int, view: memoryview, offset: int, *, ring: bool = True) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` without blocking the loop: through this
    run's ring, or on a thread with ``ring`` False or where there is none."""
    reader = _reader() if ring else None
    if reader is None:
        await threads.run_sync(read_exactly, fd, view, offset)
        return
    done = 0
    while done < len(view):
        done += _short(await reader.read(fd, view[done:], offset + done), view, done, offset)


def _short(n: int, view: memoryview, done: int, offset: int) -> int:
    """``n``, the bytes one read gave; none at all means the file ends too early."""
    if not n:
        missing = len(view) - done
        raise OSError(errno.EIO, f"image ends early: {missing} bytes missing at {offset + done}")
    return n
