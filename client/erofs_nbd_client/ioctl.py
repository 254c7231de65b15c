"""The old ioctl interface, for kernels whose nbd module has no netlink family (< 4.12).

NBD_DO_IT blocks until the device is disconnected, so a helper process holds it: attach
spawns ``python -m erofs_nbd_client.ioctl DEVICE SIZE BLOCK FLAGS TIMEOUT FD``, which sets the
device up, reports on its status pipe, and sits in NBD_DO_IT. There is no RECONFIGURE here:
a dead connection cannot be replaced, so failover is unavailable on this path.
"""

from __future__ import annotations

import fcntl
import os
import sys

from . import devices

# _IO(0xab, nr) from include/uapi/linux/nbd.h
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A


def free_device() -> int | None:
    """The first /dev/nbdN nobody uses (no pid, size 0)."""
    index = 0
    while os.path.exists(f"/dev/nbd{index}"):
        if not os.path.exists(f"/sys/block/nbd{index}/pid") and devices.size_bytes(index) == 0:
            return index
        index += 1
    return None


def disconnect(index: int) -> None:
    """Ask the kernel to drop the device's connection; NBD_DO_IT in the helper then returns."""
    fd = os.open(f"/dev/nbd{index}", os.O_RDWR)
    try:
        fcntl.ioctl(fd, NBD_DISCONNECT)
        fcntl.ioctl(fd, NBD_CLEAR_QUE)
    finally:
        os.close(fd)


def serve(
    index: int, size: int, block: int, flags: int, timeout: int, sock_fd: int, status_fd: int
) -> int:
    device = os.open(f"/dev/nbd{index}", os.O_RDWR)
    status = os.fdopen(status_fd, "w")
    try:
        fcntl.ioctl(device, NBD_SET_BLKSIZE, block)
        fcntl.ioctl(device, NBD_SET_SIZE_BLOCKS, size // block)
        fcntl.ioctl(device, NBD_SET_FLAGS, flags)
        fcntl.ioctl(device, NBD_SET_TIMEOUT, timeout)
        fcntl.ioctl(device, NBD_SET_SOCK, sock_fd)
    except OSError as exc:
        status.write(f"error {exc}\n")
        status.close()
        return 1
    os.close(sock_fd)  # the kernel holds its own reference
    status.write("ok\n")
    status.close()
    try:
        fcntl.ioctl(device, NBD_DO_IT)  # until NBD_DISCONNECT or the connection dies
    except OSError as exc:
        print(f"ioctl helper: /dev/nbd{index}: {exc}", file=sys.stderr)
    finally:
        try:
            fcntl.ioctl(device, NBD_CLEAR_QUE)
            fcntl.ioctl(device, NBD_CLEAR_SOCK)
        except OSError:
            pass
        os.close(device)
    return 0


if __name__ == "__main__":
    sys.exit(serve(*(int(a) for a in sys.argv[1:8])))
