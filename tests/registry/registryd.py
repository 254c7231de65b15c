"""A real OCI registry for tests: Debian's ``docker-registry`` (CNCF distribution 2.8) as a
fresh loopback process with TLS and htpasswd or token auth, filled with ``skopeo``.

Nothing here is ours on the wire: the registry, skopeo and curl are the peers, so a test that
passes against them shows the registry client speaks the real protocol, not our idea of it.
The one piece written here, the token issuer, implements the Docker token protocol just far
enough for distribution to accept its JWTs (it verifies them; we only sign).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import shutil
import ssl
import subprocess
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ..conftest import free_port, require_tool

Auth = Literal["htpasswd", "token", "none"]

START_TIMEOUT = 20.0  # until GET /v2/ answers
STOP_TIMEOUT = 10.0  # SIGTERM to exit, then SIGKILL
TOOL_TIMEOUT = 60.0  # one skopeo or curl run
LOG_TAIL = 20_000  # characters of the registry's log in a failure message
SERVICE = "test-registry"
ISSUER = "test-issuer"
# distribution's registry/auth/token accepts a token until exp + 60 s (and from nbf - 60 s)
# "for clock skew"; the issuer backdates exp by this much so `lifetime` is the real one.
TOKEN_LEEWAY = 60

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
EROFS_LAYER_MEDIA_TYPE = "application/vnd.erofs.layer.v1"
REF_NAME = "org.opencontainers.image.ref.name"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# Loopback only: a proxy from the environment must never see these requests.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(
    request: str | urllib.request.Request, *, context: ssl.SSLContext | None, timeout: float = 10
) -> Any:
    """urllib without proxies, with ``context`` for https (None: plain http)."""
    opener = _direct
    if context is not None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
    return opener.open(request, timeout=timeout)


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def run_tool(
    args: Sequence[str | Path],
    *,
    why: str,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = TOOL_TIMEOUT,
    log: Callable[[], str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a peer tool, bounded; a failure (or, with ``check``, a non-zero exit) raises an
    AssertionError carrying its stderr and the tail of ``log()`` (the registry's), so CI
    shows why."""
    argv = [str(a) for a in args]

    def logged() -> str:
        return "" if log is None else f"\nregistry log (tail):\n{log()[-LOG_TAIL:]}"

    try:
        result = subprocess.run(
            argv, capture_output=True, timeout=timeout, env=None if env is None else dict(env)
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{why}: {argv} still running after {timeout} s\n"
            f"stderr: {(e.stderr or b'').decode(errors='replace')}{logged()}"
        ) from None
    if check and result.returncode != 0:
        raise AssertionError(
            f"{why}: {argv} exited {result.returncode}\n"
            f"stderr: {result.stderr.decode(errors='replace')}{logged()}"
        )
    return result


class _IssuerHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    log: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Kept for the failure message instead of printed (a handshake a client dropped)."""
        self.log.append(traceback.format_exc())


class TokenSigner:
    """Signs registry tokens the way distribution 2.8 verifies them: ES256 with the key of a
    leaf certificate (issued by ``ca``) sent in the header's x5c, which the registry verifies
    against its rootcertbundle before it trusts the key."""

    def __init__(self, ca: trustme.CA) -> None:
        leaf = ca.issue_cert("token-signer.test", common_name=ISSUER)
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._key = key
        der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER
        )
        self._x5c = [base64.b64encode(der).decode()]  # standard base64 (RFC 7515 4.1.6)

    def sign(
        self,
        subject: str,
        access: Sequence[Mapping[str, Any]],
        *,
        lifetime: float = 300.0,
        audience: str = SERVICE,
        issuer: str = ISSUER,
    ) -> str:
        """A compact JWS: {typ, alg, x5c} header, the claims, raw r||s signature; ``exp`` is
        backdated by TOKEN_LEEWAY so the registry stops accepting it after ``lifetime``."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "exp": now + math.ceil(lifetime) - TOKEN_LEEWAY,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": list(access),
        }
        signing_input = f"{_b64url(_canonical(header))}.{_b64url(_canonical(claims))}"
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


class TokenIssuer:
    """The Docker registry token protocol's authorization server, run in the test process:
    ``GET /token?service=S&scope=repository:NAME:pull,push`` with HTTP basic auth answers a
    JWT signed ES256 by a certificate whose CA is the registry's ``rootcertbundle``.

    Wrong credentials get 401; no credentials get a token with no access, which the registry
    then refuses for any repository (so anonymous pulls fail the way they do in production).
    """

    def __init__(
        self,
        *,
        user: str,
        password: str,
        signer_ca: trustme.CA,
        tls_ca: trustme.CA | None,
        lifetime: float = 300.0,
    ) -> None:
        self.user = user
        self.password = password
        self.lifetime = lifetime
        self.issued = 0  # tokens handed out, so tests can see a client renew
        self.refused = 0
        self.grants: list[tuple[str, list[str]]] = []  # (subject, scopes) per token
        self.log: list[str] = []
        self._lock = threading.Lock()
        self.signer = TokenSigner(signer_ca)

        issuer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10.0  # a client that connects and stalls frees its thread

            def setup(self) -> None:
                super().setup()
                if isinstance(self.connection, ssl.SSLSocket):
                    self.connection.do_handshake()  # here, in the request's thread

            def do_GET(self) -> None:
                issuer._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                with issuer._lock:
                    issuer.log.append(format % args)

        self._server = _IssuerHTTPServer(("127.0.0.1", 0), Handler)
        self._server.log = self.log
        self.scheme = "http"
        if tls_ca is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
            raw = self._server.socket
            self._server.socket = context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False
            )
            self.scheme = "https"
        port: int = self._server.server_address[1]
        self.realm = f"{self.scheme}://127.0.0.1:{port}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()  # returns within poll_interval once serve_forever sees it
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT)
        assert not self._thread.is_alive(), "token issuer thread did not stop"

    def log_text(self) -> str:
        with self._lock:
            return "".join(line if line.endswith("\n") else line + "\n" for line in self.log)

    def _subject(self, authorization: str | None) -> str | None:
        """ "" for anonymous, the user for the right basic credentials, None for wrong ones."""
        if authorization is None:
            return ""
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except ValueError:
            return None
        ok = secrets.compare_digest(user.encode(), self.user.encode())
        ok &= secrets.compare_digest(password.encode(), self.password.encode())
        return user if ok else None

    def _answer(self, request: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(request.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path != "/token":
            self._reply(request, 404, {"error": "not found"})
            return
        if query.get("service", [""])[0] != SERVICE:
            self._reply(request, 400, {"error": f"unknown service {query.get('service')}"})
            return
        subject = self._subject(request.headers.get("Authorization"))
        if subject is None:
            with self._lock:
                self.refused += 1
            self._reply(
                request, 401, {"error": "bad credentials"}, {"WWW-Authenticate": 'Basic realm="t"'}
            )
            return
        scopes = [s for value in query.get("scope", []) for s in value.split()]
        access = [] if subject == "" else [g for s in scopes if (g := _grant(s)) is not None]
        token = self.signer.sign(subject, access, lifetime=self.lifetime)
        with self._lock:
            self.issued += 1
            self.grants.append((subject, scopes))
        issued_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self._reply(
            request,
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": max(1, math.ceil(self.lifetime)),
                "issued_at": issued_at,
            },
        )

    @staticmethod
    def _reply(
        request: BaseHTTPRequestHandler,
        status: int,
        body: object,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.end_headers()
        request.wfile.write(data)


def _grant(scope: str) -> dict[str, Any] | None:
    """``type:name:actions`` (the name may hold colons, the actions are after the last)."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not kind or not name:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass(frozen=True)
class CurlResult:
    status: int
    body: bytes
    headers: str


@dataclass
class Registry:
    """One docker-registry process and everything a client needs to reach it."""

    host: str  # "127.0.0.1:PORT"
    root: Path  # the filesystem driver's rootdirectory
    ca: Path  # PEM of the CA that signed the server (and token issuer) certificates
    certs_d: Path  # laid out like /etc/containers/certs.d: certs_d/HOST/ca.crt
    user: str
    password: str
    authfile: Path  # containers-auth.json with the user's credentials for host
    tls: bool
    config: Path
    auth: Auth
    workdir: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    issuer: TokenIssuer | None = None
    _skopeo_files: Path | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def port(self) -> int:
        return int(self.host.rpartition(":")[2])

    @property
    def token_realm(self) -> str:
        assert self.issuer is not None, "not a token registry"
        return self.issuer.realm

    @property
    def token_lifetime(self) -> float:
        """Seconds the registry accepts a new token for (the issuer compensates the leeway)."""
        assert self.issuer is not None, "not a token registry"
        return self.issuer.lifetime

    @token_lifetime.setter
    def token_lifetime(self, seconds: float) -> None:
        assert self.issuer is not None, "not a token registry"
        self.issuer.lifetime = seconds

    @property
    def tokens_issued(self) -> int:
        return 0 if self.issuer is None else self.issuer.issued

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.ca)) if self.tls else None

    def log_text(self) -> str:
        """The registry's output over all its runs (and the token issuer's request log)."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        if self.issuer is not None:
            text += "--- token issuer ---\n" + self.issuer.log_text()
        return text

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start docker-registry on this host:port and storage (again after stop()), and
        wait until ``GET /v2/`` answers 200 or 401."""
        assert not self.running(), "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        with self.log_file.open("ab") as log:
            log.write(f"--- starting docker-registry on {self.host} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [require_tool("docker-registry"), "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        context = self.ssl_context()
        last: object = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"docker-registry exited with {self.process.returncode} while starting:\n"
                    f"{self.log_text()}"
                )
            try:
                with urlopen(f"{self.url}/v2/", context=context, timeout=2) as r:
                    if r.status == 200:
                        return
                    last = r.status
            except urllib.error.HTTPError as e:
                e.close()  # it holds the response's socket
                if e.code == 401:
                    return
                last = e
            except OSError as e:  # not listening yet (URLError, ConnectionError, SSLError)
                last = e
            time.sleep(0.05)
        self.stop()
        raise AssertionError(
            f"docker-registry did not answer GET {self.url}/v2/ within {START_TIMEOUT} s "
            f"(last: {last!r}):\n{self.log_text()}"
        )

    def stop(self) -> None:
        """SIGTERM, bounded wait, then SIGKILL; the storage stays for a later start()."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """stop() and the token issuer too: the fixture's teardown."""
        try:
            self.stop()
        finally:
            if self.issuer is not None:
                self.issuer.stop()

    def skopeo(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """skopeo with a trust policy, registries.d and tmpdir of our own (not the host's)."""
        files = self._skopeo_files
        if files is None:
            files = self._skopeo_files = self.workdir / "skopeo"
            (files / "registries.d").mkdir(parents=True, exist_ok=True)
            (files / "tmp").mkdir(exist_ok=True)
            (files / "policy.json").write_text(
                json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
            )
            (files / "registries.conf").write_text("")
        env = {**os.environ, "CONTAINERS_REGISTRIES_CONF": str(files / "registries.conf")}
        return run_tool(
            [
                require_tool("skopeo"),
                "--policy",
                files / "policy.json",
                "--registries.d",
                files / "registries.d",
                "--tmpdir",
                files / "tmp",
                *args,
            ],
            why="skopeo",
            env=env,
            check=check,
            log=self.log_text,
        )

    def _tls_args(self, prefix: str) -> list[str]:
        if self.tls:
            return [f"--{prefix}cert-dir", str(self.certs_d / self.host)]
        return [f"--{prefix}tls-verify=false"]

    def push(self, layout: Path, tag: str, ref: str) -> None:
        """``skopeo copy oci:LAYOUT:TAG docker://HOST/REF`` with the user's credentials,
        keeping the manifest byte for byte (so its digest is build_oci_layout's)."""
        self.skopeo(
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-authfile",
            str(self.authfile),
            *self._tls_args("dest-"),
            f"oci:{layout}:{tag}",
            f"docker://{self.host}/{ref}",
        )

    def inspect_raw(self, ref: str) -> bytes:
        """The manifest as the registry serves it, fetched by skopeo."""
        return self.skopeo(
            "inspect",
            "--raw",
            "--authfile",
            str(self.authfile),
            *self._tls_args(""),
            f"docker://{self.host}/{ref}",
        ).stdout

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes."""
        algorithm, _, hexdigest = digest.partition(":")
        assert algorithm == "sha256" and len(hexdigest) == 64, digest
        return self.root / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"

    def authorization(self, repo: str, actions: str = "pull") -> str | None:
        """An Authorization header value for ``actions`` on ``repo``: basic credentials,
        a fresh token from the issuer, or None for a registry without auth."""
        if self.auth == "htpasswd":
            return f"Basic {_basic(self.user, self.password)}"
        if self.auth == "token":
            return f"Bearer {self.fetch_token(f'repository:{repo}:{actions}')}"
        return None

    def curl(self, path: str, *args: str, authorization: str | None = None) -> CurlResult:
        """``curl URL/PATH ARGS`` trusting only our CA, no proxy, bounded; the status, body
        and headers, whatever the status (a 401 is an answer, not an error)."""
        out = self.workdir / "curl" / secrets.token_hex(6)
        out.mkdir(parents=True)
        header = [] if authorization is None else ["-H", f"Authorization: {authorization}"]
        result = run_tool(
            [
                require_tool("curl"),
                *("--silent", "--show-error", "--noproxy", "*", "--max-time", "30"),
                *(["--cacert", str(self.ca)] if self.tls else []),
                *("--output", str(out / "body"), "--dump-header", str(out / "headers")),
                *("--write-out", "%{http_code}"),
                *header,
                *args,
                f"{self.url}{path}",
            ],
            why="curl",
            log=self.log_text,
        )
        return CurlResult(
            status=int(result.stdout.decode().strip() or 0),
            body=(out / "body").read_bytes() if (out / "body").exists() else b"",
            headers=(out / "headers").read_text(errors="replace"),
        )

    def fetch_token(
        self, *scopes: str, user: str | None = None, password: str | None = None
    ) -> str:
        """A token from the issuer for ``scopes`` (``repository:NAME:pull``), with the
        registry's credentials unless others are given; ``user=""`` asks anonymously."""
        query = urllib.parse.urlencode([("service", SERVICE), *(("scope", s) for s in scopes)])
        request = urllib.request.Request(f"{self.token_realm}?{query}")
        user = self.user if user is None else user
        if user:
            secret = self.password if password is None else password
            request.add_header("Authorization", f"Basic {_basic(user, secret)}")
        with urlopen(request, context=self.ssl_context()) as r:
            body = json.load(r)
        token: str = body["token"]
        return token


def _write_config(
    path: Path, *, host: str, root: Path, tls: tuple[Path, Path] | None, auth: dict[str, Any]
) -> None:
    """The registry's config.yml, written as JSON (YAML's flow subset: no YAML writer needed)."""
    http: dict[str, Any] = {"addr": host, "secret": secrets.token_hex(32)}
    if tls is not None:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
    }
    if auth:
        config["auth"] = auth
    path.write_text(json.dumps(config, indent=2) + "\n")


def start_registry(
    tmp: Path,
    *,
    tls: bool = True,
    auth: Auth = "htpasswd",
    user: str = "tester",
    password: str | None = None,
) -> Registry:
    """A running docker-registry with its storage, certificates and config under ``tmp``;
    the caller must close() it. A port lost to another process between choosing and binding
    is retried with a new one."""
    tmp.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(12) if password is None else password
    root = tmp / "storage"
    root.mkdir(exist_ok=True)
    ca = trustme.CA()
    ca_pem = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    server_tls: tuple[Path, Path] | None = None
    if tls:
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        server_tls = (tmp / "server.pem", tmp / "server-key.pem")
        leaf.cert_chain_pems[0].write_to_path(str(server_tls[0]))
        leaf.private_key_pem.write_to_path(str(server_tls[1]))

    issuer: TokenIssuer | None = None
    auth_config: dict[str, Any] = {}
    if auth == "htpasswd":
        line = run_tool([require_tool("htpasswd"), "-Bbn", user, password], why="htpasswd")
        (tmp / "htpasswd").write_bytes(line.stdout.strip() + b"\n")
        auth_config = {"htpasswd": {"realm": "test-registry", "path": str(tmp / "htpasswd")}}
    elif auth == "token":
        signer_ca = (
            trustme.CA()
        )  # apart from the TLS CA: trusting a server is not trusting its tokens
        signer_ca.cert_pem.write_to_path(str(tmp / "token-ca.pem"))
        issuer = TokenIssuer(
            user=user, password=password, signer_ca=signer_ca, tls_ca=ca if tls else None
        )
        auth_config = {
            "token": {
                "realm": issuer.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(tmp / "token-ca.pem"),
            }
        }

    try:
        for attempt in range(3):
            host = f"127.0.0.1:{free_port()}"
            certs_d = tmp / "certs.d"
            shutil.rmtree(certs_d, ignore_errors=True)
            (certs_d / host).mkdir(parents=True)
            (certs_d / host / "ca.crt").write_bytes(ca_pem.read_bytes())
            authfile = tmp / "auth.json"
            authfile.write_text(json.dumps({"auths": {host: {"auth": _basic(user, password)}}}))
            config = tmp / "config.yml"
            _write_config(config, host=host, root=root, tls=server_tls, auth=auth_config)
            registry = Registry(
                host=host,
                root=root,
                ca=ca_pem,
                certs_d=certs_d,
                user=user,
                password=password,
                authfile=authfile,
                tls=tls,
                config=config,
                auth=auth,
                workdir=tmp,
                log_file=tmp / f"registry-{attempt}.log",
                issuer=issuer,
            )
            try:
                registry.start()
            except AssertionError:
                if attempt < 2 and "address already in use" in registry.log_text():
                    continue
                raise
            return registry
        raise AssertionError("unreachable")  # the last attempt returned or raised
    except BaseException:
        if issuer is not None:
            issuer.stop()
        raise


def _add_blob(blobs: Path, source: Path | bytes, media_type: str) -> dict[str, Any]:
    """Store a blob under its sha256 (streamed: layers are whole images) → its descriptor."""
    blobs.mkdir(parents=True, exist_ok=True)
    partial = blobs / f".partial-{secrets.token_hex(8)}"
    digest = hashlib.sha256()
    size = 0
    with partial.open("wb") as out:
        if isinstance(source, bytes):
            digest.update(source)
            out.write(source)
            size = len(source)
        else:
            with source.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
    partial.replace(blobs / digest.hexdigest())
    return {"mediaType": media_type, "digest": f"sha256:{digest.hexdigest()}", "size": size}


def build_oci_layout(
    dir: Path,
    layers: Sequence[Path],
    tag: str,
    *,
    media_type: str = EROFS_LAYER_MEDIA_TYPE,
    annotations: Mapping[str, str] | None = None,
    architecture: str = "amd64",
    os: str = "linux",
) -> str:
    """An OCI image layout at ``dir`` (added to one already there; the same tag is replaced)
    whose image ``tag`` has one layer per file, each file's bytes as they are (EROFS is not
    compressed by the registry path), and ``annotations`` on the manifest. → its digest."""
    blobs = dir / "blobs" / "sha256"
    layer_descriptors = [_add_blob(blobs, layer, media_type) for layer in layers]
    config = {
        "architecture": architecture,
        "os": os,
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descriptors]},
    }
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": _add_blob(blobs, _canonical(config), CONFIG_MEDIA_TYPE),
        "layers": layer_descriptors,
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    descriptor = _add_blob(blobs, json.dumps(manifest, indent=2).encode(), MANIFEST_MEDIA_TYPE)
    (dir / "oci-layout").write_text(json.dumps(OCI_LAYOUT))
    index_path = dir / "index.json"
    index: dict[str, Any] = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ] + [{**descriptor, "annotations": {REF_NAME: tag}}]
    index_path.write_text(json.dumps(index, indent=2))
    digest: str = descriptor["digest"]
    return digest
