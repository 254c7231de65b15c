"""The superblock checks the server and the attach client share, on an image mkfs.erofs
made and on that image damaged one field at a time."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import pytest

from erofs_nbdd.erofs import SUPERBLOCK_OFFSET, NotErofs, parse_superblock

from .conftest import mkfs

if TYPE_CHECKING:
    from pathlib import Path

UUID = "6f0c9ad0-1d1e-4c9a-9d39-4b1e0b7a1234"


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "hello.txt").write_text("hello\n")
    return mkfs(tmp_path / "img.erofs", tmp_path / "tree", f"-U{UUID}", "-zlz4hc").read_bytes()


def test_an_image_from_mkfs(image: bytes) -> None:
    sb = parse_superblock(image, len(image))
    assert (sb.uuid, sb.block_size, sb.inodes) == (UUID, 4096, 2)
    assert 0 < sb.blocks * sb.block_size <= len(image)
    assert "zero_padding" in sb.features  # lz4's in-place decompression needs it
    assert sb.describe(len(image)).startswith(f"EROFS, uuid {UUID}, 4.0 KiB (4096 bytes), ")


@pytest.mark.parametrize(
    ("field", "fmt", "value", "match"),
    [
        (0, "<I", 0x12345678, "no EROFS magic at byte 1024"),
        (12, "<B", 8, "implausible block size 2"),
        (36, "<I", 2, "superblock claims 2 blocks of 4096"),
    ],
)
def test_a_damaged_superblock(image: bytes, field: int, fmt: str, value: int, match: str) -> None:
    head = bytearray(image)
    struct.pack_into(fmt, head, SUPERBLOCK_OFFSET + field, value)
    with pytest.raises(NotErofs, match=match):
        parse_superblock(bytes(head), len(head))


@pytest.mark.parametrize(("extra", "match"), [(-3096, "too small"), (100, "multiple of 512")])
def test_a_file_of_the_wrong_size(image: bytes, extra: int, match: str) -> None:
    with pytest.raises(NotErofs, match=match):
        parse_superblock(image, len(image) + extra)


def test_a_feature_from_the_future_is_named_not_refused(image: bytes) -> None:
    head = bytearray(image)
    struct.pack_into("<I", head, SUPERBLOCK_OFFSET + 80, 0x8000_0000)  # feature_incompat
    assert parse_superblock(bytes(head), len(head)).features[-1] == "incompat:0x80000000"
