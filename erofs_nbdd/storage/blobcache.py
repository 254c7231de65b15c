"""Registry blobs on local disk, by digest, filled on demand a chunk at a time.

Layout under the cache directory (so two tags or two repositories with one layer share a
copy, and a restart keeps everything)::

    blobs/sha256/HEX        a whole blob, verified against its digest
    partial/sha256/HEX      a blob being filled: a sparse file of the blob's size
    partial/sha256/HEX.map  one byte per chunk: 1 once that chunk's bytes are written

A blob's bytes sit at their own offsets in a plain file, so cached ranges are served by the
file path (page cache, sendfile, io_uring) like any image. A missing chunk is fetched with
one HTTP Range request, which every reader of it waits for; a sequential reader's misses
widen the request (read-ahead). The map byte is written after the chunk's data, so a chunk
marked present is whole. When the last chunk lands the file is hashed: a match moves it to
``blobs/``, a mismatch discards it and the blob is refused until BAD_RETRY passes.

Eviction keeps the disk use under the cache size, least recently opened first, and never
takes a blob someone reads: every open blob holds a shared flock on its file (across
``--workers`` processes too), and eviction takes only files it can lock exclusively.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from ..ranges import ImageUnreadable
from . import threads

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
#: The most chunks ahead a sequential reader's request grows to (16 MiB).
READAHEAD_MAX = 16
#: Longest single Range request, in chunks.
MAX_RUN = 16
#: The largest blob taken (a registry claiming more is refused: its map would not fit).
MAX_BLOB = 1 << 40
#: A map file starts with the data file's inode and size, so a map left from another
#: file (a crash between two unlinks, a partial removed by hand) is never believed.
MAP_HEADER = struct.Struct("<QQ")
#: The most one NBD_CMD_CACHE starts fetching.
MAX_PREFETCH = 64 * CHUNK
#: Seconds between measurements of the cache's disk use (other workers write to it too).
MEASURE_EVERY = 10.0
#: Seconds a blob that failed its digest check is refused before it is fetched again.
BAD_RETRY = 300.0
FIRST_DELAY = 0.1
MAX_DELAY = 2.0
#: A blob's modification time, its place in the LRU order, is renewed this often in use.
TOUCH_EVERY = 60.0
#: A blob being filled says how far it got this often (a cold 2 GiB layer takes a while).
PROGRESS_EVERY = 10.0

#: Where fetched bytes go: ``sink(offset, data)``.
Sink = Callable[[int, bytes], Awaitable[None]]
#: ``fetch(start, end, sink)``: bytes [start, end) of the blob (or more), handed to the sink.
Fetch = Callable[[int, int, Sink], Awaitable[None]]
#: Errors worth another try: the source raises these for timeouts, 5xx, resets.
Transient = tuple[type[BaseException], ...]

_ONE = bytes([0] + [1] * 255)  # any nonzero map byte means present

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``20G``, ``512M``, ``1.5T``, ``4096`` (powers of 1024; a trailing B or iB is fine)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in UNITS and value[-1:] else ""
    number = value[: len(value) - len(unit)]
    try:
        size = float(number) * UNITS[unit]
    except ValueError:
        raise ValueError(
            f"{text!r} is not a size: write bytes or a number with K, M, G or T"
        ) from None
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"{text!r} is not a size above zero")
    return int(size)


def digest_hex(digest: str) -> str:
    """The digest's hex part, which names files here: anything else is refused, so no
    name a registry sends can lead out of the cache."""
    hex_part = digest.removeprefix("sha256:")
    if len(hex_part) != 64 or hex_part.strip("0123456789abcdef"):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return hex_part


class Blob:
    """One blob open in this process; shared by every connection reading it."""

    def __init__(self, cache: BlobCache, digest: str, size: int, fd: int, complete: bool) -> None:
        self.cache = cache
        self.digest = digest
        self.size = size
        self.fd = fd
        self.complete = complete
        self.chunks = max(1, -(-size // CHUNK))
        self._map_fd = -1
        self.present = bytearray(b"\1" * self.chunks if complete else self.chunks)
        self._count = self.chunks if complete else 0
        self._pending: dict[int, trio.Event] = {}
        self.fetch: Fetch | None = None
        self.transient: Transient = ()
        self.timeout = 30.0
        #: Why the last fetch failed (for the EIO's message), or why the blob is refused.
        self.failure: str | None = None
        self.bad: str | None = None
        self.refs = 0
        self._window = 0
        self._touched = time.monotonic()
        self._verifying = False
        self._progress = time.monotonic()

    def attach_map(self, fd: int, *, fresh: bool) -> None:
        """The chunk map, believed only if it names this data file (and the data file was
        not just made); else started empty."""
        self._map_fd = fd
        header = MAP_HEADER.pack(os.fstat(self.fd).st_ino, self.size)
        if fresh or os.pread(fd, MAP_HEADER.size, 0) != header:
            os.ftruncate(fd, 0)
            os.pwrite(fd, header, 0)
        os.ftruncate(fd, MAP_HEADER.size + self.chunks)
        data = os.pread(fd, self.chunks, MAP_HEADER.size)
        self.present[: len(data)] = data.translate(_ONE)
        self._count = self.present.count(1)

    def has(self, offset: int, length: int) -> bool:
        if self.complete:
            return True
        first, last = offset // CHUNK, (offset + max(length, 1) - 1) // CHUNK
        return all(self.present[first : last + 1])

    def _refresh(self, index: int) -> None:
        """Another process may have written this chunk: its map byte says."""
        if (
            self._map_fd >= 0
            and not self.present[index]
            and os.pread(self._map_fd, 1, MAP_HEADER.size + index) == b"\1"
        ):
            self.present[index] = 1
            self._count += 1

    async def ensure(self, offset: int, length: int) -> None:
        """Wait until every chunk of the range is on disk, fetching what is missing."""
        if self.bad is not None:
            raise ImageUnreadable(self.bad)
        self._touch()
        if self.complete:
            return
        first, last = offset // CHUNK, (offset + max(length, 1) - 1) // CHUNK
        # sequential: the chunk before is in or coming (whichever reader asked for it, so
        # readers that share a sequential copy between them, as nbdcopy's do, count too)
        sequential = first > 0 and (self.present[first - 1] or (first - 1) in self._pending)
        self._window = min(max(1, self._window * 2), READAHEAD_MAX) if sequential else 0
        for index in range(first, min(last, self.chunks - 1) + 1):
            if self.present[index]:
                continue
            event = self._pending.get(index)
            if event is None:
                self._refresh(index)
                if self.present[index]:
                    continue
                event = self._start(index, min(last + self._window, self.chunks - 1))
            await event.wait()
            if self.bad is not None:
                raise ImageUnreadable(self.bad)
            if not self.present[index]:
                raise ImageUnreadable(
                    f"{self.digest} bytes {index * CHUNK}-: {self.failure or 'not fetched'}"
                )

    def prefetch(self, offset: int, length: int) -> None:
        """Start fetching the range's missing chunks, waiting for nothing (NBD_CMD_CACHE)."""
        if self.complete or self.bad is not None:
            return
        length = min(length, MAX_PREFETCH)
        last = min((offset + max(length, 1) - 1) // CHUNK, self.chunks - 1)
        for index in range(offset // CHUNK, last + 1):
            if not self.present[index] and index not in self._pending:
                self._start(index, last)

    def _start(self, first: int, upto: int) -> trio.Event:
        """Fetch chunks from ``first`` on, while missing and not already coming, in one
        request; the event of ``first`` is returned."""
        end = first
        while (
            end <= upto
            and end - first < MAX_RUN
            and not self.present[end]
            and end not in self._pending
        ):
            self._pending[end] = trio.Event()
            end += 1
        self.cache.hold(self)  # the fetch's: released when it ends
        trio.lowlevel.spawn_system_task(self._fetch, first, end, name=f"fetch {self.digest}")
        return self._pending[first]

    async def _fetch(self, first: int, end: int) -> None:
        """Chunks [first, end): retried with backoff for ``timeout`` seconds. A system
        task, so a reader that gives up does not cancel what the others wait for."""
        buffers: dict[int, bytearray] = {}
        try:
            assert self.fetch is not None
            deadline = trio.current_time() + self.timeout
            delay = FIRST_DELAY
            while True:
                todo = [i for i in range(first, end) if not self.present[i]]
                if not todo or self.bad is not None:
                    break
                start = todo[0] * CHUNK
                stop = min(end * CHUNK, self.size)
                buffers.clear()
                try:
                    with trio.move_on_at(deadline) as scope:
                        await self.fetch(
                            start, stop, lambda at, data: self._land(at, data, buffers)
                        )
                    if scope.cancelled_caught:  # a registry that drips: bounded all the same
                        self.failure = f"no whole answer in {self.timeout:g} s"
                        log.warning("%s: giving up: %s", self.digest, self.failure)
                        break
                    self.failure = None
                    break
                except self.transient as exc:
                    self.failure = str(exc)
                    if trio.current_time() + delay > deadline:
                        log.warning(
                            "%s: giving up after %.0f s: %s", self.digest, self.timeout, exc
                        )
                        break
                    self.cache.note_retry(self.digest, str(exc))
                    await trio.sleep(delay)
                    delay = min(delay * 2, MAX_DELAY)
        except Exception as exc:  # a system task must not raise: the reader gets EIO
            self.failure = str(exc) or type(exc).__name__
            log.warning("%s: fetch failed: %s", self.digest, self.failure)
        finally:
            for index in range(first, end):
                event = self._pending.pop(index, None)
                if event is not None:
                    event.set()
            self.verify_soon()  # before the release: its hold keeps the files open
            self.cache.release(self)

    def verify_soon(self) -> None:
        """Hash the blob once every chunk is in: after the fetch that brought the last one,
        or at open for a partial file found whole (the last run ended before hashing it)."""
        if self._count == self.chunks and not (self.complete or self._verifying or self.bad):
            self._verifying = True
            self.cache.hold(self)  # the verification's, released when it ends
            trio.lowlevel.spawn_system_task(self._verify_task, name=f"verify {self.digest}")

    async def _verify_task(self) -> None:
        try:
            await self._verify()
        except Exception as exc:  # a system task must not raise
            log.warning("%s: verification failed: %s", self.digest, exc)

    async def _land(self, at: int, data: bytes, buffers: dict[int, bytearray]) -> None:
        """Bytes arrived: whole chunks are written and marked (their readers go on)."""
        view = memoryview(data)  # slices of it copy nothing; the buffer is the one copy
        while view:
            index = at // CHUNK
            chunk_start = index * CHUNK
            chunk_end = min(chunk_start + CHUNK, self.size)
            buffer = buffers.setdefault(index, bytearray())
            if chunk_start + len(buffer) != at:
                raise ImageUnreadable(f"{self.digest}: bytes out of order at {at}")
            take = view[: chunk_end - at]
            buffer += take
            view = view[len(take) :]
            at += len(take)
            if at == chunk_end:
                del buffers[index]
                await self._write(index, buffer)

    async def _write(self, index: int, data: bytes | bytearray) -> None:
        if self.present[index] or self.bad is not None:
            return
        try:
            try:
                await threads.run_sync(self._write_sync, index, data)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                await self.cache.make_room(len(data))  # the disk filled before the cache did
                await threads.run_sync(self._write_sync, index, data)
        except OSError as exc:  # ENOSPC, EROFS, EIO: the cache's fault, not the registry's
            raise ImageUnreadable(f"cannot write to the cache: {exc}") from exc
        self.present[index] = 1
        self._count += 1
        await self.cache.grew(len(data))
        now = time.monotonic()
        if now - self._progress >= PROGRESS_EVERY and self._count < self.chunks:
            self._progress = now
            log.info(
                "%s: %d of %d MiB cached", self.digest, self._count * CHUNK >> 20, self.size >> 20
            )
        event = self._pending.pop(index, None)
        if event is not None:
            event.set()

    def _write_sync(self, index: int, data: bytes | bytearray) -> None:
        view, offset = memoryview(data), index * CHUNK
        while view:  # a short write (a disk filling up) must not leave a hole marked present
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written
        if self._map_fd >= 0:
            os.pwrite(self._map_fd, b"\1", MAP_HEADER.size + index)

    async def _verify(self) -> None:
        try:
            found = await trio.to_thread.run_sync(self._hash)
            if found == self.digest:
                await trio.to_thread.run_sync(self.cache.promote, self)
                self.complete = True
                log.info("%s: complete and verified (%d bytes)", self.digest, self.size)
            else:
                self.bad = (
                    f"{self.digest}: the registry's bytes hash to {found}: the blob is "
                    f"corrupt in the registry (or was changed in transit), and is refused"
                )
                log.error("%s; discarded from the cache", self.bad)
                self.cache.discard(self)
        except OSError as exc:
            log.warning("%s: cannot verify it: %s", self.digest, exc)
        finally:
            self._verifying = False
            self.cache.release(self)

    def _hash(self) -> str:
        # the descriptor's offset is this read's alone: every other read here gives its own
        with os.fdopen(os.dup(self.fd), "rb") as f:
            f.seek(0)
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()

    def _touch(self) -> None:
        now = time.monotonic()
        if now - self._touched > TOUCH_EVERY:
            self._touched = now
            self.cache.touch(self)

    def idle(self) -> bool:
        return not self._pending

    def close_files(self) -> None:
        for fd in (self.fd, self._map_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._map_fd = -1


class BlobCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        for sub in ("blobs/sha256", "partial/sha256"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._open: dict[str, Blob] = {}
        self._bad: dict[str, tuple[str, float]] = {}
        self._retrying: set[str] = set()
        self.used = self._measure()
        self._measured = time.monotonic()
        #: The last eviction could not get under the size: every blob left was in use.
        self._stuck = False
        self._full_warned = False

    def _measure(self) -> int:
        total = 0
        for sub in ("blobs/sha256", "partial/sha256"):
            for entry in os.scandir(self.root / sub):
                with contextlib.suppress(OSError):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

    def complete_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest_hex(digest)

    def head_path(self, digest: str) -> Path:
        """Where the source keeps the blob's first bytes (its superblock), which go with
        the blob when it is found corrupt."""
        return self.root / "heads" / "sha256" / digest_hex(digest)

    def partial_path(self, digest: str) -> Path:
        return self.root / "partial" / "sha256" / digest_hex(digest)

    def refused(self, digest: str) -> str | None:
        """Why this blob is refused (it failed its digest check lately), or None."""
        found = self._bad.get(digest)
        if found is None:
            return None
        if time.monotonic() - found[1] > BAD_RETRY:
            del self._bad[digest]
            return None
        return found[0]

    def open(self, digest: str, size: int) -> Blob:
        """The blob, opened (with a hold the caller releases), from disk or empty. An
        OSError if it cannot be (the size disagrees with the verified copy, say)."""
        if not 0 <= size <= MAX_BLOB:
            raise OSError(errno.EFBIG, f"{digest}: a blob of {size} bytes is not taken")
        blob = self._open.get(digest)
        if blob is not None and blob.size != size:
            raise OSError(errno.EINVAL, f"{digest}: {size} bytes claimed, {blob.size} known")
        if blob is None:
            blob = self._open_files(digest, size)
            self._open[digest] = blob
            if not blob.complete:
                blob.verify_soon()
        blob.refs += 1
        return blob

    def _open_files(self, digest: str, size: int) -> Blob:
        for _ in range(8):  # each retry follows an eviction or a promotion racing us
            path = self.complete_path(digest)
            fd = self._locked(path, os.O_RDONLY)
            if fd >= 0:
                os.utime(path)
                found = os.fstat(fd).st_size
                if found == size:
                    return Blob(self, digest, size, fd, complete=True)
                os.close(fd)
                # the verified copy's size is the digest's: the claim is wrong, not the copy
                raise OSError(errno.EINVAL, f"{digest}: {size} bytes claimed, {found} verified")
            path = self.partial_path(digest)
            fd = self._locked(path, os.O_RDWR | os.O_CREAT)
            if fd < 0:
                continue
            map_fd = -1
            try:
                # new, or left by a claim of another size: start it again
                fresh = os.fstat(fd).st_size != size
                map_fd = os.open(
                    path.with_name(path.name + ".map"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
                blob = Blob(self, digest, size, fd, complete=False)
                # the map is emptied before the data file gets its size: a crash between
                # leaves a file of the wrong size, which is fresh again at the next open
                blob.attach_map(map_fd, fresh=fresh)
                if fresh:
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                if map_fd >= 0:
                    os.close(map_fd)
                raise
            os.utime(path)
            return blob
        raise OSError(errno.EAGAIN, f"{digest}: the cache kept changing under us")

    @staticmethod
    def _locked(path: Path, flags: int) -> int:
        """``path`` opened and share-locked, if it still names what was opened; else -1."""
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            return -1
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
        except FileNotFoundError:
            os.close(fd)
            return -1
        except BaseException:
            os.close(fd)
            raise
        return fd

    def hold(self, blob: Blob) -> None:
        blob.refs += 1

    def release(self, blob: Blob) -> None:
        """One hold less; the last one closes the files (a fetch holds one too)."""
        blob.refs -= 1
        if blob.refs <= 0 and blob.idle():
            if self._open.get(blob.digest) is blob:
                del self._open[blob.digest]
            blob.close_files()
            self._stuck = False

    def touch(self, blob: Blob) -> None:
        path = self.complete_path(blob.digest) if blob.complete else self.partial_path(blob.digest)
        with contextlib.suppress(OSError):
            os.utime(path)

    def note_retry(self, digest: str, reason: str) -> None:
        if digest not in self._retrying:
            self._retrying.add(digest)
            log.warning("%s: the registry is not answering (%s); retrying", digest, reason)

    async def grew(self, size: int) -> None:
        """Bytes were written: evict (in a thread) when over, unless the last eviction
        found everything in use and nothing was closed since."""
        self.used += size
        now = time.monotonic()
        if now - self._measured > MEASURE_EVERY:  # other workers write here too
            self._measured = now
            self.used = await threads.run_sync(self._measure)
        if self.used > self.max_bytes and not self._stuck:
            await threads.run_sync(self.evict)

    async def make_room(self, size: int) -> None:
        """The disk is full below the cache size: evict as if the cache were ``size`` smaller."""
        await threads.run_sync(self.evict, max(0, min(self.used, self.max_bytes) - size))

    def promote(self, blob: Blob) -> None:
        """Verified: the partial file becomes the blob (readers keep their descriptors)."""
        partial = self.partial_path(blob.digest)
        os.rename(partial, self.complete_path(blob.digest))
        Path(str(partial) + ".map").unlink(missing_ok=True)
        self._retrying.discard(blob.digest)

    def discard(self, blob: Blob) -> None:
        """A blob that failed its digest check: its files (and its superblock's copy) go,
        and it is no longer handed out; its readers keep the bad object, which refuses."""
        assert blob.bad is not None
        self._bad[blob.digest] = (blob.bad, time.monotonic())
        if self._open.get(blob.digest) is blob:
            del self._open[blob.digest]
        partial = self.partial_path(blob.digest)
        for path in (Path(str(partial) + ".map"), partial, self.head_path(blob.digest)):
            # the map first
            path.unlink(missing_ok=True)
        self.used = self._measure()

    def evict(self, target: int | None = None) -> None:
        """Remove least recently used blobs nobody reads until under ``target`` (the
        cache size); blocking, so it runs in a thread."""
        limit = self.max_bytes if target is None else target
        entries = []
        for sub in ("blobs/sha256", "partial/sha256"):
            for entry in os.scandir(self.root / sub):
                if entry.name.endswith(".map"):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append((st.st_mtime, Path(entry.path), st.st_blocks * 512))
        entries.sort()
        used = self._measure()
        for _mtime, path, size in entries:
            if used <= limit:
                break
            if self._evict_one(path):
                used -= size
                log.info(
                    "cache: evicted sha256:%s (%d bytes) to stay under %d",
                    path.name,
                    size,
                    self.max_bytes,
                )
        self.used = used
        self._stuck = used > limit
        if used > self.max_bytes and not self._full_warned:
            self._full_warned = True
            log.warning(
                "cache: %d bytes used of %d: every other blob is being read; it shrinks "
                "when they are closed",
                used,
                self.max_bytes,
            )
        elif used <= self.max_bytes:
            self._full_warned = False

    @staticmethod
    def _evict_one(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    return False  # replaced since we opened it: not the file we locked
            except (BlockingIOError, FileNotFoundError):
                return False  # someone reads it, or it is gone
            Path(str(path) + ".map").unlink(missing_ok=True)  # the map first
            path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)
