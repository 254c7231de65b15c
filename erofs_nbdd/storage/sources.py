"""The server's sources as the command line names them: directories, and registries
(``oci://HOST[:PORT][/REPOSITORY]``) with their credentials, trust and the blob cache."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .catalog import Catalog
from .exports import ExportDirectory

if TYPE_CHECKING:
    from ..config import ServerConfig
    from .oci import RegistrySource

log = logging.getLogger(__name__)


class SourceError(Exception):
    """A source that cannot be served: the message names it, the cause and the fix."""


def build_catalog(config: ServerConfig) -> Catalog:
    """Every source opened (nothing is fetched yet: see ``check_registries``)."""
    directories = [ExportDirectory(root) for root in config.directories]
    registries: list[RegistrySource] = []
    texts = config.registry_sources
    if texts:  # httpx and its kin cost a server memory: imported only where used
        from ..config import default_cache_dir
        from ..registry.client import RegistryClient
        from ..registry.credentials import CredentialError, find_credentials
        from ..registry.manifest import host_platform
        from ..registry.reference import BadReference, parse_source
        from .blobcache import BlobCache
        from .oci import RegistrySource

        rc = config.registry
        cache_dir = rc.cache_dir or default_cache_dir()
        try:
            cache = BlobCache(cache_dir, rc.cache_size)
        except OSError as exc:
            raise SourceError(f"--cache {cache_dir}: cannot use it: {exc}") from exc
        for text in texts:
            try:
                spec, _ = parse_source(text)
                creds = find_credentials(spec.host, spec.repository, authfile=rc.authfile)
                client = RegistryClient(spec, creds, certs_d=rc.certs_d)
            except (BadReference, CredentialError) as exc:
                raise SourceError(str(exc)) from exc
            except OSError as exc:
                raise SourceError(f"{text}: {exc}") from exc
            registries.append(
                RegistrySource(
                    spec,
                    client,
                    cache,
                    platform=rc.platform or host_platform(),
                    timeout=rc.source_timeout,
                )
            )
    return Catalog(directories, registries, default_export=config.default_export)


async def check_registries(catalog: Catalog) -> None:
    """Each registry once, at start: refused credentials or certificates are fatal (a
    typo must not look like an outage); an unreachable registry only warns."""
    from ..registry.auth import AuthError
    from ..registry.client import RegistryError, TrustError

    for registry in catalog.registries:
        try:
            await registry.check()
        except TrustError as exc:
            raise SourceError(
                f"{registry}: {exc}; put its CA in /etc/containers/certs.d/"
                f"{registry.spec.host}/ca.crt (or pass --certs-d DIR)"
            ) from exc
        except AuthError as exc:
            raise SourceError(
                f"{registry}: {exc}; log in with `skopeo login {registry.spec.host}` or "
                "pass --authfile FILE"
            ) from exc
        except RegistryError as exc:
            raise SourceError(f"{registry}: {exc}") from exc
        log.info("%s: ready", registry)
