"""erofs-nbdd serving a real registry (docker-registry with TLS and auth, images pushed
with skopeo), read by peers nobody here wrote: nbdinfo, nbdcopy, qemu-img."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..interop.conftest import run, start_server_process, stop_server_process
from .helpers import (
    blob_gets,
    layer_digest,
    list_exports,
    md5,
    md5_of_export,
    push_image,
    registry_args,
    serving,
    source,
)
from .registryd import build_oci_layout

if TYPE_CHECKING:
    from .registryd import Registry

pytestmark = pytest.mark.interop


def test_every_byte_through_a_tls_registry_with_basic_auth(
    registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    tree, rand = erofs_images["tree"], erofs_images["random"]
    manifest = push_image(registry, tmp_path, [tree], "team/app:v1")
    push_image(registry, tmp_path, [rand], "team/app:v2")
    with serving(registry, tmp_path / "cache") as server:
        listed = list_exports(server)
        assert set(listed) == {"team/app:v1", "team/app:v2"}, listed
        assert manifest[:19] in listed["team/app:v1"] and "EROFS" in listed["team/app:v1"]
        assert md5_of_export(server, "team/app:v1") == md5(tree)
        assert md5_of_export(server, "team/app:v2") == md5(rand)
        # by digest too: the manifest's, and the layer's
        assert md5_of_export(server, f"team/app@{manifest}") == md5(tree)
        assert md5_of_export(server, f"team/app@{layer_digest(rand)}") == md5(rand)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(tree), server.uri("team/app:v1"))
        # a name that is no tag is refused with a message, and the server goes on
        out = run("nbdinfo", server.uri("team/app:nope"), check=False)
        assert out.returncode != 0 and "No such file" in out.stderr, out.stderr
        assert "team/app:nope: no such tag" in server.log_text()
    cache = tmp_path / "cache"
    # one copy per blob, whole and verified, named by digest
    assert (cache / "blobs" / "sha256" / layer_digest(tree).removeprefix("sha256:")).exists()
    assert "complete and verified" in server.log_text()
    for path in cache.rglob("*"):  # nothing in the cache holds the password
        if path.is_file():
            assert registry.password.encode() not in path.read_bytes(), path
    assert registry.password not in server.log_text()


def test_token_auth_and_renewal(
    token_registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    rand = erofs_images["random"]
    push_image(token_registry, tmp_path, [rand], "team/app:v1")
    token_registry.token_lifetime = 3
    with serving(token_registry, tmp_path / "cache") as server:
        assert md5_of_export(server, "team/app:v1") == md5(rand)
        issued = token_registry.tokens_issued
        # past the token's lifetime: a new negotiation (and its fetches) needs a new token
        time.sleep(3.5)
        out = run("nbdinfo", "--json", server.uri("team/app:v1"))
        assert json.loads(out.stdout)["exports"][0]["export-size"] == rand.stat().st_size
        assert token_registry.tokens_issued > issued
        for token_line in token_registry.log_text().splitlines():
            assert token_line not in server.log_text()


def test_push_is_read_by_skopeo(
    registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    tree, rand = erofs_images["tree"], erofs_images["random"]
    target = source(registry, "team/pushed") + ":v1"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "erofs_nbdd", "push", str(tree), str(rand), target),
            *("--authfile", str(registry.authfile), "--certs-d", str(registry.certs_d)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    digest = out.stdout.strip()
    raw = registry.inspect_raw("team/pushed:v1")
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    manifest = json.loads(raw)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.erofs.layer.v1"
    ] * 2
    assert [layer["digest"] for layer in manifest["layers"]] == [
        layer_digest(tree),
        layer_digest(rand),
    ]
    assert "of" in out.stderr  # progress
    # a second push sends no layer again
    again = subprocess.run(
        [
            *(sys.executable, "-m", "erofs_nbdd", "push", str(tree), str(rand), target),
            *("--authfile", str(registry.authfile), "--certs-d", str(registry.certs_d)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0 and again.stdout.strip() == digest, again.stderr
    assert again.stderr.count("already in the registry") == 2, again.stderr
    # and the server serves it: two layers, each by digest, the tag's description lists them
    with serving(registry, tmp_path / "cache", repository="team/pushed") as server:
        assert md5_of_export(server, f"team/pushed@{layer_digest(rand)}") == md5(rand)
        out2 = run("nbdinfo", server.uri("team/pushed:v1"), check=False)
        assert out2.returncode != 0, out2.stdout
        assert "2 EROFS layers" in server.log_text()


def test_push_refuses_what_is_not_erofs(registry: Registry, tmp_path: Path) -> None:
    junk = tmp_path / "junk.erofs"
    junk.write_bytes(b"not an image" * 1000)
    out = subprocess.run(
        [sys.executable, "-m", "erofs_nbdd", "push", str(junk), source(registry) + ":x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0 and "not an EROFS image" in out.stderr, out.stderr


@pytest.mark.parametrize("problem", ["password", "ca", "down"])
def test_start_checks_each_registry(registry: Registry, tmp_path: Path, problem: str) -> None:
    args = registry_args(registry, tmp_path / "cache")
    if problem == "password":
        bad = tmp_path / "auth.json"
        entry = base64.b64encode(f"{registry.user}:wrong".encode()).decode()
        bad.write_text(json.dumps({"auths": {registry.host: {"auth": entry}}}))
        args[args.index("--authfile") + 1] = str(bad)
    elif problem == "ca":
        i = args.index("--certs-d")
        del args[i : i + 2]
    else:
        registry.stop()
    command = [sys.executable, "-m", "erofs_nbdd", "serve", source(registry), *args]
    if problem == "down":
        server = start_server_process(tmp_path, *args, source=source(registry))
        assert "unreachable" in server.log_text() and registry.host in server.log_text()
        assert stop_server_process(server) == 0
        return
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1, out.stderr
    assert registry.host in out.stderr
    if problem == "password":
        assert "refused" in out.stderr and str(bad) in out.stderr, out.stderr
        assert "wrong" not in out.stderr
    else:
        assert "certificate" in out.stderr and "certs.d" in out.stderr, out.stderr


def test_uncached_and_cached_reads_share_one_copy(
    registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    """Two tags and two repositories with one layer: one blob in the cache, fetched once
    a chunk."""
    rand = erofs_images["random"]
    push_image(registry, tmp_path, [rand], "team/app:v1")
    push_image(registry, tmp_path, [rand], "team/app:v2")
    with serving(registry, tmp_path / "cache") as server:
        assert md5_of_export(server, "team/app:v1") == md5(rand)
        assert md5_of_export(server, "team/app:v2") == md5(rand)
    blobs = list((tmp_path / "cache" / "blobs" / "sha256").iterdir())
    assert [b.name for b in blobs] == [layer_digest(rand).removeprefix("sha256:")]
    chunks = -(-rand.stat().st_size // (1024 * 1024))
    assert 1 <= blob_gets(registry, layer_digest(rand)) <= chunks, registry.log_text()


def test_over_nbd_tls_cached_ranges_take_the_file_path(
    registry: Registry, erofs_images: dict[str, Path], tmp_path: Path, made_certs: Path
) -> None:
    """A registry export behind --tls require: first read fetched, second from the cache
    file (kernel TLS sends it by sendfile where the host has it)."""
    tree = erofs_images["tree"]
    push_image(registry, tmp_path, [tree], "team/app:v1")
    tls = ("--tls", "require", "--tls-certificates", str(made_certs))
    with serving(registry, tmp_path / "cache", *tls) as server:
        alice = made_certs / "clients" / "alice"
        uri = f"nbds://{server.address}/team/app:v1?tls-certificates={alice}"
        for _ in range(2):
            out = subprocess.run(
                ["nbdcopy", "--", uri, "-"], capture_output=True, timeout=120, check=False
            )
            assert out.returncode == 0, out.stderr.decode() + server.log_text()
            assert hashlib.md5(out.stdout).hexdigest() == md5(tree)


def test_a_layer_that_is_not_erofs_is_refused_with_the_reason(
    registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    tar = tmp_path / "layer.tar"
    subprocess.run(["tar", "-cf", str(tar), "-C", str(tmp_path), "."], check=True, timeout=60)
    layout = tmp_path / "layout"
    gzip_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    build_oci_layout(layout, [tar], "tar", media_type=gzip_type)
    registry.push(layout, "tar", "team/app:tar")
    push_image(registry, tmp_path, [erofs_images["random"]], "team/app:good")
    with serving(registry, tmp_path / "cache") as server:
        assert set(list_exports(server)) == {"team/app:good"}  # LIST leaves it out
        out = run("nbdinfo", server.uri("team/app:tar"), check=False)
        assert out.returncode != 0
        run("nbdinfo", server.uri("team/app:tar"), check=False)
        reason = f"team/app:tar: layer 1 of 1 is {gzip_type}, not EROFS"
        assert server.log_text().count(reason) == 2, server.log_text()  # LIST's, and GO's once


def test_a_name_the_first_registry_lacks_is_served_by_the_next(
    registry: Registry, plain_registry: Registry, erofs_images: dict[str, Path], tmp_path: Path
) -> None:
    """A whole-catalog source claims every name: a refusal from it lets the next try."""
    rand = erofs_images["random"]
    push_image(plain_registry, tmp_path, [rand], "team/app:v1")
    push_image(registry, tmp_path / "other", [rand], "team/else:v1")  # a catalog to list
    with serving(
        registry, tmp_path / "cache", repository=None, more=(source(plain_registry),)
    ) as server:
        assert md5_of_export(server, "team/app:v1") == md5(rand)
