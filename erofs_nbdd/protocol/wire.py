"""Byte layouts of every NBD message, and a receive buffer both state machines parse from.

Everything is big-endian ("network byte order") as the spec requires. Encoders return bytes;
decoders take exactly the bytes of one structure, so the state machines decide framing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .constants import (
    EXPORT_NAME_ZEROES,
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    ReplyFlag,
    ReplyType,
)

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # Info.EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # Info.BLOCK_SIZE, minimum, preferred, maximum
EXTENT = struct.Struct(">II")  # length, flags
ERROR_CHUNK = struct.Struct(">IH")  # error, message length

# What decoding a peer's bytes raises when they are too short or out of range: struct.error
# is no ValueError, so a parser that catches only ValueError lets a short payload crash it.
MALFORMED: tuple[type[Exception], ...] = (ValueError, IndexError, struct.error)


def utf8(text: str, limit: int = MAX_STRING) -> bytes:
    """``text`` as UTF-8 of at most ``limit`` bytes, cut at a character boundary. A lone
    surrogate (a file name byte that was not UTF-8) becomes "?" instead of raising: no
    string handed to a reply can stop it, and the peer always gets valid UTF-8."""
    data = text.encode("utf-8", "replace")
    if len(data) > limit:
        data = data[:limit].decode("utf-8", "ignore").encode()
    return data


class Buffer:
    """Bytes received but not yet parsed; consumes from the front without quadratic copying."""

    __slots__ = ("_data", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start and self._start == len(self._data):
            self._data.clear()
            self._start = 0
        self._data += data

    def peek(self, n: int) -> bytes:
        return bytes(self._data[self._start : self._start + n])

    def take(self, n: int) -> bytes:
        """Remove and return exactly ``n`` bytes; the caller checked ``len(self) >= n``."""
        chunk = bytes(self._data[self._start : self._start + n])
        self._advance(n)
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """Remove ``fmt.size`` bytes and unpack them, without copying them out first; the
        caller checked ``len(self) >= fmt.size``."""
        values = fmt.unpack_from(self._data, self._start)
        self._advance(fmt.size)
        return values

    def peek_unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        """Unpack the first ``fmt.size`` bytes and leave them; the caller checked the length."""
        return fmt.unpack_from(self._data, self._start)

    def _advance(self, n: int) -> None:
        self._start += n
        if self._start > 65536 and self._start * 2 > len(self._data):
            del self._data[: self._start]
            self._start = 0

    def skip(self, n: int) -> int:
        """Drop up to ``n`` bytes; return how many were dropped."""
        n = min(n, len(self))
        self._start += n
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        return n

    def take_all(self) -> bytes:
        return self.take(len(self))


# --- handshake ------------------------------------------------------------------------------


def greeting(flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def option_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    pad = b"" if no_zeroes else bytes(EXPORT_NAME_ZEROES)
    return EXPORT_NAME_REPLY.pack(size, flags) + pad


def string_with_length(text: bytes) -> bytes:
    """A 32-bit length followed by the bytes, the way names and queries travel."""
    return U32.pack(len(text)) + text


def info_request(name: bytes, infos: tuple[int, ...]) -> bytes:
    """The payload of NBD_OPT_INFO and NBD_OPT_GO."""
    return string_with_length(name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def meta_context_request(name: bytes, queries: tuple[bytes, ...]) -> bytes:
    """The payload of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""
    return (
        string_with_length(name)
        + U32.pack(len(queries))
        + b"".join(string_with_length(q) for q in queries)
    )


def rep_server(name: bytes, description: bytes) -> bytes:
    return string_with_length(name) + description


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_text(kind: Info, text: bytes) -> bytes:
    return U16.pack(kind) + text


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def rep_meta_context(context_id: int, name: bytes) -> bytes:
    return U32.pack(context_id) + name


# --- transmission ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHeader:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def request(type_: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, type_, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie: int, type_: int, payload_length: int, *, done: bool) -> bytes:
    """A structured reply chunk header; the payload follows it on the wire."""
    flags = ReplyFlag.DONE if done else 0
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type_, cookie, payload_length)


def offset_data_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk, up to where the ``length`` data bytes start."""
    return chunk(cookie, ReplyType.OFFSET_DATA, 8 + length, done=done) + U64.pack(offset)


def error_chunk(cookie: int, error: int, message: bytes = b"") -> bytes:
    payload = ERROR_CHUNK.pack(error, len(message)) + message
    return chunk(cookie, ReplyType.ERROR, len(payload), done=True) + payload


def block_status_chunk(
    cookie: int, context_id: int, extents: list[tuple[int, int]], *, done: bool
) -> bytes:
    payload = U32.pack(context_id) + b"".join(EXTENT.pack(n, f) for n, f in extents)
    return chunk(cookie, ReplyType.BLOCK_STATUS, len(payload), done=done) + payload


def done_chunk(cookie: int) -> bytes:
    return chunk(cookie, ReplyType.NONE, 0, done=True)


def is_error_rep(rep: int) -> bool:
    return bool(rep & (1 << 31))
