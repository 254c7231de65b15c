"""Exit codes of erofs-nbd-attach/-detach/-list, and the error that carries one."""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILURE = 1  # anything not listed below
    USAGE = 2  # bad arguments, missing mount point
    NOT_ROOT = 3  # netlink CONNECT and mount need root
    NO_KERNEL_SUPPORT = 4  # no nbd module / netlink family, or no erofs
    UNREACHABLE = 5  # cannot connect to the server
    TLS_FAILED = 6  # TLS refused, handshake or certificate failure
    EXPORT_MISSING = 7  # the server has no such export (or refuses it)
    NOT_EROFS = 8  # the export is not an EROFS image
    MOUNT_FAILED = 9
    PROTOCOL_ERROR = 10  # the server broke the NBD protocol
    DEVICE_BUSY = 11  # --device names a device in use
    NOT_ATTACHED = 12  # detach: nothing of ours there


class AttachError(Exception):
    """An error with its exit status; the message names the cause and the fix."""

    def __init__(self, status: ExitStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
