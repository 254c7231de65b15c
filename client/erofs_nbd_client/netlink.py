"""The kernel's generic-netlink ``nbd`` family, behind a small typed interface.

pyroute2 lives in this module only. Its sync sockets keep thread-local state, so every call
here opens, uses and closes its socket inside one function: callers run that function in a
worker thread (``trio.to_thread.run_sync``), never on the event loop. Attribute and command
numbers come from include/uapi/linux/nbd-netlink.h (DESIGN.md section 3).
"""

from __future__ import annotations

import enum
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

FAMILY = "nbd"
MULTICAST_GROUP = "nbd_mc_group"


class GenlCmd(enum.IntEnum):
    CONNECT = 1
    DISCONNECT = 2
    RECONFIGURE = 3
    LINK_DEAD = 4
    STATUS = 5


class ClientFlag(enum.IntFlag):
    DESTROY_ON_DISCONNECT = 1 << 0
    DISCONNECT_ON_CLOSE = 1 << 1


class nbd_msg(genlmsg):
    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):
        prefix = "NBD_SOCK_"
        nla_map = (("NBD_SOCK_ITEM_UNSPEC", "none"), ("NBD_SOCK_ITEM", "sock_item"))

        class sock_item(nla):
            prefix = "NBD_SOCK_"
            nla_map = (("NBD_SOCK_UNSPEC", "none"), ("NBD_SOCK_FD", "uint32"))

    class device_list(nla):
        prefix = "NBD_DEVICE_"
        nla_map = (("NBD_DEVICE_ITEM_UNSPEC", "none"), ("NBD_DEVICE_ITEM", "device_item"))

        class device_item(nla):
            prefix = "NBD_DEVICE_"
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


class NetlinkUnavailable(OSError):
    """The kernel has no ``nbd`` generic-netlink family (module not loaded, or too old)."""


class KernelRefused(OSError):
    """The kernel answered a request with an error (errno and a hint in the message)."""


@dataclass(frozen=True)
class ConnectRequest:
    size: int
    block_size: int
    server_flags: int
    sockets: tuple[int, ...]
    timeout: int
    dead_conn_timeout: int
    backend_identifier: str
    client_flags: int = 0
    index: int | None = None  # None: the kernel picks a free device


@dataclass(frozen=True)
class DeviceStatus:
    index: int
    connected: bool


def _sockets(fds: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    items = [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", fd)]}) for fd in fds]
    return ("NBD_ATTR_SOCKETS", {"attrs": items})


def _request(cmd: GenlCmd, attrs: list[tuple[str, Any]]) -> list[Any]:
    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind(FAMILY, nbd_msg)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                raise NetlinkUnavailable(
                    errno.ENOENT, "the kernel has no 'nbd' netlink family (run: modprobe nbd)"
                ) from None
            raise
        msg = nbd_msg()
        msg["cmd"] = cmd
        msg["version"] = 1
        msg["attrs"] = attrs
        try:
            return list(
                sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
            )
        except NetlinkError as exc:
            raise KernelRefused(
                exc.code, f"NBD {cmd.name} refused: {_explain(cmd, exc.code)}"
            ) from None
    finally:
        sock.close()


def _explain(cmd: GenlCmd, code: int) -> str:
    name = errno.errorcode.get(code, str(code))
    hints = {
        errno.EPERM: "needs root (CAP_SYS_ADMIN)",
        errno.EBUSY: "the device is already in use",
        errno.EINVAL: "invalid settings (block size, socket count, or backend identifier)",
        errno.ENOENT: "no such device",
    }
    return f"{name}: {hints.get(code, 'see the kernel log (dmesg)')}"


def family_available() -> bool:
    """True when the ``nbd`` family is registered (blocking: call from a thread)."""
    try:
        _request(GenlCmd.STATUS, [])
    except NetlinkUnavailable:
        return False
    return True


def connect(req: ConnectRequest) -> int:
    """NBD_CMD_CONNECT; returns the device index. The kernel takes its own reference on each
    socket, so the caller closes its fds afterwards."""
    attrs: list[tuple[str, Any]] = [
        ("NBD_ATTR_SIZE_BYTES", req.size),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", req.block_size),
        ("NBD_ATTR_SERVER_FLAGS", req.server_flags),
        ("NBD_ATTR_CLIENT_FLAGS", req.client_flags),
        ("NBD_ATTR_TIMEOUT", req.timeout),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", req.dead_conn_timeout),
        ("NBD_ATTR_BACKEND_IDENTIFIER", req.backend_identifier),
        _sockets(req.sockets),
    ]
    if req.index is not None:
        attrs.insert(0, ("NBD_ATTR_INDEX", req.index))
    for reply in _request(GenlCmd.CONNECT, attrs):
        index = reply.get_attr("NBD_ATTR_INDEX")
        if index is not None:
            return int(index)
    raise KernelRefused(errno.EIO, "NBD CONNECT: the kernel sent no device index")


def reconfigure(
    index: int,
    backend_identifier: str,
    *,
    sockets: tuple[int, ...] = (),
    client_flags: int | None = None,
) -> None:
    """NBD_CMD_RECONFIGURE: new sockets replace dead ones; client flags can change."""
    attrs: list[tuple[str, Any]] = [
        ("NBD_ATTR_INDEX", index),
        ("NBD_ATTR_BACKEND_IDENTIFIER", backend_identifier),
    ]
    if client_flags is not None:
        attrs.append(("NBD_ATTR_CLIENT_FLAGS", client_flags))
    if sockets:
        attrs.append(_sockets(sockets))
    _request(GenlCmd.RECONFIGURE, attrs)


def disconnect(index: int) -> None:
    _request(GenlCmd.DISCONNECT, [("NBD_ATTR_INDEX", index)])


def status(index: int | None = None) -> list[DeviceStatus]:
    attrs: list[tuple[str, Any]] = [] if index is None else [("NBD_ATTR_INDEX", index)]
    out = []
    for reply in _request(GenlCmd.STATUS, attrs):
        devices = reply.get_attr("NBD_ATTR_DEVICE_LIST")
        if devices is None:
            continue
        for item in devices.get_attrs("NBD_DEVICE_ITEM"):
            out.append(
                DeviceStatus(
                    int(item.get_attr("NBD_DEVICE_INDEX")),
                    bool(item.get_attr("NBD_DEVICE_CONNECTED")),
                )
            )
    return out


# --- multicast: the kernel announces a dead link (not a requested disconnect) ----------------

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_GENERIC = 16
_NLMSGHDR = struct.Struct("=IHHII")


def multicast_group() -> int:
    """The id of ``nbd_mc_group`` (blocking: call from a thread)."""
    sock = GenericNetlinkSocket()
    try:
        try:
            sock.bind(FAMILY, nbd_msg)
        except NetlinkError as exc:
            raise NetlinkUnavailable(exc.code, "no 'nbd' netlink family (modprobe nbd)") from None
        return int(sock.mcast_groups[MULTICAST_GROUP])
    finally:
        sock.close()


def link_dead_socket(group: int) -> socket.socket:
    """A plain netlink socket subscribed to ``group``: reads are LINK_DEAD announcements.
    A plain socket (not pyroute2's) so an event loop can wait on it and close it at will."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    except OSError:
        sock.close()
        raise
    return sock


def parse_link_dead(data: bytes) -> list[int]:
    """Device indexes announced dead in one datagram (which may hold several messages)."""
    out: list[int] = []
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, pos)[0]
        if length < _NLMSGHDR.size or pos + length > len(data):
            break
        msg = nbd_msg(data[pos : pos + length])
        msg.decode()
        if msg["cmd"] == GenlCmd.LINK_DEAD:
            index = msg.get_attr("NBD_ATTR_INDEX")
            if index is not None:
                out.append(int(index))
        pos += (length + 3) & ~3
    return out
