"""The OCI registry behind the registry-backed erofs-nbdd rows: Debian's docker-registry on
loopback, started and stopped by the benchmark, the image pushed to it with ``erofs-nbdd
push``, and curl's GET of the whole layer blob as the registry's own throughput.

Its storage lies in the benchmark's cache directory, one per image size, so the 1 GiB upload
happens once (a later push finds the blob there and sends only the manifest)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .servers import HOST, REPOSITORY, ROOT, TAG, Server

if TYPE_CHECKING:
    from pathlib import Path

REGISTRY = "/usr/bin/docker-registry"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
READY_TIMEOUT = 20.0  # until GET /v2/ answers 200
PUSH_TIMEOUT = 600.0  # the first push of 1 GiB (about 15 s here)
CURL_TIMEOUT = 300.0

# Loopback only: a proxy from the environment must never see these requests.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Registry(Server):
    """docker-registry as a server process (pinned with the servers, CPU and RSS measured
    like theirs); plain HTTP, no auth, the filesystem driver under ``storage``."""

    storage: Path | None = None

    @classmethod
    def create(cls, storage: Path, workdir: Path, logs: Path) -> Registry:
        port = free_port()
        config = workdir / "docker-registry.yml"
        # YAML's flow subset: JSON is YAML, so no YAML writer is needed.
        config.write_text(
            json.dumps(
                {
                    "version": "0.1",
                    "log": {"level": "warn", "formatter": "text"},
                    "storage": {
                        "filesystem": {"rootdirectory": str(storage)},
                        "maintenance": {"uploadpurging": {"enabled": False}},
                    },
                    "http": {"addr": f"{HOST}:{port}", "secret": secrets.token_hex(16)},
                },
                indent=1,
            )
            + "\n"
        )
        storage.mkdir(parents=True, exist_ok=True)
        argv = [REGISTRY, "serve", str(config)]
        return cls(
            "docker-registry",
            argv,
            port,
            False,
            logs / "docker-registry.log",
            None,
            storage=storage,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def source(self) -> str:
        """What ``erofs-nbdd serve`` is given: the repository, every tag in it an export."""
        return f"oci+http://{HOST}:{self.port}/{REPOSITORY}"

    def environment(self) -> dict[str, str] | None:
        """REGISTRY_* variables override the config file: none of the caller's apply."""
        return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}

    def start(self, cpus: str | None) -> None:
        super().start(cpus)  # bounded wait for the port
        deadline = time.monotonic() + READY_TIMEOUT
        last: object = None
        while time.monotonic() < deadline:
            try:
                with _direct.open(f"{self.url}/v2/", timeout=2) as r:
                    if r.status == 200:
                        return
                    last = r.status
            except urllib.error.HTTPError as e:
                e.close()  # it holds the response's socket
                last = e
            except OSError as e:  # not listening yet
                last = e
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"docker-registry did not answer GET /v2/ within {READY_TIMEOUT:g} s ({last!r}):\n"
            f"{self.log.read_text(errors='replace')[-2000:]}"
        )

    def push(self, image: Path, authfile: Path) -> str:
        """``erofs-nbdd push IMAGE`` as REPOSITORY:TAG; the manifest's digest."""
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "erofs_nbdd",
                "push",
                "--authfile",
                str(authfile),
                str(image),
                f"oci+http://{HOST}:{self.port}/{REPOSITORY}:{TAG}",
            ],
            capture_output=True,
            text=True,
            timeout=PUSH_TIMEOUT,
            cwd=ROOT,
        )
        if done.returncode != 0:
            raise RuntimeError(f"erofs-nbdd push failed:\n{done.stderr[-2000:]}")
        return done.stdout.strip().splitlines()[-1]

    def layer(self) -> tuple[str, int]:
        """(digest, size) of the one layer of REPOSITORY:TAG, as the registry serves it."""
        request = urllib.request.Request(
            f"{self.url}/v2/{REPOSITORY}/manifests/{TAG}", headers={"Accept": MANIFEST}
        )
        with _direct.open(request, timeout=10) as r:
            manifest: dict[str, Any] = json.load(r)
        (layer,) = manifest["layers"]
        return str(layer["digest"]), int(layer["size"])

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (for the page cache)."""
        assert self.storage is not None
        hexdigest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def curl_get(self, digest: str, size: int, cpus: str | None) -> dict[str, float]:
        """One GET of the whole blob by curl, as a client (on the clients' CPU): MiB/s."""
        argv = [
            "curl",
            "-s",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{speed_download} %{time_total}",
            f"{self.url}/v2/{REPOSITORY}/blobs/{digest}",
        ]
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CURL_TIMEOUT)
        fields = done.stdout.split()
        if done.returncode != 0 or len(fields) != 4 or fields[0] != "200":
            raise RuntimeError(f"curl GET of {digest} failed: {done.stdout} {done.stderr}")
        if int(fields[1]) != size:
            raise RuntimeError(f"curl GET of {digest}: {fields[1]} bytes, not {size}")
        return {"mib_s": float(fields[2]) / (1 << 20), "seconds": float(fields[3])}
