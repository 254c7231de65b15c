"""The thread pool that runs blocking reads: results, errors, concurrency, cancellation,
and separate trio runs and forked children each getting their answers."""

from __future__ import annotations

import functools
import multiprocessing
import threading
import time

import pytest
import trio

from erofs_nbdd.storage import threads


async def test_results_and_exceptions_come_back() -> None:
    assert await threads.run_sync(divmod, 17, 5) == (3, 2)

    def fail() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output error") as caught:
        await threads.run_sync(fail)
    assert caught.value.errno == 5


async def test_a_blocked_call_leaves_the_loop_running() -> None:
    release = threading.Event()
    ticks = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            results: list[bool] = []

            async def blocked() -> None:
                results.append(await threads.run_sync(release.wait, 10))

            nursery.start_soon(blocked)
            for _ in range(100):  # the loop keeps running while the call blocks
                await trio.lowlevel.checkpoint()
                ticks += 1
            release.set()
    assert ticks == 100
    assert results == [True]


async def test_up_to_limit_calls_run_at_once_on_at_most_limit_threads() -> None:
    """LIMIT calls that each wait for all the others can only finish if they run at once;
    hundreds more all get their own answers, from no more than LIMIT threads."""
    barrier = threading.Barrier(threads.LIMIT, timeout=10)
    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await threads.run_sync(pow, i, 2)

    async def waits_at_barrier(i: int) -> None:
        results[-1 - i] = await threads.run_sync(barrier.wait)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(threads.LIMIT):
                nursery.start_soon(waits_at_barrier, i)
        async with trio.open_nursery() as nursery:
            for i in range(threads.LIMIT, threads.LIMIT + 300):
                nursery.start_soon(call, i)
    assert sorted(results[-1 - i] for i in range(threads.LIMIT)) == list(range(threads.LIMIT))
    assert all(results[i] == i * i for i in range(threads.LIMIT, threads.LIMIT + 300))
    assert threads.thread_count() <= threads.LIMIT


async def test_a_cancelled_caller_gets_its_result_then_the_cancellation() -> None:
    """Like trio.to_thread.run_sync: a read already made is waited for, not abandoned."""
    got: list[str] = []

    def slow() -> str:
        time.sleep(0.02)
        return "done"

    with trio.CancelScope() as scope:
        scope.cancel()
        got.append(await threads.run_sync(slow))
        await trio.lowlevel.checkpoint()
        got.append("not reached")
    assert scope.cancelled_caught
    assert got == ["done"]


def test_each_trio_run_gets_its_own_answers() -> None:
    async def ask(value: int) -> int:
        with trio.fail_after(10):
            return await threads.run_sync(abs, value)

    assert trio.run(ask, -3) == 3
    assert trio.run(ask, -4) == 4


def _child(answers: multiprocessing.SimpleQueue[object]) -> None:
    async def ask() -> int:
        with trio.fail_after(10):
            return await threads.run_sync(abs, -7)

    try:
        answers.put(trio.run(ask))
    except BaseException as exc:  # report, so the parent's assertion names it
        answers.put(repr(exc))


def test_a_forked_child_starts_threads_of_its_own() -> None:
    """--workers forks: the parent's threads do not exist in the child, which must not
    count them and wait forever for them to take its reads."""
    trio.run(threads.run_sync, abs, -1)  # this process has a thread now
    assert threads.thread_count() >= 1
    context = multiprocessing.get_context("fork")
    answers: multiprocessing.SimpleQueue[object] = context.SimpleQueue()
    child = context.Process(target=_child, args=(answers,))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the child hung waiting for its read")
    assert answers.get() == 7


def test_calls_beyond_the_limit_wait_their_turn_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every thread busy, the calls that come wait and start in the order they came."""
    monkeypatch.setattr(threads, "LIMIT", 1)
    pool = threads._Threads()
    release, finished = threading.Event(), threading.Event()
    started: list[int] = []

    def call(i: int) -> None:
        started.append(i)
        if i == 9:
            finished.set()

    pool.submit(lambda: release.wait(10), lambda _: None)  # the one thread, busy
    for i in range(10):
        pool.submit(functools.partial(call, i), lambda _: None)
    release.set()
    assert finished.wait(10)
    assert started == list(range(10))
    assert pool.count == 1


def test_when_no_thread_can_start_the_read_fails_or_waits_for_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no thread at all, the call fails with an OSError (the request gets EIO and the
    connection goes on); with some running, it waits for the first to finish."""
    pool = threads._Threads()
    answers: list[object] = []

    def keep(result: object) -> None:
        answers.append(result)

    real_start = threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", _refuse)
    with pytest.raises(OSError, match="no thread could be started"):
        pool.submit(lambda: 1, keep)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    release = threading.Event()
    pool.submit(lambda: release.wait(10), keep)  # one thread, busy
    monkeypatch.setattr(threading.Thread, "start", _refuse)
    pool.submit(lambda: 2, keep)  # queued for that thread
    release.set()
    for _ in range(1000):
        if len(answers) == 2:
            break
        time.sleep(0.01)
    assert [a.unwrap() for a in answers] == [True, 2]  # type: ignore[attr-defined]
    assert pool.count == 1


def _refuse(self: threading.Thread) -> None:
    raise RuntimeError("can't start new thread")
