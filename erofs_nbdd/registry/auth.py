"""Registry authentication as an httpx auth flow: HTTP basic, and the token flow of the
distribution spec (a 401 with ``WWW-Authenticate: Bearer realm=...,service=...`` sends us to
the realm for a token of scope ``repository:NAME:pull``), tokens kept until they expire.

Credentials go only to the registry's own origin and to the token realm it names: a
redirect to object storage, a pagination link or an upload location elsewhere gets none,
and a challenge from anywhere else is not answered. Only the token response's body is read
here (bounded); every other response streams to its caller. Secrets stay in this object's
memory: nothing here logs a header, a token or a password.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from .errors import AuthError, Unreachable

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Generator

    from .credentials import Credentials

#: A token is renewed this long before it expires, so a request never carries a dead one.
RENEW_EARLY = 10.0
#: What the spec says to assume when a token response gives no expires_in.
DEFAULT_LIFETIME = 60.0
#: Largest token response read.
MAX_TOKEN_RESPONSE = 1024 * 1024
#: The request a token flow sends to the realm carries this extension.
TOKEN_REQUEST = "erofs-nbdd-token"

_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')
# greedy: a repository may hold a component named blobs or tags; what follows cannot
_REPOSITORY_PATH = re.compile(r"^/v2/(.+)/(?:manifests|blobs|tags)/")
#: RFC 6750's b64token: anything else (a newline, say) could end up in an error message.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

__all__ = ["AuthError", "RegistryAuth"]


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def scope_of(request: httpx.Request) -> str:
    """The token scope a request needs: the repository its path names, pull for reads and
    pull,push for writes; the catalog's scope for /v2/_catalog."""
    path = request.url.path
    if path.startswith("/v2/_catalog"):
        return "registry:catalog:*"
    match = _REPOSITORY_PATH.match(path)
    if match is None:
        return ""
    actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
    return f"repository:{match.group(1)}:{actions}"


class RegistryAuth(httpx.Auth):
    def __init__(self, origin: httpx.URL, host: str, credentials: Credentials | None) -> None:
        self.origin = origin
        self.host = host
        self.credentials = credentials
        #: basic or bearer, once the registry said which.
        self._scheme: str | None = None
        self._tokens: dict[str, tuple[str, float]] = {}  # scope: (token, renew at)

    def _ours(self, url: httpx.URL) -> bool:
        return (url.scheme, url.host, url.port) == (
            self.origin.scheme,
            self.origin.host,
            self.origin.port,
        )

    def _basic(self) -> str:
        assert self.credentials is not None
        pair = f"{self.credentials.username}:{self.credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    def _whose(self) -> str:
        if self.credentials is None:
            return "no credentials (none found for it in the auth files)"
        return f"the credentials from {self.credentials.origin}"

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """The flow below, reading only the token response's body (bounded)."""
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if outgoing.extensions.get(TOKEN_REQUEST):
                body = bytearray()
                async for data in response.aiter_raw():
                    body += data
                    if len(body) > MAX_TOKEN_RESPONSE:
                        await response.aclose()
                        raise AuthError(f"the token service of {self.host} sent too much")
                response._content = bytes(body)  # what .json() reads
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if not self._ours(request.url):
            yield request  # object storage, or a link elsewhere: no credentials go there
            return
        scope = scope_of(request)
        if self._scheme == "basic" and self.credentials is not None:
            request.headers["Authorization"] = self._basic()
        elif self._scheme == "bearer":
            cached = self._tokens.get(scope)
            if cached is not None and cached[1] > time.monotonic():
                request.headers["Authorization"] = f"Bearer {cached[0]}"
        response = yield request
        if response.status_code != 401:
            return
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if challenge is None:
            raise AuthError(f"{self.host} answered 401 without saying how to authenticate")
        self._scheme = challenge.scheme
        if challenge.scheme == "basic":
            if self.credentials is None or "Authorization" in request.headers:
                raise AuthError(f"{self.host} refused {self._whose()} (HTTP basic auth)")
            request.headers["Authorization"] = self._basic()
            response = yield request
            if response.status_code == 401:
                raise AuthError(f"{self.host} refused {self._whose()} (HTTP basic auth)")
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthError(f"{self.host} asks for {challenge.scheme} auth, which is not supported")
        token = yield from self._fetch_token(challenge, scope)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self._tokens.pop(scope, None)
            raise AuthError(
                f"{self.host} refused the token its token service gave for {scope or 'this'} "
                f"with {self._whose()}: do they have pull access?"
            )

    def _fetch_token(
        self, challenge: Challenge, scope: str
    ) -> Generator[httpx.Request, httpx.Response, str]:
        params = {"service": challenge.params.get("service", "")}
        wanted = challenge.params.get("scope") or scope
        if wanted:
            params["scope"] = wanted
        headers = {}
        realm = challenge.params["realm"]
        try:
            url = httpx.URL(realm)
        except (httpx.InvalidURL, ValueError):
            raise AuthError(f"{self.host} names a token realm that is not a URL") from None
        if url.scheme != "https" and not (url.scheme == "http" and self.origin.scheme == "http"):
            raise AuthError(
                f"{self.host} sends us for a token to a realm without TLS: refused, as the "
                "credentials would travel in the clear"
            )
        if self.credentials is not None:
            headers["Authorization"] = self._basic()
        response = yield httpx.Request(
            "GET", url, params=params, headers=headers, extensions={TOKEN_REQUEST: True}
        )
        status = response.status_code
        if status in (401, 403):
            raise AuthError(f"the token service of {self.host} refused {self._whose()}")
        if status >= 500 or status == 429:
            raise Unreachable(f"the token service of {self.host} answered HTTP {status}")
        if status != 200:
            raise AuthError(f"the token service of {self.host} answered HTTP {status}")
        try:
            body = json.loads(response.content)
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_LIFETIME)
        except (ValueError, AttributeError, TypeError, RecursionError):
            raise AuthError(f"the token service of {self.host} sent no token") from None
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            raise AuthError(f"the token service of {self.host} sent no usable token")
        renew = max(lifetime - RENEW_EARLY, lifetime / 2)
        self._tokens[scope] = (token, time.monotonic() + renew)
        return token
