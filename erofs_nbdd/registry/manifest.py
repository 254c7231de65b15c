"""Manifests and indexes as registries return them (OCI and Docker v2 forms): which layers
an image has, and which image of an index fits this platform. Pure parsing of bytes whose
digest the caller checked."""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import dataclass, field

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
#: What a manifest GET accepts, preferred first.
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
#: Larger manifests are refused unread: a manifest of thousands of layers is not an image.
MAX_MANIFEST = 4 * 1024 * 1024

#: The largest blob a descriptor may claim (1 TiB).
MAX_BLOB = 1 << 40
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


class BadManifest(ValueError):
    """The registry's answer is not a manifest or an index we can use; the message says why."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_platform() -> str:
    machine = platform.machine()
    return f"linux/{_ARCHES.get(machine, machine)}"


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: str | None = None  # os/arch[/variant], in an index

    @property
    def title(self) -> str | None:
        return self.annotations.get("org.opencontainers.image.title")


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest: its layers in order, and what it says of itself."""

    digest: str
    media_type: str
    layers: tuple[Descriptor, ...]
    config: Descriptor | None
    annotations: dict[str, str]


@dataclass(frozen=True, slots=True)
class Index:
    digest: str
    media_type: str
    manifests: tuple[Descriptor, ...]

    def choose(self, wanted: str) -> Descriptor:
        """The entry for ``wanted`` (os/arch[/variant]); a lone entry with no platform too."""
        for entry in self.manifests:
            if entry.platform == wanted or (
                entry.platform
                and wanted.count("/") == 1
                and entry.platform.startswith(wanted + "/")
            ):
                return entry
        if len(self.manifests) == 1 and self.manifests[0].platform is None:
            return self.manifests[0]
        offered = ", ".join(sorted({m.platform or "?" for m in self.manifests})) or "none"
        raise BadManifest(f"the index has no image for {wanted} (it has: {offered})")


def _descriptor(raw: object, where: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise BadManifest(f"{where} is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise BadManifest(f"{where} has no sha256 digest")  # it names files: hex only
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB:
        raise BadManifest(f"{where} has no size (or one over {MAX_BLOB} bytes)")
    annotations = raw.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise BadManifest(f"{where} has annotations that are not an object")
    found = raw.get("platform")
    plat = None
    if isinstance(found, dict) and found.get("os") and found.get("architecture"):
        plat = f"{found['os']}/{found['architecture']}"
        if found.get("variant"):
            plat += f"/{found['variant']}"
    return Descriptor(
        media_type=str(media_type or ""),
        digest=digest,
        size=size,
        annotations={str(k): str(v) for k, v in annotations.items()},
        platform=plat,
    )


def parse(data: bytes, digest: str, content_type: str = "") -> Manifest | Index:
    """A manifest or an index, by its mediaType field (else the response's Content-Type)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadManifest(f"not JSON: {type(exc).__name__}") from exc
    if not isinstance(raw, dict) or raw.get("schemaVersion") != 2:
        raise BadManifest("not a schema 2 manifest (schema 1 images are not supported)")
    media_type = str(raw.get("mediaType") or content_type.partition(";")[0].strip())
    if media_type in INDEXES or (not media_type and "manifests" in raw):
        entries = raw.get("manifests")
        if not isinstance(entries, list):
            raise BadManifest("an index without a manifests list")
        return Index(
            digest,
            media_type or OCI_INDEX,
            tuple(_descriptor(e, f"manifests[{i}]") for i, e in enumerate(entries)),
        )
    if media_type in MANIFESTS or (not media_type and "layers" in raw):
        layers = raw.get("layers")
        if not isinstance(layers, list):
            raise BadManifest("a manifest without a layers list")
        config = raw.get("config")
        annotations = raw.get("annotations") or {}
        return Manifest(
            digest=digest,
            media_type=media_type or OCI_MANIFEST,
            layers=tuple(_descriptor(e, f"layers[{i}]") for i, e in enumerate(layers)),
            config=_descriptor(config, "config") if config is not None else None,
            annotations=(
                {str(k): str(v) for k, v in annotations.items()}
                if isinstance(annotations, dict)
                else {}
            ),
        )
    raise BadManifest(f"media type {media_type or '(none)'} is neither a manifest nor an index")


def image_manifest(layers: list[Descriptor], config: Descriptor) -> bytes:
    """An OCI image manifest of these layers (for push), in canonical form."""

    def out(d: Descriptor) -> dict[str, object]:
        entry: dict[str, object] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
        if d.annotations:
            entry["annotations"] = d.annotations
        return entry

    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": out(config),
        "layers": [out(d) for d in layers],
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def image_config(diff_ids: list[str], plat: str) -> bytes:
    os_name, _, arch = plat.partition("/")
    arch, _, variant = arch.partition("/")
    body: dict[str, object] = {
        "architecture": arch,
        "os": os_name,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {},
    }
    if variant:
        body["variant"] = variant
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
