"""Credentials and trust for a registry, found where docker, podman and skopeo look, so a
host that can ``skopeo login`` or ``podman pull`` can serve without more setup.

Credentials are read when a registry source is set up, kept in memory only, and never
written, logged or put in an error message: messages name the file they came from.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CERTS_D = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


class CredentialError(ValueError):
    """An auth file that cannot be used; the message names it, never its secrets."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = ""
    #: Where they were found, for messages.
    origin: str = ""

    def __repr__(self) -> str:  # a stray %r in a log line shows no secret
        return f"Credentials(from {self.origin or '?'})"


def auth_files(authfile: Path | None = None) -> list[Path]:
    """The files searched, in the order containers/image and docker search them."""
    env = os.environ
    found: list[Path] = []
    if authfile is not None:
        return [authfile]
    if env.get("REGISTRY_AUTH_FILE"):
        found.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        found.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config_home = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    found.append(Path(config_home) / "containers" / "auth.json")
    if env.get("DOCKER_CONFIG"):
        found.append(Path(env["DOCKER_CONFIG"]) / "config.json")
    found.append(Path.home() / ".docker" / "config.json")
    return found


def _key_host(key: str) -> str:
    """docker writes ``https://HOST/v1/`` for some hosts; the rest write HOST[/PATH]."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            return key[len(prefix) :].partition("/")[0]
    return key.rstrip("/")


def _decode(entry: object, origin: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        try:
            text = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except ValueError as exc:
            raise CredentialError(f'{origin}: an "auth" entry is not base64 user:password') from exc
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise CredentialError(f'{origin}: an "auth" entry is not base64 user:password')
        return Credentials(user, password, origin)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password") or ""), origin)
    return None


def find_credentials(
    host: str, repository: str | None, *, authfile: Path | None = None
) -> Credentials | None:
    """The first credentials for ``host`` (most specific repository key first, as podman
    reads ``host/namespace`` keys), or None to go anonymous."""
    keys = [host]
    if repository:
        parts = repository.split("/")
        keys = [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + keys
    for path in auth_files(authfile):
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            if authfile is not None:
                raise CredentialError(f"--authfile {path}: no such file") from None
            continue
        except (OSError, ValueError) as exc:
            raise CredentialError(f"{path}: cannot read it as JSON: {exc}") from exc
        auths = raw.get("auths") if isinstance(raw, dict) else None
        if not isinstance(auths, dict):
            continue
        by_host = {_key_host(k) if k.startswith("http") else k: v for k, v in auths.items()}
        for key in keys:
            creds = _decode(by_host.get(key), str(path))
            if creds is not None:
                return creds
        if isinstance(raw, dict) and (
            host in (raw.get("credHelpers") or {}) or raw.get("credsStore")
        ):
            log.warning(
                "%s: credential helpers are not used here; for %s, put the credentials in "
                "an auth file (skopeo login --authfile FILE %s) and pass --authfile FILE",
                path,
                host,
                host,
            )
    return None


def cert_dirs(host: str, extra: tuple[Path, ...] = ()) -> list[Path]:
    """The certs.d directories for ``host`` that exist, searched in this order."""
    return [root / host for root in (*extra, *CERTS_D) if (root / host).is_dir()]


def tls_context(host: str, extra: tuple[Path, ...] = ()) -> ssl.SSLContext:
    """The system store plus the host's certs.d CAs (``*.crt``) and client certificate
    (``*.cert`` with its ``*.key``), as docker and containers/image build theirs."""
    context = ssl.create_default_context()
    for directory in cert_dirs(host, extra):
        for crt in sorted(directory.glob("*.crt")):
            try:
                context.load_verify_locations(cafile=crt)
            except (OSError, ssl.SSLError) as exc:
                raise CredentialError(f"{crt}: not a CA certificate in PEM: {exc}") from exc
        for cert in sorted(directory.glob("*.cert")):
            key = cert.with_suffix(".key")
            try:
                context.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise CredentialError(f"{cert} with {key}: cannot load them: {exc}") from exc
    return context
