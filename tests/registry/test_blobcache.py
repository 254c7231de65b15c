"""The blob cache's files across crashes and disagreements (no registry: the bytes a test
writes stand for what a fetch would have landed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from erofs_nbdd.storage.blobcache import CHUNK, MAP_HEADER, BlobCache

DATA = os.urandom(2 * CHUNK + 17)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_a_map_left_from_another_file_is_not_believed(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 30)
    blob = cache.open(DIGEST, len(DATA))
    os.pwrite(blob.fd, DATA[:CHUNK], 0)
    os.pwrite(blob._map_fd, b"\1", MAP_HEADER.size)  # chunk 0 present
    cache.release(blob)
    # a crash between the two unlinks of an eviction: the data file went, the map stayed
    cache.partial_path(DIGEST).unlink()
    again = cache.open(DIGEST, len(DATA))
    assert not again.has(0, 4096)  # zeros are never served as the blob's bytes
    os.pwrite(again._map_fd, b"\1", MAP_HEADER.size)
    cache.release(again)
    # and a file of the right size in its place that the map is not of (made by hand, say;
    # the old one kept aside so that the new one cannot reuse its inode number)
    aside = tmp_path / "aside"
    cache.partial_path(DIGEST).rename(aside)
    cache.partial_path(DIGEST).write_bytes(bytes(len(DATA)))
    third = cache.open(DIGEST, len(DATA))
    assert not third.has(0, 4096)
    cache.release(third)
    aside.unlink()


async def test_a_whole_partial_found_at_start_is_verified(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 30)
    blob = cache.open(DIGEST, len(DATA))
    os.pwrite(blob.fd, DATA, 0)
    os.pwrite(blob._map_fd, b"\1" * blob.chunks, MAP_HEADER.size)
    cache.release(blob)  # as if the process ended before hashing it
    restarted = BlobCache(tmp_path, 1 << 30)
    again = restarted.open(DIGEST, len(DATA))
    with trio.fail_after(10):
        while not again.complete:
            await trio.sleep(0.01)
    assert restarted.complete_path(DIGEST).read_bytes() == DATA
    restarted.release(again)


def test_a_wrong_size_claim_keeps_the_verified_copy(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 30)
    cache.complete_path(DIGEST).write_bytes(DATA)
    with pytest.raises(OSError, match="verified"):
        cache.open(DIGEST, len(DATA) + 1)
    assert cache.complete_path(DIGEST).read_bytes() == DATA
    for bad in ("sha256:../../x", "sha256:" + "A" * 64, "md5:" + "0" * 64):
        with pytest.raises(ValueError, match="not a sha256 digest"):
            cache.open(bad, 10)
