"""``erofs-nbdd``: the command line. ``main(argv) -> int`` so tests call it in-process."""

from __future__ import annotations

import argparse
import enum
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__
from .config import DEFAULT_PORT, Limits, ServerConfig
from .server import ListenError, Server, parse_listen

if TYPE_CHECKING:
    from collections.abc import Sequence


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erofs-nbdd", description="Serve EROFS images read-only over NBD."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="serve every EROFS image in a directory",
        description="Serve every EROFS image below DIR as a read-only NBD export named by its "
        "path relative to DIR without '.erofs'.",
    )
    s.add_argument("directory", type=Path, metavar="DIR")
    s.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"HOST:PORT, [V6]:PORT, :PORT or unix:PATH; repeatable (default :{DEFAULT_PORT}, "
        "all addresses)",
    )
    s.add_argument("--default-export", metavar="NAME", help="export served for the empty name")
    s.add_argument("--max-connections", type=int, default=Limits.max_connections, metavar="N")
    s.add_argument(
        "--handshake-timeout", type=float, default=Limits.handshake_timeout, metavar="SECONDS"
    )
    s.add_argument(
        "--shutdown-grace", type=float, default=Limits.shutdown_grace, metavar="SECONDS",
        help="how long in-flight requests may take to finish after SIGINT/SIGTERM",
    )  # fmt: skip
    s.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def _config(args: argparse.Namespace) -> ServerConfig:
    listen = tuple(args.listen or [f":{DEFAULT_PORT}"])
    for text in listen:
        parse_listen(text)  # fail before anything is opened
    if args.max_connections < 1:
        raise ListenError("--max-connections must be at least 1")
    limits = Limits(
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        shutdown_grace=args.shutdown_grace,
    )
    return ServerConfig(
        root=args.directory,
        listen=listen,
        default_export=args.default_export,
        limits=limits,
        verbose=args.verbose,
    )


async def _serve_until_signalled(config: ServerConfig) -> None:
    server = Server(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)

            async def on_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    logging.getLogger("erofs_nbdd").info("%s: shutting down", name)
                    server.shutdown()
                    return

            nursery.start_soon(on_signal)
            # server.run returns after shutdown drains; on_signal has returned by then


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """trio reports a failure as a group; a group of one is just that failure."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = _config(args)
        if not args.directory.is_dir():
            parser.error(f"{args.directory} is not a directory")
        try:
            trio.run(_serve_until_signalled, config)
        except BaseExceptionGroup as group:
            raise _sole(group) from None
    except ListenError as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except OSError as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    return ExitStatus.OK
