"""Every export the server offers, over all its sources (directories and registries), and
the one place names are resolved: a name two sources both offer goes to the first source
on the command line, with a warning naming both, never silently."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .exports import Export, ExportDirectory
    from .oci import RegistrySource

log = logging.getLogger(__name__)

REFUSAL_LOG_EVERY = 60.0


class NotServed(Exception):
    """A name a source knows but cannot serve; the message goes to the client."""


@dataclass(frozen=True, slots=True)
class Listed:
    name: str
    description: str


class Catalog:
    def __init__(
        self,
        directories: list[ExportDirectory],
        registries: list[RegistrySource] | None = None,
        *,
        default_export: str | None = None,
    ) -> None:
        self.directories = directories
        self.registries = registries or []
        self.default_export = default_export
        self._collisions: set[str] = set()
        self._refusals: dict[str, float] = {}

    async def files(self) -> dict[str, Export]:
        """Each directory's exports; the first directory's wins a shared name."""
        found: dict[str, Export] = {}
        for directory in self.directories:
            for name, export in (await trio.to_thread.run_sync(directory.scan)).items():
                if name in found:
                    self._collide(name, str(found[name].path), str(export.path))
                else:
                    found[name] = export
        return found

    def _collide(self, name: str, kept: str, lost: str) -> None:
        if name not in self._collisions:
            self._collisions.add(name)
            log.warning("export %r is offered twice: serving %s, not %s", name, kept, lost)

    async def listing(self, files: dict[str, Export] | None = None) -> list[Listed]:
        """Every export, by name and description (``files``: the directories' exports,
        when the caller has just scanned them)."""
        if files is None:
            files = await self.files()
        out = [Listed(e.name, e.description) for e in files.values()]
        seen = set(files)
        for registry in self.registries:
            for name, description in await registry.listing():
                if name in seen:
                    if name in files:
                        self._collide(name, str(files[name].path), f"{registry} {name}")
                    continue
                seen.add(name)
                out.append(Listed(name, description))
        return out

    async def lookup(self, name: str) -> Export | str:
        """The export ``name`` selects, or a message saying why there is none."""
        files = await self.files()
        if name == "":
            if self.default_export is not None:
                name = self.default_export
            else:
                listed = await self.listing(files)
                if len(listed) == 1:
                    name = listed[0].name
                else:
                    names = ", ".join(sorted(e.name for e in listed)[:10]) or "none"
                    return (
                        f"no default export: {len(listed)} images are served ({names}); "
                        "name one, or start the server with --default-export NAME"
                    )
        if name in files:
            return files[name]
        refusal = None
        for registry in self.registries:
            wanted = registry.parse(name)
            if wanted is None:
                continue
            try:
                return await registry.lookup(wanted)
            except NotServed as exc:  # the next registry may have it (two catalogs, say)
                self._log_refusal(f"{registry}: {exc}")
                refusal = refusal or str(exc)
        return refusal or f"no export named {name!r}; list them with NBD_OPT_LIST (nbdinfo --list)"

    def _log_refusal(self, message: str) -> None:
        """Once a minute per message: a client's INFO, GO and retries say the same."""
        now = time.monotonic()
        if now - self._refusals.get(message, -REFUSAL_LOG_EVERY) >= REFUSAL_LOG_EVERY:
            if len(self._refusals) > 1024:
                self._refusals.clear()
            self._refusals[message] = now
            log.warning("%s", message)

    async def aclose(self) -> None:
        for registry in self.registries:
            await registry.aclose()
