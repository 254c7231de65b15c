"""Listening sockets: parsing --listen, binding, naming.

Binding is plain blocking socket code on purpose: with ``--workers N`` the sockets are bound
once, before any worker process starts, and every worker accepts from the same ones.

TCP sockets are bound with SO_REUSEPORT, so a new server can listen on the port while the
old one finishes its connections (the upgrade procedure in README): Linux shares a port only
between sockets of the same user, and the kernel spreads new connections over them until
the old server stops accepting. A port another of our servers already holds is logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from .address import parse_port, split_host_port

log = logging.getLogger("erofs_nbdd.server")

BACKLOG = 1024
#: Not every platform has it; without it a port is held by one server at a time.
REUSEPORT = getattr(socket, "SO_REUSEPORT", None)


class ListenError(ValueError):
    """A --listen value that cannot be used; the message says how to write it."""


@dataclass(frozen=True)
class ListenSpec:
    family: str  # "tcp" or "unix"
    host: str | None = None
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.family == "unix" else f"{self.host or '*'}:{self.port}"


def parse_listen(text: str, default_port: int = 10809) -> ListenSpec:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (all addresses) or ``unix:PATH``."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ListenError("unix: needs a path, e.g. unix:/run/erofs-nbdd.sock")
        return ListenSpec("unix", path=path)
    try:
        host, port_text = split_host_port(text)
        port = parse_port(text, port_text, default_port, allow_zero=True)
    except ValueError as exc:
        raise ListenError(str(exc)) from None
    return ListenSpec("tcp", host=host or None, port=port)


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by an earlier run would make bind() fail; anything else stays."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


def bind(spec: ListenSpec) -> list[socket.socket]:
    """Listening sockets for one --listen value (all addresses of a name, v4 and v6); with
    ``--workers`` every worker accepts from these same sockets (``balance.py`` says which).
    An OSError names the address and the cause."""
    try:
        return _bind(spec)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {spec}: {exc.strerror or exc}") from exc


def _bind(spec: ListenSpec) -> list[socket.socket]:
    if spec.family == "unix":
        _remove_stale_socket(Path(spec.path))
        return [_listening(socket.AF_UNIX, spec.path)]
    infos = socket.getaddrinfo(
        spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    socks: list[socket.socket] = []
    try:
        seen = set()
        for family, _, _, _, address in infos:
            if (family, address) not in seen:
                seen.add((family, address))
                socks.append(_listening(family, address))
    except BaseException:
        close_all(socks)
        raise
    return socks


def _held(family: int, address: tuple[object, ...]) -> bool:
    """Whether a listening socket already holds ``address`` (a bind without SO_REUSEPORT
    fails then; a fixed port only)."""
    if REUSEPORT is None or address[1] == 0:
        return False
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _listening(family: int, address: str | tuple[object, ...]) -> socket.socket:
    shared = not isinstance(address, str) and _held(family, address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if REUSEPORT is not None:
                with contextlib.suppress(OSError):  # a sandbox may refuse it: one server then
                    sock.setsockopt(socket.SOL_SOCKET, REUSEPORT, 1)
        if family == socket.AF_INET6:  # "::" must not also claim the v4 port we bind next
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if shared:
            log.warning(
                "another server of this user listens on %s too: new connections are shared "
                "with it until it stops (an upgrade: now stop the old one with SIGTERM)",
                describe(sock),
            )
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
