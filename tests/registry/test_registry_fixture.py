"""The registry fixtures are real: skopeo pushes to and reads from them, curl range-reads
blobs, and the registry itself refuses wrong passwords, forged tokens and expired ones."""

from __future__ import annotations

import hashlib
import json
import socket
import time
import urllib.error
from pathlib import Path

import pytest
import trustme

from .registryd import (
    EROFS_LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    Registry,
    TokenSigner,
    build_oci_layout,
)


@pytest.fixture(params=["registry", "token_registry", "plain_registry"])
def any_registry(request: pytest.FixtureRequest) -> Registry:
    """Each kind of registry in turn."""
    registry: Registry = request.getfixturevalue(request.param)
    return registry


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def pushed(registry: Registry, tmp_path: Path, image: Path, ref: str) -> str:
    """Push a one-layer image of ``image``; → its manifest digest."""
    layout = tmp_path / "layout"
    digest = build_oci_layout(layout, [image], "v1")
    registry.push(layout, "v1", ref)
    return digest


def test_skopeo_round_trip(
    any_registry: Registry, tmp_path: Path, erofs_images: dict[str, Path]
) -> None:
    """Two tags from one layout go in; skopeo reads back the very manifests (same digest,
    EROFS layer media type) and the registry's storage holds the image bytes as they are."""
    registry = any_registry
    layout = tmp_path / "layout"
    tree, rand = erofs_images["tree"], erofs_images["random"]
    one = build_oci_layout(layout, [tree], "one", annotations={"org.example.note": "one"})
    two = build_oci_layout(layout, [tree, rand], "two")
    assert len(json.loads((layout / "index.json").read_text())["manifests"]) == 2
    registry.push(layout, "one", "erofs/demo:one")
    registry.push(layout, "two", "erofs/demo:two")

    raw = registry.inspect_raw("erofs/demo:one")
    assert sha256(raw) == one, registry.log_text()
    manifest = json.loads(raw)
    assert manifest["mediaType"] == MANIFEST_MEDIA_TYPE
    assert manifest["annotations"] == {"org.example.note": "one"}
    assert [layer["mediaType"] for layer in manifest["layers"]] == [EROFS_LAYER_MEDIA_TYPE]

    raw = registry.inspect_raw(f"erofs/demo@{two}")
    assert sha256(raw) == two
    layers = json.loads(raw)["layers"]
    for layer, image in zip(layers, [tree, rand], strict=True):
        data = image.read_bytes()
        assert layer == {
            "mediaType": EROFS_LAYER_MEDIA_TYPE,
            "digest": sha256(data),
            "size": len(data),
        }
        assert registry.blob_path(layer["digest"]).read_bytes() == data


def test_curl_range_read(
    any_registry: Registry, tmp_path: Path, erofs_images: dict[str, Path]
) -> None:
    """A ranged blob GET (what an NBD read of a registry-backed image becomes) answers 206
    with exactly those bytes: the EROFS superblock is at 1024, inside the first 4 KiB."""
    registry = any_registry
    image = erofs_images["random"]
    data = image.read_bytes()
    pushed(registry, tmp_path, image, "erofs/random:v1")
    got = registry.curl(
        f"/v2/erofs/random/blobs/{sha256(data)}",
        "--range",
        "0-4095",
        authorization=registry.authorization("erofs/random"),
    )
    assert got.status == 206, (got.headers, registry.log_text())
    assert got.body == data[:4096]
    assert got.body[1024:1028] == b"\xe2\xe1\xf5\xe0"  # EROFS_SUPER_MAGIC_V1, little-endian
    tail = registry.curl(
        f"/v2/erofs/random/blobs/{sha256(data)}",
        "--range",
        f"{len(data) - 100}-",
        authorization=registry.authorization("erofs/random"),
    )
    assert (tail.status, tail.body) == (206, data[-100:])


def test_wrong_password_refused(
    registry: Registry, tmp_path: Path, erofs_images: dict[str, Path]
) -> None:
    """htpasswd is enforced by the registry, for curl and for skopeo."""
    digest = pushed(registry, tmp_path, erofs_images["tree"], "erofs/tree:v1")
    path = f"/v2/erofs/tree/manifests/{digest}"
    # distribution answers 404 for an OCI manifest unless Accept names its media type
    accept = ("--header", f"Accept: {MANIFEST_MEDIA_TYPE}")
    right = registry.curl(path, *accept, "--user", f"{registry.user}:{registry.password}")
    assert (right.status, sha256(right.body)) == (200, digest), registry.log_text()
    refused = registry.curl(path, *accept, "--user", f"{registry.user}:wrong")
    assert refused.status == 401, registry.log_text()
    assert "www-authenticate: basic" in refused.headers.lower()
    assert registry.curl(path, *accept).status == 401
    result = registry.skopeo(
        "inspect",
        "--raw",
        "--creds",
        f"{registry.user}:wrong",
        "--cert-dir",
        str(registry.certs_d / registry.host),
        f"docker://{registry.host}/erofs/tree:v1",
        check=False,
    )
    assert result.returncode != 0
    assert b"401" in result.stderr or b"unauthorized" in result.stderr.lower(), result.stderr


def test_token_auth_refusals(
    token_registry: Registry, tmp_path: Path, erofs_images: dict[str, Path]
) -> None:
    """The issuer refuses a wrong password; the registry refuses an anonymous token (no
    access), a token for another repository, for another audience, or signed by a
    certificate its rootcertbundle does not vouch for; it accepts our signer's."""
    registry = token_registry
    assert registry.issuer is not None
    data = erofs_images["tree"].read_bytes()
    pushed(registry, tmp_path, erofs_images["tree"], "erofs/tree:v1")
    path = f"/v2/erofs/tree/blobs/{sha256(data)}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        registry.fetch_token("repository:erofs/tree:pull", password="wrong")
    refused.value.close()
    assert refused.value.code == 401
    assert registry.issuer.refused == 1

    def status(token: str) -> int:
        return registry.curl(path, "--head", authorization=f"Bearer {token}").status

    pull = [{"type": "repository", "name": "erofs/tree", "actions": ["pull"]}]
    assert status(registry.fetch_token("repository:erofs/tree:pull")) == 200
    assert status(registry.fetch_token("repository:erofs/tree:pull", user="")) == 401
    assert status(registry.fetch_token("repository:erofs/other:pull")) == 401
    assert status(registry.issuer.signer.sign("tester", pull)) == 200
    assert status(registry.issuer.signer.sign("tester", pull, audience="elsewhere")) == 401
    assert status(TokenSigner(trustme.CA()).sign("tester", pull)) == 401
    assert "unable to verify certificate chain" in registry.log_text()


def test_token_expiry_forces_renewal(
    token_registry: Registry, tmp_path: Path, erofs_images: dict[str, Path]
) -> None:
    """With a 3 s lifetime the registry accepts a token, then refuses the same token once it
    expired (despite distribution's 60 s leeway), and a renewed one works again."""
    registry = token_registry
    data = erofs_images["random"].read_bytes()
    pushed(registry, tmp_path, erofs_images["random"], "erofs/random:v1")
    path = f"/v2/erofs/random/blobs/{sha256(data)}"
    registry.token_lifetime = 3
    before = registry.tokens_issued
    issued = time.monotonic()
    old = f"Bearer {registry.fetch_token('repository:erofs/random:pull')}"
    first = registry.curl(path, "--range", "0-4095", authorization=old)
    assert (first.status, first.body) == (206, data[:4096]), registry.log_text()

    deadline = issued + 15
    while (again := registry.curl(path, "--head", authorization=old)).status == 200:
        assert time.monotonic() < deadline, f"token still accepted:\n{registry.log_text()}"
        time.sleep(0.2)
    assert again.status == 401, (again.headers, registry.log_text())
    assert 'error="invalid_token"' in again.headers
    # whole-second claims: a token is good for lifetime - 1 s at least
    assert time.monotonic() - issued >= registry.token_lifetime - 1

    renewed = registry.authorization("erofs/random")
    assert registry.tokens_issued == before + 2
    assert registry.curl(path, "--head", authorization=renewed).status == 200
    # skopeo renews on its own too (each run asks the issuer again)
    registry.inspect_raw("erofs/random:v1")
    assert registry.tokens_issued > before + 2


def test_restart_keeps_port_and_storage(
    registry: Registry, tmp_path: Path, erofs_images: dict[str, Path]
) -> None:
    """stop() really stops the process (the port refuses connections) and start() brings it
    back on the same host with the same content."""
    digest = pushed(registry, tmp_path, erofs_images["tree"], "erofs/tree:v1")
    registry.stop()
    assert not registry.running()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", registry.port), timeout=5),
    ):
        pass
    registry.start()
    assert sha256(registry.inspect_raw("erofs/tree:v1")) == digest
