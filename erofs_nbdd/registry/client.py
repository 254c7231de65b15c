"""An OCI distribution client over httpx: the few calls a server and ``push`` make, each
bounded in bytes and in time whatever the registry does (errors.py says what can fail)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urljoin

import httpx
import trio
from httpcore._async.http11 import AsyncHTTP11Connection

from .auth import RegistryAuth
from .credentials import tls_context
from .errors import AuthError, NotFound, RegistryError, TrustError, Unreachable
from .manifest import ACCEPT, MAX_BLOB, MAX_MANIFEST, sha256_digest

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from pathlib import Path

    from .credentials import Credentials
    from .reference import RegistrySpec

log = logging.getLogger(__name__)
# httpcore reads a connection 64 KiB at a time; each read costs ~0.1 ms of Python (httpcore,
# h11, anyio) here, which held cold fetches to ~200 MiB/s. Larger reads return what the
# socket holds, so they cost nothing when less has arrived.
AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024
# httpx logs each request at INFO: URLs carry no secret, but one line a chunk is noise
logging.getLogger("httpx").setLevel(logging.WARNING)

#: Connections one server keeps to one registry: the most fetches in flight at once.
MAX_CONNECTIONS = 16
#: Pages asked of the catalog and tag lists.
PAGE = 1000
MAX_PAGES = 100
#: Largest page of a catalog or tag list read.
MAX_LISTING = 16 * 1024 * 1024

__all__ = ["AuthError", "NotFound", "RegistryClient", "RegistryError", "TrustError", "Unreachable"]


class _Enough(Exception):
    """A sink has what it wanted: the rest of the answer is not read."""


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _check_range(header: str, start: int, size: int, what: str) -> None:
    """A 206 must answer from the byte asked for, of a blob of the size the manifest said."""
    unit, _, rest = header.partition(" ")
    first, _, total = rest.partition("-")[0], None, rest.rpartition("/")[2]
    try:
        if unit != "bytes" or int(first) != start or (total != "*" and int(total) != size):
            raise ValueError(header)
    except ValueError:
        raise RegistryError(
            f"{what}: answered {header or 'no Content-Range'}, not bytes from {start} of {size}"
        ) from None


def _trust_problem(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_message or str(seen)
        if isinstance(seen, ssl.SSLError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


class RegistryClient:
    def __init__(
        self,
        spec: RegistrySpec,
        credentials: Credentials | None,
        *,
        certs_d: tuple[Path, ...] = (),
        timeout: float = 10.0,
    ) -> None:
        self.spec = spec
        self.auth = RegistryAuth(httpx.URL(spec.base_url), spec.host, credentials)
        #: Longest a request for metadata may take in all (httpx's timeout is per read).
        self.deadline = 3 * timeout
        verify: ssl.SSLContext | bool = tls_context(spec.host, certs_d) if spec.tls else False
        self._http = httpx.AsyncClient(
            base_url=spec.base_url,
            auth=self.auth,
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(
                max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
            ),
            follow_redirects=True,  # blobs 307 to object storage; httpx drops our auth there
            # identity: blob offsets are byte offsets, and no decompression bomb
            headers={"User-Agent": "erofs-nbdd", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def _wrap(self, exc: Exception, what: str) -> RegistryError:
        problem = _trust_problem(exc)
        if problem is not None:
            return TrustError(f"{self.spec.host}: its TLS certificate was refused: {problem}")
        if isinstance(exc, httpx.LocalProtocolError):
            # h11 quotes the offending header, which may hold a token
            reason = "refused to send a malformed request header"
        else:
            reason = str(exc) or type(exc).__name__
        return Unreachable(f"{self.spec.host}: {what}: {reason}")

    @contextlib.contextmanager
    def _answering(self, what: str, *, deadline: bool = True) -> Iterator[None]:
        """One request's bounds and errors, in one place: at most ``self.deadline`` in all
        (unless the caller bounds it), and httpx's failures as ours."""
        try:
            with trio.fail_after(self.deadline if deadline else math.inf):
                yield
        except trio.TooSlowError:
            raise Unreachable(
                f"{self.spec.host}: {what}: no answer in {self.deadline:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise self._wrap(exc, what) from exc

    async def _request(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: object
    ) -> httpx.Response:
        with self._answering(f"{method} {path}"):
            response = await self._http.request(method, path, headers=headers, **kw)  # type: ignore[arg-type]
        self._check(response, f"{method} {path}")
        return response

    async def _get_bounded(
        self, path: str, limit: int, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        """A GET whose body is read only up to ``limit`` bytes: a registry that sends more
        (a hostile or broken one) is refused before it costs memory."""
        what = f"GET {path}"
        with self._answering(what):
            async with self._http.stream("GET", path, headers=headers) as response:
                self._check(response, what)
                body = bytearray()
                async for data in response.aiter_raw():
                    body += data
                    if len(body) > limit:
                        raise RegistryError(f"{self.spec.host}: {what}: over {limit} bytes")
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            content=bytes(body),
            request=response.request,
        )

    def _check(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status < 300:
            return
        if status == 404:
            raise NotFound(f"{self.spec.host}: {what}: not found")
        if status >= 500 or status == 429:
            raise Unreachable(f"{self.spec.host}: {what}: HTTP {status}")
        if status in (401, 403):
            raise AuthError(f"{self.spec.host}: {what}: HTTP {status} (access denied)")
        raise RegistryError(f"{self.spec.host}: {what}: HTTP {status}")

    async def check(self) -> None:
        """``GET /v2/``: reachable, trusted, and our credentials good (a token registry is
        asked for a token; basic registries check the password here)."""
        await self._request("GET", "/v2/")

    async def _pages(self, path: str, key: str) -> list[str]:
        found: list[str] = []
        url: str | None = f"{path}?n={PAGE}"
        for _ in range(MAX_PAGES):
            if url is None:
                break
            response = await self._get_bounded(url, MAX_LISTING)
            try:
                values = response.json().get(key) or []
                if not isinstance(values, list):
                    raise ValueError(f"{key} is not a list")
            except (ValueError, AttributeError, RecursionError) as exc:
                raise RegistryError(f"{self.spec.host}: {path}: not JSON") from exc
            found.extend(str(v) for v in values)
            following = response.links.get("next", {}).get("url")
            url = urljoin(url, following) if following else None
            if url is not None and not url.startswith("/"):
                log.warning("%s: %s: ignored a next page elsewhere (%s)", self.spec.host, path, url)
                break
        return found

    async def catalog(self) -> list[str]:
        return await self._pages("/v2/_catalog", "repositories")

    async def tags(self, repository: str) -> list[str]:
        return await self._pages(f"/v2/{repository}/tags/list", "tags")

    async def manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """A manifest's bytes, digest and Content-Type; a digest reference is checked."""
        response = await self._get_bounded(
            f"/v2/{repository}/manifests/{reference}", MAX_MANIFEST, {"Accept": ACCEPT}
        )
        data = response.content
        digest = sha256_digest(data)
        claimed = response.headers.get("Docker-Content-Digest")
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(
                f"{self.spec.host}: {repository}@{reference}: the manifest sent has digest {digest}"
            )
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            log.warning(
                "%s: %s:%s: the registry says digest %s, the bytes are %s; using the bytes'",
                self.spec.host,
                repository,
                reference,
                claimed,
                digest,
            )
        return data, digest, response.headers.get("Content-Type", "")

    async def manifest_digest(self, repository: str, tag: str) -> str | None:
        """What a tag names now, by HEAD (no body), if the registry says; else None."""
        response = await self._request(
            "HEAD", f"/v2/{repository}/manifests/{tag}", headers={"Accept": ACCEPT}
        )
        digest = response.headers.get("Docker-Content-Digest", "")
        return digest if _DIGEST.fullmatch(digest) else None

    async def read_head(self, repository: str, digest: str, length: int, size: int) -> bytes:
        """The first ``length`` bytes of a blob, uncached (a superblock for LIST)."""
        got = bytearray()

        async def sink(at: int, data: bytes) -> None:
            if at != len(got):
                raise RegistryError(f"{self.spec.host}: {digest}: bytes out of order")
            got.extend(data[: length - len(got)])
            if len(got) >= length:
                raise _Enough

        with contextlib.suppress(_Enough), self._answering(f"{digest} bytes 0-{length - 1}"):
            await self.read_blob(repository, digest, 0, length, size, sink)
        return bytes(got)

    async def blob_size(self, repository: str, digest: str) -> int:
        response = await self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
        try:
            size = int(response.headers["Content-Length"])
        except (KeyError, ValueError) as exc:
            raise RegistryError(f"{self.spec.host}: {digest}: no size in HEAD") from exc
        if not 0 <= size <= MAX_BLOB:
            raise RegistryError(f"{self.spec.host}: {digest}: a blob of {size} bytes")
        return size

    async def read_blob(
        self,
        repository: str,
        digest: str,
        start: int,
        end: int,
        size: int,
        sink: Callable[[int, bytes], Awaitable[None]],
    ) -> None:
        """Bytes ``start`` to ``end`` (exclusive) of a blob of ``size`` bytes, handed to
        ``sink(offset, data)`` as they arrive (memory stays one network read). A registry
        that ignores Range sends the whole blob: all of it goes to the sink, from 0. No
        deadline here: the caller sets one for the whole fetch."""
        path = f"/v2/{repository}/blobs/{digest}"
        what = f"GET {path} bytes {start}-{end - 1}"
        at = start
        # the sink's own errors (the cache's) pass through
        with self._answering(what, deadline=False):
            async with self._http.stream(
                "GET", path, headers={"Range": f"bytes={start}-{end - 1}"}
            ) as response:
                self._check(response, what)
                stop = end
                if response.status_code == 206:
                    _check_range(response.headers.get("Content-Range", ""), start, size, what)
                else:
                    at, stop = 0, size  # 200: the whole blob
                async for data in response.aiter_raw():
                    data = data[: stop - at]
                    if data:
                        await sink(at, data)
                        at += len(data)
                    if at >= stop:
                        break
        if at < end:
            raise Unreachable(f"{self.spec.host}: {what}: the answer ended at byte {at}")

    async def has_blob(self, repository: str, digest: str) -> bool:
        try:
            await self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
        except NotFound:
            return False
        return True

    async def upload_blob(
        self, repository: str, digest: str, size: int, chunks: AsyncIterator[bytes]
    ) -> None:
        """POST an upload, PATCH its bytes as ``chunks`` yields them, PUT it closed."""
        response = await self._request("POST", f"/v2/{repository}/blobs/uploads/")
        location = response.headers.get("Location")
        sent = 0
        async for data in chunks:
            if location is None:
                raise RegistryError(f"{self.spec.host}: an upload without a Location")
            response = await self._request(
                "PATCH",
                location,
                content=data,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{sent}-{sent + len(data) - 1}",
                },
            )
            sent += len(data)
            location = response.headers.get("Location", location)
        if location is None or sent != size:
            raise RegistryError(f"{self.spec.host}: upload of {digest} sent {sent} of {size}")
        sep = "&" if "?" in location else "?"
        await self._request("PUT", f"{location}{sep}digest={digest}", content=b"")

    async def put_manifest(
        self, repository: str, reference: str, data: bytes, media_type: str
    ) -> str:
        response = await self._request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            content=data,
            headers={"Content-Type": media_type},
        )
        return response.headers.get("Docker-Content-Digest") or sha256_digest(data)
