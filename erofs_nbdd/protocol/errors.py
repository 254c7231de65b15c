"""Protocol errors, in the two kinds h11 taught us: our mistake (Local) or the peer's (Remote).

After either, the state machine that raised it is in its ERROR state and the connection must be
dropped: these are the violations after which the byte stream cannot be trusted.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: the connection cannot continue."""


class LocalProtocolError(ProtocolError):
    """We (the code driving the machine) asked for something the protocol forbids here."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something after which the stream cannot be parsed or trusted."""
