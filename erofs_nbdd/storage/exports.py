"""The exports of a directory: which files are EROFS images, their names and descriptions.

A file is served only if its EROFS superblock checks out, so a stray tarball or a half-copied
image never reaches a client. The directory is re-scanned whenever a client negotiates;
superblocks are parsed again only when a file's identity (inode, size, mtime) changes.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..erofs import SUPERBLOCK_OFFSET, NotErofs, Superblock, parse_superblock
from .pagecache import can_see

log = logging.getLogger(__name__)

SUFFIX = ".erofs"


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    path: Path  # resolved, inside the export root
    size: int
    superblock: Superblock

    @property
    def description(self) -> str:
        return self.superblock.describe(self.size)


def export_name(relative: str) -> str:
    return relative[: -len(SUFFIX)] if relative.endswith(SUFFIX) else relative


class ExportDirectory:
    """Every EROFS image below ``root``; never anything outside it."""

    def __init__(self, root: Path, *, default_export: str | None = None) -> None:
        self.root = root.resolve(strict=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{root} is not a directory")
        self.default_export = default_export
        self._cache: dict[tuple[int, int, int, int], Superblock | str] = {}
        self._warned: set[str] = set()

    def scan(self) -> dict[str, Export]:
        """Walk the tree now (blocking: call it from a worker thread)."""
        found: dict[str, Export] = {}
        seen: set[tuple[int, int, int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(dirpath, filename)
                export = self._consider(path, seen)
                if export is not None:
                    found.setdefault(export.name, export)
        # forget files that are gone, so a re-added bad file is warned about again
        self._cache = {k: v for k, v in self._cache.items() if k in seen}
        return found

    def _consider(self, path: Path, seen: set[tuple[int, int, int, int]]) -> Export | None:
        relative = path.relative_to(self.root).as_posix()
        try:
            real = path.resolve(strict=True)
        except OSError:
            return None  # dangling link, or removed while we looked
        if not real.is_relative_to(self.root):
            self._warn_once(relative, f"{relative}: links outside {self.root}; not served")
            return None
        try:
            st = real.stat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        seen.add(key)
        cached = self._cache.get(key)
        if cached is None:
            try:
                with real.open("rb") as f:
                    cached = parse_superblock(f.read(SUPERBLOCK_OFFSET + 256), st.st_size)
            except NotErofs as exc:
                cached = str(exc)
                log.warning("%s: not served: %s", relative, exc)
            except OSError as exc:
                log.warning("%s: not served: %s", relative, exc.strerror or exc)
                return None
            self._cache[key] = cached
            if not isinstance(cached, str) and not can_see(real):
                log.info(
                    "%s: owned by uid %d and not writable here, so Linux hides its page cache "
                    "from this server: its reads are copied, not sent from the page cache "
                    "(chown it to uid %d for zero-copy reads)",
                    relative,
                    st.st_uid,
                    os.geteuid(),
                )
        if isinstance(cached, str):
            return None
        name = export_name(relative)
        if ".." in name.split("/") or name.startswith("/"):
            return None
        return Export(name=name, path=real, size=st.st_size, superblock=cached)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def resolve_name(self, name: str, exports: dict[str, Export]) -> Export | str:
        """The export a client's name selects, or a message saying why there is none."""
        if name == "":
            if self.default_export is not None:
                name = self.default_export
            elif len(exports) == 1:
                return next(iter(exports.values()))
            else:
                names = ", ".join(sorted(exports)[:10]) or "none"
                return (
                    f"no default export: {len(exports)} images are served ({names}); "
                    "name one, or start the server with --default-export NAME"
                )
        export = exports.get(name)
        if export is None:
            return f"no export named {name!r}; list them with NBD_OPT_LIST (nbdinfo --list)"
        return export
