"""TLS handshake steps in worker threads, so a burst of handshakes cannot stall the event loop.

A server handshake step (key exchange, signature) is about a millisecond of OpenSSL; with
200 clients starting TLS at once, running them on the loop held established connections back
by 0.1-0.3 s. ``_ssl`` lets go of the GIL inside ``SSL_do_handshake``, so a step in a thread
costs the loop only the hand-off. Only handshakes go to threads: records are read and written
on the loop as before.

The threads have a limiter of their own (trio's default one is shared with file reads):
``THREADS``, as many as the CPUs this process may run on and at least two, so one step's
result travelling back to the loop (its slot is held until the loop takes it) overlaps
the next step. A step is never abandoned: a cancelled handshake waits for the step in
hand, so no two threads ever touch one session.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

#: Handshake steps that may run at once in this process (each ``--workers`` process has its
#: own).
THREADS = max(2, len(os.sched_getaffinity(0)))
_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("tls_handshakes")


def limiter() -> trio.CapacityLimiter:
    """This trio run's limiter (a limiter belongs to one run)."""
    try:
        return _LIMITER.get()
    except LookupError:
        found = trio.CapacityLimiter(THREADS)
        _LIMITER.set(found)
        return found


async def step(fn: Callable[[], T]) -> T:
    """``fn()``, one handshake step, in a worker thread; what it raises is raised here."""
    return await trio.to_thread.run_sync(
        fn, thread_name="tls handshake", abandon_on_cancel=False, limiter=limiter()
    )
