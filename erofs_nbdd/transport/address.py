"""``HOST:PORT`` and ``[V6]:PORT``, as both the server's --listen and the client's SERVER
take them."""

from __future__ import annotations


def split_host_port(text: str) -> tuple[str, str]:
    """(host, port text), either possibly empty; IPv6 addresses must be in brackets."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, ""
    if ":" in host:
        raise ValueError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    return host, port


def parse_port(text: str, port_text: str, default: int, *, allow_zero: bool) -> int:
    if not port_text:
        return default
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: the port must be a number") from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{text!r}: the port must be {low}..65535")
    return port
