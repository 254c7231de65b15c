"""Our server in front of a test registry, and the peers that read from it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..interop.conftest import RunningServer, run, start_server_process, stop_server_process
from .registryd import Registry, build_oci_layout


def source(registry: Registry, repository: str | None = "team/app") -> str:
    scheme = "oci" if registry.tls else "oci+http"
    return f"{scheme}://{registry.host}" + (f"/{repository}" if repository else "")


def registry_args(registry: Registry, cache: Path, *extra: str) -> list[str]:
    """The flags a server needs for this registry: its cache, credentials and CA."""
    args = ["--cache", str(cache), "--authfile", str(registry.authfile)]
    if registry.tls:
        args += ["--certs-d", str(registry.certs_d)]
    return [*args, *extra]


@contextmanager
def serving(
    registry: Registry,
    cache: Path,
    *extra: str,
    repository: str | None = "team/app",
    more: tuple[str, ...] = (),
) -> Iterator[RunningServer]:
    """``erofs-nbdd serve oci://... MORE...`` as a process; it must stop cleanly, without a
    traceback."""
    server = start_server_process(
        cache, *more, *registry_args(registry, cache, *extra), source=source(registry, repository)
    )
    try:
        yield server
    finally:
        status = stop_server_process(server)
        text = server.log_text()
        assert "Traceback" not in text, text
        assert status == 0, text


def push_image(registry: Registry, work: Path, images: list[Path], ref: str) -> str:
    """skopeo pushes an OCI layout of ``images`` as ``ref`` (team/app:v1): its digest."""
    _repository, _, tag = ref.rpartition(":")
    layout = work / f"layout-{hashlib.sha256(ref.encode()).hexdigest()[:8]}"
    digest = build_oci_layout(layout, images, tag)
    registry.push(layout, tag, ref)
    return digest


def layer_digest(image: Path) -> str:
    return "sha256:" + hashlib.sha256(image.read_bytes()).hexdigest()


def md5_of_export(server: RunningServer, export: str) -> str:
    """nbdcopy the whole export to stdout, hashed."""
    out = subprocess.run(
        ["nbdcopy", "--", server.uri(export), "-"], capture_output=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr.decode() + server.log_text()
    return hashlib.md5(out.stdout).hexdigest()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def list_exports(server: RunningServer) -> dict[str, str]:
    """nbdinfo --list --json: export name to description."""
    out = run("nbdinfo", "--list", "--json", f"nbd://{server.address}")
    return {e["export-name"]: e.get("description", "") for e in json.loads(out.stdout)["exports"]}


def blob_gets(registry: Registry, digest: str) -> int:
    """GETs of a blob the registry logged (each Range request is one)."""
    return sum(
        1
        for line in registry.log_text().splitlines()
        if f"/blobs/{digest}" in line and "GET" in line and "response completed" in line
    )


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Reader:
    """One NBD connection held open by libnbd, reading on request (nbdread.py)."""

    def __init__(self, uri: str) -> None:
        self.process = subprocess.Popen(
            ["/usr/bin/python3", str(Path(__file__).with_name("nbdread.py")), uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready", self._fail()

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def _fail(self) -> str:
        self.process.kill()
        assert self.process.stderr is not None
        text = self.process.stderr.read()
        self.close()
        return text

    def read(self, offset: int, length: int) -> str:
        """``ok SHA256`` or ``error ERRNO MESSAGE`` (bounded by the server's timeouts)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"read {offset} {length}\n")
        self.process.stdin.flush()
        answer = self._line()
        assert answer, self._fail()
        return answer

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def sha256_range(path: Path, offset: int, length: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).hexdigest()
