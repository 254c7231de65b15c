"""Coverage-guided fuzz target (atheris/libFuzzer) for the protocol machines.

    python -m tests.fuzz.fuzz_protocol CORPUS_DIR -max_total_time=60

The first input byte picks a machine (server handshake, server transmission plain or
structured, client handshake, client transmission), a few more pick how the stream is cut,
the rest is the stream. A ProtocolError is the machine refusing bad input (fine); any other
exception is a crash, and so is a reply our own machines framed wrong.
"""

from __future__ import annotations

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from erofs_nbdd.protocol import Negotiated, ProtocolError
    from tests.protocol.drive import (
        Closed,
        chunked,
        drive_client_handshake,
        drive_client_transmission,
        drive_server_handshake,
        drive_server_transmission,
        good_client_stream,
    )

TARGETS = 5


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, TARGETS - 1)
    cuts = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(1, 6))]
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    pieces = chunked(stream, cuts)
    with contextlib.suppress(ProtocolError, Closed):
        if target == 0:
            drive_server_handshake(pieces)
        elif target in (1, 2):
            negotiated = Negotiated(structured_replies=target == 2, meta_contexts={1: "b"})
            drive_server_transmission(pieces, negotiated)
        elif target == 3:
            drive_client_handshake(pieces)
        else:
            drive_client_transmission(pieces, structured=bool(cuts[0] & 1))


# Inputs that once crashed a machine, so every run replays them.
CRASHES = [
    # client transmission: an ERROR chunk with an empty payload raised struct.error
    bytes.fromhex("668e33efbd71c4fe00000000000000040000000000000004"),
]


def seeds() -> list[bytes]:
    """Inputs that reach deep states at once: a whole session for the server handshake
    (target 0, one cut of 64) and its requests for the transmission machines; and CRASHES."""
    session = good_client_stream()
    requests = session[session.index(b"\x25\x60\x95\x13") :]
    return [
        bytes([0, 0, 63]) + session,
        bytes([1, 0, 63]) + requests,
        bytes([2, 0, 7]) + requests,
        *CRASHES,
    ]


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
