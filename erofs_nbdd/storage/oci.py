"""A registry as a source of exports: its EROFS-native images, named as OCI tools write
them (``REPOSITORY:TAG``, ``REPOSITORY@sha256:HEX``), their blobs read through the cache.

Tags are resolved each time a client asks (a moved tag serves its new image from then on;
a connection already open keeps the blob it opened). What the registry said is kept under
the cache directory (``meta/``: tag to digest, manifests, layer sizes, superblocks), so a
registry that is down costs only what was never fetched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..erofs import SUPERBLOCK_OFFSET, NotErofs, parse_superblock
from ..ranges import ImageUnreadable
from ..registry.auth import AuthError
from ..registry.client import NotFound, RegistryError, TrustError, Unreachable
from ..registry.manifest import BadManifest, Descriptor, Index, Manifest, parse
from ..registry.reference import (
    EROFS_LAYER,
    BadReference,
    ImageName,
    check_repository,
    check_tag,
    parse_image_name,
)
from .blobcache import digest_hex
from .catalog import NotServed
from .exports import Export
from .remote import RemoteBackend

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from ..registry.client import RegistryClient
    from ..registry.reference import RegistrySpec
    from .backend import Backend
    from .blobcache import Blob, BlobCache, Sink

log = logging.getLogger(__name__)

HEAD = SUPERBLOCK_OFFSET + 256
#: Seconds a listing of the registry (catalog, tags) is reused: LIST from many clients at
#: once must not be a storm of requests to the registry.
LIST_TTL = 2.0
#: Tags one LIST shows at most, and how many are resolved at once.
MAX_LISTED = 1000
LIST_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class RemoteBlob:
    cache: BlobCache
    client: RegistryClient
    repository: str
    digest: str
    size: int
    timeout: float

    def open(self, *, io_uring: bool) -> Backend:
        blob = self.cache.open(self.digest, self.size)
        try:
            self._arm(blob)
            return RemoteBackend(self.cache, blob, io_uring=io_uring)
        except BaseException:
            self.cache.release(blob)
            raise

    def _arm(self, blob: Blob) -> None:
        """How the blob fetches what it lacks: from the registry that opened it first (the
        digest, checked when the blob is whole, makes any registry holding it as good)."""
        blob.timeout = self.timeout
        blob.transient = (Unreachable,)
        if blob.fetch is None:
            client, repository, digest, size = self.client, self.repository, self.digest, self.size

            async def fetch(start: int, end: int, sink: Sink) -> None:
                await client.read_blob(repository, digest, start, end, size, sink)

            blob.fetch = fetch


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_once(path: Path, data: bytes) -> None:
    """For files named by their content's digest: once written, never again."""
    if not path.exists():
        _atomic_write(path, data)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


class MetaStore:
    """What one registry said, under ``CACHE/meta/HOST``: no credential ever goes here."""

    def __init__(self, cache: BlobCache, host: str) -> None:
        self.root = cache.root / "meta" / host
        self._cache = cache
        self._manifests = cache.root / "manifests" / "sha256"

    def _repo(self, repository: str) -> Path:
        return self.root / "repos" / repository.replace("/", "+")

    def save_ref(self, repository: str, tag: str, digest: str) -> None:
        path = self._repo(repository) / "tags" / tag
        with contextlib.suppress(OSError):
            if path.read_text() == digest:
                return
        _atomic_write(path, digest.encode())

    def ref(self, repository: str, tag: str) -> str | None:
        try:
            return (self._repo(repository) / "tags" / tag).read_text().strip() or None
        except OSError:
            return None

    def tags(self, repository: str) -> list[str]:
        try:
            return sorted(
                p.name
                for p in (self._repo(repository) / "tags").iterdir()
                if not p.name.startswith(".")
            )
        except OSError:
            return []

    def repositories(self) -> list[str]:
        try:
            return sorted(p.name.replace("+", "/") for p in (self.root / "repos").iterdir())
        except OSError:
            return []

    def save_manifest(self, digest: str, data: bytes) -> None:
        _write_once(self._manifests / digest_hex(digest), data)

    def manifest(self, digest: str) -> bytes | None:
        return _read(self._manifests / digest_hex(digest))

    def _layer(self, repository: str, digest: str) -> Path:
        return self._repo(repository) / "layers" / digest_hex(digest)

    def save_layer(self, repository: str, layer: Descriptor) -> None:
        _write_once(
            self._layer(repository, layer.digest), f"{layer.size} {layer.media_type}".encode()
        )

    def layer(self, repository: str, digest: str) -> Descriptor | None:
        text = _read(self._layer(repository, digest))
        if text is None:
            return None
        size, _, media_type = text.decode(errors="replace").partition(" ")
        try:
            return Descriptor(media_type=media_type, digest=digest, size=int(size))
        except ValueError:
            return None

    def save_head(self, digest: str, head: bytes) -> None:
        _write_once(self._cache.head_path(digest), head)

    def head(self, digest: str) -> bytes | None:
        return _read(self._cache.head_path(digest))


def _short(digest: str) -> str:
    return digest[: 7 + 12]


class RegistrySource:
    def __init__(
        self,
        spec: RegistrySpec,
        client: RegistryClient,
        cache: BlobCache,
        *,
        platform: str,
        timeout: float = 30.0,
    ) -> None:
        self.spec = spec
        self.client = client
        self.cache = cache
        self.meta = MetaStore(cache, spec.host)
        self.platform = platform
        self.timeout = timeout
        self._warned: set[str] = set()
        self._listing: tuple[float, list[tuple[str, str]]] | None = None
        self._list_lock = trio.Lock()

    def __str__(self) -> str:
        return str(self.spec)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    async def check(self) -> None:
        """At start: AuthError and TrustError are fatal (the caller exits); an unreachable
        registry is a warning, and what the cache holds is served."""
        try:
            await self.client.check()
            if self.spec.repository is not None:
                await self.client.tags(self.spec.repository)
            else:
                await self.client.catalog()
        except Unreachable as exc:
            log.warning(
                "%s: unreachable (%s); serving what the cache holds until it answers",
                self.spec,
                exc,
            )
        except NotFound as exc:
            if self.spec.repository is None:
                raise RegistryError(
                    f"{self.spec}: the registry offers no catalog (/v2/_catalog); "
                    f"name the repository: {self.spec}/REPOSITORY"
                ) from exc
            log.warning("%s: no such repository yet (%s)", self.spec, exc)

    def owns(self, repository: str) -> bool:
        return self.spec.repository is None or repository == self.spec.repository

    # -- resolving names --------------------------------------------------------------

    async def _manifest(self, repository: str, reference: str) -> Manifest | Index:
        """The manifest a tag or digest names now; the cached answer if the registry is
        unreachable (a digest's is immutable and never asked again)."""
        if reference.startswith("sha256:"):
            data = self.meta.manifest(reference)
            if data is not None:
                return parse(data, reference)
        try:
            if not reference.startswith("sha256:"):
                # a HEAD says where the tag points; that manifest may be here already
                now = await self.client.manifest_digest(repository, reference)
                known = self.meta.manifest(now) if now else None
                if now and known is not None:
                    self.meta.save_ref(repository, reference, now)
                    return parse(known, now)
            data, digest, content_type = await self.client.manifest(repository, reference)
        except Unreachable as exc:
            cached = (
                reference
                if reference.startswith("sha256:")
                else self.meta.ref(repository, reference)
            )
            data = self.meta.manifest(cached) if cached else None
            if data is None or cached is None:
                raise
            self._warn_once(
                f"stale {repository}:{reference}",
                "%s: %s: registry unreachable (%s); serving the cached %s",
                self.spec,
                f"{repository}:{reference}",
                exc,
                cached,
            )
            return parse(data, cached)
        found = parse(data, digest, content_type)
        self.meta.save_manifest(digest, data)
        if not reference.startswith("sha256:"):
            self.meta.save_ref(repository, reference, digest)
        return found

    async def _image(self, repository: str, reference: str) -> Manifest:
        found = await self._manifest(repository, reference)
        if isinstance(found, Index):
            entry = found.choose(self.platform)
            found = await self._manifest(repository, entry.digest)
            if isinstance(found, Index):
                raise BadManifest("an index inside an index")
        for layer in found.layers:
            self.meta.save_layer(repository, layer)
        return found

    async def _superblock_export(
        self, name: str, repository: str, layer: Descriptor, note: str, *, listing: bool = False
    ) -> Export:
        """The layer as an export, once its superblock checks out. GO reads it through the
        cache (the mount needs that chunk next); LIST only the bytes it needs, uncached."""
        refused = self.cache.refused(layer.digest)
        if refused is not None:
            raise NotServed(refused)
        head = self.meta.head(layer.digest)
        remote = RemoteBlob(
            self.cache, self.client, repository, layer.digest, layer.size, self.timeout
        )
        if head is None and listing and not self.cache.complete_path(layer.digest).exists():
            try:
                head = await self.client.read_head(repository, layer.digest, HEAD, layer.size)
            except RegistryError as exc:
                raise NotServed(f"{name}: cannot read its superblock: {exc}") from exc
        if head is None:
            try:
                backend = remote.open(io_uring=False)
            except OSError as exc:
                raise NotServed(f"{name}: the cache cannot hold it: {exc}") from exc
            try:
                view = memoryview(bytearray(min(HEAD, layer.size)))
                await backend.read(view, 0)
                head = bytes(view)
            except ImageUnreadable as exc:
                raise NotServed(f"{name}: cannot read its superblock: {exc}") from exc
            finally:
                backend.close()
        try:
            superblock = parse_superblock(head, layer.size)
        except NotErofs as exc:
            raise NotServed(f"{name}: layer {_short(layer.digest)} is not EROFS: {exc}") from exc
        self.meta.save_head(layer.digest, head)
        return Export(
            name=name, path=None, size=layer.size, superblock=superblock, remote=remote, note=note
        )

    @staticmethod
    def _erofs_layers(name: str, manifest: Manifest) -> list[Descriptor]:
        if not manifest.layers:
            raise NotServed(f"{name}: the image has no layers")
        for i, layer in enumerate(manifest.layers):
            if layer.media_type != EROFS_LAYER:
                raise NotServed(
                    f"{name}: layer {i + 1} of {len(manifest.layers)} is {layer.media_type}, "
                    f"not EROFS ({EROFS_LAYER}): only EROFS-native images are served"
                )
        return list(manifest.layers)

    @staticmethod
    def _describe(manifest: Manifest, layers: list[Descriptor], repository: str) -> str:
        title = manifest.annotations.get(
            "org.opencontainers.image.title"
        ) or manifest.annotations.get("org.opencontainers.image.description")
        parts = [f"image {_short(manifest.digest)}"]
        if title:
            parts.append(title)
        if len(layers) > 1:
            listed = ", ".join(f"{repository}@{d.digest}" for d in layers)
            parts.append(f"{len(layers)} EROFS layers, bottom first: {listed}")
        return "; ".join(parts)

    async def lookup(self, wanted: ImageName) -> Export:
        """The export a name selects; NotServed with the reason if there is none."""
        name = str(wanted)
        try:
            if wanted.digest is not None and self.meta.layer(wanted.repository, wanted.digest):
                return await self._layer(wanted)
            try:
                manifest = await self._image(wanted.repository, wanted.reference)
            except NotFound:
                if wanted.digest is None:
                    raise NotServed(f"{name}: no such tag in {self.spec}") from None
                return await self._layer(wanted)
            except RegistryError:
                # distribution answers 500 for a manifest GET of a layer's digest
                if wanted.digest is None:
                    raise
                return await self._layer(wanted)
            layers = self._erofs_layers(name, manifest)
            note = self._describe(manifest, layers, wanted.repository)
            if len(layers) > 1:
                raise NotServed(f"{name}: {note}; attach a layer by its digest")
            return await self._superblock_export(name, wanted.repository, layers[0], note)
        except NotServed:
            raise
        except (BadManifest, RegistryError, AuthError) as exc:
            raise NotServed(f"{name}: {exc}") from exc

    async def _layer(self, wanted: ImageName) -> Export:
        assert wanted.digest is not None
        layer = self.meta.layer(wanted.repository, wanted.digest)
        if layer is None:
            size = await self.client.blob_size(wanted.repository, wanted.digest)
            layer = Descriptor(media_type=EROFS_LAYER, digest=wanted.digest, size=size)
        elif layer.media_type != EROFS_LAYER:
            raise NotServed(f"{wanted}: a {layer.media_type} layer, not EROFS ({EROFS_LAYER})")
        return await self._superblock_export(
            str(wanted), wanted.repository, layer, f"layer {_short(layer.digest)}"
        )

    # -- listing ----------------------------------------------------------------------

    async def _repositories(self) -> list[str]:
        if self.spec.repository is not None:
            return [self.spec.repository]
        try:
            return self._valid("repository", await self.client.catalog(), check_repository)
        except RegistryError as exc:
            self._warn_once(
                "catalog",
                "%s: cannot list its catalog (%s); listing what the cache knows",
                self.spec,
                exc,
            )
            return self.meta.repositories()

    async def _tags(self, repository: str) -> list[str]:
        try:
            return sorted(self._valid("tag", await self.client.tags(repository), check_tag))
        except NotFound:
            return []
        except RegistryError as exc:
            self._warn_once(
                f"tags {repository}",
                "%s: cannot list the tags of %s (%s); listing the cached ones",
                self.spec,
                repository,
                exc,
            )
            return self.meta.tags(repository)

    def _valid(self, what: str, names: list[str], check: Callable[[str], str]) -> list[str]:
        """Names the registry sent that OCI allows: they become paths under meta/."""
        good = []
        for name in names:
            try:
                good.append(check(name))
            except BadReference:
                self._warn_once(
                    f"bad {what} {name!r}", "%s: ignored a %s named %r", self, what, name
                )
        return good

    async def listing(self) -> list[tuple[str, str]]:
        """(name, description) of every tag, and of each layer of multi-layer images."""
        async with self._list_lock:
            now = trio.current_time()
            if self._listing is not None and now - self._listing[0] < LIST_TTL:
                return self._listing[1]
            wanted: list[ImageName] = []
            for repository in await self._repositories():
                wanted += [ImageName(repository, tag=t) for t in await self._tags(repository)]
                if len(wanted) > MAX_LISTED:
                    self._warn_once(
                        "too many", "%s: over %d tags; LIST shows the first", self, MAX_LISTED
                    )
                    del wanted[MAX_LISTED:]
                    break
            results: list[list[tuple[str, str]]] = [[] for _ in wanted]
            limiter = trio.CapacityLimiter(LIST_CONCURRENCY)

            async def one(i: int) -> None:
                async with limiter:
                    results[i] = await self._list_tag(wanted[i])

            async with trio.open_nursery() as nursery:  # a tag at a time is 2000 round trips
                for i in range(len(wanted)):
                    nursery.start_soon(one, i)
            found = [entry for entries in results for entry in entries]
            self._listing = (trio.current_time(), found)
            return found

    async def _list_tag(self, wanted: ImageName) -> list[tuple[str, str]]:
        name = str(wanted)
        try:
            manifest = await self._image(wanted.repository, wanted.reference)
            layers = self._erofs_layers(name, manifest)
            note = self._describe(manifest, layers, wanted.repository)
            if len(layers) == 1:
                export = await self._superblock_export(
                    name, wanted.repository, layers[0], note, listing=True
                )
                return [(name, export.description)]
            out = [(name, note)]
            for i, layer in enumerate(layers):
                digest_name = f"{wanted.repository}@{layer.digest}"
                export = await self._superblock_export(
                    digest_name,
                    wanted.repository,
                    layer,
                    f"layer {i + 1} of {len(layers)} of {name}",
                    listing=True,
                )
                out.append((digest_name, export.description))
            return out
        except (NotServed, BadManifest, RegistryError, AuthError) as exc:
            self._warn_once(f"list {name}", "%s: %s: not served: %s", self.spec, name, exc)
            return []

    def parse(self, name: str) -> ImageName | None:
        wanted = parse_image_name(name)
        if wanted is None or not self.owns(wanted.repository):
            return None
        return wanted

    async def aclose(self) -> None:
        await self.client.aclose()


__all__ = ["NotServed", "RegistrySource", "RemoteBlob", "TrustError"]
