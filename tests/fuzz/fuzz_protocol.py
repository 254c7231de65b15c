"""Coverage-guided fuzz target (atheris/libFuzzer) for the protocol machines.

    python -m tests.fuzz.fuzz_protocol CORPUS_DIR -max_total_time=60

An input is ``[target, n, cut * n, stream...]``: the target byte picks a machine (server
handshake and the transmission it hands over to, server transmission plain or structured,
client handshake, client transmission plain or structured), the cut bytes say how the stream
is split into receives, the rest is the stream. The layout is spelled out here rather than
left to FuzzedDataProvider, which takes integers from the end, so that the seeds below
really start where they claim.
A ProtocolError is the machine refusing bad input (fine); any other exception is a crash,
and so is a reply our own machines framed wrong.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from erofs_nbdd.protocol import Negotiated, ProtocolError, wire
    from erofs_nbdd.protocol.constants import STRUCTURED_REPLY_MAGIC
    from tests.protocol.drive import (
        Closed,
        chunked,
        drive_client_handshake,
        drive_client_transmission,
        drive_server_session,
        drive_server_transmission,
        good_client_stream,
        good_server_replies,
        good_server_stream,
    )

TARGETS = 6


def case(target: int, cuts: list[int], stream: bytes) -> bytes:
    """The input that runs ``stream`` through ``target``, cut into pieces of ``cuts`` bytes."""
    return bytes([target, len(cuts) - 1, *(c - 1 for c in cuts)]) + stream


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    target, n = data[0] % TARGETS, data[1] % 6 + 1
    cuts = [c % 64 + 1 for c in data[2 : 2 + n]] or [64]
    pieces = chunked(data[2 + n :], cuts)
    with contextlib.suppress(ProtocolError, Closed):
        if target == 0:
            drive_server_session(pieces)
        elif target in (1, 2):
            told = (512, 4096, 1 << 20) if target == 2 else None  # aligned to 512, or to 1
            negotiated = Negotiated(
                structured_replies=target == 2, meta_contexts={1: "b"}, block_size=told
            )
            drive_server_transmission(pieces, negotiated)
        elif target == 3:
            drive_client_handshake(pieces)
        else:
            drive_client_transmission(pieces, structured=target == 5)


# Inputs that once crashed a machine, so every run replays them.
CRASHES = [
    # client transmission: an unknown error chunk type with an empty payload raised
    # struct.error (it was found under FuzzedDataProvider's layout; this is it re-encoded)
    case(5, [1], wire.CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, 0xBD71, 0xC4FE, 4, 0) + b"\0"),
]


def seeds() -> list[bytes]:
    """Inputs that reach deep states at once: a whole session for each handshake machine,
    good requests for the server's transmission, good replies for the client's; and CRASHES."""
    session = good_client_stream()
    requests = session[session.index(b"\x25\x60\x95\x13") :]
    return [
        case(0, [64], session),
        case(1, [64], requests),
        case(2, [8, 3], requests),
        case(3, [64], good_server_stream()),
        case(4, [64], good_server_replies(structured=False)),
        case(5, [7, 64], good_server_replies(structured=True)),
        *CRASHES,
    ]


def main() -> None:
    """libFuzzer's command line; an empty corpus directory gets the seeds first."""
    dirs = [Path(a) for a in sys.argv[1:] if not a.startswith("-") and Path(a).is_dir()]
    if dirs and not any(dirs[0].iterdir()):
        for i, seed in enumerate(seeds()):
            (dirs[0] / f"seed{i}").write_bytes(seed)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
