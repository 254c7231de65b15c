"""Attach: negotiate, hand the sockets to the kernel, mount; detach: undo all of it.

Order matters for "nothing is left behind": everything that can fail without touching the
kernel (server reachable, export present, TLS, EROFS superblock) happens before CONNECT; from
CONNECT on, any failure disconnects the device, stops the helper and removes the record.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import devices, netlink
from .bridge import Helper, start_bridge
from .connect import check_erofs, kernel_block_size, open_connections, socket_of
from .errors import AttachError, ExitStatus

if TYPE_CHECKING:
    import socket

    from .connect import Connection
    from .negotiate import ExportDetails
    from .target import Target

log = logging.getLogger("erofs_nbd_client")

#: Seconds the kernel gives one request before it requeues it on a live connection. The
#: kernel retries a request lost with a dead connection only then (``nbd_xmit_timeout``:
#: ``recv_work`` only marks the socket dead), so this bounds what a crash costs a mounted
#: image; a request a live server takes longer over is retried on a new connection, not
#: failed. Raise it on links too slow to move a full queue (up to 128 requests per
#: connection, 128 KiB each with the default readahead) in this time.
REQUEST_TIMEOUT = 4
#: Seconds I/O waits for a dead connection to be replaced before it fails.
DEAD_TIMEOUT = 300


@dataclass(frozen=True)
class AttachOptions:
    targets: list[Target]  # tried in order; the supervisor fails over along the same list
    mountpoint: str
    connections: int = 1
    timeout: int = REQUEST_TIMEOUT  # seconds the kernel waits for one request
    dead_timeout: int = DEAD_TIMEOUT  # seconds I/O waits on a dead connection before EIO
    mount_options: str = ""
    device: int | None = None
    relay: bool = False  # plain links through a relay too, as TLS ones always are


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise AttachError(
            ExitStatus.NOT_ROOT, f"{what} needs root (netlink NBD commands and mount); use sudo"
        )


async def ensure_kernel_support() -> str:
    """ "netlink", or "ioctl" when the nbd module has no netlink family (kernels < 4.12)."""
    forced = os.environ.get("EROFS_NBD_FORCE_IOCTL") == "1"  # tests of the old path
    if not forced and await trio.to_thread.run_sync(netlink.family_available):
        return "netlink"
    try:
        result = await trio.run_process(["modprobe", "nbd"], check=False, capture_stderr=True)
        detail = result.stderr.decode(errors="replace").strip()
    except FileNotFoundError:
        detail = "no modprobe here: install kmod"
    if not forced and await trio.to_thread.run_sync(netlink.family_available):
        return "netlink"
    if not os.path.exists("/dev/nbd0"):
        raise AttachError(
            ExitStatus.NO_KERNEL_SUPPORT,
            "the kernel has no NBD driver: install or build the 'nbd' module "
            f"(CONFIG_BLK_DEV_NBD) and run modprobe nbd ({detail or 'modprobe failed'})",
        )
    log.warning(
        "the nbd module has no netlink interface (kernel older than 4.12?): using the ioctl "
        "interface; a lost connection cannot be replaced, so failover is unavailable"
    )
    return "ioctl"


async def open_for_kernel(
    target: Target, count: int, targets: list[Target], relay: bool
) -> tuple[list[Connection], Helper | None]:
    """Connections whose kernel side is ready to hand over: the TCP sockets themselves, or
    with TLS (or ``relay``) the socketpair ends a fresh bridge helper relays (resuming
    along ``targets``)."""
    if target.tls or relay:
        helper = await start_bridge(target, count, targets)
        return helper.connections, helper
    return await open_connections(target, count, None), None


async def open_first(
    targets: list[Target], count: int, relay: bool
) -> tuple[Target, list[Connection], Helper | None]:
    """The first target that can be reached; other errors (export missing, TLS) are final."""
    for i, target in enumerate(targets):
        try:
            conns, helper = await open_for_kernel(target, count, targets, relay)
        except AttachError as exc:
            if exc.status is not ExitStatus.UNREACHABLE or i == len(targets) - 1:
                raise
            log.warning("%s; trying the next server", exc)
            continue
        return target, conns, helper
    raise AttachError(ExitStatus.USAGE, "no server given")


async def _ioctl_connect(
    device: int | None, details: ExportDetails, sock: socket.socket, request_timeout: int
) -> tuple[int, int, str]:
    """Set the device up through a holder process sitting in NBD_DO_IT: (index, pid, log)."""
    from . import ioctl
    from .spawn import read_line, reap, spawn

    index = device if device is not None else ioctl.free_device()
    if index is None:
        raise AttachError(ExitStatus.DEVICE_BUSY, "no free /dev/nbdN (modprobe nbd nbds_max=N)")
    devices.RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = devices.RUN_DIR / f"ioctl-nbd{index}.log"
    status_r, status_w = os.pipe()
    block = kernel_block_size(details)
    args = [index, details.size, block, details.flags, request_timeout, sock.fileno(), status_w]
    try:
        pid = spawn(
            "erofs_nbd_client.ioctl", [str(a) for a in args], [sock.fileno(), status_w], log_path
        )
    finally:
        os.close(status_w)
    try:
        line = await trio.to_thread.run_sync(read_line, status_r, 30)
    finally:
        os.close(status_r)
    if line != b"ok":
        reap(pid)
        log_path.unlink(missing_ok=True)
        raise AttachError(
            ExitStatus.FAILURE, f"ioctl set-up of /dev/nbd{index} failed: {line.decode()}"
        )
    return index, pid, str(log_path)


async def _mount(index: int, options: AttachOptions) -> None:
    opts = "ro" + (f",{options.mount_options}" if options.mount_options else "")
    cmd = ["mount", "-t", "erofs", "-o", opts, devices.device_path(index), options.mountpoint]
    result = await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)
    if result.returncode:
        text = result.stderr.decode(errors="replace").strip()
        status = ExitStatus.MOUNT_FAILED
        if "unknown filesystem type" in text:
            status = ExitStatus.NO_KERNEL_SUPPORT
            text += " (load the erofs module: modprobe erofs)"
        raise AttachError(status, f"mount failed: {text}")


async def _wait_for_device(index: int, size: int) -> None:
    with trio.move_on_after(20):
        while devices.size_bytes(index) != size or not devices.is_connected(index):
            await trio.sleep(0.05)
        return
    raise AttachError(ExitStatus.FAILURE, f"/dev/nbd{index} did not come up with {size} bytes")


async def attach(options: AttachOptions) -> devices.Record:
    require_root("erofs-nbd-attach")
    if not os.path.isdir(options.mountpoint):
        raise AttachError(
            ExitStatus.USAGE, f"mount point {options.mountpoint} does not exist (mkdir -p it)"
        )
    if options.device is not None and any(
        s.connected for s in await trio.to_thread.run_sync(netlink.status, options.device)
    ):
        raise AttachError(ExitStatus.DEVICE_BUSY, f"/dev/nbd{options.device} is already in use")
    interface = await ensure_kernel_support()
    backend = f"erofs-nbd-attach:{uuid.uuid4()}"
    target, conns, helper = await open_first(options.targets, options.connections, options.relay)
    if interface == "ioctl" and len(conns) > 1:
        log.warning("the ioctl interface takes one connection; using one")
        for extra in conns[1:]:
            await trio.aclose_forcefully(extra.session.stream)
        conns = conns[:1]
    kernel_socks = [socket_of(c.session.stream) for c in conns]
    pids = [helper.pid] if helper else []
    logs = [helper.log_path] if helper else []
    index: int | None = None
    record: devices.Record | None = None
    mounted = False
    try:
        identity = await check_erofs(conns[0])
        details = conns[0].details
        request = netlink.ConnectRequest(
            size=details.size,
            block_size=kernel_block_size(details),
            server_flags=details.flags,
            sockets=tuple(s.fileno() for s in kernel_socks),
            timeout=options.timeout,
            dead_conn_timeout=options.dead_timeout,
            backend_identifier=backend,
            index=options.device,
        )
        if interface == "ioctl":
            index, holder, holder_log = await _ioctl_connect(
                options.device, details, kernel_socks[0], options.timeout
            )
            pids.append(holder)
            logs.append(holder_log)
        else:
            try:
                index = await trio.to_thread.run_sync(netlink.connect, request)
            except netlink.KernelRefused as exc:
                status = ExitStatus.DEVICE_BUSY if "EBUSY" in str(exc) else ExitStatus.FAILURE
                raise AttachError(status, str(exc)) from exc
        for conn in conns:  # the kernel holds its own references now
            await trio.aclose_forcefully(conn.session.stream)
        await _wait_for_device(index, details.size)
        record = devices.Record(
            index=index,
            backend=backend,
            server=target.describe(),
            export=target.export,
            connections=len(conns),
            mountpoint=os.path.realpath(options.mountpoint),
            size=details.size,
            tls=target.tls,
            cert_dir=str(target.cert_dir) if target.cert_dir else None,
            interface=interface,
            helper_pids=pids,
            helper_logs=logs,
            identity=identity,
            flags=details.flags,
            targets=[t.to_json() for t in options.targets],
            relay=options.relay,
        )
        record.save()
        if interface == "netlink":  # watching before anything can depend on the device
            await start_supervisor(record)
        await _mount(index, options)
        mounted = True
        if interface == "netlink":
            flags = netlink.ClientFlag.DISCONNECT_ON_CLOSE  # a plain umount frees the device
            await trio.to_thread.run_sync(
                lambda: netlink.reconfigure(index, backend, client_flags=flags)
            )
        return record
    except BaseException:
        with trio.CancelScope(shield=True):
            for conn in conns:
                await trio.aclose_forcefully(conn.session.stream)
            if mounted:
                await trio.run_process(["umount", options.mountpoint], check=False)
            await _undo(index, interface, pids, logs)
            if record is not None:
                record.remove()
        raise


#: Seconds a new supervisor gets to report ready (Python starting under an emulated CPU
#: took 8 s here).
SUPERVISOR_READY = 120


async def start_supervisor(record: devices.Record) -> None:
    """The per-device process that replaces dead connections (netlink devices only);
    returns once it listens for the kernel's announcements and has checked the device, so
    no death can fall between attach (or --reattach) returning and the supervisor
    watching: the kernel announces each one once."""
    from .spawn import read_line, spawn

    log_path = devices.RUN_DIR / f"supervisor-nbd{record.index}.log"
    ready_r, ready_w = os.pipe()
    try:
        pid = spawn(
            "erofs_nbd_client.supervisor",
            [str(record.index), str(ready_w)],
            [ready_w],
            log_path,
        )
    finally:
        os.close(ready_w)
    record.helper_pids.append(pid)
    for path in (str(log_path), str(devices.state_path(record.index))):
        if path not in record.helper_logs:
            record.helper_logs.append(path)
    record.save()
    try:
        line = await trio.to_thread.run_sync(read_line, ready_r, SUPERVISOR_READY)
    finally:
        os.close(ready_r)
    if line != b"ready":
        reason = line.decode(errors="replace") or f"no report within {SUPERVISOR_READY} s"
        raise AttachError(
            ExitStatus.FAILURE,
            f"the supervisor of /dev/nbd{record.index} did not start: {reason} (its log: "
            f"{log_path})",
        )


async def _disconnect(index: int, interface: str) -> None:
    """Drop the device's connections and wait (bounded) until the kernel agrees."""
    if devices.is_connected(index):
        try:
            if interface == "ioctl":
                from . import ioctl

                await trio.to_thread.run_sync(ioctl.disconnect, index)
            else:
                await trio.to_thread.run_sync(netlink.disconnect, index)
        except OSError as exc:
            log.warning("could not disconnect /dev/nbd%d: %s", index, exc)
    with trio.move_on_after(10):
        while devices.is_connected(index):
            await trio.sleep(0.05)


async def _undo(index: int | None, interface: str, pids: list[int], logs: list[str]) -> None:
    """Disconnect, stop the helpers, remove their logs: what any failed attach must do."""
    if index is not None:
        await _disconnect(index, interface)
    for pid in pids:
        await stop_process(pid)
    for path in logs:
        Path(path).unlink(missing_ok=True)


async def stop_process(pid: int | None) -> None:
    """SIGTERM, then SIGKILL after 5 s; quiet if it has already gone."""
    if not devices.pid_alive(pid):
        return
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    with trio.move_on_after(5):
        while devices.pid_alive(pid):
            await trio.sleep(0.05)
        return
    os.kill(pid, signal.SIGKILL)


async def reattach(index: int) -> int:
    """A new supervisor from the device's record; the mount keeps working meanwhile."""
    require_root("erofs-nbd-attach --reattach")
    record = devices.load_record(index)
    if record is None or not devices.is_connected(index):
        raise AttachError(ExitStatus.NOT_ATTACHED, f"/dev/nbd{index} is not attached by us")
    if devices.backend_of(index) != record.backend:
        raise AttachError(
            ExitStatus.NOT_ATTACHED,
            f"/dev/nbd{index} belongs to {devices.backend_of(index)!r}, not to its record",
        )
    if record.interface != "netlink":
        raise AttachError(ExitStatus.NO_KERNEL_SUPPORT, "ioctl devices cannot be supervised")
    old = devices.read_state(index).get("pid")
    if isinstance(old, int) and devices.pid_alive(old):
        await stop_process(old)  # an upgrade: the new one takes over
    record.helper_pids = [p for p in record.helper_pids if devices.pid_alive(p)]
    await start_supervisor(record)
    return record.helper_pids[-1]


async def detach(what: str) -> str:
    """Unmount, disconnect, stop the helper, drop the record; returns what was done."""
    require_root("erofs-nbd-detach")
    index = devices.parse_device(what)
    mountpoint: str | None = None
    if index is None:
        mountpoint = os.path.realpath(what)
        index = devices.device_at(mountpoint)
        if index is None:
            raise AttachError(
                ExitStatus.NOT_ATTACHED, f"{what} is not a mounted NBD device (erofs-nbd-list)"
            )
    else:
        mountpoint = devices.mountpoint_of(index)
    record = devices.load_record(index)
    if record is None and not devices.is_connected(index) and mountpoint is None:
        raise AttachError(ExitStatus.NOT_ATTACHED, f"/dev/nbd{index} is not attached")
    if mountpoint is not None:
        result = await trio.run_process(
            ["umount", mountpoint], check=False, capture_stdout=True, capture_stderr=True
        )
        if result.returncode:
            text = result.stderr.decode(errors="replace").strip()
            raise AttachError(
                ExitStatus.FAILURE, f"umount {mountpoint} failed: {text} (in use? see fuser -m)"
            )
    # with DISCONNECT_ON_CLOSE the umount has usually disconnected it already
    if record is None:
        await _undo(index, "netlink", [], [])
    else:
        await _undo(index, record.interface, record.helper_pids, record.helper_logs)
        record.remove()
    return f"/dev/nbd{index}" + (f" (was mounted on {mountpoint})" if mountpoint else "")
