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


class Pool:
    """The server-wide budget, shared out by client address.

    One address may hold at most ``per_client`` bytes, whatever its number of connections,
    and the last ``reserve`` bytes go only to an address that holds nothing: connections
    that ask for reads and never read the replies hold what they took until the reply
    timeout drops them, and meanwhile neither one address nor several together can take
    what a newcomer needs for its first read.
    """

    def __init__(self, total: int, *, per_client: int = 0, reserve: int | None = None) -> None:
        if total < 1:
            raise ValueError("a byte budget must be at least 1 byte")
        self.total = total
        self.free = total
        self.per_client = min(per_client or total // 4 or 1, total)
        self.reserve = min(total // 8 if reserve is None else reserve, total - self.per_client)
        self._changed = trio.Event()
        self._shares: dict[str, Share] = {}
        #: The most held at once since ``drained`` last answered True.
        self.peak = 0

    def drained(self, peak: int) -> bool:
        """Whether nothing is held now, after at least ``peak`` bytes were (once per such
        peak): the moment to give freed buffers back to the system."""
        if self.free < self.total or self.peak < peak:
            return False
        self.peak = 0
        return True

    def join(self, address: str) -> Share:
        """The share of ``address``, for one more of its connections."""
        share = self._shares.get(address)
        if share is None:
            share = self._shares[address] = Share(self, address)
        share.connections += 1
        return share

    def leave(self, share: Share) -> None:
        share.connections -= 1
        self._forget_if_idle(share)

    def _forget_if_idle(self, share: Share) -> None:
        """An address with no connection and nothing held is forgotten."""
        if share.connections == 0 and share.held == 0:
            self._shares.pop(share.address, None)

    def connections(self, address: str) -> int:
        share = self._shares.get(address)
        return share.connections if share is not None else 0

    def busiest(self) -> Share | None:
        """The address with the most connections."""
        return max(self._shares.values(), key=lambda s: s.connections, default=None)

    def _fits(self, share: Share, n: int) -> bool:
        if share.held + n > self.per_client:
            return False
        keep = self.reserve if share.held else 0
        return self.free - n >= keep

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class Share:
    """One client address's part of a ``Pool``: what its connections hold together."""

    def __init__(self, pool: Pool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.connections = 0
        self.held = 0

    def clamp(self, n: int) -> int:
        """A request bigger than a whole share waits for all of it, not forever."""
        return min(n, self.pool.per_client)

    def try_acquire(self, n: int) -> bool:
        n = self.clamp(n)
        pool = self.pool
        if not pool._fits(self, n):
            return False
        pool.free -= n
        self.held += n
        pool.peak = max(pool.peak, pool.total - pool.free)
        return True

    async def acquire(self, n: int) -> None:
        while not self.try_acquire(n):
            await self.pool._changed.wait()

    def release(self, n: int) -> None:
        n = self.clamp(n)
        pool = self.pool
        pool.free += n
        self.held -= n
        pool._forget_if_idle(self)
        pool._changed_now()
