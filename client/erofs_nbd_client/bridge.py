"""The bridge: the kernel speaks plaintext NBD, so a helper process relays between a
socketpair end the kernel holds and the TLS connection to the server (as nbd-client does);
with ``--relay``, plain connections too, for relays that resume (below).

attach starts it with ``posix_spawn`` in its own session, so it outlives attach. It connects,
negotiates (over TLS, or plain with ``--relay``), checks the image and reports the export's
details (or its error) as one JSON line on a status pipe; attach returns only after that
line. Then each link is a ``relay.Relay``, which moves to a new server connection when its
own ends (along the failover list, to the same image) until the kernel closes its side. A
requested disconnect (EOF from the kernel) is a quiet exit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import uuid
from typing import TYPE_CHECKING

import trio

from erofs_nbdd.protocol import Negotiated

from . import devices
from .connect import Connection, check_erofs, open_connections, tls_context
from .errors import AttachError, ExitStatus
from .negotiate import ExportDetails, Session
from .relay import Relay, Resume
from .spawn import read_line, reap, spawn
from .target import Target

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("erofs_nbd_client.bridge")
STATUS_TIMEOUT = 120


@dataclasses.dataclass
class Helper:
    """A helper process (the bridge) as attach sees it: the kernel's side of each
    connection is a socketpair end whose other end the helper relays (over TLS, or plain
    with ``--relay``)."""

    pid: int
    log_path: str
    connections: list[Connection]


async def start_bridge(target: Target, count: int, targets: list[Target]) -> Helper:
    """Spawn the bridge for ``target`` (its links resume along ``targets``, the failover
    list); return once it has negotiated every connection, or raise its error."""
    devices.RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = devices.RUN_DIR / f"bridge-{uuid.uuid4().hex[:12]}.log"
    pairs = [socket.socketpair() for _ in range(count)]
    status_r, status_w = os.pipe()
    child_fds = [b.fileno() for _, b in pairs]
    spec = {
        "target": target.to_json(),
        "targets": [t.to_json() for t in _resume_order(target, targets)],
        "fds": child_fds,
        "status_fd": status_w,
    }
    try:
        pid = spawn("erofs_nbd_client.bridge", [json.dumps(spec)], [*child_fds, status_w], log_path)
    finally:
        os.close(status_w)
        for _, b in pairs:
            b.close()
    try:
        line = await trio.to_thread.run_sync(read_line, status_r, STATUS_TIMEOUT)
    finally:
        os.close(status_r)
    try:
        status = json.loads(line) if line else None
    except ValueError:
        status = None
    if not status or not status.get("ok"):
        for a, _ in pairs:
            a.close()
        reap(pid)
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        log_path.unlink(missing_ok=True)  # a failed attach leaves nothing behind
        if status is None:
            raise AttachError(ExitStatus.FAILURE, f"the relay helper died without a word: {tail}")
        raise AttachError(ExitStatus(status["status"]), status["error"])
    used = status["connections"]
    for a, _ in pairs[used:]:
        a.close()
    details = ExportDetails(**status["details"])
    conns = [
        Connection(
            details,
            Session(trio.SocketStream(trio.socket.from_stdlib_socket(a)), Negotiated(), b""),
        )
        for a, _ in pairs[:used]
    ]
    return Helper(pid=pid, log_path=str(log_path), connections=conns)


def _note_relayed(target: Target) -> None:
    devices.note_relayed(os.getpid(), target.describe())


def _resume_order(target: Target, targets: list[Target]) -> list[Target]:
    """Where a link resumes: its own server first, then the rest of the failover list."""
    return [target, *(t for t in targets if t != target)]


async def bridge_in_process(
    nursery: trio.Nursery,
    target: Target,
    count: int,
    targets: list[Target],
    identity: str,
    on_resume: Callable[[Target], None] | None = None,
) -> list[Connection]:
    """The bridge without a process of its own (the supervisor's reconnects): connections
    relayed in ``nursery``, resuming along ``targets`` to the image ``identity`` names;
    returns connections over the kernel's socketpair ends."""
    conns = await open_connections(target, count, tls_context(target))
    resume = Resume(_resume_order(target, targets), identity)
    out = []
    for i, conn in enumerate(conns):
        kernel_end, ours = socket.socketpair()
        plain = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        nursery.start_soon(Relay(i, plain, conn.session.stream, resume, on_resume).run)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(kernel_end))
        out.append(Connection(conn.details, Session(stream, Negotiated(), b"")))
    return out


async def run(spec: dict[str, object]) -> int:
    target = Target.from_json(spec["target"])  # type: ignore[arg-type]
    targets = [Target.from_json(t) for t in spec["targets"]]  # type: ignore[attr-defined]
    fds: list[int] = list(spec["fds"])  # type: ignore[call-overload]
    with os.fdopen(int(spec["status_fd"]), "w") as status:  # type: ignore[call-overload]
        try:
            conns = await open_connections(target, len(fds), tls_context(target))
            identity = await check_erofs(conns[0])  # what a resumed link must find again
        except AttachError as exc:
            status.write(json.dumps({"ok": False, "status": int(exc.status), "error": str(exc)}))
            status.write("\n")
            return int(exc.status)
        except Exception as exc:
            log.exception("negotiation failed")
            status.write(json.dumps({"ok": False, "status": 1, "error": repr(exc)}) + "\n")
            return 1
        details = dataclasses.asdict(conns[0].details)
        message = {"ok": True, "connections": len(conns), "details": details}
        status.write(json.dumps(message) + "\n")
    log.info("relaying %d connection(s) to %s", len(conns), target.describe())
    for fd in fds[len(conns) :]:
        os.close(fd)
    resume = Resume(targets, identity)
    async with trio.open_nursery() as nursery:
        for i, (fd, conn) in enumerate(zip(fds, conns, strict=False)):
            plain = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
            relay = Relay(i, plain, conn.session.stream, resume, _note_relayed)
            nursery.start_soon(relay.run)
    log.info("all connections closed; exiting")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s bridge[%(process)d] %(levelname)s: %(message)s"
    )
    return trio.run(run, json.loads(args[0]))


if __name__ == "__main__":
    sys.exit(main())
