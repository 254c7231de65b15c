"""A registry that stops, a tag that moves, a blob corrupt in the registry, a cache over its
size, many clients missing at once: what the server does, seen by real clients."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..conftest import mkfs, random_image
from ..interop.conftest import run, start_server_process, stop_server_process
from .helpers import (
    Reader,
    blob_gets,
    layer_digest,
    md5,
    md5_of_export,
    push_image,
    registry_args,
    serving,
    sha256_range,
    source,
    wait_until,
)

if TYPE_CHECKING:
    from .registryd import Registry

pytestmark = pytest.mark.interop

MIB = 1024 * 1024


def test_registry_down_cached_data_served_uncached_fails_then_recovers(
    registry: Registry, tmp_path: Path, source_tree: Path
) -> None:
    rand = random_image(tmp_path / "six", "six", 6 * MIB)  # 7 chunks: the last never read
    push_image(registry, tmp_path, [rand], "team/app:v1")
    local = tmp_path / "local"
    mkfs(local / "demo.erofs", source_tree)
    cache = tmp_path / "cache"
    with serving(registry, cache, "--source-timeout", "3", more=(str(local),)) as server:
        reader = Reader(server.uri("team/app:v1"))
        try:
            assert reader.read(0, 65536) == f"ok {sha256_range(rand, 0, 65536)}"
            registry.stop()
            assert reader.read(4096, 8192) == f"ok {sha256_range(rand, 4096, 8192)}"
            # an uncached read waits --source-timeout, then EIO; meanwhile others are served
            answer: list[str] = []
            waiting = threading.Thread(
                target=lambda: answer.append(reader.read(MIB + 4096, 4096)), daemon=True
            )
            waiting.start()
            assert md5_of_export(server, "demo") == md5(local / "demo.erofs")
            assert waiting.is_alive(), (
                f"the uncached read did not wait: {answer} {server.log_text()}"
            )
            # a new client still gets the tag as last resolved
            again = Reader(server.uri("team/app:v1"))
            assert again.read(0, 4096) == f"ok {sha256_range(rand, 0, 4096)}"
            again.close()
            waiting.join(30)
            assert answer and answer[0].startswith("error EIO "), answer
            assert "serving the cached" in server.log_text()
            registry.start()
            assert reader.read(MIB + 4096, 4096) == f"ok {sha256_range(rand, MIB + 4096, 4096)}"
        finally:
            reader.close()
    # the cache survives a restart: with the registry down, what it holds is served
    registry.stop()
    server = start_server_process(
        cache, *registry_args(registry, cache, "--source-timeout", "1"), source=source(registry)
    )
    try:
        assert "unreachable" in server.log_text()
        reader = Reader(server.uri("team/app:v1"))
        try:
            assert reader.read(0, 65536) == f"ok {sha256_range(rand, 0, 65536)}"
            last = (rand.stat().st_size - 4096) // 4096 * 4096
            assert reader.read(last, 4096).startswith("error EIO ")
        finally:
            reader.close()
    finally:
        assert stop_server_process(server) == 0


def test_a_moved_tag_serves_its_new_image_to_new_clients_only(
    registry: Registry, tmp_path: Path
) -> None:
    first = random_image(tmp_path / "a", "first", 2 * MIB)
    second = random_image(tmp_path / "b", "second", 2 * MIB)
    push_image(registry, tmp_path / "l1", [first], "team/app:v1")
    with serving(registry, tmp_path / "cache") as server:
        old = Reader(server.uri("team/app:v1"))
        try:
            assert old.read(0, 4096) == f"ok {sha256_range(first, 0, 4096)}"
            push_image(registry, tmp_path / "l2", [second], "team/app:v1")
            assert md5_of_export(server, "team/app:v1") == md5(second)
            # the open connection keeps its digest, even for bytes never fetched before
            assert old.read(MIB, 4096) == f"ok {sha256_range(first, MIB, 4096)}"
        finally:
            old.close()


def test_a_blob_corrupt_in_the_registry_is_found_and_discarded(
    registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    rand = erofs_images["random"]
    push_image(registry, tmp_path, [rand], "team/app:v1")
    digest = layer_digest(rand)
    stored = registry.blob_path(digest)
    data = bytearray(stored.read_bytes())
    data[MIB + 100] ^= 0xFF  # in the file's data, not the superblock
    stored.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with serving(registry, cache) as server:
        reader = Reader(server.uri("team/app:v1"))
        try:
            run("nbdcopy", "--", server.uri("team/app:v1"), "null:", check=False)
            wait_until(lambda: "is corrupt in the registry" in server.log_text(), "the check")
            assert " ERROR " in server.log_text()
            assert not (cache / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()
            assert not any((cache / "partial" / "sha256").iterdir())
            # refused from then on: open connections get EIO, new ones are turned away
            assert reader.read(0, 4096).startswith("error EIO ")
            out = run("nbdinfo", server.uri("team/app:v1"), check=False)
            assert out.returncode != 0
        finally:
            reader.close()


def test_eviction_keeps_the_cache_under_its_size(registry: Registry, tmp_path: Path) -> None:
    images = [random_image(tmp_path / f"i{i}", f"img{i}", 2 * MIB) for i in range(3)]
    for i, image in enumerate(images):
        push_image(registry, tmp_path / f"l{i}", [image], f"team/app:v{i}")
    cache = tmp_path / "cache"
    blobs = cache / "blobs" / "sha256"

    def cached() -> set[str]:
        return {p.name for p in blobs.iterdir()} if blobs.exists() else set()

    def used() -> int:
        return sum(p.stat().st_blocks * 512 for p in cache.glob("*/sha256/*"))

    with serving(registry, cache, "--cache-size", "5M") as server:
        holder = Reader(server.uri("team/app:v0"))  # v0 stays open: never evicted
        try:
            assert md5_of_export(server, "team/app:v0") == md5(images[0])
            assert md5_of_export(server, "team/app:v1") == md5(images[1])
            assert md5_of_export(server, "team/app:v2") == md5(images[2])
            hexes = [layer_digest(i).removeprefix("sha256:") for i in images]
            assert hexes[0] in cached() and hexes[2] in cached(), cached()
            assert hexes[1] not in cached(), "the least recently used blob stayed"
            assert used() <= 5 * MIB, used()
            assert "evicted" in server.log_text()
            assert md5_of_export(server, "team/app:v1") == md5(images[1])  # fetched again
            assert holder.read(0, 4096) == f"ok {sha256_range(images[0], 0, 4096)}"
        finally:
            holder.close()


def test_64_clients_missing_at_once_make_one_fetch_per_chunk(
    registry: Registry, tmp_path: Path
) -> None:
    image = random_image(tmp_path / "big", "big", 8 * MIB)
    push_image(registry, tmp_path, [image], "team/app:v1")
    with serving(registry, tmp_path / "cache", "--max-server-buffer", str(32 * MIB)) as server:
        start = server.rss_mib()
        copies = [
            subprocess.Popen(
                ["nbdcopy", "--", server.uri("team/app:v1"), str(tmp_path / f"out{i}")],
                stderr=subprocess.PIPE,
            )
            for i in range(64)
        ]
        for copy in copies:
            assert copy.wait(120) == 0, copy.stderr.read() if copy.stderr else ""
            if copy.stderr:
                copy.stderr.close()
        want = md5(image)
        assert all(md5(tmp_path / f"out{i}") == want for i in range(64))
        chunks = -(-image.stat().st_size // MIB)
        gets = blob_gets(registry, layer_digest(image))
        print(f"64 clients: {gets} blob GETs for {chunks} chunks")
        assert 1 <= gets <= chunks, registry.log_text()
        peak = next(
            int(line.split()[1]) // 1024
            for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        print(f"64 clients: server grew from {start:.0f} MiB to a peak of {peak} MiB")
        # replies are bounded by --max-server-buffer, fetches by a chunk each (16 at once)
        assert peak - start < 32 + 16 + 48, f"server grew from {start:.0f} MiB to {peak} MiB"
