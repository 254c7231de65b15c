"""Server settings, with the limits that keep one client from hurting the others."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .protocol import DEFAULT_MAX_PAYLOAD
from .tls import TLSConfig

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class Limits:
    #: Seconds a client has from connecting to starting transmission (slowloris guard).
    handshake_timeout: float = 10.0
    #: Options before GO/EXPORT_NAME; each listed export adds two (nbdinfo --list asks INFO
    #: for every export it lists).
    max_options: int = 64
    #: Longest option payload accepted.
    max_option_length: int = 16 * 1024
    #: Connections served at once; more are accepted and closed at once, with a log line.
    max_connections: int = 512
    #: Requests being read from storage at once per connection (the kernel pipelines 128).
    max_in_flight: int = 64
    #: Largest READ; also advertised as the maximum block size.
    max_payload: int = DEFAULT_MAX_PAYLOAD
    #: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    shutdown_grace: float = 10.0


@dataclass(frozen=True)
class ServerConfig:
    root: Path
    listen: tuple[str, ...] = (f":{DEFAULT_PORT}",)
    default_export: str | None = None
    limits: Limits = field(default_factory=Limits)
    tls: TLSConfig = field(default_factory=TLSConfig)
    verbose: bool = False
