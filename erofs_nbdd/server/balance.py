"""Which worker takes the next connection: the one holding the fewest.

With ``--workers N`` every worker waits on the same listening sockets, and each publishes how
many connections it holds in memory shared across the fork. A pending connection is taken
at once by a worker that holds no more than any other; a busier one leaves it for up to
``DEFER`` seconds, then takes it anyway, so a stuck worker cannot stop the accepting.

SO_REUSEPORT, which this replaces, hashes each connection's addresses to a worker: the two
connections of one nbdcopy landed on the same worker about half the time, and over TLS that
worker then encrypted for both on one core while the other idled (1 GiB took 2.2 s instead
of 1.1-1.3 s when they were split).
"""

from __future__ import annotations

import mmap

#: How long a busier worker leaves a pending connection to a less busy one.
DEFER = 0.1
#: How often it looks again meanwhile.
POLL = 0.001


class LoadBoard:
    """One slot per worker, in an anonymous shared mapping made before the workers fork."""

    def __init__(self, workers: int) -> None:
        self._map = mmap.mmap(-1, max(8 * workers, mmap.PAGESIZE))  # MAP_SHARED
        self._slots = memoryview(self._map).cast("q")[:workers]

    def seat(self, index: int) -> Seat:
        return Seat(self._slots, index)

    def clear(self, index: int) -> None:
        """Forget a worker that died (its replacement starts with nothing)."""
        self._slots[index] = 0


class Seat:
    """One worker's slot on the board: it writes only its own; aligned 8-byte stores and
    loads are atomic, and a stale read only moves one connection to the other worker."""

    def __init__(self, slots: memoryview, index: int) -> None:
        self._slots = slots
        self._index = index

    def hold(self, connections: int) -> None:
        self._slots[self._index] = connections

    def least_loaded(self) -> bool:
        mine = self._slots[self._index]
        return all(mine <= other for other in self._slots)
