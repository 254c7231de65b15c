"""A registry that misbehaves (an HTTP server of the test's own, as the hostile-client tests
have their own clients): the server refuses what it must, serves what it can, and lives."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ..interop.conftest import RunningServer, run, start_server_process, stop_server_process
from .helpers import md5, md5_of_export

pytestmark = pytest.mark.interop

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class Hostile:
    """Serves one EROFS image as several tags, each broken in its own way."""

    def __init__(self, image: Path) -> None:
        self.blob = image.read_bytes()
        self.digest = "sha256:" + hashlib.sha256(self.blob).hexdigest()
        layer = {"mediaType": "application/vnd.erofs.layer.v1", "digest": self.digest}
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "layers": [{**layer, "size": len(self.blob)}],
            }
        ).encode()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                hostile.answer(self)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    @property
    def source(self) -> str:
        return f"oci+http://127.0.0.1:{self.http.server_address[1]}/team/app"

    def _send(self, r: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
        r.send_response(status)
        for key, value in headers.items():
            r.send_header(key.replace("_", "-"), value)
        r.send_header("Content-Length", str(len(body)))
        r.end_headers()
        if r.command != "HEAD":
            r.wfile.write(body)

    def answer(self, r: BaseHTTPRequestHandler) -> None:
        path = r.path.partition("?")[0]
        if path == "/v2/":
            return self._send(r, 200, b"{}")
        if path == "/v2/team/app/tags/list":
            tags = ["good", "huge", "../../escape", "no-range", "short", "UPPER/../x", "traversal"]
            body = json.dumps({"name": "team/app", "tags": tags}).encode()
            # a next page elsewhere: our credentials must not follow it there
            elsewhere = f"<http://127.0.0.1:{self.http.server_address[1] + 1}/v2/x>; rel=next"
            return self._send(r, 200, body, Link=elsewhere)
        if path.startswith("/v2/team/app/manifests/"):
            tag = path.rpartition("/")[2]
            if tag == "huge":  # far past any manifest: must not be read into memory
                return self._send(r, 200, b"{" + b" " * (64 * 1024 * 1024) + b"}")
            if tag == "traversal":  # a "digest" that is a path out of the cache
                bad = self.manifest.replace(self.digest.encode(), b"sha256:" + b"/.." * 21 + b"/x")
                return self._send(r, 200, bad, Content_Type=OCI_MANIFEST)
            if tag in ("good", "no-range", "short", self.digest):
                body = self.manifest
                return self._send(r, 200, body, Content_Type=OCI_MANIFEST)
            return self._send(r, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        if path == f"/v2/team/app/blobs/{self.digest}":
            return self._blob(r)
        return self._send(r, 404, b"{}")

    def _blob(self, r: BaseHTTPRequestHandler) -> None:
        mode = getattr(self, "mode", "good")
        spec = (r.headers.get("Range") or "").removeprefix("bytes=")
        if mode == "no-range" or not spec:
            return self._send(r, 200, self.blob)  # the whole blob, Range ignored
        start, _, end = spec.partition("-")
        part = self.blob[int(start) : int(end) + 1]
        if mode == "short":
            part = part[: len(part) // 2]
        if mode == "drip":  # a byte every 0.2 s, for as long as the client waits
            r.send_response(206)
            r.send_header("Content-Range", f"bytes {start}-{end}/{len(self.blob)}")
            r.send_header("Content-Length", str(len(part)))
            r.end_headers()
            try:
                for i in range(len(part)):
                    r.wfile.write(part[i : i + 1])
                    r.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        total = len(self.blob)
        self._send(r, 206, part, Content_Range=f"bytes {start}-{end}/{total}")

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def hostile(erofs_images: dict[str, Path]) -> Iterator[Hostile]:
    found = Hostile(erofs_images["random"])
    yield found
    found.close()


@pytest.fixture
def server(hostile: Hostile, tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server_process(
        tmp_path,
        *("--cache", str(tmp_path / "cache"), "--source-timeout", "1"),
        source=hostile.source,
    )
    yield running
    assert stop_server_process(running) == 0, running.log_text()
    assert "Traceback" not in running.log_text(), running.log_text()


def test_names_that_are_paths_are_ignored(server: RunningServer, tmp_path: Path) -> None:
    out = run("nbdinfo", "--list", f"nbd://{server.address}", check=False)
    assert 'export="team/app:good"' in out.stdout, out.stdout + out.stderr
    assert "escape" not in out.stdout
    assert "ignored a tag named '../../escape'" in server.log_text(), server.log_text()
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside <= {"cache"}, outside  # nothing written beside the cache
    assert not list((tmp_path / "cache").rglob("*escape*"))


def test_a_huge_manifest_is_refused_unread(server: RunningServer, hostile: Hostile) -> None:
    before = server.rss_mib()
    out = run("nbdinfo", server.uri("team/app:huge"), check=False)
    assert out.returncode != 0
    assert "over 4194304 bytes" in server.log_text()
    assert server.rss_mib() - before < 32  # 64 MiB were sent
    assert md5_of_export(server, "team/app:good") == hashlib.md5(hostile.blob).hexdigest()


def test_a_registry_that_ignores_range_still_gives_the_right_bytes(
    server: RunningServer, hostile: Hostile, erofs_images: dict[str, Path]
) -> None:
    hostile.mode = "no-range"  # type: ignore[attr-defined]
    assert md5_of_export(server, "team/app:no-range") == md5(erofs_images["random"])


def test_short_answers_are_eio_and_the_server_lives(
    server: RunningServer, hostile: Hostile
) -> None:
    hostile.mode = "short"  # type: ignore[attr-defined]
    out = run("nbdcopy", "--", server.uri("team/app:short"), "null:", check=False)
    assert out.returncode != 0
    hostile.mode = "good"  # type: ignore[attr-defined]
    assert md5_of_export(server, "team/app:good") == hashlib.md5(hostile.blob).hexdigest()


def test_a_digest_that_is_a_path_is_refused(server: RunningServer, tmp_path: Path) -> None:
    out = run("nbdinfo", server.uri("team/app:traversal"), check=False)
    assert out.returncode != 0
    assert "has no sha256 digest" in server.log_text()
    assert not Path("/x").exists() and not Path("/x.map").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"cache"}


def test_next_pages_elsewhere_are_not_followed(server: RunningServer) -> None:
    run("nbdinfo", "--list", f"nbd://{server.address}", check=False)
    assert "ignored a next page elsewhere" in server.log_text()


def test_a_registry_that_drips_costs_a_bounded_wait(
    server: RunningServer, hostile: Hostile
) -> None:
    hostile.mode = "drip"  # type: ignore[attr-defined]
    started = time.monotonic()
    out = run("nbdcopy", "--", server.uri("team/app:good"), "null:", check=False, timeout=60)
    assert out.returncode != 0  # --source-timeout 1: EIO, not a wait of days
    assert time.monotonic() - started < 45
    assert "no whole answer in 1 s" in server.log_text()
