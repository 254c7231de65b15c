"""The benchmark's arithmetic: medians, ratios to nbdkit, target verdicts, the table."""

from __future__ import annotations

from bench.report import render_table, summarize, verdicts
from bench.workloads import WORKLOADS


def test_summary_ratios_and_verdicts() -> None:
    runs = []
    for rnd, (ours, theirs) in enumerate([(900.0, 1000.0), (1200.0, 1000.0), (1100.0, 1000.0)]):
        for server, mib in (("erofs-nbdd", ours), ("nbdkit", theirs)):
            runs.append({"server": server, "workload": "seq1m_qd8", "round": rnd,
                         "mib_s": mib, "iops": mib, "p50_us": 50.0, "p99_us": 90.0,
                         "server_cpu": 0.5})  # fmt: skip
    workloads = [WORKLOADS["seq1m_qd8"]]
    summary = summarize(runs, workloads, ["erofs-nbdd", "nbdkit"])
    assert summary["erofs-nbdd"]["seq1m_qd8"]["mib_s"] == {
        "median": 1100.0, "min": 900.0, "max": 1200.0
    }  # fmt: skip
    (what, ratio, target, higher, met), *_ = verdicts(summary)
    assert (what, round(ratio, 2), target, higher, met) == (
        "erofs-nbdd seq1m_qd8 mib_s", 1.1, 1.0, True, True
    )  # fmt: skip
    meta = {"date": "2026-11-22T00:00:00", "machine": "m, 2 CPUs", "repeats": 3,
            "duration_s": 8.0, "pin": "none"}  # fmt: skip
    table = render_table(summary, workloads, ["erofs-nbdd", "nbdkit"], {"rss_peak_mib": 120}, meta)
    assert "1100 [900..1200]" in table
    assert "1.10x  target >= 1x  met" in table
    assert "120 MiB  target < 100 MiB  NOT met" in table
