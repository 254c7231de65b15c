"""erofs-nbd-attach, erofs-nbd-detach, erofs-nbd-list: ``main(argv) -> int`` each."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__, devices, netlink
from .attach import DEAD_TIMEOUT, REQUEST_TIMEOUT, AttachOptions, attach, detach, reattach
from .errors import AttachError, ExitStatus
from .target import parse_target

if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_CODES = "exit codes: " + ", ".join(f"{s.value} {s.name.lower()}" for s in ExitStatus)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format=f"{Path(sys.argv[0]).name}: %(message)s",
    )


def _fail(prog: str, exc: AttachError) -> int:
    print(f"{prog}: {exc}", file=sys.stderr)
    return int(exc.status)


def attach_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="erofs-nbd-attach",
        description="Attach an EROFS image served over NBD and mount it read-only; a "
        "supervisor keeps it attached across server restarts and fails over along SERVER,...",
        epilog="SERVER: HOST[:PORT], [V6]:PORT, nbd://HOST[:PORT]/EXPORT, nbds://... (TLS), "
        "nbd+unix:///EXPORT?socket=PATH; several, comma-separated or with --server, form a "
        "failover list. " + EXIT_CODES,
    )
    parser.add_argument("server", metavar="SERVER[,SERVER...]", nargs="?")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    parser.add_argument(
        "--server",
        dest="more",
        action="append",
        default=[],
        metavar="SERVER",
        help="another server for the failover list",
    )
    parser.add_argument("--export", help="export name (default: from the URI, else the default)")
    parser.add_argument(
        "--tls-certificates",
        type=Path,
        metavar="CERTDIR",
        help="ca-cert.pem (and client-cert.pem, client-key.pem); implies TLS",
    )
    parser.add_argument("--connections", type=int, default=1, metavar="N")
    parser.add_argument(
        "--relay",
        action="store_true",
        help="plain links through a relay too, as TLS links are: a server lost mid-request "
        "then costs its absence, not --timeout, but every byte crosses a helper process",
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=REQUEST_TIMEOUT,
        metavar="S",
        help="kernel per-request timeout: a request lost with a dead connection is retried "
        "after this long; a slower one is retried on a new connection",
    )
    parser.add_argument(
        "--dead-timeout",
        type=int,
        default=DEAD_TIMEOUT,
        metavar="S",
        help="how long I/O waits for the supervisor to replace a dead connection",
    )
    parser.add_argument("-o", dest="options", default="", metavar="MOUNTOPTS")
    parser.add_argument("--device", metavar="/dev/nbdN", help="use this device")
    parser.add_argument(
        "--reattach",
        metavar="/dev/nbdN",
        help="start a new supervisor for an attached device (its old one died or is upgraded)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.reattach is not None:
        index = devices.parse_device(args.reattach)
        if index is None:
            return _fail(parser.prog, AttachError(ExitStatus.USAGE, "--reattach takes /dev/nbdN"))
        try:
            pid = trio.run(reattach, index)
        except AttachError as exc:
            return _fail(parser.prog, exc)
        print(f"/dev/nbd{index}: new supervisor (pid {pid})")
        return ExitStatus.OK
    if not args.server or not args.mountpoint:
        parser.error("SERVER and MOUNTPOINT are required (or --reattach /dev/nbdN)")
    try:
        targets = []
        for text in [*args.server.split(","), *args.more]:
            target = parse_target(text.strip(), export=args.export)
            if args.tls_certificates is not None:
                target = dataclasses.replace(target, tls=True, cert_dir=args.tls_certificates)
            targets.append(target)
    except ValueError as exc:
        return _fail(parser.prog, AttachError(ExitStatus.USAGE, str(exc)))
    device = None
    if args.device is not None:
        device = devices.parse_device(args.device)
        if device is None:
            return _fail(parser.prog, AttachError(ExitStatus.USAGE, "--device takes /dev/nbdN"))
    if not 1 <= args.connections <= 16:
        return _fail(parser.prog, AttachError(ExitStatus.USAGE, "--connections must be 1..16"))
    options = AttachOptions(
        targets=targets,
        mountpoint=args.mountpoint,
        connections=args.connections,
        timeout=args.timeout,
        dead_timeout=args.dead_timeout,
        mount_options=args.options,
        device=device,
        relay=args.relay,
    )
    try:
        record = trio.run(attach, options)
    except AttachError as exc:
        return _fail(parser.prog, exc)
    print(
        f"{record.server} attached as /dev/nbd{record.index} ({record.connections} "
        f"connection(s)), mounted on {record.mountpoint}"
    )
    return ExitStatus.OK


def detach_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="erofs-nbd-detach",
        description="Unmount, disconnect and clean up what erofs-nbd-attach made.",
        epilog=EXIT_CODES,
    )
    parser.add_argument("what", metavar="MOUNTPOINT|/dev/nbdN")
    args = parser.parse_args(argv)
    _setup_logging(False)
    try:
        done = trio.run(detach, args.what)
    except AttachError as exc:
        return _fail(parser.prog, exc)
    print(f"detached {done}")
    return ExitStatus.OK


def list_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="erofs-nbd-list", description="The NBD devices attached, and what attach recorded."
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        status = {s.index: s.connected for s in netlink.status()}
    except OSError as exc:
        print(f"erofs-nbd-list: {exc}", file=sys.stderr)
        return ExitStatus.NO_KERNEL_SUPPORT
    records = {r.index: r for r in devices.all_records()}
    rows = []
    for index in sorted(set(records) | {i for i, c in status.items() if c}):
        r = records.get(index)
        connected = status.get(index, False)
        helper_ok = r is None or all(devices.pid_alive(pid) for pid in r.helper_pids)
        supervisor = devices.read_state(index)
        if supervisor and not devices.pid_alive(int(str(supervisor.get("pid", 0)))):
            supervisor = {**supervisor, "state": "supervisor gone"}
        state = "connected" if connected else "disconnected"
        if connected and not helper_ok:
            state = "connected, helper gone"

        rows.append(
            {
                "device": devices.device_path(index),
                "index": index,
                "state": state,
                "server": r.server if r else None,
                "supervisor": supervisor.get("state") if supervisor else None,
                "reconnects": supervisor.get("reconnects", 0) if supervisor else 0,
                "export": r.export if r else None,
                "connections": r.connections if r else None,
                "mountpoint": devices.mountpoint_of(index),
                "tls": r.tls if r else None,
                "interface": r.interface if r else None,
                "helper_pids": r.helper_pids if r else [],
                "backend": devices.backend_of(index) or (r.backend if r else None),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return ExitStatus.OK
    if not rows:
        print("no NBD devices attached")
        return ExitStatus.OK
    print(f"{'DEVICE':<11} {'STATE':<36} {'CONN':>4} {'RECONN':>6}  {'SERVER':<36} MOUNTPOINT")
    for row in rows:
        state = str(row["state"]) + (f", {row['supervisor']}" if row["supervisor"] else "")
        print(
            f"{row['device']:<11} {state:<36} {row['connections'] or '-':>4} "
            f"{row['reconnects']:>6}  {row['server'] or '(not ours)':<36} "
            f"{row['mountpoint'] or '-'}"
        )
    return ExitStatus.OK
