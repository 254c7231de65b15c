"""How a connection ends: the exceptions that end it, and the counters of its log line."""

from __future__ import annotations

from dataclasses import dataclass


class ClientGone(Exception):
    """The client closed or reset the connection."""


class LimitExceeded(Exception):
    """The client broke a server limit; it is disconnected and the limit logged."""


class ReplyTimeout(LimitExceeded):
    """Replies waited and the client read none of them whole for the reply timeout."""


class Refused(Exception):
    """The client was turned away (TLS failed or was skipped); worth a warning."""


class ImageFailed(Exception):
    """The image ended early or failed to read after a reply's header was sent from it;
    the reply cannot be finished, so the connection is closed (the server goes on)."""


@dataclass
class Stats:
    export: str = "-"
    requests: int = 0
    bytes_read: int = 0
    errors: int = 0
    tls: str = "-"
    client: str = "-"
    ended: str = "closed"
