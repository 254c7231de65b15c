"""The wheel holds exactly the two import packages, with the client's under its own name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_wheel_top_level_names(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"erofs_nbdd", "erofs_nbd_client"}
    assert "erofs_nbdd/protocol/handshake.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "erofs-nbdd = erofs_nbdd.cli:main" in text
