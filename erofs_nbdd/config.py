"""Server settings: the limits that keep one client from hurting the others, and TLS policy
(whether TLS is offered or required, and who may see which export)."""

from __future__ import annotations

import enum
import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import DEFAULT_MAX_PAYLOAD
from .registry.reference import is_registry_source
from .transport.contexts import TLSSetupError

DEFAULT_PORT = 10809
#: Validity of new leaf certificates: what browsers still accept; the CA gets 10 years.
DEFAULT_CERT_DAYS = 825


class TLSMode(enum.Enum):
    OFF = "off"  # NOTLS: STARTTLS is refused
    ON = "on"  # TLS offered; plaintext clients are served too
    REQUIRE = "require"  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


@dataclass(frozen=True)
class AllowRule:
    pattern: str  # an export name, or an fnmatch pattern such as team/*
    names: frozenset[str]


def parse_allow(text: str) -> AllowRule:
    """``EXPORT=CN[,CN...]`` as given to --tls-allow."""
    pattern, sep, names = text.partition("=")
    cns = frozenset(n.strip() for n in names.split(",") if n.strip())
    if not sep or not pattern or not cns:
        raise TLSSetupError(
            f"--tls-allow {text!r}: write EXPORT=CN[,CN...], e.g. team/app=ci-runner"
        )
    return AllowRule(pattern, cns)


@dataclass(frozen=True)
class TLSConfig:
    mode: TLSMode = TLSMode.OFF
    cert_dir: Path | None = None
    verify_peer: bool = False
    allow: tuple[AllowRule, ...] = field(default_factory=tuple)
    #: Hand the session keys to the kernel when it can take them (see ktls.py).
    kernel: bool = True
    #: Otherwise seal TLS 1.3 records of replies here, not in OpenSSL (see records.py).
    seal: bool = True

    def restricted(self, export: str) -> frozenset[str] | None:
        """The client names that may use ``export``; None when anyone may."""
        rules = [r for r in self.allow if fnmatch.fnmatchcase(export, r.pattern)]
        if not rules:
            return None
        return frozenset().union(*(r.names for r in rules))

    def check(self) -> None:
        if self.mode is not TLSMode.OFF and self.cert_dir is None:
            raise TLSSetupError(f"--tls {self.mode.value} needs --tls-certificates DIR")
        if self.allow and not self.verify_peer:
            raise TLSSetupError("--tls-allow needs --tls-verify-peer (clients must prove names)")
        if self.allow and self.mode is TLSMode.OFF:
            raise TLSSetupError("--tls-allow needs --tls on or --tls require")


@dataclass(frozen=True)
class Limits:
    #: Seconds a client has from connecting to starting transmission (slowloris guard).
    handshake_timeout: float = 10.0
    #: Options before GO/EXPORT_NAME. The first LIST lets each export it names be asked
    #: twice more outside the count (nbdinfo --list asks INFO and LIST_META_CONTEXT of each);
    #: later ones free nothing, so the budget only goes down.
    max_options: int = 64
    #: Longest option payload accepted.
    max_option_length: int = 16 * 1024
    #: Connections served at once; more are accepted and closed at once, with a log line.
    max_connections: int = 1024
    #: Connections from one IP address at once (0: no limit). Unix-socket clients share one.
    max_connections_per_client: int = 256
    #: Seconds a connection in transmission may stay without a request or a reply in flight
    #: (0: forever). Off by default: a mounted image can rightly sit idle for days.
    idle_timeout: float = 0.0
    #: Seconds a reply may wait for the client to read it before the connection is dropped:
    #: a client that stops reading must not pin server memory.
    reply_timeout: float = 60.0
    #: Requests being read from storage at once per connection (the kernel pipelines 128).
    max_in_flight: int = 64
    #: Bytes of read replies one connection may hold in memory at once.
    max_connection_buffer: int = 64 * 1024 * 1024
    #: Bytes of read replies all connections together may hold in memory at once.
    max_server_buffer: int = 512 * 1024 * 1024
    #: Bytes of that one client address may hold, over all its connections (0: a quarter of
    #: max_server_buffer). The last eighth is kept for addresses that hold nothing.
    max_client_buffer: int = 0
    #: Largest READ; also advertised as the maximum block size.
    max_payload: int = DEFAULT_MAX_PAYLOAD
    #: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    shutdown_grace: float = 10.0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/erofs-nbdd``, as the XDG base directory spec places caches."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "erofs-nbdd"


@dataclass(frozen=True)
class RegistryConfig:
    """How registry sources are reached and cached (README: Registry sources)."""

    cache_dir: Path | None = None  # None: default_cache_dir()
    cache_size: int = 10 << 30
    #: Seconds a read of an uncached range keeps retrying a registry that fails.
    source_timeout: float = 30.0
    #: Credentials file used instead of the standard ones (as skopeo --authfile).
    authfile: Path | None = None
    #: Directories laid out like /etc/containers/certs.d, searched before the standard ones.
    certs_d: tuple[Path, ...] = ()
    #: os/arch[/variant] chosen from multi-platform indexes (None: this machine's).
    platform: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    #: The first directory of images (None when every source is a registry).
    root: Path | None
    listen: tuple[str, ...] = (f":{DEFAULT_PORT}",)
    default_export: str | None = None
    limits: Limits = field(default_factory=Limits)
    tls: TLSConfig = field(default_factory=TLSConfig)
    verbose: bool = False
    #: After answering, keep trying to read the next request this long before sleeping in
    #: epoll: a client at queue depth 1 usually sends it within tens of microseconds, and
    #: catching it awake saves a scheduler round trip (about 30 us of its latency here).
    busy_poll_us: int = 30
    #: Read what misses the page cache through io_uring where the kernel allows it (else,
    #: and with False, on threads): the event loop then only queues reads and collects them.
    io_uring: bool = True
    #: More sources after ``root``: directories, and registries as ``oci://HOST/REPO``.
    sources: tuple[str, ...] = ()
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    @property
    def directories(self) -> list[Path]:
        extra = [Path(s) for s in self.sources if not is_registry_source(s)]
        return ([self.root] if self.root is not None else []) + extra

    @property
    def registry_sources(self) -> list[str]:
        return [s for s in self.sources if is_registry_source(s)]
