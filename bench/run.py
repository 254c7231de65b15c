"""erofs-nbdd against nbdkit and qemu-nbd, side by side in one run.

    ./setup.sh bench [--quick] [--pin split] [...]       (python -m bench.run --help)

Builds (once, cached) an EROFS image of about 1 GiB, serves it with every server, plaintext
and TLS, and measures each with fio's nbd engine and nbdcopy. Runs are interleaved: each
round runs every workload on every server, the server order rotating, so drift on a shared
machine hits all alike. Figures are medians of the rounds, with min and max; erofs-nbdd is
judged by its ratio to nbdkit in the same run. ``--against REF`` adds erofs-nbdd as it was at
commit REF (``erofs-nbdd@SHORT``, ``erofs-nbdd@SHORT-tls``) to the same rounds, for a before and
after. Writes table.txt, results.json and ratios.png.

The registry-backed rows serve the same image from a docker-registry the benchmark starts on
loopback (a server: pinned with the others), pushed there by ``erofs-nbdd push``:
``erofs-nbdd-registry-warm`` once its cache holds the whole blob (filled before the rounds),
judged against the file-backed erofs-nbdd; ``erofs-nbdd-registry-cold`` restarted with an
empty cache before every run, its nbdcopy judged against ``registry-curl``, curl's GET of the
whole blob from the same registry in the same round.
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

from .registry import Registry
from .report import CURL, plot, render_table, summarize
from .servers import REGISTRY_KINDS, ROOT, Origin, RegistryServer, Server, make_servers, with_refs
from .workloads import WORKLOADS, MiB, memory_under_load, primary, run_fio, run_nbdcopy

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .workloads import Workload

SERVERS = [
    "erofs-nbdd",
    "nbdkit",
    "qemu-nbd",
    *REGISTRY_KINDS,  # erofs-nbdd-registry-warm, erofs-nbdd-registry-cold
    "erofs-nbdd-tls",
    "nbdkit-tls",
    "qemu-nbd-tls",
]
#: What an empty cache is measured with: nbdcopy (a sequential whole read, the figure that
#: matters) and, but for --quick, random 4k reads (each first read of a chunk a Range GET;
#: the cache fills as the run goes on, so these are an empty cache's first seconds).
COLD_WORKLOADS = ("nbdcopy", "rand4k_qd1", "rand4k_qd32")
COLD_WORKLOADS_QUICK = ("nbdcopy",)
#: Bounds on filling the warm cache: nbdcopy of the whole export, then the digest check.
FILL_TIMEOUT = 300.0
VERIFY_TIMEOUT = 60.0
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
    ap.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help="comma list (default %(default)s; any with -tls too, erofs-nbdd@REF with --against)",
    )
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


def fill(
    server: RegistryServer, digest: str, size: int, cpus: str | None, prefix: list[str]
) -> float:
    """Read the whole export once (nbdcopy to null:) so ``server``'s cache holds the blob,
    and check it does: CACHE/blobs/sha256/HEX, whole, and nothing left in partial/. MiB/s of
    the fill (an empty cache's sequential read, like the cold row's)."""
    figures = run_nbdcopy(server.uri(), size, cpus, prefix, loops=1, timeout=FILL_TIMEOUT)
    blob = server.cached_blob(digest)
    partial = server.cache / "partial" / "sha256" / blob.name
    deadline = time.monotonic() + VERIFY_TIMEOUT  # the server hashes the blob, then moves it
    while not (blob.exists() and not partial.exists()):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name}: {blob} not complete {VERIFY_TIMEOUT:g} s after a whole read"
                f" (partial: {partial.exists()}); see {server.log}"
            )
        time.sleep(0.1)
    if blob.stat().st_size != size:
        raise RuntimeError(f"{server.name}: {blob} holds {blob.stat().st_size} bytes, not {size}")
    # the fill left 1 GiB of dirty pages: written back now, not during the measured rounds
    # (the file-backed image is clean; the comparison is of serving, not of writeback)
    fd = os.open(blob, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return figures["mib_s"]


def start_registry(
    args: argparse.Namespace, image: Path, out: Path, cpus: str | None
) -> tuple[Registry, Origin, str, str]:
    """docker-registry on a free loopback port, its storage in the bench cache (so the
    upload is once per image size), the image pushed as team/app:bench. (registry, what the
    servers need, manifest digest, layer digest)."""
    registry = Registry.create(CACHE / f"registry-{args.image_mib}", out, out / "logs")
    say(f"docker-registry on {registry.url}, storage {registry.storage}")
    registry.start(cpus)
    authfile = out / "registry-auth.json"  # no credentials: not the host's either
    authfile.write_text('{"auths": {}}\n')
    t0 = time.monotonic()
    manifest = registry.push(image, authfile)
    layer, layer_size = registry.layer()
    if layer_size != image.stat().st_size:
        raise RuntimeError(f"the registry's layer {layer} is {layer_size} bytes, not the image's")
    say(f"pushed {image.name} as {manifest} in {time.monotonic() - t0:.1f} s; layer {layer}")
    caches = Path(tempfile.mkdtemp(prefix="caches-", dir=CACHE))  # the image's file system
    cache_size = f"{2 * layer_size // MiB + 64}M"
    return registry, Origin(registry.source, caches, authfile, cache_size), manifest, layer


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
    registry: Registry | None = None
    origin: Origin | None = None
    registry_meta: dict[str, object] = {}
    fills: dict[str, float] = {}  # MiB/s of each warm cache's fill
    layer = ""
    cold_workloads = COLD_WORKLOADS_QUICK if args.quick else COLD_WORKLOADS
    results: list[dict[str, object]] = []
    memory: dict[str, dict[str, float]] = {}
    imports = {}
    servers: list[Server] = []
    started = time.monotonic()
    try:
        if any(n.removesuffix("-tls") in REGISTRY_KINDS for n in names):
            registry, origin, manifest, layer = start_registry(args, image, out, server_cpus)
            registry_meta = {
                "argv": " ".join(registry.argv),
                "config": registry.argv[-1],
                "source": registry.source,
                "manifest": manifest,
                "layer": layer,
                "cold_workloads": list(cold_workloads),
                "fill_mib_s": fills,
            }
        servers = make_servers(
            names, image, pki, out / "logs", args.base_port, args.workers, trees, origin
        )
        rows = list(names)
        colds = [s for s in servers if isinstance(s, RegistryServer) and s.cold]
        if colds and any(w.kind == "nbdcopy" for w in workloads):
            rows.insert(rows.index(colds[0].name) + 1, CURL)

        def measured(server: Server, w: Workload) -> bool:
            cold = isinstance(server, RegistryServer) and server.cold
            return not cold or w.name in cold_workloads

        def backing(server: Server) -> Path:
            """The file whose pages the server's reads come from, to warm or evict."""
            if not isinstance(server, RegistryServer):
                return image
            assert registry is not None
            return registry.blob_file(layer) if server.cold else server.cached_blob(layer)

        for server in servers:
            if server.tree is not None:
                imports[server.name] = str(server.imported_from())
                say(f"{server.name}: erofs_nbdd from {imports[server.name]}")
        runs = args.repeats * sum(measured(s, w) for s in servers for w in workloads)
        say(
            f"{len(servers)} servers x {len(workloads)} workloads x {args.repeats} rounds: "
            f"{runs} runs of {args.duration:g} s; results in {out}"
        )
        wide = max(len(r) for r in rows)
        for server in servers:
            server.start(server_cpus)
        for server in servers:
            if isinstance(server, RegistryServer) and not server.cold:
                mib_s = fill(server, layer, size, client_cpus, client_prefix)
                fills[server.name] = mib_s
                say(
                    f"{server.name}: cache filled at {mib_s:.0f} MiB/s, {server.cached_blob(layer)}"
                )
        done = 0
        for rnd in range(args.repeats):
            for w in workloads:
                order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
                for server in order:
                    if not measured(server, w):
                        continue
                    cold = isinstance(server, RegistryServer) and server.cold
                    if cold and w.kind == "nbdcopy" and registry is not None:
                        resident = evict(backing(server)) if w.cold else warm(backing(server))
                        cpu0 = registry.cpu_seconds()
                        figures = registry.curl_get(layer, size, client_cpus)
                        figures["server_cpu"] = (registry.cpu_seconds() - cpu0) / figures["seconds"]
                        figures["resident_before"] = resident
                        results.append(
                            {"server": CURL, "workload": w.name, "round": rnd, **figures}
                        )
                        say(f"    {w.name:15} {CURL:{wide}} {figures['mib_s']:10.0f} mib_s")
                    resident = evict(backing(server)) if w.cold else warm(backing(server))
                    if isinstance(server, RegistryServer) and server.cold:
                        server.restart_empty(server_cpus)
                    cpu0 = server.cpu_seconds()
                    registry_cpu0 = registry.cpu_seconds() if registry is not None else 0.0
                    t0 = time.monotonic()
                    uri = server.uri()
                    if w.kind == "fio":
                        figures = run_fio(w, uri, args.duration, client_cpus, client_prefix)
                    else:
                        # an empty cache is empty once: the cold row reads the image once
                        loops = 1 if cold else 2
                        figures = run_nbdcopy(uri, size, client_cpus, client_prefix, loops)
                    elapsed = time.monotonic() - t0
                    figures["server_cpu"] = (server.cpu_seconds() - cpu0) / elapsed
                    if isinstance(server, RegistryServer) and registry is not None:
                        figures["registry_cpu"] = (registry.cpu_seconds() - registry_cpu0) / elapsed
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
        if registry is not None:
            registry.stop()
        if origin is not None:
            shutil.rmtree(origin.caches, ignore_errors=True)
    summary = summarize(results, workloads, rows)
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
        "registry": registry_meta,
    }
    table = render_table(summary, workloads, rows, memory, meta)
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
