"""The benchmark's arithmetic: medians, ratios to nbdkit, target verdicts, the table; the
names of servers at a ref (``--against``) and what they are compared with."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.report import baseline, counterpart, render_table, series, summarize, verdicts, versus
from bench.servers import ROOT, make_servers, split_name, with_refs
from bench.workloads import WORKLOADS


def test_summary_ratios_and_verdicts() -> None:
    runs = []
    for rnd, (ours, theirs) in enumerate([(900.0, 1000.0), (1200.0, 1000.0), (1100.0, 1000.0)]):
        for server, mib in (("erofs-nbdd", ours), ("nbdkit", theirs)):
            runs.append(
                {
                    "server": server,
                    "workload": "seq1m_qd8",
                    "round": rnd,
                    "mib_s": mib,
                    "iops": mib,
                    "p50_us": 50.0,
                    "p99_us": 90.0,
                    "server_cpu": 0.5,
                }
            )
    workloads = [WORKLOADS["seq1m_qd8"]]
    summary = summarize(runs, workloads, ["erofs-nbdd", "nbdkit"])
    assert summary["erofs-nbdd"]["seq1m_qd8"]["mib_s"] == {
        "median": 1100.0,
        "min": 900.0,
        "max": 1200.0,
    }
    (what, ratio, target, higher, met), *_ = verdicts(summary)
    assert (what, round(ratio, 2), target, higher, met) == (
        "erofs-nbdd seq1m_qd8 mib_s",
        1.1,
        1.0,
        True,
        True,
    )
    meta = {
        "date": "2026-11-22T00:00:00",
        "machine": "m, 2 CPUs",
        "repeats": 3,
        "duration_s": 8.0,
        "pin": "none",
    }
    table = render_table(
        summary, workloads, ["erofs-nbdd", "nbdkit"], {"erofs-nbdd": {"rss_peak_mib": 120}}, meta
    )
    assert "1100 [900..1200]" in table
    assert "1.10x  target >= 1x  met" in table
    assert "120 MiB  target < 100 MiB  NOT met" in table


def test_names_at_a_ref() -> None:
    assert split_name("erofs-nbdd@c1721e8-tls") == ("erofs-nbdd", "c1721e8", True)
    assert split_name("erofs-nbdd@c1721e8") == ("erofs-nbdd", "c1721e8", False)
    assert split_name("nbdkit-tls") == ("nbdkit", None, True)
    # each erofs-nbdd is followed by its counterparts, TLS by TLS; none without a ref
    assert with_refs(["erofs-nbdd", "nbdkit", "erofs-nbdd-tls"], ["c1721e8", "abc1234"]) == [
        "erofs-nbdd",
        "erofs-nbdd@c1721e8",
        "erofs-nbdd@abc1234",
        "nbdkit",
        "erofs-nbdd-tls",
        "erofs-nbdd@c1721e8-tls",
        "erofs-nbdd@abc1234-tls",
    ]
    assert with_refs(["nbdkit"], ["c1721e8"]) == [
        "nbdkit",
        "erofs-nbdd@c1721e8",
        "erofs-nbdd@c1721e8-tls",
    ]
    assert with_refs(["erofs-nbdd", "nbdkit"], []) == ["erofs-nbdd", "nbdkit"]
    assert baseline("erofs-nbdd@c1721e8") == baseline("erofs-nbdd") == "nbdkit"
    assert baseline("erofs-nbdd@c1721e8-tls") == baseline("erofs-nbdd-tls") == "nbdkit-tls"
    assert baseline("nbdkit") is None and baseline("qemu-nbd-tls") is None
    assert counterpart("erofs-nbdd@c1721e8-tls") == "erofs-nbdd-tls"
    assert counterpart("erofs-nbdd-tls") is None


def test_servers_at_a_ref_run_their_own_tree(tmp_path: Path) -> None:
    names = ["erofs-nbdd", "erofs-nbdd@c1721e8-tls", "nbdkit"]
    image = tmp_path / "export" / "img.erofs"
    ours, theirs, nbdkit = make_servers(
        names, image, tmp_path / "pki", tmp_path, 21800, 2, {"c1721e8": tmp_path / "tree"}
    )
    assert (ours.tree, theirs.tree, nbdkit.tree) == (ROOT, tmp_path / "tree", None)
    assert theirs.kind == "erofs-nbdd" and theirs.tls and theirs.port == 21801
    env = theirs.environment()
    assert env is not None and env["PYTHONPATH"] == f"{tmp_path}/tree:{tmp_path}/tree/client"
    # the same flags as this tree's erofs-nbdd, but for the port and TLS
    assert theirs.argv[: len(ours.argv)] == [a.replace("21800", "21801") for a in ours.argv]
    assert "--workers" in theirs.argv and theirs.argv[-4:-2] == ["--tls", "require"]
    assert str(ours.imported_from()).startswith(str(ROOT))
    with pytest.raises(ValueError, match="no checkout"):
        make_servers(["erofs-nbdd@abc1234"], image, tmp_path, tmp_path, 21800, None, {})
    with pytest.raises(ValueError, match="only erofs-nbdd"):
        make_servers(["nbdkit@abc1234"], image, tmp_path, tmp_path, 21800, None, {})


def test_ratios_of_servers_at_a_ref() -> None:
    """A ref's servers are judged against nbdkit as this tree's are (TLS against nbdkit-tls),
    and this tree is compared with the ref's."""
    figures = {
        "erofs-nbdd": 1200.0,
        "erofs-nbdd@c1721e8": 1000.0,
        "nbdkit": 1000.0,
        "erofs-nbdd-tls": 900.0,
        "erofs-nbdd@c1721e8-tls": 600.0,
        "nbdkit-tls": 800.0,
    }
    runs = [
        {
            "server": server,
            "workload": "seq1m_qd8",
            "round": 0,
            "mib_s": mib,
            "iops": mib,
            "server_cpu": 0.5,
        }
        for server, mib in figures.items()
    ]
    workloads = [WORKLOADS["seq1m_qd8"]]
    names = list(figures)
    summary = summarize(runs, workloads, names)
    found = {what: (round(r, 2), met) for what, r, _, _, met in verdicts(summary)}
    assert found == {
        "erofs-nbdd seq1m_qd8 mib_s": (1.2, True),
        "erofs-nbdd@c1721e8 seq1m_qd8 mib_s": (1.0, True),
        "erofs-nbdd-tls seq1m_qd8 mib_s": (1.12, True),
        "erofs-nbdd@c1721e8-tls seq1m_qd8 mib_s": (0.75, False),
    }
    assert [(label, round(v[0], 2)) for label, v in series(summary, workloads)] == [
        ("erofs-nbdd / nbdkit", 1.2),
        ("erofs-nbdd@c1721e8 / nbdkit", 1.0),
        ("erofs-nbdd-tls / nbdkit-tls", 1.12),
        ("erofs-nbdd@c1721e8-tls / nbdkit-tls", 0.75),
    ]
    assert versus(summary, workloads) == [
        ("erofs-nbdd", "erofs-nbdd@c1721e8", [1.2]),
        ("erofs-nbdd-tls", "erofs-nbdd@c1721e8-tls", [1.5]),
    ]
    meta = {
        "date": "2026-11-22T00:00:00",
        "machine": "m, 2 CPUs",
        "repeats": 1,
        "duration_s": 3.0,
        "pin": "none",
    }
    memory = {"erofs-nbdd": {"rss_peak_mib": 30.0}, "erofs-nbdd@c1721e8": {"rss_peak_mib": 31.0}}
    table = render_table(summary, workloads, names, memory, meta)
    assert "\nerofs-nbdd@c1721e8-tls  " in table and "600 [600..600]" in table
    assert "erofs-nbdd@c1721e8-tls seq1m_qd8 mib_s  0.75x  target >= 1x  NOT met" in table
    assert "erofs-nbdd@c1721e8 RSS, 64 conns x 128 reads in flight: 31 MiB" in table
    assert "erofs-nbdd-tls / erofs-nbdd@c1721e8-tls:  seq1m_qd8 1.50x" in table
