"""FastLock: mutual exclusion, order, and cancellation of a waiter."""

from __future__ import annotations

import trio
import trio.testing

from erofs_nbdd.transport.lock import FastLock


async def test_one_holder_at_a_time_in_arrival_order() -> None:
    lock = FastLock()
    inside = 0
    order: list[int] = []

    async def worker(i: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1
            order.append(i)
            await trio.sleep(0.001)  # hold it across a scheduler round
            inside -= 1

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()  # so arrival order is i's order
    assert order == list(range(20))
    assert not lock.locked()


async def test_an_uncontended_acquire_does_not_yield() -> None:
    lock = FastLock()
    with trio.testing.assert_no_checkpoints():
        async with lock:
            assert lock.locked()
    assert not lock.locked()


async def test_a_cancelled_waiter_does_not_take_or_lose_the_lock() -> None:
    lock = FastLock()
    got: list[str] = []
    doomed = trio.CancelScope()

    async def wait_for_it(name: str, scope: trio.CancelScope) -> None:
        with scope:
            async with lock:
                got.append(name)

    async with trio.open_nursery() as nursery:
        await lock.__aenter__()
        nursery.start_soon(wait_for_it, "cancelled", doomed)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait_for_it, "second", trio.CancelScope())
        await trio.testing.wait_all_tasks_blocked()
        doomed.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert lock.locked()
        await lock.__aexit__(None, None, None)
    assert got == ["second"]
    assert not lock.locked()
