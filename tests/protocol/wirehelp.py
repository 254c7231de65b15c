"""Helpers that move bytes between protocol machines the way a network would."""

from __future__ import annotations

from typing import Protocol


class Machine(Protocol):
    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...


def feed(machine: Machine, data: bytes, *, bytewise: bool = False) -> list[object]:
    """Feed ``data`` (one byte at a time if asked) and collect every event it completes."""
    from erofs_nbdd.protocol import NEED_DATA

    events: list[object] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        machine.receive_data(chunk)
        while (event := machine.next_event()) is not NEED_DATA:
            events.append(event)
    return events
