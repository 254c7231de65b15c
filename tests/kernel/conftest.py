"""Kernel-level fixtures: the nbd and erofs modules, servers on loopback, and the attach CLI."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from erofs_nbd_client import devices, netlink
from erofs_nbd_client.devices import RUN_DIR

from ..conftest import require_tool
from ..interop.conftest import RunningServer, start_server_process, stop_server_process

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def kernel_modules() -> None:
    if os.environ.get("VMRUN_GUEST") != "1" or os.geteuid() != 0:
        pytest.fail("kernel tests run as root inside the VM: python tests/vm/vmrun.py -- ...")
    subprocess.run(["modprobe", "nbd", "nbds_max=16"], check=True)
    subprocess.run(["modprobe", "erofs"], check=True)
    subprocess.run(["modprobe", "tls"], check=True)  # every TLS server here uses kernel TLS
    # What udev loads at boot on a real host with AES-NI; without it (no udev in the VM)
    # kernel TLS would encrypt with the generic C AES-GCM, unlike anywhere it is deployed.
    subprocess.run(["modprobe", "-a", "aesni_intel", "ghash_clmulni_intel"], check=False)
    assert netlink.family_available()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(
    name: str,
    *args: str,
    user: int | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> Result:
    """One of our console scripts, as a real process (as ``user``, with ``env`` added)."""
    proc = subprocess.run(
        [str(BIN / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        user=user,
        group=user,
        env={**os.environ, **(env or {})},
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def connected_devices() -> list[int]:
    return [s.index for s in netlink.status() if s.connected]


def our_helpers() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "erofs_nbd_client." in line]


def assert_nothing_left() -> None:
    """No device connected, no helper running, no record or log in the run directory."""
    deadline = time.monotonic() + 15
    while (connected_devices() or our_helpers()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert connected_devices() == []
    assert our_helpers() == []
    leftovers = sorted(p.name for p in RUN_DIR.glob("*")) if RUN_DIR.exists() else []
    assert leftovers == []


def tree_digest(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root``: (kind, mode bits, sha256 or link target or size)."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", stat.S_IMODE(st.st_mode), os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), "")
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), f"{st.st_size}:{digest}")
    return out


def wait_state(
    index: int,
    timeout: float = 120,
    min_reconnects: int = 0,
    not_pid: int | None = None,
    **want: object,
) -> dict[str, object]:
    """The supervisor's published state once it matches (rounds may coalesce deaths, so
    reconnects are counted as a minimum; ``not_pid`` waits out a replaced supervisor)."""
    deadline = time.monotonic() + timeout
    while True:
        state = devices.read_state(index)
        reconnects = state.get("reconnects", 0)
        assert isinstance(reconnects, int)
        fresh = not_pid is None or state.get("pid") not in (None, not_pid)
        if (
            fresh
            and reconnects >= min_reconnects
            and all(state.get(k) == v for k, v in want.items())
        ):
            return state
        assert time.monotonic() < deadline, f"supervisor state {state}, wanted {want}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def certs(made_certs: Path) -> Path:
    return made_certs


@pytest.fixture(scope="session")
def plain_server(images: Path) -> Iterator[RunningServer]:
    server = start_server_process(images)
    yield server
    assert stop_server_process(server) == 0


@pytest.fixture(scope="session")
def tls_server(images: Path, certs: Path) -> Iterator[RunningServer]:
    server = start_server_process(
        images, "--tls", "require", "--tls-certificates", str(certs), "--tls-verify-peer"
    )
    yield server
    assert stop_server_process(server) == 0


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    mp = tmp_path / "mnt"
    mp.mkdir()
    yield mp
    # A failed test must leave nothing behind for the next: no mount, device, helper,
    # record or log (what is left is printed first, for the failure's report).
    if os.path.ismount(mp):
        subprocess.run(["umount", "-l", str(mp)], check=False)
    left = {*connected_devices(), *(r.index for r in devices.all_records())}
    for index in sorted(left):
        subprocess.run([str(BIN / "erofs-nbd-detach"), f"/dev/nbd{index}"], check=False)
    for path in sorted(RUN_DIR.glob("*")) if RUN_DIR.exists() else []:
        print(f"left behind: {path}:\n{path.read_text(errors='replace')[-4000:]}")
        path.unlink()


def start_peer(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    """A server nobody here wrote, listening on 127.0.0.1:port."""
    import socket

    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{cmd[0]} did not start: {process.communicate()[1].decode()}")
        time.sleep(0.1)


__all__ = [
    "Result",
    "assert_nothing_left",
    "cli",
    "require_tool",
    "start_peer",
    "tree_digest",
    "wait_state",
]
