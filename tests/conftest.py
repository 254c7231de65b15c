"""Fixtures shared by every test: real EROFS images built with mkfs.erofs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

# Kernel tests need root and the NBD driver: they run inside the VM (tests/vm/vmrun.py), which
# sets VMRUN_GUEST; the host run leaves them out rather than skipping them.
collect_ignore = [] if os.environ.get("VMRUN_GUEST") else ["kernel"]


def free_port() -> int:
    """A loopback port free now (closed again for the test's server to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_tool(name: str) -> str:
    """The path of a peer tool; a missing one fails the test (CI must install it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run ./setup.sh test (it installs the peers)")
    return path


def build_tree(root: Path) -> None:
    """Files of several kinds, so images have inline, block and compressed data."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hello.txt").write_text("hello from erofs-nbdd\n")
    (root / "bin").mkdir()
    (root / "bin" / "random.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (root / "var" / "lib" / "deep").mkdir(parents=True)
    (root / "var" / "lib" / "deep" / "pattern.bin").write_bytes(bytes(range(256)) * 4096)
    (root / "zeros.bin").write_bytes(bytes(512 * 1024))
    (root / "etc" / "link").symlink_to("hello.txt")


def mkfs(image: Path, source: Path, *extra: str) -> Path:
    image.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [require_tool("mkfs.erofs"), *extra, str(image), str(source)],
        check=True,
        stdout=subprocess.DEVNULL,  # mkfs.erofs 1.5 prints a line per file
    )
    return image


def random_image(root: Path, name: str, size: int) -> Path:
    """``root/name.erofs``: an uncompressed image holding one file of ``size`` random bytes
    (its source tree is built beside ``root``)."""
    tree = root.parent / f"{name}-tree"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(size))
    return mkfs(root / f"{name}.erofs", tree)


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache (a real eviction, on ext4)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    build_tree(root)
    return root


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory, source_tree: Path) -> Path:
    """An export directory: two images, a junk file, and symlinks in and out of it."""
    root = tmp_path_factory.mktemp("images")
    mkfs(root / "demo.erofs", source_tree)
    mkfs(root / "team" / "app-v2.erofs", source_tree, "-zlz4hc")
    (root / "notes.txt").write_text("not an image\n")
    outside = mkfs(tmp_path_factory.mktemp("outside") / "secret.erofs", source_tree)
    (root / "escape.erofs").symlink_to(outside)
    (root / "alias.erofs").symlink_to("team/app-v2.erofs")
    return root


@pytest.fixture(scope="session")
def made_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates made by `erofs-nbdd certs` itself: a CA, a server certificate for
    localhost, and client directories for "alice" and "anonymous" (the CA only)."""
    import sys

    d = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [sys.executable, "-m", "erofs_nbdd", "certs", str(d), "--client", "alice"],
        check=True,
        capture_output=True,
    )
    anonymous = d / "clients" / "anonymous"
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    return d
