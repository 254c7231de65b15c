"""A short coverage-guided run of the protocol fuzz target in every test run.

FUZZ_SECONDS sets how long (default 20). Longer hunts: python -m tests.fuzz.fuzz_protocol DIR.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_fuzz_protocol_machines(tmp_path: Path) -> None:
    seconds = int(os.environ.get("FUZZ_SECONDS", "20"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()  # the target puts its seeds in an empty corpus
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.fuzz_protocol",
            str(corpus),
            f"-max_total_time={seconds}",
            "-rss_limit_mb=2048",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=seconds + 90,
    )
    tail = "\n".join(result.stderr.splitlines()[-60:])
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name != "corpus")
    assert result.returncode == 0 and not crashes, f"fuzzer found {crashes}:\n{tail}"
    runs = re.search(r"Done (\d+) runs", result.stderr)
    assert runs is not None, tail
    assert int(runs.group(1)) > 1000, tail  # it really ran, not just started
