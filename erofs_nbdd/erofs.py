"""The EROFS superblock: what makes a file an image worth serving, and what its exports
are described as. Pure parsing, no I/O, so the server (on the files) and the attach
client (on the first bytes read over NBD) check an image by the same rules."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

EROFS_MAGIC = 0xE0F5E1E2
SUPERBLOCK_OFFSET = 1024
# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time,
# build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name, feature_incompat
_SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sI")
MIN_BLOCK = 512

_COMPAT = {0x1: "sb_chksum", 0x2: "mtime", 0x4: "xattr_filter"}
_INCOMPAT = {
    0x1: "zero_padding",
    0x2: "compr_cfgs",
    0x4: "chunked_file",
    0x8: "device_table",
    0x10: "ztailpacking",
    0x20: "fragments",
    0x40: "xattr_prefixes",
    0x80: "48bit",
    0x100: "metabox",
}


class NotErofs(ValueError):
    """The file is not a usable EROFS image; the message says why."""


@dataclass(frozen=True, slots=True)
class Superblock:
    block_size: int
    blocks: int
    inodes: int
    build_time: int
    uuid: str
    volume_name: str
    features: tuple[str, ...]

    def describe(self, size: int) -> str:
        """The human description NBD_INFO_DESCRIPTION and NBD_OPT_LIST carry."""
        parts = ["EROFS"]
        if self.volume_name:
            parts.append(f"volume {self.volume_name!r}")
        parts.append(f"uuid {self.uuid}")
        parts.append(f"{_human(size)} ({size} bytes)")
        parts.append(f"block size {self.block_size}")
        parts.append(f"{self.inodes} inodes")
        parts.append("features " + (",".join(self.features) if self.features else "none"))
        return ", ".join(parts)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_superblock(head: bytes, size: int) -> Superblock:
    """Check the EROFS superblock in the first bytes of a file of ``size`` bytes."""
    end = SUPERBLOCK_OFFSET + _SUPERBLOCK.size
    if size < end or len(head) < end:
        raise NotErofs(f"too small for an EROFS superblock ({size} bytes)")
    (
        magic,
        _csum,
        compat,
        blkszbits,
        _ext,
        _root,
        inos,
        build_time,
        _nsec,
        blocks,
        _meta,
        _xattr,
        raw_uuid,
        raw_name,
        incompat,
    ) = _SUPERBLOCK.unpack_from(head, SUPERBLOCK_OFFSET)
    if magic != EROFS_MAGIC:
        raise NotErofs(f"no EROFS magic at byte {SUPERBLOCK_OFFSET} (found {magic:#010x})")
    if not 9 <= blkszbits <= 16:
        raise NotErofs(f"implausible block size 2^{blkszbits}")
    block_size = 1 << blkszbits
    if blocks == 0 or blocks * block_size > size:
        raise NotErofs(f"superblock claims {blocks} blocks of {block_size}, file has {size} bytes")
    if size % MIN_BLOCK:
        raise NotErofs(f"size {size} is not a multiple of {MIN_BLOCK} bytes")
    features = [n for bit, n in _COMPAT.items() if compat & bit]
    features += [n for bit, n in _INCOMPAT.items() if incompat & bit]
    unknown = incompat & ~sum(_INCOMPAT)
    if unknown:
        features.append(f"incompat:{unknown:#x}")
    return Superblock(
        block_size=block_size,
        blocks=blocks,
        inodes=inos,
        build_time=build_time,
        uuid=str(uuid.UUID(bytes=raw_uuid)),
        volume_name=raw_name.split(b"\0", 1)[0].decode("utf-8", "replace"),
        features=tuple(features),
    )
