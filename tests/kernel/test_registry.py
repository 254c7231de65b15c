"""The kernel mounts registry-backed exports: every file as pushed, and a mount that fails
over between two servers with separate caches in front of one registry."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from erofs_nbd_client import devices

from ..conftest import mkfs
from ..interop.conftest import start_server_process, stop_server_process
from ..registry.helpers import push_image, registry_args, source
from ..registry.registryd import Registry, start_registry
from .conftest import cli, require_tool, tree_digest, wait_state
from .test_attach import attach_and_check
from .test_failover import CRASH_BOUND, Reader, Stall, detach_clean, file_digests, kill, recovered

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from ..interop.conftest import RunningServer

PORT_A, PORT_B = 10940, 10941


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    for tool in ("docker-registry", "skopeo"):
        require_tool(tool)
    found = start_registry(tmp_path_factory.mktemp("registry"), tls=True, auth="htpasswd")
    try:
        yield found
    finally:
        found.close()


def _serve(registry: Registry, cache: Path, port: int) -> RunningServer:
    return start_server_process(
        cache, *registry_args(registry, cache), listen=f"127.0.0.1:{port}", source=source(registry)
    )


def test_mount_a_registry_export(
    registry: Registry, tmp_path: Path, source_tree: Path, mountpoint: Path
) -> None:
    image = mkfs(tmp_path / "app.erofs", source_tree, "-zlz4hc")
    push_image(registry, tmp_path, [image], "team/app:v1")
    server = _serve(registry, tmp_path / "cache", PORT_A)
    try:
        attach_and_check(f"nbd://127.0.0.1:{PORT_A}/team/app:v1", mountpoint, source_tree)
    finally:
        assert stop_server_process(server) == 0, server.log_text()
    assert "Traceback" not in server.log_text()


def test_failover_between_two_caching_servers(
    registry: Registry, tmp_path: Path, source_tree: Path, mountpoint: Path
) -> None:
    image = mkfs(tmp_path / "app.erofs", source_tree)
    push_image(registry, tmp_path, [image], "team/app:v1")
    first = _serve(registry, tmp_path / "cache-a", PORT_A)
    second = _serve(registry, tmp_path / "cache-b", PORT_B)
    try:
        servers = f"nbd://127.0.0.1:{PORT_A},nbd://127.0.0.1:{PORT_B}"
        result = cli("erofs-nbd-attach", servers, str(mountpoint), "--export", "team/app:v1")
        assert result.returncode == 0, result.stderr
        index = devices.device_at(str(mountpoint))
        assert index is not None
        wait_state(index, state="watching", reconnects=0)
        reader = Reader(mountpoint, file_digests(source_tree)).start()
        stall = Stall.before(reader)
        kill(first)  # its cache goes with it: the second fetches what it lacks
        by = recovered(index)
        rows = json.loads(cli("erofs-nbd-list", "--json").stdout)
        (row,) = (r for r in rows if r["index"] == index)
        assert row["server"] == f"nbd://127.0.0.1:{PORT_B}/team/app:v1"
        stall.check(f"failover between caching servers, recovered by the {by}", CRASH_BOUND)
        assert tree_digest(mountpoint) == tree_digest(source_tree)
        detach_clean(mountpoint)
    finally:
        for server in (first, second):
            if server.process.poll() is None:
                stop_server_process(server)
    assert "Traceback" not in second.log_text()
