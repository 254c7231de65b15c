"""Real registries (docker-registry processes) and real EROFS images to push into them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import mkfs, random_image, require_tool
from .registryd import Auth, Registry, start_registry


def _serve(factory: pytest.TempPathFactory, *, tls: bool, auth: Auth) -> Iterator[Registry]:
    for tool in ("docker-registry", "skopeo", "curl"):
        require_tool(tool)
    registry = start_registry(factory.mktemp(f"registry-{auth}"), tls=tls, auth=auth)
    try:
        yield registry
    finally:
        registry.close()


# Function-scoped: a registry starts in about 0.1 s, and a test may stop, restart, delete
# from or shorten the token lifetime of its own without the next test seeing it.
@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry over TLS (our CA) with htpasswd basic auth."""
    yield from _serve(tmp_path_factory, tls=True, auth="htpasswd")


@pytest.fixture
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry over TLS with token auth, the issuer running in this process."""
    yield from _serve(tmp_path_factory, tls=True, auth="token")


@pytest.fixture
def plain_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry over plain http without auth (what a local mirror often is)."""
    yield from _serve(tmp_path_factory, tls=False, auth="none")


@pytest.fixture(scope="session")
def erofs_images(tmp_path_factory: pytest.TempPathFactory, source_tree: Path) -> dict[str, Path]:
    """Real EROFS images by name: "tree" (the shared source tree, lz4hc-compressed, ~3 MiB)
    and "random" (one file of 2 MiB + 5 random bytes, uncompressed, ~2 MiB)."""
    root = tmp_path_factory.mktemp("registry-images")
    return {
        "tree": mkfs(root / "tree.erofs", source_tree, "-zlz4hc"),
        "random": random_image(root, "random", 2 * 1024 * 1024 + 5),
    }
