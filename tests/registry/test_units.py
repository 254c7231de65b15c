"""The registry code's pure parts: names, manifests, credentials, challenges, sizes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from erofs_nbdd.registry.auth import parse_challenge, scope_of
from erofs_nbdd.registry.credentials import CredentialError, find_credentials
from erofs_nbdd.registry.manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    BadManifest,
    Index,
    Manifest,
    parse,
)
from erofs_nbdd.registry.reference import BadReference, ImageName, parse_image_name, parse_source
from erofs_nbdd.storage.blobcache import parse_size

HEX = "ab" * 32


def test_sources() -> None:
    spec, tag = parse_source("oci://Registry.example:5000/team/app")
    assert (spec.host, spec.repository, spec.tls, tag) == (
        "registry.example:5000",
        "team/app",
        True,
        None,
    )
    assert parse_source("oci+http://127.0.0.1:5000")[0].repository is None
    assert not parse_source("oci+http://127.0.0.1:5000")[0].tls
    assert parse_source("oci://h:1/a/b:v1", allow_tag=True)[1] == "v1"
    for bad in ("http://h/a", "oci://", "oci://h/UPPER", "oci://h/a//b", "oci://h:x/a"):
        with pytest.raises(BadReference):
            parse_source(bad)


def test_image_names() -> None:
    assert parse_image_name("team/app:v1") == ImageName("team/app", tag="v1")
    assert parse_image_name(f"team/app@sha256:{HEX}") == ImageName(
        "team/app", digest=f"sha256:{HEX}"
    )
    assert str(ImageName("a", tag="t")) == "a:t"
    # file exports' names and mistakes are not image names
    for other in ("demo", "team/app-v2", "team/app@sha256:12", "Team/app:v1", "a:b:c"):
        assert parse_image_name(other) is None, other


def _manifest(layers: list[dict[str, object]], **extra: object) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": layers, **extra}
    ).encode()


def test_manifest_and_index() -> None:
    layer = {"mediaType": "application/vnd.erofs.layer.v1", "digest": f"sha256:{HEX}", "size": 4096}
    found = parse(_manifest([layer]), "sha256:" + "0" * 64)
    assert isinstance(found, Manifest)
    assert found.layers[0].size == 4096
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": f"sha256:{'1' * 64}",
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": f"sha256:{'2' * 64}",
                "size": 1,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
        ],
    }
    parsed = parse(json.dumps(index).encode(), "sha256:" + "3" * 64)
    assert isinstance(parsed, Index)
    assert parsed.choose("linux/amd64").digest.endswith("2" * 64)
    assert parsed.choose("linux/arm64").digest.endswith("1" * 64)  # any variant
    with pytest.raises(BadManifest, match="no image for linux/s390x"):
        parsed.choose("linux/s390x")
    for bad in (b"{", b'{"schemaVersion": 1}', _manifest([{"digest": "md5:x", "size": 1}])):
        with pytest.raises(BadManifest):
            parse(bad, "sha256:" + "0" * 64)


def test_credentials_order_and_secrecy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def auth(user: str, password: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}

    runtime = tmp_path / "run"
    (runtime / "containers").mkdir(parents=True)
    (runtime / "containers" / "auth.json").write_text(
        json.dumps({"auths": {"h:1": auth("runtime", "s1"), "h:1/team/app": auth("repo", "s2")}})
    )
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(
        json.dumps({"auths": {"https://other:2/v1/": auth("d", "s3")}})
    )
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_credentials("h:1", "team/app").username == "repo"  # type: ignore[union-attr]
    assert find_credentials("h:1", "team/other").username == "runtime"  # type: ignore[union-attr]
    found = find_credentials("other:2", None)
    assert found is not None and found.username == "d" and "s3" not in repr(found)
    assert find_credentials("nowhere:3", None) is None
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"auths": {"h:1": auth("first", "s4")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(first))
    assert find_credentials("h:1", "team/app").username == "first"  # type: ignore[union-attr]
    first.write_text(json.dumps({"auths": {"h:1": {"auth": "not base64!"}}}))
    with pytest.raises(CredentialError) as excinfo:
        find_credentials("h:1", None)
    assert str(first) in str(excinfo.value)
    with pytest.raises(CredentialError, match="no such file"):
        find_credentials("h:1", None, authfile=tmp_path / "missing.json")


def test_challenges_and_scopes() -> None:
    found = parse_challenge(
        'Bearer realm="https://auth/token",service="reg",scope="repository:a:pull"'
    )
    assert found is not None and found.scheme == "bearer"
    assert found.params == {
        "realm": "https://auth/token",
        "service": "reg",
        "scope": "repository:a:pull",
    }
    assert parse_challenge('Basic realm="x"').scheme == "basic"  # type: ignore[union-attr]
    assert (
        scope_of(httpx.Request("GET", "https://h/v2/team/app/blobs/sha256:x"))
        == "repository:team/app:pull"
    )
    assert scope_of(httpx.Request("PUT", "https://h/v2/a/manifests/v1")) == "repository:a:pull,push"
    assert scope_of(httpx.Request("GET", "https://h/v2/_catalog")) == "registry:catalog:*"


def test_sizes() -> None:
    assert parse_size("20G") == 20 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5k") == 1536
    assert parse_size("4096") == 4096
    assert parse_size("2GiB") == 2 << 30
    for bad in ("", "G", "-1G", "0", "ten", "nan"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_credentials_go_only_to_the_registry() -> None:
    from erofs_nbdd.registry.auth import RegistryAuth
    from erofs_nbdd.registry.credentials import Credentials

    auth = RegistryAuth(httpx.URL("https://reg:5000"), "reg:5000", Credentials("u", "secret"))
    auth._scheme = "basic"  # as after the registry's first challenge
    ours = next(auth.auth_flow(httpx.Request("GET", "https://reg:5000/v2/a/tags/list")))
    assert ours.headers["Authorization"].startswith("Basic ")
    for elsewhere in ("https://storage:443/blob", "http://reg:5000/v2/", "https://reg:5001/v2/"):
        sent = next(auth.auth_flow(httpx.Request("GET", elsewhere)))
        assert "Authorization" not in sent.headers, elsewhere
    assert "secret" not in repr(auth.credentials)
