"""Byte budgets: how much reply data may sit in server memory at once.

A request count alone does not bound memory (64 reads of 32 MiB are 2 GiB), so every read
that waits for storage first takes its length from its connection's budget and from the
server's. Waiting for budget stops the connection reading requests: the client feels
backpressure, the server's memory stays flat.
"""

from __future__ import annotations

import trio


class ByteBudget:
    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a byte budget must be at least 1 byte")
        self.total = total
        self.free = total
        self._changed = trio.Event()

    def clamp(self, n: int) -> int:
        """A request bigger than the whole budget waits for all of it, not forever."""
        return min(n, self.total)

    def try_acquire(self, n: int) -> bool:
        n = self.clamp(n)
        if self.free < n:
            return False
        self.free -= n
        return True

    async def acquire(self, n: int) -> None:
        n = self.clamp(n)
        while self.free < n:
            await self._changed.wait()
        self.free -= n

    def release(self, n: int) -> None:
        self.free += self.clamp(n)
        self._changed.set()
        self._changed = trio.Event()
