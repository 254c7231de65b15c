"""erofs-nbd-attach, erofs-nbd-detach, erofs-nbd-list: ``main(argv) -> int`` each."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__, devices, netlink
from .attach import AttachOptions, attach, detach
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
        description="Attach an EROFS image served over NBD and mount it read-only.",
        epilog="SERVER: HOST[:PORT], [V6]:PORT, nbd://HOST[:PORT]/EXPORT, nbds://... (TLS), "
        "nbd+unix:///EXPORT?socket=PATH. " + EXIT_CODES,
    )
    parser.add_argument("server", metavar="SERVER")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT")
    parser.add_argument("--export", help="export name (default: from the URI, else the default)")
    parser.add_argument(
        "--tls-certificates", type=Path, metavar="CERTDIR",
        help="ca-cert.pem (and client-cert.pem, client-key.pem); implies TLS",
    )  # fmt: skip
    parser.add_argument("--connections", type=int, default=1, metavar="N")
    parser.add_argument(
        "--timeout", type=int, default=30, metavar="S", help="kernel per-request timeout"
    )
    parser.add_argument(
        "--dead-timeout", type=int, default=60, metavar="S",
        help="how long I/O waits on a dead connection before failing",
    )  # fmt: skip
    parser.add_argument("-o", dest="options", default="", metavar="MOUNTOPTS")
    parser.add_argument("--device", metavar="/dev/nbdN", help="use this device")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        target = parse_target(args.server, export=args.export)
    except ValueError as exc:
        return _fail(parser.prog, AttachError(ExitStatus.USAGE, str(exc)))
    if args.tls_certificates is not None:
        target = type(target)(**{**target.__dict__, "tls": True, "cert_dir": args.tls_certificates})
    device = None
    if args.device is not None:
        device = devices.parse_device(args.device)
        if device is None:
            return _fail(parser.prog, AttachError(ExitStatus.USAGE, "--device takes /dev/nbdN"))
    if not 1 <= args.connections <= 16:
        return _fail(parser.prog, AttachError(ExitStatus.USAGE, "--connections must be 1..16"))
    options = AttachOptions(
        target=target, mountpoint=args.mountpoint, connections=args.connections,
        timeout=args.timeout, dead_timeout=args.dead_timeout, mount_options=args.options,
        device=device,
    )  # fmt: skip
    try:
        record = trio.run(attach, options)
    except AttachError as exc:
        return _fail(parser.prog, exc)
    print(
        f"{target.describe()} attached as /dev/nbd{record.index} ({record.connections} "
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
        state = "connected" if connected else "disconnected"
        if connected and not helper_ok:
            state = "connected, helper gone"
        rows.append({
            "device": devices.device_path(index),
            "index": index,
            "state": state,
            "server": r.server if r else None,
            "export": r.export if r else None,
            "connections": r.connections if r else None,
            "mountpoint": devices.mountpoint_of(index),
            "tls": r.tls if r else None,
            "interface": r.interface if r else None,
            "helper_pids": r.helper_pids if r else [],
            "backend": devices.backend_of(index) or (r.backend if r else None),
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
        return ExitStatus.OK
    if not rows:
        print("no NBD devices attached")
        return ExitStatus.OK
    print(f"{'DEVICE':<11} {'STATE':<22} {'CONN':>4}  {'SERVER':<40} MOUNTPOINT")
    for row in rows:
        print(
            f"{row['device']:<11} {row['state']:<22} {row['connections'] or '-':>4}  "
            f"{row['server'] or '(not ours)':<40} {row['mountpoint'] or '-'}"
        )
    return ExitStatus.OK
