"""What the system says about NBD devices (sysfs, mountinfo) and what attach recorded.

A record per device lives in /run/erofs-nbd/nbdN.json (0600): where the device's data comes
from, its mount point and its helper process, so detach and list (and later reattach) work
from any shell. Records hold paths and names, never secrets.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_DIR = Path(os.environ.get("EROFS_NBD_RUN_DIR", "/run/erofs-nbd"))
SYS_BLOCK = Path("/sys/block")


@dataclass
class Record:
    index: int
    backend: str
    server: str
    export: str
    connections: int
    mountpoint: str
    size: int
    tls: bool = False
    cert_dir: str | None = None
    interface: str = "netlink"  # or "ioctl" (no failover possible)
    helper_pids: list[int] = field(default_factory=list)  # bridge, ioctl holder, supervisor
    helper_logs: list[str] = field(default_factory=list)  # their files, removed on detach
    identity: str = ""  # what a reconnect must find again (attach.check_erofs)
    flags: int = 0
    targets: list[dict[str, object]] = field(default_factory=list)  # the failover list
    relay: bool = False  # plain links relayed too (--relay), not only TLS ones
    attached_at: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return RUN_DIR / f"nbd{self.index}.json"

    def save(self) -> None:
        RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def state_path(index: int) -> Path:
    """Where a device's supervisor publishes its state for erofs-nbd-list."""
    return RUN_DIR / f"nbd{index}.state.json"


def read_state(index: int) -> dict[str, object]:
    try:
        data = json.loads(state_path(index).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(index: int, **state: object) -> None:
    RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = state_path(index).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path(index))


def load_record(index: int) -> Record | None:
    try:
        data = json.loads((RUN_DIR / f"nbd{index}.json").read_text())
        return Record(**data)
    except (OSError, ValueError, TypeError):
        return None


def all_records() -> list[Record]:
    out = []
    for path in sorted(RUN_DIR.glob("nbd*.json")):
        try:
            out.append(Record(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return out


def note_relayed(helper_pid: int, server: str) -> None:
    """A relay in helper process ``helper_pid`` resumed on ``server``: the record of its
    device says so, for erofs-nbd-list (the helper starts before its device has a number,
    so it is found by the pid the record keeps)."""
    for record in all_records():
        if helper_pid in record.helper_pids and record.server != server:
            record.server = server
            record.save()


def device_path(index: int) -> str:
    return f"/dev/nbd{index}"


def parse_device(text: str) -> int | None:
    """The index in ``/dev/nbdN`` or ``nbdN``; None for anything else."""
    name = text.removeprefix("/dev/")
    if name.startswith("nbd") and name[3:].isdigit():
        return int(name[3:])
    return None


def size_bytes(index: int) -> int:
    try:
        return int((SYS_BLOCK / f"nbd{index}" / "size").read_text()) * 512
    except (OSError, ValueError):
        return 0


def is_connected(index: int) -> bool:
    """sysfs has ``pid`` while a device is connected, by netlink or by ioctl."""
    return (SYS_BLOCK / f"nbd{index}" / "pid").exists()


def backend_of(index: int) -> str | None:
    try:
        return (SYS_BLOCK / f"nbd{index}" / "backend").read_text().strip() or None
    except OSError:
        return None


def mounts() -> list[tuple[str, str]]:
    """(source, mount point) pairs from /proc/self/mountinfo, octal escapes decoded."""
    with open("/proc/self/mountinfo", "rb") as f:
        return parse_mountinfo(f.read())


def parse_mountinfo(data: bytes) -> list[tuple[str, str]]:
    """(source, mount point) pairs from mountinfo's bytes, which the kernel writes unencoded."""
    out = []
    for line in data.split(b"\n"):
        if not line:
            continue
        fields = line.split(b" ")  # only " \t\n\\" are escaped: a name may hold \r or \f
        sep = fields.index(b"-")
        out.append((_unescape(fields[sep + 2]), _unescape(fields[4])))
    return out


_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")


def _unescape(raw: bytes) -> str:
    """Undo the kernel's octal escapes (space, tab, newline, backslash) on the bytes, then
    decode UTF-8 keeping other bytes as surrogates, as Python decodes file names, so the
    result equals what os.path.realpath gives for the same path."""
    return _OCTAL.sub(lambda m: bytes([int(m[1], 8)]), raw).decode("utf-8", "surrogateescape")


def mountpoint_of(index: int) -> str | None:
    for source, mountpoint in mounts():
        if source == device_path(index):
            return mountpoint
    return None


def device_at(mountpoint: str) -> int | None:
    target = os.path.realpath(mountpoint)
    for source, mp in mounts():
        if mp == target:
            return parse_device(source)
    return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
