"""``erofs-nbdd``: the command line. ``main(argv) -> int`` so tests call it in-process."""

from __future__ import annotations

import argparse
import enum
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__
from .config import (
    DEFAULT_CERT_DAYS,
    DEFAULT_PORT,
    Limits,
    RegistryConfig,
    ServerConfig,
    TLSConfig,
    TLSMode,
    parse_allow,
)
from .memory import tune_malloc
from .registry.reference import BadReference, is_registry_source, parse_source
from .server.balance import LoadBoard
from .server.listener import Server, bind_listen
from .server.workers import run_workers, share
from .storage.blobcache import parse_size
from .storage.sources import SourceError, build_catalog, check_registries
from .transport.contexts import TLSSetupError
from .transport.listen import ListenError, describe, parse_listen

if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence

    from .server.balance import Seat


class UsageError(ValueError):
    """A command-line value that cannot work; the message says which and why."""


class ExitStatus(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2


#: --flag, Limits field, help. Counts and byte sizes are ints; times are float seconds.
LIMIT_FLAGS = (
    ("--max-connections", "max_connections", "connections served at once"),
    (
        "--max-connections-per-client",
        "max_connections_per_client",
        "connections from one IP address at once; 0: no limit",
    ),
    ("--handshake-timeout", "handshake_timeout", "seconds from connect to transmission"),
    (
        "--idle-timeout",
        "idle_timeout",
        "close a connection after this many seconds without a request; 0: never",
    ),
    (
        "--reply-timeout",
        "reply_timeout",
        "close a connection whose client reads no reply for this long; 0: never",
    ),
    ("--max-in-flight", "max_in_flight", "storage reads in flight per connection"),
    (
        "--max-connection-buffer",
        "max_connection_buffer",
        "bytes of replies one connection may hold in memory",
    ),
    ("--max-server-buffer", "max_server_buffer", "bytes of replies all connections may hold"),
    (
        "--max-client-buffer",
        "max_client_buffer",
        "bytes of replies the connections of one IP address may hold; 0: a quarter of "
        "--max-server-buffer",
    ),
    (
        "--shutdown-grace",
        "shutdown_grace",
        "seconds in-flight requests get to finish after SIGINT/SIGTERM",
    ),
)
#: Limits that must be at least 1 (the others accept 0 where their help says so).
POSITIVE_LIMITS = (
    "max_connections",
    "max_in_flight",
    "max_connection_buffer",
    "max_server_buffer",
    "handshake_timeout",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erofs-nbdd", description="Serve EROFS images read-only over NBD."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="serve the EROFS images of directories and registries",
        description="Serve every EROFS image below each DIR as a read-only NBD export named by "
        "its path relative to DIR without '.erofs', and the EROFS-native images of registries "
        "(oci://HOST[:PORT]/REPOSITORY, oci+http:// for plain HTTP, oci://HOST[:PORT] for its "
        "whole catalog) as REPOSITORY:TAG and REPOSITORY@sha256:HEX.",
    )
    s.add_argument("sources", nargs="+", metavar="SOURCE", help="DIR or oci://HOST[:PORT][/REPO]")
    s.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help=f"HOST:PORT, [V6]:PORT, :PORT or unix:PATH; repeatable (default :{DEFAULT_PORT}, "
        "all addresses)",
    )
    s.add_argument("--default-export", metavar="NAME", help="export served for the empty name")
    s.add_argument("-v", "--verbose", action="store_true", help="log every request")
    s.add_argument(
        "--busy-poll",
        type=int,
        default=ServerConfig.busy_poll_us,
        metavar="MICROSECONDS",
        help="after a reply, poll this long for the next request before sleeping: lower "
        "latency at queue depth 1 for some CPU (default %(default)s; 0: off)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing the listening sockets; server-wide limits are split "
        "between them (default 1)",
    )
    s.add_argument(
        "--io-uring",
        choices=["auto", "off"],
        default="auto",
        help="auto: read what misses the page cache through io_uring where the kernel allows "
        "it; off: on threads",
    )
    lim = s.add_argument_group("limits", "what one client may cost the server (README: Limits)")
    for flag, field, help_text in LIMIT_FLAGS:
        default = getattr(Limits, field)
        kind = type(default)
        lim.add_argument(
            flag,
            dest=field,
            type=kind,
            default=default,
            metavar="SECONDS" if kind is float else "N",
            help=f"{help_text} (default {default:g})",
        )
    r = s.add_argument_group("registry sources", "README: Registry sources")
    r.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        help="where registry blobs are cached by digest (default $XDG_CACHE_HOME/erofs-nbdd)",
    )
    r.add_argument(
        "--cache-size",
        default="10G",
        metavar="SIZE",
        help="most disk the cache may use, e.g. 20G or 512M (default %(default)s)",
    )
    r.add_argument(
        "--source-timeout",
        type=float,
        default=RegistryConfig.source_timeout,
        metavar="SECONDS",
        help="how long a read of an uncached range retries a failing registry before it "
        "gets EIO (default %(default)s)",
    )
    r.add_argument(
        "--authfile",
        type=Path,
        metavar="FILE",
        help="registry credentials (containers auth.json form) instead of the standard files",
    )
    r.add_argument(
        "--certs-d",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a directory laid out like /etc/containers/certs.d (HOST:PORT/*.crt), searched "
        "first; repeatable",
    )
    r.add_argument(
        "--platform",
        metavar="OS/ARCH",
        help="the image chosen from multi-platform indexes (default: this machine's)",
    )
    t = s.add_argument_group("TLS")
    t.add_argument(
        "--tls",
        choices=[m.value for m in TLSMode],
        default="off",
        help="off: refuse STARTTLS; on: offer TLS, serve plaintext too; require: TLS only",
    )
    t.add_argument(
        "--tls-certificates",
        type=Path,
        metavar="DIR",
        help="ca-cert.pem, server-cert.pem, server-key.pem (make them with `erofs-nbdd certs`)",
    )
    t.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="only clients with a certificate signed by ca-cert.pem get in",
    )
    t.add_argument(
        "--tls-kernel",
        choices=["auto", "off"],
        default="auto",
        help="auto: the kernel encrypts replies when it can (the tls module is loaded), so "
        "large reads go out by sendfile; off: always encrypt in this process",
    )
    t.add_argument(
        "--tls-seal",
        choices=["auto", "openssl"],
        default="auto",
        help="in this process, auto: TLS 1.3 records of replies are sealed by erofs-nbdd "
        "(AES-GCM or ChaCha20-Poly1305 from the cryptography package), the rest by OpenSSL; "
        "openssl: OpenSSL seals every record",
    )
    t.add_argument(
        "--tls-allow",
        action="append",
        default=[],
        metavar="EXPORT=CN[,CN...]",
        help="only these client certificate names may use EXPORT (a name or a pattern such as "
        "team/*); repeatable; needs --tls-verify-peer",
    )

    p = sub.add_parser(
        "push",
        help="publish EROFS images to a registry as an EROFS-native OCI image",
        description="Push IMAGE... (one layer each, bottom first) with an OCI image config "
        "and manifest to oci://HOST[:PORT]/REPOSITORY:TAG (oci+http:// for plain HTTP); "
        "prints the manifest digest.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("target", metavar="oci://HOST[:PORT]/REPOSITORY:TAG")
    p.add_argument("--authfile", type=Path, metavar="FILE", help="registry credentials file")
    p.add_argument("--certs-d", type=Path, action="append", default=[], metavar="DIR")
    p.add_argument(
        "--platform",
        metavar="OS/ARCH",
        help="the image config's platform (default: this machine's)",
    )
    c = sub.add_parser(
        "certs",
        help="make a CA, a server certificate and client certificates",
        description="Write CERTDIR/{ca-cert,ca-key,server-cert,server-key}.pem and "
        "CERTDIR/clients/NAME/{ca-cert,client-cert,client-key}.pem. Existing files are kept "
        "unless --force; run again with --client NAME to add a client.",
    )
    c.add_argument("cert_dir", type=Path, metavar="CERTDIR")
    c.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME_OR_IP",
        help="names the server certificate covers (default: localhost, 127.0.0.1, ::1, "
        "this machine's hostname)",
    )
    c.add_argument("--client", action="append", default=[], metavar="NAME")
    c.add_argument(
        "--days", type=int, default=DEFAULT_CERT_DAYS, help="validity of new certificates"
    )
    c.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def _config(args: argparse.Namespace) -> ServerConfig:
    listen = tuple(args.listen or [f":{DEFAULT_PORT}"])
    for text in listen:
        parse_listen(text)  # fail before anything is opened
    for flag, field, _ in LIMIT_FLAGS:
        value = getattr(args, field)
        if value < 0 or (value == 0 and field in POSITIVE_LIMITS):
            least = "above 0" if field in POSITIVE_LIMITS else "0 or more"
            raise UsageError(f"{flag} must be {least}, not {value:g}")
    limits = Limits(**{field: getattr(args, field) for _, field, _ in LIMIT_FLAGS})
    tls = TLSConfig(
        mode=TLSMode(args.tls),
        cert_dir=args.tls_certificates,
        verify_peer=args.tls_verify_peer,
        allow=tuple(parse_allow(a) for a in args.tls_allow),
        kernel=args.tls_kernel == "auto",
        seal=args.tls_seal == "auto",
    )
    tls.check()
    directories = [p for p in args.sources if not is_registry_source(p)]
    for text in args.sources:
        if is_registry_source(text):
            try:
                parse_source(text)
            except BadReference as exc:
                raise UsageError(str(exc)) from None
        elif not Path(text).is_dir():
            raise UsageError(
                f"{text} is not a directory (a registry is oci://HOST[:PORT]/REPOSITORY)"
            )
    try:
        cache_size = parse_size(args.cache_size)
    except ValueError as exc:
        raise UsageError(f"--cache-size: {exc}") from None
    if args.source_timeout <= 0:
        raise UsageError("--source-timeout must be above 0")
    root = Path(directories[0]) if directories else None
    rest = [t for t in args.sources if t != directories[0]] if directories else list(args.sources)
    return ServerConfig(
        root=root,
        sources=tuple(rest),
        registry=RegistryConfig(
            cache_dir=args.cache,
            cache_size=cache_size,
            source_timeout=args.source_timeout,
            authfile=args.authfile,
            certs_d=tuple(args.certs_d),
            platform=args.platform,
        ),
        tls=tls,
        listen=listen,
        default_export=args.default_export,
        limits=limits,
        verbose=args.verbose,
        busy_poll_us=args.busy_poll,
        io_uring=args.io_uring == "auto",
    )


async def _serve_until_signalled(
    config: ServerConfig, sockets: list[socket.socket], seat: Seat | None
) -> None:
    server = Server(config, seat)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run, sockets)

            async def on_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    logging.getLogger("erofs_nbdd").info("%s: shutting down", name)
                    server.shutdown()
                    return

            nursery.start_soon(on_signal)
            # server.run returns after shutdown drains; on_signal has returned by then


async def _check_sources(config: ServerConfig) -> None:
    catalog = build_catalog(config)
    try:
        await check_registries(catalog)
    finally:
        await catalog.aclose()


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """trio reports a failure as a group; a group of one is just that failure."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _certs(args: argparse.Namespace) -> int:
    from .transport.certs import make_certificates  # cryptography costs a server ~9 MiB: only here

    for name in args.client:
        if not name or "/" in name or name in (".", ".."):
            print(
                f"erofs-nbdd: --client {name!r}: use a plain name such as ci-runner-1",
                file=sys.stderr,
            )
            return ExitStatus.USAGE
    try:
        written = make_certificates(
            args.cert_dir, hosts=args.host, clients=args.client, force=args.force, days=args.days
        )
    except (OSError, ValueError) as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    for w in written:
        state = "kept (use --force to replace)" if w.kept else "written"
        expires = w.expires.date().isoformat() if w.expires else "-"
        print(f"{w.path}: {w.what}, expires {expires}, {state}")
    print(f"serve with: erofs-nbdd serve DIR --tls require --tls-certificates {args.cert_dir}")
    return ExitStatus.OK


def _push(args: argparse.Namespace) -> int:
    from .registry.auth import AuthError
    from .registry.client import RegistryError
    from .registry.credentials import CredentialError
    from .registry.manifest import host_platform
    from .registry.push import PushError, push

    images: list[Path] = args.images
    target: str = args.target
    try:
        spec, tag = parse_source(target, allow_tag=True)
    except BadReference as exc:
        print(f"erofs-nbdd push: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    if spec.repository is None or tag is None:
        print(
            f"erofs-nbdd push: {target}: name the repository and tag, as in "
            "oci://HOST[:PORT]/team/app:v1",
            file=sys.stderr,
        )
        return ExitStatus.USAGE
    try:
        digest = trio.run(
            lambda: push(
                images,
                spec,
                tag,
                authfile=args.authfile,
                certs_d=tuple(args.certs_d),
                platform=args.platform or host_platform(),
            )
        )
    except (PushError, RegistryError, AuthError, CredentialError) as exc:
        print(f"erofs-nbdd push: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    print(digest)
    return ExitStatus.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "certs":
        return _certs(args)
    if args.command == "push":
        return _push(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = _config(args)
        if not 0 <= args.busy_poll <= 10_000:
            raise UsageError("--busy-poll takes 0..10000 microseconds")
        if args.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {args.workers}")
        if config.registry_sources:
            trio.run(_check_sources, config)
        sockets = bind_listen(config.listen)
    except SourceError as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    except (ListenError, TLSSetupError, UsageError) as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except OSError as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    tune_malloc()
    gc.freeze()  # startup objects: the collections that return a burst's memory skip them
    if args.workers == 1:
        return _serve(config, sockets)
    logging.getLogger("erofs_nbdd").info(
        "%d worker processes on %s", args.workers, ", ".join(describe(s) for s in sockets)
    )
    shared = share(config, args.workers)
    board = LoadBoard(args.workers)
    return run_workers(
        board, args.workers, lambda i: _serve(shared, sockets, board.seat(i)), sockets
    )


def _serve(config: ServerConfig, sockets: list[socket.socket], seat: Seat | None = None) -> int:
    """One server process (the only one, or a worker) until SIGINT/SIGTERM."""
    try:
        try:
            trio.run(_serve_until_signalled, config, sockets, seat)
        except BaseExceptionGroup as group:
            raise _sole(group) from None
    except TLSSetupError as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.USAGE
    except OSError as exc:
        print(f"erofs-nbdd: {exc}", file=sys.stderr)
        return ExitStatus.ERROR
    return ExitStatus.OK
