"""The attach client's parts that need no kernel: SERVER parsing, block sizes, records, and
what it says on a machine without the NBD driver (this host has none)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import erofs_nbd_client
from erofs_nbd_client import devices, netlink
from erofs_nbd_client.connect import kernel_block_size
from erofs_nbd_client.errors import ExitStatus
from erofs_nbd_client.negotiate import ExportDetails
from erofs_nbd_client.target import Target, parse_target

from ..interop.conftest import start_server_process, stop_server_process


@pytest.mark.parametrize(
    ("text", "export", "target"),
    [
        ("host:1234", None, Target(host="host", port=1234)),
        ("host", "img", Target(host="host", port=10809, export="img")),
        ("[::1]:99", None, Target(host="::1", port=99)),
        ("nbd://h/team/app-v2", None, Target(host="h", export="team/app-v2")),
        ("nbd://h:7/x", "y", Target(host="h", port=7, export="y")),
        ("nbd://[::1]:7/x%20y", None, Target(host="::1", port=7, export="x y")),
        (
            "nbds://h/x?tls-certificates=/p",
            None,
            Target(host="h", export="x", tls=True, cert_dir=Path("/p")),
        ),
        ("nbd+unix:///x?socket=/run/s", None, Target(unix_path="/run/s", export="x")),
        ("nbds+unix:///?socket=/s", None, Target(unix_path="/s", tls=True)),
    ],
)
def test_parse_target(text: str, export: str | None, target: Target) -> None:
    assert parse_target(text, export=export) == target


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("http://h/x", "scheme"),
        ("nbd+unix:///x", "socket=PATH"),
        ("::1:80", r"\[ADDR\]"),
        ("h:0", "1..65535"),
        ("h:x", "number"),
        (":80", "no host"),
    ],
)
def test_parse_target_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_target(text)


def test_describe_round_trips() -> None:
    for text in ["nbd://h:1/x", "nbds://[::1]:2/y", "nbd+unix:///z?socket=/s"]:
        assert parse_target(text).describe() == text


@pytest.mark.parametrize(
    ("block_size", "expect"),
    [
        (None, 4096),
        ((512, 4096, 1 << 25), 4096),
        ((512, 512, 0), 512),
        ((512, 1 << 16, 0), 4096),
        ((1024, 512, 0), 1024),
        ((1, 3000, 0), 4096),
    ],
)
def test_kernel_block_size(block_size: tuple[int, int, int] | None, expect: int) -> None:
    assert os.sysconf("SC_PAGE_SIZE") == 4096
    assert kernel_block_size(ExportDetails("x", block_size=block_size)) == expect


def test_records_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "RUN_DIR", tmp_path / "run")
    record = devices.Record(
        index=3,
        backend="b",
        server="nbd://h/x",
        export="x",
        connections=2,
        mountpoint="/m",
        size=4096,
    )
    record.save()
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    assert record.path.stat().st_mode & 0o777 == 0o600
    assert devices.load_record(3) == record
    assert devices.all_records() == [record]
    record.remove()
    assert devices.load_record(3) is None


def test_a_relay_that_moved_updates_its_devices_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge does not know its device's number: the record that lists its pid is
    the one that now names the server its relay resumed on, and no other."""
    monkeypatch.setattr(devices, "RUN_DIR", tmp_path / "run")
    for index, pids in ((1, [111, 112]), (2, [222])):
        devices.Record(
            index=index,
            backend="b",
            server="nbds://a/x",
            export="x",
            connections=1,
            mountpoint="/m",
            size=1,
            helper_pids=pids,
        ).save()
    devices.note_relayed(111, "nbds://b/x")
    assert [(r.index, r.server) for r in devices.all_records()] == [
        (1, "nbds://b/x"),
        (2, "nbds://a/x"),
    ]


@pytest.mark.parametrize(
    ("text", "index"),
    [("/dev/nbd3", 3), ("nbd12", 12), ("/dev/sda", None), ("/mnt", None), ("nbdx", None)],
)
def test_parse_device(text: str, index: int | None) -> None:
    assert devices.parse_device(text) == index


@pytest.mark.parametrize(
    ("escape", "char"), [(b"\\040", " "), (b"\\011", "\t"), (b"\\012", "\n"), (b"\\134", "\\")]
)
def test_mountinfo_non_ascii_with_escapes(escape: bytes, char: str, tmp_path: Path) -> None:
    """The kernel escapes four bytes and writes the rest raw: café's UTF-8 must survive."""
    where = os.fsencode(tmp_path) + "/café".encode() + escape + b"x"
    data = (
        b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        b"36 27 43:0 / " + where + b" ro,relatime shared:1 - erofs /dev/nbd0 ro\n"
    )
    mountpoint = str(tmp_path / f"café{char}x")
    assert devices.parse_mountinfo(data) == [("proc", "/proc"), ("/dev/nbd0", mountpoint)]
    os.mkdir(mountpoint)  # what detach compares it with
    assert os.path.realpath(mountpoint) == mountpoint


def test_mountinfo_keeps_bytes_that_are_not_utf8() -> None:
    line = b"36 27 43:0 / /mnt/\xe9\\040x ro - erofs /dev/nbd0 ro\n"
    assert devices.parse_mountinfo(line) == [("/dev/nbd0", os.fsdecode(b"/mnt/\xe9 x"))]


def test_mounts_reads_this_machine() -> None:
    assert "/" in [mountpoint for _, mountpoint in devices.mounts()]


def attach_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "erofs_nbd_client", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_usage_errors(tmp_path: Path) -> None:
    result = attach_cli("http://x/y", str(tmp_path))
    assert result.returncode == ExitStatus.USAGE
    assert "scheme" in result.stderr
    result = attach_cli("h:1", str(tmp_path), "--connections", "99")
    assert result.returncode == ExitStatus.USAGE
    result = attach_cli("h:1", str(tmp_path), "--device", "/dev/sda")
    assert result.returncode == ExitStatus.USAGE


@pytest.mark.parametrize("modprobe", [True, False], ids=["modprobe", "no-modprobe"])
def test_no_nbd_driver_is_named(images: Path, tmp_path: Path, modprobe: bool) -> None:
    """On this host (no nbd module): a clear error naming the module, before any socket
    reaches the kernel, and nothing left behind; also where modprobe itself is missing (a
    minimal container: no kmod)."""
    if os.geteuid() != 0 or os.path.exists("/dev/nbd0"):
        pytest.fail("needs root on a host without the NBD driver (as ./setup.sh test runs)")
    env = None if modprobe else {**os.environ, "PATH": str(tmp_path / "empty")}
    server = start_server_process(images)
    try:
        result = attach_cli(server.uri("demo"), str(tmp_path), env=env)
    finally:
        assert stop_server_process(server) == 0
    assert result.returncode == ExitStatus.NO_KERNEL_SUPPORT, result.stderr
    assert "nbd" in result.stderr
    assert "modprobe" in result.stderr
    if not modprobe:
        assert "install kmod" in result.stderr, result.stderr
    assert not os.path.ismount(tmp_path)


def test_parse_link_dead_ignores_other_commands() -> None:
    msg = netlink.nbd_msg()
    msg["cmd"] = netlink.GenlCmd.STATUS
    msg["version"] = 1
    msg["attrs"] = [("NBD_ATTR_INDEX", 3)]
    msg.encode()
    assert netlink.parse_link_dead(bytes(msg.data)) == []
    msg = netlink.nbd_msg()
    msg["cmd"] = netlink.GenlCmd.LINK_DEAD
    msg["version"] = 1
    msg["attrs"] = [("NBD_ATTR_INDEX", 7)]
    msg.encode()
    assert netlink.parse_link_dead(bytes(msg.data) * 2) == [7, 7]


def test_client_modules_import_one_another_without_a_cycle() -> None:
    """Counting imports inside functions too: a cycle hidden in a lazy import is one still
    (connect.py used to import the bridge that imports it)."""
    package = Path(erofs_nbd_client.__file__).parent
    modules = {path.stem: ast.parse(path.read_text()) for path in package.glob("*.py")}
    imports: dict[str, set[str]] = {}
    for name, tree in modules.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.removeprefix("erofs_nbd_client."))
        imports[name] = {m.partition(".")[0] for m in found} & modules.keys()

    def cycle_from(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        for other in sorted(imports[name]):
            if cycle := cycle_from(other, [*path, name]):
                return cycle
        return None

    assert [cycle for name in sorted(modules) if (cycle := cycle_from(name, []))] == []
