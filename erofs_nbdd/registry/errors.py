"""What can go wrong with a registry, in the kinds callers treat differently: fix the
configuration (``AuthError``, ``TrustError``), fix the name (``NotFound``), try again later
(``Unreachable``: connection failures, timeouts, 5xx, 429), or give up (the rest)."""


class RegistryError(Exception):
    """Something the registry said or did that keeps a request from succeeding."""


class Unreachable(RegistryError):
    """Not reached now: worth retrying."""


class TrustError(RegistryError):
    """The registry's TLS certificate was refused."""


class NotFound(RegistryError):
    pass


class AuthError(RegistryError):
    """The registry refused us: bad credentials, or a token service that would not answer.
    The message names the registry and where the credentials came from, never a secret."""
