"""Where the export is: ``HOST:PORT``, ``[V6]:PORT``, or an NBD URI (nbd, nbds, nbd+unix,
nbds+unix) as the NBD URI specification (doc/uri.md) writes them."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from erofs_nbdd.transport.address import parse_port, split_host_port

DEFAULT_PORT = 10809


@dataclass(frozen=True)
class Target:
    host: str | None = None
    port: int = DEFAULT_PORT
    unix_path: str | None = None
    export: str = ""
    tls: bool = False
    cert_dir: Path | None = None

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "cert_dir": str(self.cert_dir) if self.cert_dir else None}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Target:
        raw = dict(data)
        if raw.get("cert_dir"):
            raw["cert_dir"] = Path(str(raw["cert_dir"]))
        return cls(**raw)  # type: ignore[arg-type]

    def describe(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        if self.unix_path is not None:
            return f"{scheme}+unix:///{self.export}?socket={self.unix_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.export}"


def parse_target(text: str, *, export: str | None = None) -> Target:
    """Parse SERVER; ``export`` (from --export) overrides the URI's path."""
    if "://" in text:
        return _parse_uri(text, export)
    host, port = _host_port(text)
    return Target(host=host, port=port, export=export or "")


def _host_port(text: str) -> tuple[str, int]:
    host, port_text = split_host_port(text)
    if not host:
        raise ValueError(f"{text!r}: no host")
    return host, parse_port(text, port_text, DEFAULT_PORT, allow_zero=False)


def _parse_uri(text: str, export: str | None) -> Target:
    url = urllib.parse.urlsplit(text)
    schemes = {
        "nbd": (False, False),
        "nbds": (True, False),
        "nbd+unix": (False, True),
        "nbds+unix": (True, True),
    }
    if url.scheme not in schemes:
        raise ValueError(f"{text!r}: the scheme must be nbd, nbds, nbd+unix or nbds+unix")
    tls, unix = schemes[url.scheme]
    query = urllib.parse.parse_qs(url.query)
    name = export if export is not None else urllib.parse.unquote(url.path.removeprefix("/"))
    certs = query.get("tls-certificates", [None])[0]
    cert_dir = Path(certs) if certs else None
    if unix:
        socket = query.get("socket", [None])[0]
        if not socket:
            raise ValueError(f"{text!r}: nbd+unix URIs need ?socket=PATH")
        return Target(unix_path=socket, export=name, tls=tls, cert_dir=cert_dir)
    if not url.hostname:
        raise ValueError(f"{text!r}: no host")
    return Target(
        host=url.hostname, port=url.port or DEFAULT_PORT, export=name, tls=tls, cert_dir=cert_dir
    )
