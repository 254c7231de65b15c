"""erofs-nbd-attach against the real kernel: mount, compare every file, detach, nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from erofs_nbd_client.errors import ExitStatus

from .conftest import assert_nothing_left, cli, require_tool, start_peer, tree_digest

if TYPE_CHECKING:
    from ..interop.conftest import RunningServer


def attach_and_check(
    uri: str, mountpoint: Path, source: Path, *extra: str, env: dict[str, str] | None = None
) -> dict[str, object]:
    result = cli("erofs-nbd-attach", uri, str(mountpoint), *extra, env=env)
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(cli("erofs-nbd-list", "--json").stdout)
    (row,) = [r for r in listed if r["mountpoint"] == str(mountpoint)]
    assert row["state"] == "connected"
    assert tree_digest(mountpoint) == tree_digest(source)
    with pytest.raises(OSError, match="Read-only file system"):
        (mountpoint / "new-file").write_text("x")
    detached = cli("erofs-nbd-detach", str(mountpoint))
    assert detached.returncode == 0, detached.stderr
    assert not os.path.ismount(mountpoint)
    assert_nothing_left()
    return row


@pytest.mark.parametrize("connections", [1, 4])
def test_attach_our_server(
    plain_server: RunningServer, mountpoint: Path, source_tree: Path, connections: int
) -> None:
    row = attach_and_check(
        plain_server.uri("team/app-v2"), mountpoint, source_tree, "--connections", str(connections)
    )
    assert row["connections"] == connections
    assert row["tls"] is False


@pytest.mark.parametrize("connections", [1, 4])
def test_attach_our_server_over_tls(
    tls_server: RunningServer, certs: Path, mountpoint: Path, source_tree: Path, connections: int
) -> None:
    uri = f"nbds://{tls_server.address}/demo"
    row = attach_and_check(
        uri,
        mountpoint,
        source_tree,
        "--connections",
        str(connections),
        "--tls-certificates",
        str(certs / "clients" / "alice"),
    )
    assert row["connections"] == connections
    assert row["tls"] is True
    assert "CN=alice" in tls_server.log_text()
    assert "+ktls" in tls_server.log_text()  # the server's replies were encrypted by the kernel


@pytest.mark.parametrize("tls", [False, True])
def test_ioctl_fallback(
    plain_server: RunningServer,
    tls_server: RunningServer,
    certs: Path,
    mountpoint: Path,
    source_tree: Path,
    tls: bool,
) -> None:
    """Kernels without the netlink family: the ioctl interface, one connection, and a warning
    that failover is unavailable (forced here: this kernel has netlink)."""
    uri = f"nbds://{tls_server.address}/demo" if tls else plain_server.uri("demo")
    extra = ["--tls-certificates", str(certs / "clients" / "alice")] if tls else []
    force = {"EROFS_NBD_FORCE_IOCTL": "1"}
    result = cli("erofs-nbd-attach", uri, str(mountpoint), "--connections", "2", *extra, env=force)
    assert result.returncode == 0, result.stderr
    assert "failover is unavailable" in result.stderr
    listed = json.loads(cli("erofs-nbd-list", "--json").stdout)
    (row,) = listed
    assert row["interface"] == "ioctl"
    assert row["connections"] == 1
    assert len(row["helper_pids"]) == (2 if tls else 1)
    assert tree_digest(mountpoint) == tree_digest(source_tree)
    assert cli("erofs-nbd-detach", str(mountpoint)).returncode == 0
    assert not os.path.ismount(mountpoint)
    assert_nothing_left()


def test_attach_nbdkit(images: Path, mountpoint: Path, source_tree: Path) -> None:
    nbdkit = start_peer(
        [
            require_tool("nbdkit"),
            "-f",
            "-r",
            "-i",
            "127.0.0.1",
            "-p",
            "10901",
            "file",
            str(images / "demo.erofs"),
        ],
        10901,
    )
    try:
        attach_and_check("nbd://127.0.0.1:10901/", mountpoint, source_tree, "--connections", "2")
    finally:
        nbdkit.terminate()
        nbdkit.communicate(timeout=10)


def test_attach_qemu_nbd(images: Path, mountpoint: Path, source_tree: Path) -> None:
    qemu = start_peer(
        [
            require_tool("qemu-nbd"),
            "-r",
            "-b",
            "127.0.0.1",
            "-p",
            "10902",
            "-f",
            "raw",
            "-x",
            "img",
            "-e",
            "4",
            "-t",
            str(images / "team" / "app-v2.erofs"),
        ],
        10902,
    )
    try:
        attach_and_check("nbd://127.0.0.1:10902/img", mountpoint, source_tree)
    finally:
        qemu.terminate()
        qemu.communicate(timeout=10)


def test_unknown_export(plain_server: RunningServer, mountpoint: Path) -> None:
    result = cli("erofs-nbd-attach", plain_server.uri("no/such"), str(mountpoint))
    assert result.returncode == ExitStatus.EXPORT_MISSING
    assert "no export named 'no/such'" in result.stderr
    assert_nothing_left()


def test_not_erofs(tmp_path: Path, mountpoint: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    nbdkit = start_peer(
        [require_tool("nbdkit"), "-f", "-r", "-i", "127.0.0.1", "-p", "10903", "file", str(junk)],
        10903,
    )
    try:
        result = cli("erofs-nbd-attach", "nbd://127.0.0.1:10903/", str(mountpoint))
    finally:
        nbdkit.terminate()
        nbdkit.communicate(timeout=10)
    assert result.returncode == ExitStatus.NOT_EROFS
    assert "not an EROFS image" in result.stderr
    assert_nothing_left()


def test_server_down(mountpoint: Path) -> None:
    result = cli("erofs-nbd-attach", "127.0.0.1:10999", str(mountpoint))
    assert result.returncode == ExitStatus.UNREACHABLE
    assert "is the server running" in result.stderr
    assert_nothing_left()


def test_missing_mountpoint(plain_server: RunningServer, tmp_path: Path) -> None:
    result = cli("erofs-nbd-attach", plain_server.uri("demo"), str(tmp_path / "nope"))
    assert result.returncode == ExitStatus.USAGE
    assert "does not exist" in result.stderr
    assert_nothing_left()


def test_not_root(plain_server: RunningServer, mountpoint: Path) -> None:
    # let uid 65534 reach the interpreter (this changes only the guest's throw-away overlay)
    for path in {*Path(os.path.realpath(sys.executable)).parents, *Path(sys.executable).parents}:
        path.chmod(path.stat().st_mode | 0o055)
    result = cli("erofs-nbd-attach", plain_server.uri("demo"), str(mountpoint), user=65534)
    assert result.returncode == ExitStatus.NOT_ROOT
    assert "needs root" in result.stderr
    assert_nothing_left()


def test_tls_required_but_not_used(tls_server: RunningServer, mountpoint: Path) -> None:
    result = cli("erofs-nbd-attach", tls_server.uri("demo"), str(mountpoint))
    assert result.returncode == ExitStatus.TLS_FAILED
    assert "requires TLS" in result.stderr
    assert_nothing_left()


def test_tls_without_client_certificate(
    tls_server: RunningServer, certs: Path, mountpoint: Path, tmp_path: Path
) -> None:
    anonymous = tmp_path / "anon"
    anonymous.mkdir()
    (anonymous / "ca-cert.pem").write_bytes((certs / "ca-cert.pem").read_bytes())
    uri = f"nbds://{tls_server.address}/demo?tls-certificates={anonymous}"
    result = cli("erofs-nbd-attach", uri, str(mountpoint))
    assert result.returncode == ExitStatus.TLS_FAILED
    assert "client certificate" in result.stderr
    assert_nothing_left()


def test_mount_failure_disconnects(plain_server: RunningServer, mountpoint: Path) -> None:
    result = cli("erofs-nbd-attach", plain_server.uri("demo"), str(mountpoint), "-o", "bogus=1")
    assert result.returncode == ExitStatus.MOUNT_FAILED
    assert "mount failed" in result.stderr
    assert_nothing_left()


def test_detach_of_something_not_attached(mountpoint: Path) -> None:
    result = cli("erofs-nbd-detach", str(mountpoint))
    assert result.returncode == ExitStatus.NOT_ATTACHED
    result = cli("erofs-nbd-detach", "/dev/nbd15")
    assert result.returncode == ExitStatus.NOT_ATTACHED


def test_plain_umount_frees_the_device(plain_server: RunningServer, mountpoint: Path) -> None:
    """DISCONNECT_ON_CLOSE: someone who only knows umount still frees the device."""
    assert cli("erofs-nbd-attach", plain_server.uri("demo"), str(mountpoint)).returncode == 0
    subprocess.run(["umount", str(mountpoint)], check=True)
    listed = json.loads(cli("erofs-nbd-list", "--json").stdout)
    assert all(r["state"] != "connected" for r in listed)
    assert cli("erofs-nbd-detach", listed[0]["device"]).returncode == 0  # drops the record
    assert_nothing_left()
