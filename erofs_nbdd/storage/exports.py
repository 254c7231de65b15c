"""The exports of a directory: which files are EROFS images, their names and descriptions.

A file is served only if its EROFS superblock checks out, so a stray tarball or a half-copied
image never reaches a client. The directory is re-scanned whenever a client negotiates;
superblocks are parsed again only when a file's identity (inode, size, mtime) changes.

Whatever else the tree holds costs only that path: a symlink loop, a FIFO, device or socket,
a name that is not UTF-8 (NBD export names are), a file that cannot be opened or is gone
before it is, a directory that cannot be listed, directories nested past MAX_DEPTH. Each is
not served, with one warning for as long as it stays, and the scan never raises because of
it: one odd entry must not take LIST, INFO and GO from every client, nor the start.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..erofs import SUPERBLOCK_OFFSET, NotErofs, Superblock, parse_superblock
from ..protocol.constants import MAX_STRING
from .file import file_kind, open_regular
from .pagecache import can_see

if TYPE_CHECKING:
    from .backend import Backend

log = logging.getLogger(__name__)

SUFFIX = ".erofs"
#: Directories this far below the root are listed, those below them are not: a bound on
#: the walk's time and recursion that no real layout of images comes near.
MAX_DEPTH = 64

_Key = tuple[int, int, int, int]


class Remote(Protocol):
    """Where a registry export's bytes come from (storage/oci.py)."""

    def open(self, *, io_uring: bool) -> Backend: ...


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    path: Path | None  # a file export's image, resolved, inside the export root
    size: int
    superblock: Superblock
    #: A registry export's blob (path is None then).
    remote: Remote | None = None
    #: What the source says of it before the superblock's description (the manifest).
    note: str = ""

    @property
    def image(self) -> Path:
        """A file export's image file; a registry export has none (it has ``remote``)."""
        if self.path is None:
            raise ValueError(f"{self.name} is served from a registry, not a file")
        return self.path

    @property
    def description(self) -> str:
        described = self.superblock.describe(self.size)
        return f"{self.note}; {described}" if self.note else described


def export_name(relative: str) -> str:
    return relative[: -len(SUFFIX)] if relative.endswith(SUFFIX) else relative


def shown(relative: str) -> str:
    """A path for messages: bytes that are not UTF-8 escaped (b"bad\\xff" reads bad\\xff),
    so a log line never fails to encode."""
    return os.fsencode(relative).decode("utf-8", "backslashreplace") or "."


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an NBD export name (UTF-8, at most MAX_STRING bytes), or None."""
    try:
        size = len(name.encode("utf-8"))  # undecodable bytes are lone surrogates: they fail
    except UnicodeEncodeError:
        return "its name is not UTF-8, and NBD export names are"
    if size > MAX_STRING:
        return f"its name is {size} bytes, and NBD export names are at most {MAX_STRING}"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _identity(st: os.stat_result) -> _Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ExportDirectory:
    """Every EROFS image below ``root``; never anything outside it."""

    def __init__(self, root: Path) -> None:
        # stat first: the kernel ends a symlink loop or an endless chain with ELOOP, where
        # realpath would loop in Python until RecursionError
        if not stat.S_ISDIR(os.stat(root).st_mode):
            raise NotADirectoryError(f"{root} is not a directory")
        self.root = Path(os.path.realpath(root, strict=True))
        self._cache: dict[_Key, Superblock | str] = {}
        self._warned: set[str] = set()
        #: Scans run in worker threads, several at once when clients negotiate together.
        self._lock = threading.Lock()

    def scan(self) -> dict[str, Export]:
        """Walk the tree now (blocking: call it from a worker thread)."""
        found: dict[str, Export] = {}
        seen: set[_Key] = set()
        odd: set[str] = set()  # the paths warned about that are still odd
        root = str(self.root)

        def unlistable(exc: OSError) -> None:
            relative = os.path.relpath(exc.filename, root) if exc.filename else ""
            relative = "" if relative == "." else relative
            self._warn_once(
                odd, relative, f"{shown(relative)}: cannot list it: {_reason(exc)}; not served"
            )

        for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
            here = os.path.relpath(dirpath, root)
            here = "" if here == "." else here
            kept = []
            for dirname in sorted(dirnames):
                relative = os.path.join(here, dirname)
                problem = _name_problem(relative)
                if problem is None:
                    kept.append(dirname)
                else:
                    self._warn_once(
                        odd, relative, f"{shown(relative)}: {problem}; nothing in it is served"
                    )
            depth = here.count("/") + 1 if here else 0
            if kept and depth >= MAX_DEPTH:
                self._warn_once(
                    odd,
                    here,
                    f"{shown(here)}: {MAX_DEPTH} directories below the root already; "
                    "the directories in it are not searched, and nothing in them is served",
                )
                kept = []
            dirnames[:] = kept  # os.walk descends into these only
            for filename in sorted(filenames):
                export = self._consider(os.path.join(here, filename), seen, odd)
                if export is not None:
                    found.setdefault(export.name, export)
        with self._lock:
            # forget files that are gone, so a re-added bad file is warned about again
            self._cache = {k: v for k, v in self._cache.items() if k in seen}
            self._warned &= odd
        return found

    def _consider(self, relative: str, seen: set[_Key], odd: set[str]) -> Export | None:
        name = export_name(relative)
        problem = _name_problem(name)
        if problem is not None:
            self._warn_once(odd, relative, f"{shown(relative)}: {problem}; not served")
            return None
        path = os.path.join(self.root, relative)
        try:
            # stat follows links, and the kernel ends loops (ELOOP) before realpath is asked
            st = os.stat(path)
            real = os.path.realpath(path)
        except (OSError, RuntimeError, ValueError) as exc:  # RecursionError: a RuntimeError
            self._warn_once(odd, relative, f"{shown(relative)}: not served: {_reason(exc)}")
            return None
        if not Path(real).is_relative_to(self.root):
            self._warn_once(
                odd, relative, f"{shown(relative)}: links outside {self.root}; not served"
            )
            return None
        if not stat.S_ISREG(st.st_mode):
            self._warn_once(
                odd,
                relative,
                f"{shown(relative)}: not served: not a regular file but {file_kind(st.st_mode)}",
            )
            return None
        key = _identity(st)
        seen.add(key)
        cached = self._cache.get(key)
        if cached is None:
            try:
                # the path may be a FIFO by now: open_regular neither blocks nor accepts one
                fd, st = open_regular(real)
                try:
                    head = os.pread(fd, SUPERBLOCK_OFFSET + 256, 0)
                    visible = can_see(fd)
                finally:
                    os.close(fd)
            except OSError as exc:  # NotRegularFile too
                self._warn_once(odd, relative, f"{shown(relative)}: not served: {_reason(exc)}")
                return None
            key = _identity(st)  # what was read, should it have changed since the stat
            seen.add(key)
            try:
                cached = parse_superblock(head, st.st_size)
            except NotErofs as exc:
                cached = str(exc)
                log.warning("%s: not served: %s", shown(relative), exc)
            with self._lock:
                self._cache[key] = cached
            if not isinstance(cached, str) and not visible:
                log.info(
                    "%s: owned by uid %d and not writable here, so Linux hides its page cache "
                    "from this server: its reads are copied, not sent from the page cache "
                    "(chown it to uid %d for zero-copy reads)",
                    shown(relative),
                    st.st_uid,
                    os.geteuid(),
                )
        if isinstance(cached, str):
            return None
        return Export(name=name, path=Path(real), size=st.st_size, superblock=cached)

    def _warn_once(self, odd: set[str], key: str, message: str) -> None:
        """Warn about ``key`` unless already warned while it stayed odd; ``odd`` collects
        this scan's keys, and a key that stops being odd is forgotten."""
        odd.add(key)
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning("%s", message)
