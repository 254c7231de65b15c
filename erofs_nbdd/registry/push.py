"""``erofs-nbdd push``: EROFS images published as an EROFS-native OCI image (one layer per
image, bottom first, an OCI image config, the manifest), so publishing needs no other tool.
Blobs the registry already has are not sent again."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import trio

from ..erofs import SUPERBLOCK_OFFSET, NotErofs, parse_superblock
from .client import RegistryClient
from .credentials import find_credentials
from .manifest import (
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    image_config,
    image_manifest,
    sha256_digest,
)
from .reference import EROFS_LAYER

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from .reference import RegistrySpec

#: Bytes a PATCH carries: large enough to keep the link busy, small enough to show progress.
PIECE = 8 * 1024 * 1024


class PushError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Layer:
    path: Path
    digest: str
    size: int


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def check_image(path: Path) -> int:
    """The image's size, if it is an EROFS image; PushError saying why not."""
    try:
        with path.open("rb") as f:
            head = f.read(SUPERBLOCK_OFFSET + 256)
            size = os.fstat(f.fileno()).st_size
        parse_superblock(head, size)
    except OSError as exc:
        raise PushError(f"{path}: {exc.strerror or exc}") from exc
    except NotErofs as exc:
        raise PushError(f"{path}: not an EROFS image: {exc}") from exc
    return size


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


class Progress:
    """One line per blob on stderr, redrawn at most every half second on a terminal."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self.out = out
        self._last = 0.0

    def show(self, what: str, done: int, total: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < 0.5:
            return
        self._last = now
        line = f"{what}: {_human(done)} of {_human(total)}"
        if self.out.isatty():
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        elif final or done == 0:
            self.out.write(line + "\n")
        self.out.flush()


async def push(
    images: list[Path],
    spec: RegistrySpec,
    tag: str,
    *,
    authfile: Path | None = None,
    certs_d: tuple[Path, ...] = (),
    platform: str = "linux/amd64",
    progress: Progress | None = None,
) -> str:
    """Push and return the manifest digest."""
    assert spec.repository is not None
    repository = spec.repository
    progress = progress or Progress()
    sizes = [check_image(p) for p in images]  # refuse before sending anything
    layers = []
    for path, size in zip(images, sizes, strict=True):
        digest = await trio.to_thread.run_sync(_digest, path)
        layers.append(Layer(path, digest, size))
    creds = find_credentials(spec.host, repository, authfile=authfile)
    client = RegistryClient(spec, creds, certs_d=certs_d, timeout=60.0)
    try:
        for layer in layers:
            await _upload_file(client, repository, layer, progress)
        config = image_config([layer.digest for layer in layers], platform)
        config_digest = sha256_digest(config)
        if not await client.has_blob(repository, config_digest):
            await client.upload_blob(repository, config_digest, len(config), _once(config))
        manifest = image_manifest(
            [
                Descriptor(
                    EROFS_LAYER,
                    layer.digest,
                    layer.size,
                    annotations={"org.opencontainers.image.title": layer.path.name},
                )
                for layer in layers
            ],
            Descriptor(OCI_CONFIG, config_digest, len(config)),
        )
        return await client.put_manifest(repository, tag, manifest, OCI_MANIFEST)
    finally:
        await client.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _upload_file(
    client: RegistryClient, repository: str, layer: Layer, progress: Progress
) -> None:
    what = f"{layer.path.name} {layer.digest[:19]}"
    if await client.has_blob(repository, layer.digest):
        progress.out.write(f"{what}: already in the registry\n")
        return

    async def pieces() -> AsyncIterator[bytes]:
        sent = 0
        progress.show(what, 0, layer.size)
        with layer.path.open("rb") as f:
            while data := await trio.to_thread.run_sync(f.read, PIECE):
                yield data
                sent += len(data)
                progress.show(what, sent, layer.size)
        progress.show(what, sent, layer.size, final=True)

    await client.upload_blob(repository, layer.digest, layer.size, pieces())
