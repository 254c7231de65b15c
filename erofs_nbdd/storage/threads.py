"""Blocking calls (reads that miss the page cache, SEEK_DATA) on threads, for less of the
event loop than ``trio.to_thread.run_sync`` takes.

Each ``to_thread`` call passes a capacity limiter, copies the context and goes through the
scheduler several times. Serving an image that is not in the page cache, at random 4 KiB
reads and QD32, the event loop was the bottleneck: 4.1-4.3k reads/s through ``to_thread``,
7.0k through this pool, replies batched alike (nbdkit's threads: 22-34k). Here a call is
one queue put and one reschedule, and the calls that finish while the loop is busy are
handed back in one pass of it.

The threads belong to the process (started on demand, up to ``LIMIT``, never stopped) and
serve every trio run in it; each result goes back through the token of the run that asked.

Not ``trio.lowlevel.start_thread_soon`` under a counter: tried, it served cold random 4 KiB
reads at QD32 (``--io-uring off``, fio over NBD, 2 CPUs) at 33k reads/s where this pool did
41k (medians of 30 interleaved 5 s runs each). trio's cache binds each call to one idle
thread that must be woken for it; here a thread that has just finished takes the next call
off the shared queue without sleeping (warm reads: 2-5 context switches a call there,
0.2-1.7 here).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import queue
import threading
from typing import TYPE_CHECKING, Any, TypeVar

import outcome
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

#: Threads at most. More made no difference to cold reads here (4 to 32 gave the same
#: 7k reads/s: the GIL hand-offs bound them), but a slow disk or a network file system needs
#: many reads waiting at once. trio's own limit is 40.
LIMIT = 32

if TYPE_CHECKING:
    #: A job: the call, and what to do with its outcome (in the worker thread).
    Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class _Threads:
    """The worker threads and their queue of jobs. Every job is claimed when it is queued:
    by a thread waiting for work, by a thread started for it, or (with ``LIMIT`` threads
    busy) by the next thread to finish. So no job waits while a thread could take it."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.count = 0
        self._waiting = 0  # threads waiting for a job that no job has claimed yet
        self._unclaimed = 0  # queued jobs that wait for a busy thread to finish

    def submit(self, call: Callable[[], Any], done: Callable[[outcome.Outcome[Any]], None]) -> None:
        with self._lock:
            if self._waiting:
                self._waiting -= 1  # a thread waiting for work takes it
            elif self.count < LIMIT and self._start():
                pass  # the thread started for it takes it
            elif self.count:
                self._unclaimed += 1  # the next thread to finish takes it
            else:
                raise OSError(
                    errno.EAGAIN, "no thread could be started to read (a process or memory limit)"
                )
            self._jobs.put((call, done))

    def _start(self) -> bool:
        try:
            threading.Thread(target=self._work, name="erofs-nbdd io", daemon=True).start()
        except RuntimeError:  # "can't start new thread": RLIMIT_NPROC, memory, pids.max
            return False
        self.count += 1
        return True

    def _work(self) -> None:
        jobs, lock = self._jobs, self._lock
        while True:
            call, done = jobs.get()
            result = outcome.capture(call)
            with lock:  # ready for the next before the caller can ask for it
                if self._unclaimed:
                    self._unclaimed -= 1
                else:
                    self._waiting += 1
            done(result)
            del call, done, result  # hold nothing of a job while waiting for the next


_threads = _Threads()


def _after_fork() -> None:
    global _threads  # a child has none of its parent's threads
    _threads = _Threads()


os.register_at_fork(after_in_child=_after_fork)


def thread_count() -> int:
    """Worker threads started in this process."""
    return _threads.count


class _Completions:
    """One trio run's finished calls, handed back to their tasks in one pass of the loop."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._done: collections.deque[tuple[trio.lowlevel.Task, outcome.Outcome[Any]]] = (
            collections.deque()
        )
        self._signalled = False

    def finish(self, task: trio.lowlevel.Task, result: outcome.Outcome[Any]) -> None:
        """In a worker thread: queue the result, and wake the loop unless a wake-up is
        already coming. The loop clears the flag before it empties the queue, so a result
        queued after a wake-up was seen is never left behind."""
        self._done.append((task, result))
        if not self._signalled:
            self._signalled = True
            with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody waits
                self._token.run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        self._signalled = False
        done = self._done
        while done:
            task, result = done.popleft()
            trio.lowlevel.reschedule(task, result)


_COMPLETIONS: trio.lowlevel.RunVar[_Completions] = trio.lowlevel.RunVar("erofs_nbdd_completions")


def no_abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    """For ``wait_task_rescheduled`` where the work runs to its end (a thread's call, or
    the kernel writing into a buffer): a cancellation waits for it."""
    return trio.lowlevel.Abort.FAILED


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` on a worker thread: its result, or its exception raised here. Like
    ``trio.to_thread.run_sync`` by default, a call cannot be abandoned once it is made;
    a cancellation takes effect at the caller's next checkpoint."""
    try:
        completions = _COMPLETIONS.get()
    except LookupError:
        completions = _Completions()
        _COMPLETIONS.set(completions)
    task = trio.lowlevel.current_task()
    _threads.submit(lambda: fn(*args), lambda result: completions.finish(task, result))
    return await trio.lowlevel.wait_task_rescheduled(no_abort)  # type: ignore[no-any-return]
