"""Summaries of the benchmark runs: medians with min and max, ratios of erofs-nbdd to nbdkit
(TLS to nbdkit with TLS; erofs-nbdd at a ref likewise), the issue's targets, this tree against
each ref, the registry-backed erofs-nbdd against the file-backed one (warm) and against curl
(cold), a text table and a PNG plot."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from .servers import server_name, split_name
from .workloads import primary

if TYPE_CHECKING:
    from pathlib import Path

    from .workloads import Workload

#: workload -> (metric, target ratio to nbdkit, higher is better). QD1 is judged by p50.
TARGETS: dict[str, tuple[str, float, bool]] = {
    "seq1m_qd8": ("mib_s", 1.0, True),
    "nbdcopy": ("mib_s", 1.0, True),
    "rand4k_qd32": ("iops", 0.7, True),
    "rand4k_qd1": ("p50_us", 1.5, False),
}
TLS_TARGETS = {"seq1m_qd8": ("mib_s", 1.0, True)}
#: erofs-nbdd-registry-warm (a cache holding the whole blob) against the file-backed
#: erofs-nbdd, on every workload's primary metric: within 10 %.
WARM_TARGET = 0.9
#: curl's GET of the whole blob, the row the cold registry-backed nbdcopy is compared with.
CURL = "registry-curl"
Summary = dict[str, dict[str, dict[str, dict[str, float]]]]


def summarize(runs: list[dict[str, Any]], workloads: list[Workload], names: list[str]) -> Summary:
    """server -> workload -> metric -> {median, min, max}."""
    out: Summary = {}
    for name in names:
        for w in workloads:
            mine = [r for r in runs if r["server"] == name and r["workload"] == w.name]
            if not mine:
                continue
            metrics = [k for k, v in mine[0].items() if isinstance(v, float)]
            out.setdefault(name, {})[w.name] = {
                m: {
                    "median": statistics.median(r[m] for r in mine),
                    "min": min(r[m] for r in mine),
                    "max": max(r[m] for r in mine),
                }
                for m in metrics
            }
    return out


def ratio(summary: Summary, ours: str, ref: str, workload: str, metric: str) -> float | None:
    try:
        a = summary[ours][workload][metric]["median"]
        b = summary[ref][workload][metric]["median"]
    except KeyError:
        return None
    return a / b if b else None


def baseline(name: str) -> str | None:
    """What ``name`` is judged against: nbdkit for any erofs-nbdd (this tree's or a ref's),
    nbdkit-tls for its TLS variant."""
    kind, _, tls = split_name(name)
    return server_name("nbdkit", None, tls) if kind == "erofs-nbdd" else None


def file_backed(name: str) -> str | None:
    """The file-backed erofs-nbdd a registry-backed one with a full cache is judged
    against: ``erofs-nbdd-registry-warm[-tls]`` -> ``erofs-nbdd[-tls]``."""
    kind, ref, tls = split_name(name)
    return server_name("erofs-nbdd", ref, tls) if kind == "erofs-nbdd-registry-warm" else None


def counterpart(name: str) -> str | None:
    """This tree's server that a ref's is compared with: ``erofs-nbdd@c1721e8-tls`` ->
    ``erofs-nbdd-tls``."""
    kind, ref, tls = split_name(name)
    return server_name(kind, None, tls) if ref else None


def verdicts(summary: Summary) -> list[tuple[str, float, float, bool, bool]]:
    """(what, ratio, target, higher_is_better, met) for every target measured."""
    out = []
    for ours in summary:
        ref = baseline(ours)
        if ref is None:
            continue
        for workload, (metric, target, higher) in (
            TLS_TARGETS if ref.endswith("-tls") else TARGETS
        ).items():
            r = ratio(summary, ours, ref, workload, metric)
            if r is not None:
                met = r >= target if higher else r <= target
                out.append((f"{ours} {workload} {metric}", r, target, higher, met))
    return out


def warm_verdicts(
    summary: Summary, workloads: list[Workload]
) -> list[tuple[str, float, float, bool, bool]]:
    """The registry-backed erofs-nbdd with a full cache / the file-backed one, every
    workload's primary metric, target WARM_TARGET; as ``verdicts``."""
    out = []
    for ours in summary:
        ref = file_backed(ours)
        if ref is None:
            continue
        for w in workloads:
            r = ratio(summary, ours, ref, w.name, primary(w))
            if r is not None:
                what = f"{ours} / {ref} {w.name} {primary(w)}"
                out.append((what, r, WARM_TARGET, True, r >= WARM_TARGET))
    return out


def cold_versus_curl(summary: Summary) -> list[tuple[str, float, float, float]]:
    """(server, its nbdcopy MiB/s, curl's MiB/s, ratio) for each registry-backed erofs-nbdd
    with an empty cache, against curl's GET of the blob in the same run (medians)."""
    out = []
    for ours in summary:
        if split_name(ours)[0] != "erofs-nbdd-registry-cold":
            continue
        r = ratio(summary, ours, CURL, "nbdcopy", "mib_s")
        if r is not None:
            mine = summary[ours]["nbdcopy"]["mib_s"]["median"]
            out.append((ours, mine, summary[CURL]["nbdcopy"]["mib_s"]["median"], r))
    return out


def versus(
    summary: Summary, workloads: list[Workload]
) -> list[tuple[str, str, list[float | None]]]:
    """(this tree's server, the ref's, ratios per workload of the primary metric) for every
    server at a ref whose counterpart was measured too."""
    out = []
    for name in summary:
        mine = counterpart(name)
        if mine is not None and mine in summary:
            out.append(
                (mine, name, [ratio(summary, mine, name, w.name, primary(w)) for w in workloads])
            )
    return out


def render_table(
    summary: Summary,
    workloads: list[Workload],
    names: list[str],
    memory: dict[str, dict[str, float]],
    meta: dict[str, Any],
) -> str:
    """``memory``: server -> ``memory_under_load``'s figures."""
    registry = bool(meta.get("registry"))
    lines = [
        f"erofs-nbdd benchmark, {meta['date']}, {meta['machine']}",
        f"{meta['repeats']} round(s) of {meta['duration_s']:g} s, pin={meta['pin']}; "
        "median [min..max]; QD1 adds p50/p99 latency",
    ]
    if meta["pin"] == "split":
        lines.append(
            "pin=split: servers on CPU 0"
            + (" (docker-registry too, beside the registry-backed erofs-nbdd)" if registry else "")
            + ", clients on CPU 1 (fio, nbdcopy"
            + (", curl)" if registry else ")")
        )
    if registry:
        lines += [
            "registry rows: the image pushed to a docker-registry on loopback as team/app:bench;"
            " -warm: the cache held the whole blob before the rounds;",
            "  -cold: restarted with an empty cache before every run (nbdcopy: one copy);"
            f" {CURL}: curl GET of the whole blob from that registry",
        ]
    lines.append("")
    wide = max([16, *(len(n) + 2 for n in names)])
    head = f"{'server':{wide}}" + "".join(f"{w.label:>30}" for w in workloads)
    lines += [head, "-" * len(head)]
    for name in names:
        row = f"{name:{wide}}"
        for w in workloads:
            cell = summary.get(name, {}).get(w.name)
            if cell is None:
                row += f"{'-':>30}"
                continue
            m = cell[primary(w)]
            text = f"{m['median']:.0f} [{m['min']:.0f}..{m['max']:.0f}]"
            if w.name == "rand4k_qd1":
                text += f" {cell['p50_us']['median']:.0f}/{cell['p99_us']['median']:.0f}us"
            row += f"{text:>30}"
        lines.append(row)
    lines += ["", "ratios to nbdkit in this run (targets from the performance issue):"]
    found = verdicts(summary)
    warm = warm_verdicts(summary, workloads)
    wide = max([38, *(len(v[0]) for v in found + warm)])
    for what, r, target, higher, met in found:
        sign = ">=" if higher else "<="
        lines.append(
            f"  {what:{wide}} {r:5.2f}x  target {sign} {target:g}x  {'met' if met else 'NOT met'}"
        )
    for name, figures in memory.items():
        met = figures["rss_peak_mib"] < 100
        lines.append(
            f"  {name} RSS, 64 conns x 128 reads in flight: {figures['rss_peak_mib']:.0f} MiB"
            f"  target < 100 MiB  {'met' if met else 'NOT met'}"
        )
    if warm:
        lines += ["", "registry-backed with the whole blob cached / file-backed, this run:"]
    for what, r, target, _, met in warm:
        lines.append(
            f"  {what:{wide}} {r:5.2f}x  target >= {target:g}x  {'met' if met else 'NOT met'}"
        )
    cold = cold_versus_curl(summary)
    if cold:
        lines += ["", f"registry-backed with an empty cache, nbdcopy / {CURL}, this run:"]
    for server, cold_mib_s, curl_mib_s, r in cold:
        lines.append(
            f"  {server} {cold_mib_s:.0f} MiB/s / {CURL} {curl_mib_s:.0f} MiB/s = {r:.2f}x"
        )
        busy = {k: v["median"] for k, v in summary[server]["nbdcopy"].items()}
        curl_cpu = summary[CURL]["nbdcopy"].get("server_cpu", {}).get("median", 0.0)
        lines.append(
            f"    cores busy: erofs-nbdd {busy.get('server_cpu', 0.0):.2f} and docker-registry"
            f" {busy.get('registry_cpu', 0.0):.2f} during its nbdcopy;"
            f" docker-registry {curl_cpu:.2f} during curl's GET"
        )
    pairs = versus(summary, workloads)
    if pairs:
        lines += [
            "",
            "this tree / the ref, same run (median of each column's metric; > 1: faster now):",
        ]
        for mine, theirs, ratios in pairs:
            cells = "  ".join(
                f"{w.name} {'-' if r is None else f'{r:.2f}x'}"
                for w, r in zip(workloads, ratios, strict=True)
            )
            lines.append(f"  {mine} / {theirs}:  {cells}")
    cpu = [
        f"{name} {summary[name][w.name]['server_cpu']['median']:.2f}"
        for name in names
        for w in workloads
        if w.name == "rand4k_qd32" and name in summary and w.name in summary[name]
    ]
    if cpu:
        lines += ["", "server CPU (cores busy) during rand 4k QD32: " + ", ".join(cpu)]
    return "\n".join(lines) + "\n"


def series(summary: Summary, workloads: list[Workload]) -> list[tuple[str, list[float]]]:
    """The plot's bars: each erofs-nbdd (this tree's or a ref's, plaintext or TLS) relative to
    its nbdkit, and the registry-backed one with a full cache relative to the file-backed one,
    per workload (0 where not measured)."""
    out = []
    for ours in summary:
        ref = baseline(ours) or file_backed(ours)
        if ref is None:
            continue
        values = [ratio(summary, ours, ref, w.name, primary(w)) or 0.0 for w in workloads]
        if any(values):
            out.append((f"{ours} / {ref}", values))
    return out


def plot(summary: Summary, workloads: list[Workload], path: Path, meta: dict[str, Any]) -> bool:
    """erofs-nbdd relative to nbdkit per workload, plaintext and TLS; False without
    matplotlib (the table and JSON still hold everything)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [w.name for w in workloads]
    bars_of = series(summary, workloads)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(bars_of))
    for i, (label, values) in enumerate(bars_of):
        xs = [x + i * width for x in range(len(labels))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([x + width * (len(bars_of) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("relative to the baseline (1.0 = equal)")
    ax.set_title(
        f"erofs-nbdd / its baseline (legend), {meta['date'][:10]}, {meta['machine'].split(',')[1]}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
