"""The server's reply budget shared out by client address: no address holds more than its
share, several together cannot take what a newcomer needs for its first read, waiters get
their bytes as others give them back, and an address is forgotten once it has nothing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from erofs_nbdd.server.budget import Pool

MIB = 1 << 20


def test_one_address_holds_at_most_its_share() -> None:
    pool = Pool(64 * MIB)  # a quarter each: 16 MiB
    a = pool.join("a")
    for _ in range(16):
        assert a.try_acquire(MIB)
    assert not a.try_acquire(MIB)  # its share is full, the server's is not
    assert pool.free == 48 * MIB
    b = pool.join("b")
    assert b.try_acquire(16 * MIB)  # another address is not held back by it


def test_the_reserve_is_kept_for_an_address_holding_nothing() -> None:
    pool = Pool(64 * MIB)  # reserve: 8 MiB
    shares = [pool.join(name) for name in "abcd"]
    for share in shares[:3]:
        assert share.try_acquire(16 * MIB)
    assert shares[3].try_acquire(8 * MIB)
    assert not shares[3].try_acquire(MIB)  # holding something: the reserve is not for it
    newcomer = pool.join("e")
    assert newcomer.try_acquire(8 * MIB)  # holding nothing: its first read fits
    assert not newcomer.try_acquire(1)
    assert pool.free == 0


def test_a_read_bigger_than_a_share_waits_for_all_of_it() -> None:
    pool = Pool(64 * MIB)
    a = pool.join("a")
    assert a.try_acquire(32 * MIB)  # clamped to the share, not refused forever
    assert a.held == 16 * MIB
    a.release(32 * MIB)
    assert (a.held, pool.free) == (0, 64 * MIB)


async def test_waiters_get_their_bytes_as_others_give_them_back() -> None:
    pool = Pool(64 * MIB)
    a = pool.join("a")
    assert a.try_acquire(16 * MIB)
    got: list[str] = []

    async def wait(name: str) -> None:
        await a.acquire(4 * MIB)
        got.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "first")
        nursery.start_soon(wait, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        a.release(4 * MIB)
        await trio.testing.wait_all_tasks_blocked()
        assert len(got) == 1
        a.release(4 * MIB)
    assert len(got) == 2 and a.held == 16 * MIB


def test_an_address_is_forgotten_once_it_has_nothing() -> None:
    pool = Pool(64 * MIB)
    a = pool.join("a")
    pool.join("a")
    assert pool.connections("a") == 2
    assert a.try_acquire(MIB)
    pool.leave(a)
    pool.leave(a)  # both connections gone, but a read still holds bytes
    assert pool.connections("a") == 0 and pool.busiest() is a
    a.release(MIB)
    assert pool.busiest() is None


def test_drained_says_when_a_burst_is_all_back() -> None:
    pool = Pool(64 * MIB)
    a = pool.join("a")
    assert not pool.drained(8 * MIB)  # nothing was ever held
    assert a.try_acquire(16 * MIB)
    assert not pool.drained(8 * MIB)  # still held
    a.release(16 * MIB)
    assert pool.drained(8 * MIB)
    assert not pool.drained(8 * MIB)  # once per burst


@pytest.mark.parametrize("total", [0, -1])
def test_a_pool_must_hold_something(total: int) -> None:
    with pytest.raises(ValueError, match="at least 1 byte"):
        Pool(total)
