"""The per-device supervisor: keeps an attached device alive across server restarts, lost
links and failover, so the mounted filesystem never sees an error it need not see.

``python -m erofs_nbd_client.supervisor INDEX`` reads the device's record. On LINK_DEAD for
the device (multicast on ``nbd_mc_group``) it reconnects with backoff along the record's
server list, checks it finds the same image (size, flags, first 4 KiB), and hands the new
sockets over with RECONFIGURE and the same BACKEND_IDENTIFIER. The kernel keeps I/O waiting
for DEAD_CONN_TIMEOUT meanwhile. A different image is refused and the reason logged: reads
then fail once the dead timeout passes, which is the safe outcome. It exits when the device
is disconnected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

import trio

from . import devices, netlink
from .bridge import bridge_in_process
from .connect import (
    ATTEMPT_TIMEOUT,
    RECONNECT_ERRORS,
    Notes,
    backoff,
    differs,
    open_connections,
    socket_of,
)
from .target import Target

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("erofs_nbd_client.supervisor")


class Supervisor:
    def __init__(self, record: devices.Record) -> None:
        self.record = record
        self.index = record.index
        self.targets = [Target.from_json(t) for t in record.targets]
        self.reconnects = 0
        self.state = "watching"
        self.notes = Notes(log)

    def publish(self, **extra: object) -> None:
        devices.write_state(
            self.index,
            pid=os.getpid(),
            state=self.state,
            server=self.record.server,
            reconnects=self.reconnects,
            updated=time.time(),
            **extra,
        )

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Supervise until the device is disconnected; ``ready()`` once subscribed to the
        kernel's announcements and the device checked (whoever started us waits for it)."""
        group = await trio.to_thread.run_sync(netlink.multicast_group)
        raw = netlink.link_dead_socket(group)
        listener = trio.socket.from_stdlib_socket(raw)
        log.info("watching /dev/nbd%d (%s)", self.index, self.record.server)
        async with trio.open_nursery() as nursery:
            self.relays = nursery  # TLS relays of reconnected links live as long as we do
            nursery.start_soon(self._exit_when_disconnected, nursery.cancel_scope)
            # A link that died while no supervisor listened sent its LINK_DEAD to nobody,
            # and the kernel never says it again: one round now replaces it (RECONFIGURE
            # drops our sockets if nothing is dead), and if no server answers, the
            # supervisor keeps trying as after a LINK_DEAD, until one does or the device
            # goes (the dead timeout).
            found = await self._round()
            self.publish()
            ready()
            cause = None if found else "no server answered the startup check"
            while True:
                if cause is None:
                    data = await listener.recv(65536)
                    if self.index not in netlink.parse_link_dead(data):
                        continue
                    cause = "the kernel reported a dead connection (LINK_DEAD)"
                await self._reconnect(cause)
                # One LINK_DEAD comes per dead socket. Those queued during the round may be
                # for sockets it already replaced, or for later deaths: one more round,
                # whose RECONFIGURE comes after this drain, covers them all.
                cause = "more connections died meanwhile (LINK_DEAD)"
                if self.index not in _drain(raw):
                    cause = None

    def _relayed(self, target: Target) -> None:
        """One of our relays resumed on ``target`` (called in a thread)."""
        self.record.server = target.describe()
        self.record.save()
        self.publish()

    async def _round(self) -> bool:
        """One attempt along the server list; whether a server took over the device."""
        for target in self.targets:
            if await self._try(target):
                return True
        return False

    async def _exit_when_disconnected(self, scope: trio.CancelScope) -> None:
        while devices.is_connected(self.index):
            await trio.sleep(1)
        log.info("/dev/nbd%d was disconnected; exiting", self.index)
        scope.cancel()

    async def _reconnect(self, cause: str) -> None:
        started = time.monotonic()
        self.state = "reconnecting"
        self.publish(cause=cause)
        log.warning("/dev/nbd%d: %s; reconnecting", self.index, cause)
        pauses = backoff()  # connect.py: 0.1 s doubling to 1 s, jittered
        while devices.is_connected(self.index):
            if await self._round():
                waited = time.monotonic() - started
                self.reconnects += 1
                self.state = "watching"
                self.publish(last_wait=round(waited, 3), cause=cause)
                log.warning(
                    "/dev/nbd%d: reconnected to %s after %.1f s (reconnect %d; cause: %s)",
                    self.index,
                    self.record.server,
                    waited,
                    self.reconnects,
                    cause,
                )
                return
            await trio.sleep(next(pauses))

    async def _try(self, target: Target) -> bool:
        """One attempt: connect, check the image, hand the sockets over. Whatever the
        server does costs at most ATTEMPT_TIMEOUT a connection and is logged once per
        kind of failure (``Notes``)."""
        record = self.record
        try:
            with trio.fail_after(ATTEMPT_TIMEOUT * record.connections):
                if target.tls or record.relay:  # relayed here, not by a new bridge process
                    conns = await bridge_in_process(
                        self.relays,
                        target,
                        record.connections,
                        self.targets,
                        record.identity,
                        self._relayed,
                    )
                else:
                    conns = await open_connections(target, record.connections, None)
        except RECONNECT_ERRORS as exc:
            self.notes.note(target, f"{exc or type(exc).__name__}", logging.INFO)
            return False
        try:
            try:
                with trio.fail_after(ATTEMPT_TIMEOUT):
                    different = await differs(conns[0], record.identity)
            except RECONNECT_ERRORS as exc:
                self.notes.note(target, f"cannot check the image it serves: {exc}; will retry")
                return False
            if different is not None:
                self.state = "refusing"
                self.publish(refused=target.describe())
                self.notes.note(
                    target,
                    f"serves {different} under {target.export!r}; not reconnecting to it",
                    logging.ERROR,
                )
                return False
            self.notes.forget(target)
            fds = tuple(socket_of(c.session.stream).fileno() for c in conns)
            await trio.to_thread.run_sync(
                lambda: netlink.reconfigure(self.index, record.backend, sockets=fds)
            )
        finally:
            for conn in conns:  # the kernel holds its own references
                await trio.aclose_forcefully(conn.session.stream)
        record.helper_pids = [p for p in record.helper_pids if devices.pid_alive(p)]
        record.server = target.describe()
        record.save()
        return True


def _drain(raw: socket.socket) -> list[int]:
    """Every LINK_DEAD already queued, without waiting."""
    out: list[int] = []
    while True:
        try:
            out += netlink.parse_link_dead(raw.recv(65536, socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return out


async def main_async(index: int, ready_fd: int | None = None) -> int:
    """Supervise /dev/nbdINDEX; ``ready_fd``, a pipe to whoever started us, gets "ready"
    once we listen and have checked the device, or the reason we cannot."""

    def report(line: str) -> None:
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, line.encode() + b"\n")
                os.close(ready_fd)

    record = devices.load_record(index)
    if record is None:
        report(f"no record for /dev/nbd{index} in {devices.RUN_DIR}")
        log.error("no record for /dev/nbd%d in %s", index, devices.RUN_DIR)
        return 1
    if devices.backend_of(index) != record.backend:
        report(f"/dev/nbd{index} is not the device the record describes")
        log.error("/dev/nbd%d is not the device the record describes", index)
        return 1
    try:
        await Supervisor(record).run(ready=lambda: report("ready"))
    except BaseException as exc:
        report(f"supervisor failed: {exc!r}")
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s supervisor[%(process)d] %(levelname)s: %(message)s",
    )
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # bridges it starts are reaped by the kernel
    ready_fd = int(args[1]) if len(args) > 1 else None
    return trio.run(main_async, int(args[0]), ready_fd)


if __name__ == "__main__":
    sys.exit(main())
