"""erofs-nbdd against nbdkit and qemu-nbd, side by side in one run.

    ./setup.sh bench [--quick] [--pin split] [...]       (python -m bench.run --help)

Builds (once, cached) an EROFS image of about 1 GiB, serves it with every server, plaintext
and TLS, and measures each with fio's nbd engine and nbdcopy. Runs are interleaved: each
round runs every workload on every server, the server order rotating, so drift on a shared
machine hits all alike. Figures are medians of the rounds, with min and max; erofs-nbdd is
judged by its ratio to nbdkit in the same run. ``--against REF`` adds erofs-nbdd as it was at
commit REF (``erofs-nbdd@SHORT``, ``erofs-nbdd@SHORT-tls``) to the same rounds, for a before and
after. Writes table.txt, results.json and ratios.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .report import plot, render_table, summarize
from .servers import ROOT, make_servers, with_refs
from .workloads import WORKLOADS, memory_under_load, primary, run_fio, run_nbdcopy

if TYPE_CHECKING:
    from collections.abc import Iterator

SERVERS = ["erofs-nbdd", "nbdkit", "qemu-nbd", "erofs-nbdd-tls", "nbdkit-tls", "qemu-nbd-tls"]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "erofs-nbdd-bench"


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_image(mib: int) -> Path:
    """An uncompressed EROFS image of random files, about ``mib`` MiB; built once."""
    image = CACHE / f"export-{mib}" / "img.erofs"
    if image.exists():
        return image
    tree = CACHE / f"tree-{mib}"
    say(f"building a {mib} MiB EROFS image in {image} (once)")
    tree.mkdir(parents=True, exist_ok=True)
    files = max(1, mib // 16)
    for i in range(files):
        path = tree / f"d{i % 8}" / f"f{i:04d}.bin"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            with path.open("wb") as f:
                for _ in range(16):
                    f.write(os.urandom(1 << 20))
        if i % 16 == 15:
            say(f"  {i + 1}/{files} files")
    image.parent.mkdir(parents=True, exist_ok=True)
    partial = image.with_suffix(".partial")
    subprocess.run(["mkfs.erofs", str(partial), str(tree)], check=True, stdout=subprocess.DEVNULL)
    partial.rename(image)
    return image


def make_pki(out: Path) -> tuple[Path, list[str]]:
    """Certificates from ``erofs-nbdd certs``, and the command prefix that runs a client
    with them: libnbd reads $HOME/.pki/libnbd, except for root (/etc/pki/libnbd, which we
    leave alone), so as root the clients run as nobody with a HOME of their own."""
    pki = out / "pki"
    subprocess.run(
        [sys.executable, "-m", "erofs_nbdd", "certs", str(pki), "--client", "bench"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    home = Path(tempfile.mkdtemp(prefix="erofs-nbdd-bench-home-"))
    libnbd = home / ".pki" / "libnbd"
    libnbd.mkdir(parents=True)
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(pki / "clients" / "bench" / name, libnbd / name)
    for path in (home, home / ".pki", libnbd, *libnbd.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    prefix = ["env", f"HOME={home}"]
    if os.geteuid() == 0:
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *prefix]
    return pki, prefix


def resident_share(image: Path) -> float:
    """How much of the image is in the page cache, as fincore reports it (-1: unknown)."""
    try:
        out = subprocess.run(
            ["fincore", "-nb", "-o", "RES,SIZE", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return int(out[0]) / max(1, int(out[1]))
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return -1.0


def warm(image: Path) -> float:
    """Read the image into the page cache (these VMs reclaim idle cache); returns the
    resident share before."""
    resident = resident_share(image)
    with image.open("rb") as f:
        while f.read(8 << 20):
            pass
    return resident


def evict(image: Path) -> float:
    """Drop the image from the page cache; returns the resident share after."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_share(image)


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[tuple[str, str, Path]]:
    """(short hash, full hash, directory) of this repository's tree at ``ref``, exported by
    ``git archive`` into a temporary directory that is removed on the way out."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"--against {ref}: git {args[0]}: {done.stderr.strip()}")
        return done.stdout.strip()

    full = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    short = git("rev-parse", "--short", full)
    tree = Path(tempfile.mkdtemp(prefix=f"erofs-nbdd-bench-{short}-"))
    try:
        archive = subprocess.Popen(
            ["git", "-C", str(ROOT), "archive", full], stdout=subprocess.PIPE
        )
        with archive:
            subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.returncode != 0:
            raise RuntimeError(f"git archive {full} failed")
        yield short, full, tree
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s runs (under 3 min)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma list")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list")
    ap.add_argument("--repeats", type=int, help="rounds (default 3; quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per fio run (default 8; quick 3)")
    ap.add_argument("--image-mib", type=int, default=1024)
    ap.add_argument(
        "--pin",
        choices=["none", "split"],
        default="none",
        help="split: servers on CPU 0, clients on CPU 1",
    )
    ap.add_argument("--workers", type=int, help="erofs-nbdd --workers (default: its own)")
    ap.add_argument("--out", type=Path, help="default bench/results/DATE")
    ap.add_argument("--base-port", type=int, default=21800)
    ap.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="REF",
        help="also run erofs-nbdd as at commit REF, as erofs-nbdd@SHORT[-tls] "
        "beside each erofs-nbdd in --servers (both if none); repeatable",
    )
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out = (args.out or ROOT / "bench" / "results" / stamp).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so servers are stopped and checkouts removed either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with contextlib.ExitStack() as stack:
        refs = [stack.enter_context(checkout(ref)) for ref in dict.fromkeys(args.against)]
        return measure(args, refs)


def measure(args: argparse.Namespace, refs: list[tuple[str, str, Path]]) -> int:
    """The run proper, with each ``--against`` ref checked out as (short, full, tree)."""
    trees = {short: tree for short, _, tree in refs}
    names = with_refs([n for n in args.servers.split(",") if n], list(trees))
    workloads = [WORKLOADS[w] for w in args.workloads.split(",") if w]
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    image = build_image(args.image_mib)
    size = image.stat().st_size
    pki, client_prefix = make_pki(out)
    server_cpus, client_cpus = ("0", "1") if args.pin == "split" else (None, None)
    servers = make_servers(names, image, pki, out / "logs", args.base_port, args.workers, trees)
    imports = {}
    for server in servers:
        if server.tree is not None:
            imports[server.name] = str(server.imported_from())
            say(f"{server.name}: erofs_nbdd from {imports[server.name]}")
    results: list[dict[str, object]] = []
    started = time.monotonic()
    runs = args.repeats * len(workloads) * len(servers)
    say(
        f"{len(servers)} servers x {len(workloads)} workloads x {args.repeats} rounds = {runs} "
        f"runs of {args.duration:g} s; results in {out}"
    )
    memory: dict[str, dict[str, float]] = {}
    wide = max(len(s.name) for s in servers)
    try:
        for server in servers:
            server.start(server_cpus)
        done = 0
        for rnd in range(args.repeats):
            for w in workloads:
                order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
                for server in order:
                    resident = evict(image) if w.cold else warm(image)
                    cpu0 = server.cpu_seconds()
                    t0 = time.monotonic()
                    uri = server.uri()
                    if w.kind == "fio":
                        figures = run_fio(w, uri, args.duration, client_cpus, client_prefix)
                    else:
                        figures = run_nbdcopy(uri, size, client_cpus, client_prefix)
                    elapsed = time.monotonic() - t0
                    figures["server_cpu"] = (server.cpu_seconds() - cpu0) / elapsed
                    figures["resident_before"] = resident
                    results.append(
                        {"server": server.name, "workload": w.name, "round": rnd, **figures}
                    )
                    done += 1
                    say(
                        f"{done}/{runs} {w.name:15} {server.name:{wide}} "
                        f"{figures[primary(w)]:10.0f} {primary(w)}"
                    )
        for ours in servers:
            if ours.kind != "erofs-nbdd" or ours.tls:
                continue
            say(f"memory of {ours.name}: 64 connections x 128 reads of 128 KiB in flight")
            m = memory[ours.name] = memory_under_load(ours, size)
            idle, peak = m["rss_before_mib"], m["rss_peak_mib"]
            say(f"  {ours.name} RSS {idle:.0f} MiB idle, {peak:.0f} MiB peak")
    finally:
        for server in servers:
            server.stop()
    summary = summarize(results, workloads, names)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}",
        "python": platform.python_version(),
        "image_bytes": size,
        "repeats": args.repeats,
        "duration_s": args.duration,
        "pin": args.pin,
        "quick": args.quick,
        "wall_s": round(time.monotonic() - started, 1),
        "servers": {s.name: " ".join(s.argv) for s in servers},
        "against": {short: full for short, full, _ in refs},
        "erofs_nbdd_imported_from": imports,
    }
    table = render_table(summary, workloads, names, memory, meta)
    (out / "table.txt").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "runs": results, "summary": summary, "memory": memory}, indent=1)
    )
    png = plot(summary, workloads, out / "ratios.png", meta)
    print(table)
    say(f"wrote {out}/table.txt, results.json" + (", ratios.png" if png else ""))
    latest = ROOT / "bench" / "results" / "latest"
    if out.parent == latest.parent:
        latest.unlink(missing_ok=True)
        latest.symlink_to(out.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
