"""Registry sources (``oci://HOST[:PORT][/REPOSITORY]``) and the names OCI tools write for
images (``REPOSITORY:TAG``, ``REPOSITORY@sha256:HEX``): parsing only, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The layer media type of EROFS-native images (containerd's erofs snapshotter).
EROFS_LAYER = "application/vnd.erofs.layer.v1"

# distribution/reference's grammar, as the registry enforces it
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?")


class BadReference(ValueError):
    """A source or image name that is not what OCI tools write; the message says why."""


@dataclass(frozen=True, slots=True)
class RegistrySpec:
    """Where a registry source points: one repository, or (``repository`` None) every
    repository of the registry's catalog."""

    host: str  # HOST or HOST:PORT, as credentials and certs.d are keyed
    repository: str | None
    tls: bool = True

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def __str__(self) -> str:
        scheme = "oci" if self.tls else "oci+http"
        return f"{scheme}://{self.host}" + (f"/{self.repository}" if self.repository else "")


def is_registry_source(text: str) -> bool:
    return text.startswith(("oci://", "oci+http://"))


def check_repository(name: str) -> str:
    if not _REPOSITORY.fullmatch(name) or len(name) > 255:
        raise BadReference(
            f"{name!r} is not a repository name (lower-case components such as team/app)"
        )
    return name


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise BadReference(f"{digest!r} is not a digest (sha256: and 64 lower-case hex digits)")
    return digest


def parse_source(text: str, *, allow_tag: bool = False) -> tuple[RegistrySpec, str | None]:
    """``oci://HOST[:PORT][/REPOSITORY[:TAG]]`` (``oci+http://`` for plain HTTP); the tag
    only where ``allow_tag`` (push names one)."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("oci", "oci+http"):
        raise BadReference(f"{text!r}: write oci://HOST[:PORT]/REPOSITORY (oci+http:// if plain)")
    host, _, path = rest.partition("/")
    if not _HOST.fullmatch(host):
        raise BadReference(f"{text!r}: {host!r} is not a host name with an optional :PORT")
    tag = None
    if path and allow_tag:
        path, tag = split_tag(path)
    repository = check_repository(path.rstrip("/")) if path.rstrip("/") else None
    if tag is not None:
        check_tag(tag)
    return RegistrySpec(host=host.lower(), repository=repository, tls=scheme == "oci"), tag


def split_tag(path: str) -> tuple[str, str | None]:
    """``team/app:v1`` as (``team/app``, ``v1``): a colon after the last slash."""
    slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > slash:
        return path[:colon], path[colon + 1 :]
    return path, None


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise BadReference(f"{tag!r} is not a tag (letters, digits, _ . -; at most 128)")
    return tag


@dataclass(frozen=True, slots=True)
class ImageName:
    """An export name a client asked for: a repository and a tag or a digest."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/ (or /blobs/)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return (
            f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"
        )


def parse_image_name(name: str) -> ImageName | None:
    """``REPOSITORY:TAG`` or ``REPOSITORY@sha256:HEX``, or None for a name that is neither
    (a file export's name, or a mistake)."""
    repository, at, digest = name.partition("@")
    try:
        if at:
            return ImageName(check_repository(repository), digest=check_digest(digest))
        repository, tag = split_tag(name)
        if tag is None:
            return None
        return ImageName(check_repository(repository), tag=check_tag(tag))
    except BadReference:
        return None
