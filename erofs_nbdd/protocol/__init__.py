"""Sans-IO NBD: the wire format and the handshake and transmission state machines of both
sides. Standard library only, no I/O, no logging: the server and the attach client drive it."""

from .client_handshake import ClientHandshake
from .constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_PAYLOAD,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import NEED_DATA
from .handshake import Negotiated, State
from .server_handshake import ServerHandshake
from .transmission import ClientTransmission, ExportLimits, ServerTransmission, check_request

__all__ = [
    "BASE_ALLOCATION",
    "DEFAULT_MAX_PAYLOAD",
    "NEED_DATA",
    "ClientFlag",
    "ClientHandshake",
    "ClientTransmission",
    "Cmd",
    "CmdFlag",
    "Errno",
    "ExportLimits",
    "HandshakeFlag",
    "Info",
    "LocalProtocolError",
    "Negotiated",
    "Opt",
    "ProtocolError",
    "RemoteProtocolError",
    "Rep",
    "ReplyType",
    "ServerHandshake",
    "ServerTransmission",
    "State",
    "StateFlag",
    "TransmissionFlag",
    "check_request",
]
