"""The servers the benchmark compares, each serving one image as export ``img`` on
127.0.0.1, plaintext or TLS, started as process groups so they are always stopped.

Names are ``KIND[@REF][-tls]``: ``erofs-nbdd@c1721e8-tls`` is erofs-nbdd as it was at commit
c1721e8 (checked out by ``bench.run --against``), with TLS required.

The registry-backed kinds serve the same image pushed to a local docker-registry
(bench/registry.py) as export ``team/app:bench``, fetched on demand into a cache directory:
``erofs-nbdd-registry-warm`` once that cache holds the whole blob, ``erofs-nbdd-registry-cold``
restarted with an empty cache before every run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

HOST = "127.0.0.1"
EXPORT = "img"
ROOT = Path(__file__).resolve().parents[1]
#: The registry-backed erofs-nbdd: kind -> whether every run starts from an empty cache.
REGISTRY_KINDS = {"erofs-nbdd-registry-warm": False, "erofs-nbdd-registry-cold": True}
REPOSITORY = "team/app"
TAG = "bench"


def split_name(name: str) -> tuple[str, str | None, bool]:
    """``"erofs-nbdd@c1721e8-tls"`` -> ``("erofs-nbdd", "c1721e8", True)``."""
    tls = name.endswith("-tls")
    kind, _, ref = name.removesuffix("-tls").partition("@")
    return kind, ref or None, tls


def server_name(kind: str, ref: str | None, tls: bool) -> str:
    return kind + (f"@{ref}" if ref else "") + ("-tls" if tls else "")


def with_refs(names: list[str], refs: list[str]) -> list[str]:
    """``names`` with each erofs-nbdd followed by its counterparts at ``refs`` (TLS by TLS);
    with no erofs-nbdd in ``names``, both counterparts come last."""
    out = []
    for name in names:
        out.append(name)
        kind, ref, tls = split_name(name)
        if (kind, ref) == ("erofs-nbdd", None):
            out += [server_name(kind, r, tls) for r in refs]
    if out == names:
        out += [server_name("erofs-nbdd", r, tls) for tls in (False, True) for r in refs]
    return out


@dataclass
class Server:
    name: str  # e.g. "erofs-nbdd", "nbdkit-tls", "erofs-nbdd@c1721e8"
    argv: list[str]
    port: int
    tls: bool
    log: Path
    #: erofs-nbdd's source tree: this checkout, or a ref's; the server imports only from it.
    tree: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return split_name(self.name)[0]

    def environment(self) -> dict[str, str] | None:
        """erofs-nbdd runs in its tree, with only that tree on PYTHONPATH (``-m`` puts the
        working directory first on ``sys.path``, so that must be the tree too)."""
        if self.tree is None:
            return None
        return {**os.environ, "PYTHONPATH": f"{self.tree}:{self.tree / 'client'}"}

    def imported_from(self) -> Path:
        """Where this server's interpreter, environment and directory find ``erofs_nbdd``;
        raises unless that is in its tree."""
        assert self.tree is not None
        probe = [sys.executable, "-c", "import erofs_nbdd; print(erofs_nbdd.__file__)"]
        found = subprocess.run(
            probe, env=self.environment(), cwd=self.tree, capture_output=True, text=True
        )
        if found.returncode != 0:
            raise RuntimeError(f"{self.name} cannot import erofs_nbdd:\n{found.stderr[-2000:]}")
        path = Path(found.stdout.strip()).resolve()
        if not path.is_relative_to(self.tree.resolve()):
            raise RuntimeError(f"{self.name} would import erofs_nbdd from {path}, not {self.tree}")
        return path

    def uri(self) -> str:
        """fio's nbd engine may not name files in a URI, so TLS clients find their
        certificates where libnbd looks by default (see ``client_prefix``)."""
        return f"{'nbds' if self.tls else 'nbd'}://{HOST}:{self.port}/{EXPORT}"

    def start(self, cpus: str | None) -> None:
        argv = ["taskset", "-c", cpus, *self.argv] if cpus else self.argv
        with self.log.open("ab") as out:  # a server restarted keeps its earlier output
            self.process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.environment(),
                cwd=self.tree,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded wait for the port
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen on {self.port} within 30 s")

    def pids(self) -> list[int]:
        """The server's processes (a multi-process server has several)."""
        if self.process is None:
            return []
        found = [self.process.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) == self.process.pid:
                        found.append(int(entry.name))
                except OSError:
                    continue
        return sorted(set(found))

    def cpu_seconds(self) -> float:
        """User+system CPU of the process group so far (children reaped or not)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / tick

    def rss_mib(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total / 1024

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(15)
        except ProcessLookupError:
            pass


@dataclass
class RegistryServer(Server):
    """erofs-nbdd serving REPOSITORY from a registry, its blobs cached in ``cache``."""

    cache: Path = Path()
    #: Every run starts from an empty cache (the server restarted with ``cache`` removed).
    cold: bool = False

    def uri(self) -> str:
        """The export ``team/app:bench`` as libnbd writes it (nbdinfo's ``uri:``): the
        path is the export name, percent-decoded; ':' escaped, '/' kept."""
        export = quote(f"{REPOSITORY}:{TAG}", safe="/")
        return f"{'nbds' if self.tls else 'nbd'}://{HOST}:{self.port}/{export}"

    def cached_blob(self, digest: str) -> Path:
        """Where the cache keeps a whole, verified blob."""
        return self.cache / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def restart_empty(self, cpus: str | None) -> None:
        """Stop, remove the cache directory, start: nothing of the image is local."""
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.start(cpus)


@dataclass(frozen=True)
class Origin:
    """What the registry-backed servers need: the registry source (``oci+http://...``), a
    directory for their caches, a credentials file of their own, the cache size."""

    source: str
    caches: Path
    authfile: Path
    cache_size: str


def erofs_nbdd_argv(source: str, port: int, workers: int | None, tls: bool, pki: Path) -> list[str]:
    argv = [sys.executable, "-m", "erofs_nbdd", "serve", source, "--listen", f"{HOST}:{port}"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if tls:
        argv += ["--tls", "require", "--tls-certificates", str(pki)]
    return argv


def make_servers(
    names: list[str],
    image: Path,
    pki: Path,
    logs: Path,
    base_port: int,
    workers: int | None,
    trees: dict[str, Path] | None = None,
    origin: Origin | None = None,
) -> list[Server]:
    """Command lines for each named server; ``image`` lies in a directory of its own, so
    erofs-nbdd serves exactly it, as ``img``. ``trees`` maps a ref's short hash to its
    checkout; every erofs-nbdd, this tree's or a ref's, gets the same flags. The
    registry-backed kinds (this tree's only) need ``origin``."""
    out: list[Server] = []
    for i, name in enumerate(names):
        port = base_port + i
        kind, ref, tls = split_name(name)
        tree = None
        if kind == "erofs-nbdd":
            tree = ROOT if ref is None else (trees or {}).get(ref)
            if tree is None:
                raise ValueError(f"{name}: no checkout of {ref} (see --against)")
            argv = erofs_nbdd_argv(str(image.parent), port, workers, tls, pki)
        elif kind in REGISTRY_KINDS:
            if ref is not None:
                raise ValueError(f"{name}: only erofs-nbdd can be run at a ref")
            if origin is None:
                raise ValueError(f"{name}: no registry to serve from")
            cache = origin.caches / name
            argv = erofs_nbdd_argv(origin.source, port, workers, tls, pki)
            argv += ["--cache", str(cache), "--cache-size", origin.cache_size]
            argv += ["--authfile", str(origin.authfile)]
            log = logs / f"{name}.log"
            out.append(
                RegistryServer(
                    name, argv, port, tls, log, ROOT, cache=cache, cold=REGISTRY_KINDS[kind]
                )
            )
            continue
        elif ref is not None:
            raise ValueError(f"{name}: only erofs-nbdd can be run at a ref")
        elif kind == "nbdkit":
            argv = ["nbdkit", "-r", "-f", "-i", HOST, "-p", str(port)]
            if tls:
                argv += ["--tls=require", f"--tls-certificates={pki}"]
            argv += ["file", str(image)]
        elif kind == "qemu-nbd":
            argv = [
                "qemu-nbd",
                "-r",
                "-f",
                "raw",
                "-t",
                "-e",
                "0",
                "-x",
                EXPORT,
                "-b",
                HOST,
                "-p",
                str(port),
            ]
            if tls:
                argv += [
                    "--object",
                    f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
                    "--tls-creds",
                    "tls0",
                ]
            argv.append(str(image))
        else:
            raise ValueError(f"unknown server {name!r}")
        out.append(Server(name, argv, port, tls, logs / f"{name}.log", tree))
    return out
