"""qemu-img and fio's nbd engine against our server."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from ..conftest import require_tool
from .conftest import run

if TYPE_CHECKING:
    from .conftest import RunningServer

pytestmark = pytest.mark.interop


def test_qemu_img_info(served: RunningServer) -> None:
    info = json.loads(
        run(require_tool("qemu-img"), "info", "--output=json", served.uri("team/app-v2")).stdout
    )
    assert info["virtual-size"] == (served.root / "team/app-v2.erofs").stat().st_size
    assert info["format"] == "raw"


@pytest.mark.parametrize("name", ["demo", "team/app-v2"])
def test_qemu_img_compare(served: RunningServer, name: str) -> None:
    out = run(
        require_tool("qemu-img"),
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        served.uri(name),
        str(served.root / f"{name}.erofs"),
    ).stdout
    assert "Images are identical" in out


def test_qemu_io_sees_a_read_only_export(served: RunningServer) -> None:
    qemu_io = require_tool("qemu-io")
    result = run(qemu_io, "-f", "raw", "-c", "write 0 512", served.uri("demo"), check=False)
    assert result.returncode == 1
    assert "Permission denied" in result.stderr  # qemu honours NBD_FLAG_READ_ONLY
    out = run(qemu_io, "-r", "-f", "raw", "-c", "read -v 1024 4", served.uri("demo")).stdout
    assert out.startswith("00000400:  e2 e1 f5 e0")


def test_fio_random_reads(served: RunningServer) -> None:
    result = run(
        require_tool("fio"),
        "--name=randread",
        "--ioengine=nbd",
        f"--uri={served.uri('demo')}",
        "--rw=randread",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--runtime=3",
        "--time_based",
        "--readonly",
        "--output-format=json",
        timeout=120,
    )
    report = json.loads(result.stdout[result.stdout.index("{") :])
    jobs = report["jobs"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["error"] == 0
        assert job["read"]["io_bytes"] > 0
        assert job["read"]["total_ios"] > 100
